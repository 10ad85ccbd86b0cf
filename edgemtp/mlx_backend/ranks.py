"""What both ways of running over an ``mlx.launch`` group share: joining it, each rank's memory
budget, the per-rank status vector, and rank 0's ``Backend`` bookkeeping (time per pass, the
report ``generate --json`` and the TUI show).

``pipeline.py`` splits the trunk's layers over the ranks; ``tensor_parallel.py`` splits every
layer. Either way rank 0 runs the engine through a ``RankedBackend`` subclass and the other
ranks serve its passes.

The status vector holds, per rank: seconds computing, weights, caches and peak RSS (MiB).
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from edgemtp.config import is_qwen3_5, load_config, mtp_fusion_layers
from edgemtp.distributed import Watchdog, host_of, init_group, peer_timeout
from edgemtp.engine.stats import peak_rss_bytes
from edgemtp.errors import UserError
from edgemtp.mlx_backend.backend import MLXBackend
from edgemtp.mlx_backend.models import output_head
from edgemtp.pipeline_plan import RankPlan
from edgemtp.planner import MemoryBudget, detect_memory_budget

STATUS_FIELDS = 4  # per rank: compute seconds, weight MiB, cache MiB, peak RSS MiB
MIB = 2**20


def fill_status(status: np.ndarray, rank: int, stage: MLXBackend, seconds: float) -> np.ndarray:
    """``status`` (float32, every rank's slots) with ``rank``'s filled in from its ``stage``."""
    status[rank * STATUS_FIELDS:(rank + 1) * STATUS_FIELDS] = [
        seconds, stage.weight_bytes() / MIB, stage.cache_bytes() / MIB, peak_rss_bytes() / MIB]
    return status


def budgets(group) -> list[MemoryBudget]:
    """Every rank's memory budget, shared among the ranks that run on one host."""
    rank, size = group.rank(), group.size()
    mine = detect_memory_budget()
    megabytes = np.zeros(size, dtype=np.float32)
    megabytes[rank] = mine.bytes / MIB
    everyone = np.array(mx.distributed.all_sum(mx.array(megabytes), group=group))
    hosts = [host_of(r) for r in range(size)]
    return [MemoryBudget(int(everyone[r] * MIB) // hosts.count(hosts[r]),
                         f"{mine.source} of {hosts[r]}" + (f", shared by {hosts.count(hosts[r])} ranks"
                                                            if hosts.count(hosts[r]) > 1 else ""))
            for r in range(size)]


def check_runs_on_several(config: dict) -> None:
    """Refuse, in one line, what neither split runs yet."""
    if is_qwen3_5(config):  # rollback recomputes whole steps on one rank
        raise UserError(f"Qwen3.5 ({config['model_type']}) does not run over several machines yet: its linear-attention "
                        "state rolls back by recomputing a step, which the pipeline does not do; run it "
                        "in one process, without mlx.launch")


def join_group(path: Path):
    """The checks every split makes before anything loads, then the group."""
    check_runs_on_several(load_config(path))
    return init_group()


def start_serving(stage: MLXBackend, group, serve: Callable[[MLXBackend, object, Watchdog], None]) -> Watchdog:
    """Once this rank has loaded: wait for every rank to load, then, on every rank but 0, serve
    rank 0's passes and leave the process (exit code 0) when rank 0 closes. Returns rank 0's
    watchdog."""
    rank, size = group.rank(), group.size()
    watchdog = Watchdog(rank, peer_timeout())
    # Loading takes as long as it takes (no time limit), but a rank that fails to load ends the
    # others with one line, not a traceback.
    with watchdog.waiting_for((rank + 1) % size, timed=False):
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    if rank != 0:
        serve(stage, group, watchdog)
        raise SystemExit(0)
    return watchdog


def trim_to(stage: MLXBackend, start: int, depth: int = 0) -> None:
    """Roll this rank's trunk caches (or MTP depth ``depth``'s) back to ``start`` positions."""
    length = stage.mtp_len(depth) if depth else stage.trunk_len()
    if start > length:
        raise RuntimeError(f"ranks out of step: a pass starts at {start} but this rank holds {length} positions")
    if depth:
        stage.mtp_rollback(depth, length - start)
    else:
        stage.trunk_rollback(length - start)


def run_stage(stage: MLXBackend, h: mx.array, taps: list[mx.array]) -> tuple[mx.array, list[mx.array]]:
    """``h`` through ``stage``'s trunk layers. ``taps``: a fusion head's inner-layer outputs so far,
    one per fusion layer (placeholders for layers that a later stage holds); returned with this
    stage's own filled in. Without a fusion head ``taps`` is empty."""
    end = stage.first_layer + len(stage.trunk.model.layers)
    fusion = mtp_fusion_layers(stage.config) or ()
    mine = [i for i in fusion if stage.first_layer <= i < end]
    h, tapped = stage.forward_layers(h, tuple(i - stage.first_layer for i in mine))
    filled = dict(zip(mine, tapped))
    return h, [filled.get(layer, tap) for layer, tap in zip(fusion, taps)]


def finish(stage: MLXBackend, h: mx.array, taps: list[mx.array]) -> tuple[mx.array, mx.array]:
    """Final norm and head (the pipeline's last rank, tensor parallel's rank 0): float32 ``(n, V)``
    logits and ``(n, H)`` hidden states, the fused feature for a fusion head (``models.run_trunk``)."""
    hidden = stage.trunk.model.norm(h)
    logits = output_head(stage.trunk)(hidden)
    if stage.fusion:
        hidden = stage.fusion[1].fuse(taps, hidden)
    return logits[0].astype(mx.float32), hidden[0].astype(mx.float32)


def no_taps(stage: MLXBackend, rows: int) -> list[mx.array]:
    """Placeholders for a pass's fusion taps (``run_stage``), one per fusion layer."""
    return [mx.zeros((1, rows, stage.hidden_size), dtype=stage.dtype)] * len(mtp_fusion_layers(stage.config) or ())


class RankedBackend:
    """Rank 0's side of a group, as the engine's ``Backend``: what the pipeline and the tensor
    parallel backends share. Subclasses run the passes and call ``_record_trunk``/``_record_mtp``."""

    parallel = ""  # "pipeline" or "tensor", named in the report

    def __init__(self, stage: MLXBackend, group, watchdog: Watchdog, plans: list[RankPlan], num_mtp_layers: int,
                 draft_ids: np.ndarray | None):
        self.stage, self.group, self.watchdog, self.plans = stage, group, watchdog, plans
        self.size = group.size()
        self.config = stage.config
        self.vocab_size, self.hidden_size = stage.vocab_size, stage.hidden_size
        self.max_context = stage.max_context
        self.num_mtp_layers = num_mtp_layers
        self.draft_ids = draft_ids if num_mtp_layers else None
        self._broken = False  # a failed exchange leaves the group unusable: close sends nothing
        self._status = np.zeros(self.size * STATUS_FIELDS, dtype=np.float32)
        self._memory = self._status.reshape(self.size, STATUS_FIELDS)[:, 1:].copy()  # MiB, from the last trunk pass
        self.reset_pass_times()
        atexit.register(self.close)

    def close(self) -> None:
        raise NotImplementedError

    def _record_trunk(self, wall: float, compute: float) -> None:
        self._memory = self._status.reshape(self.size, STATUS_FIELDS)[:, 1:].copy()
        self.trunk_passes += 1
        self.trunk_seconds += wall
        self.trunk_communication += wall - compute

    def _record_mtp(self, wall: float, compute: float) -> None:
        self.mtp_steps += 1
        self.mtp_seconds += wall
        self.mtp_communication += wall - compute

    def trunk_len(self) -> int:
        return self.stage.trunk_len()

    def trunk_rollback(self, n: int) -> None:
        self.stage.trunk_rollback(n)  # the other ranks trim at the start of the next pass

    def weight_bytes(self) -> int:
        """Weights of every rank (as their last status said; rank 0's own before the first pass)."""
        reported = int(self._memory[:, 0].sum() * MIB)
        return reported or self.stage.weight_bytes()

    def cache_bytes(self) -> int:
        reported = int(self._memory[:, 1].sum() * MIB)
        return reported or self.stage.cache_bytes()

    # --- what the stats report -------------------------------------------------------

    def reset_pass_times(self) -> None:
        self.trunk_passes = self.mtp_steps = 0
        self.trunk_seconds = self.trunk_communication = self.mtp_seconds = self.mtp_communication = 0.0

    def ranks_report(self) -> dict:
        """Per rank memory (from the last trunk pass) and time per pass since ``reset_pass_times``."""
        passes, steps = max(self.trunk_passes, 1), max(self.mtp_steps, 1)
        memory = self._memory
        return {
            "parallel": self.parallel,
            "ranks": [{"rank": plan.rank, "host": host_of(plan.rank), "layers": [plan.first_layer, plan.end_layer],
                       "shards": plan.shards,
                       "weight_bytes": int(memory[plan.rank, 0] * MIB), "cache_bytes": int(memory[plan.rank, 1] * MIB),
                       "peak_memory_bytes": int(memory[plan.rank, 2] * MIB)} for plan in self.plans],
            "trunk_passes": self.trunk_passes,
            "seconds_per_pass": self.trunk_seconds / passes,
            "communication_seconds_per_pass": self.trunk_communication / passes,
            "mtp_steps": self.mtp_steps,
            "communication_seconds_per_mtp_step": self.mtp_communication / steps,
        }
