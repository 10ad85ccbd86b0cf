"""Several machines: the process group ``mlx.launch`` starts, who is who, and a watchdog.

``mlx.launch`` starts one process per rank and tells it its rank (``MLX_RANK``) and, for the
``ring`` backend, the peers' addresses (``MLX_HOSTFILE``: a JSON list, per rank, of
``"ip:port"``). Messages go through ``mx.distributed`` (``send``/``recv`` between ring
neighbours); edgemtp adds no transport of its own.

What a surviving rank sees when a peer dies (measured with mlx 0.32.4, ring backend): a peer
whose process exits closes its sockets, and a pending ``recv`` raises ``RuntimeError("[ring]
connection to a peer was lost")`` within about a second. A peer that stops answering without
closing them (a frozen process, a host cut off the network) leaves ``recv`` waiting forever, so
every wait on a peer runs under a ``Watchdog`` that ends the process after ``peer_timeout()``
seconds with one line naming the rank and host it waited for.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator

from edgemtp.errors import UserError

# Seconds a rank waits on a peer before giving up. Long enough for a prefill of a long prompt
# on a large model; ``EDGEMTP_PEER_TIMEOUT`` changes it (the tests use a few seconds).
DEFAULT_PEER_TIMEOUT = 300.0


def launched() -> bool:
    """Whether this process is one rank of a group started by ``mlx.launch`` (more than one rank)."""
    return "MLX_RANK" in os.environ and (
        bool(os.environ.get("MLX_HOSTFILE")) or int(os.environ.get("MLX_WORLD_SIZE", "1")) > 1)


def init_group():
    """The ``mx.distributed`` group of this launch; a one-line error if it cannot form."""
    import mlx.core as mx

    try:
        return mx.distributed.init(strict=True)
    except RuntimeError as exc:
        raise UserError(f"could not join the mlx.launch group ({exc}); start every rank with "
                        "mlx.launch --hostfile HOSTS.json -- edgemtp ...") from None


def peer_timeout() -> float:
    value = os.environ.get("EDGEMTP_PEER_TIMEOUT")
    if value is None:
        return DEFAULT_PEER_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise UserError(f"EDGEMTP_PEER_TIMEOUT must be a number of seconds above 0, got {value!r}")
    return seconds


def host_of(rank: int) -> str:
    """The address ``rank`` runs at, from ``mlx.launch``'s hostfile ("?" when it is not known)."""
    path = os.environ.get("MLX_HOSTFILE")
    try:
        with open(path) as handle:
            return json.load(handle)[rank][0].rsplit(":", 1)[0]
    except (TypeError, OSError, ValueError, IndexError, KeyError):
        return "?"


def peer_name(rank: int | list[int]) -> str:
    """``rank 1 (10.0.0.2)``; for several ranks (a collective waits on all of them), each of them."""
    if isinstance(rank, list):
        return " or ".join(peer_name(r) for r in rank)
    return f"rank {rank} ({host_of(rank)})"


class Watchdog:
    """Ends the process with one line when a wait on a peer lasts longer than ``timeout`` seconds.

    ``with watchdog.waiting_for(rank): ...`` arms it around a blocking exchange. A thread checks
    the deadline; ``os._exit`` is the only way out of a ``recv`` that never returns, and it also
    closes this rank's sockets, so its other peers learn at once that it is gone.
    """

    def __init__(self, rank: int, timeout: float):
        self.rank = rank
        self.timeout = timeout
        self._deadline: float | None = None
        self._peer: int | list[int] = -1
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True, name="edgemtp-watchdog").start()

    @contextlib.contextmanager
    def waiting_for(self, peer: int | list[int], timed: bool = True) -> Iterator[None]:
        """Around an exchange with ``peer`` (or with each of several): ends the process after ``timeout`` seconds (when
        ``timed``), and turns a lost connection into a one-line ``UserError``."""
        if timed:
            with self._lock:
                self._deadline, self._peer = time.monotonic() + self.timeout, peer
        try:
            yield
        except RuntimeError as exc:  # mx.distributed's "connection to a peer was lost"
            raise UserError(f"rank {self.rank} lost the connection while waiting for {peer_name(peer)}: {exc}; "
                            "a rank stopped or its host is unreachable, see that rank's output") from None
        finally:
            with self._lock:
                self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.5, self.timeout / 4))
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                peer = self._peer
            if late:
                sys.stderr.write(f"error: rank {self.rank} waited {self.timeout:g} s for {peer_name(peer)} without an "
                                 "answer; that rank stopped or its host is unreachable (EDGEMTP_PEER_TIMEOUT sets the "
                                 "wait)\n")
                sys.stderr.flush()
                os._exit(2)
