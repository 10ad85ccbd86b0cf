"""Pipeline parallel decoding over the ranks of an ``mlx.launch`` group.

Each rank holds a contiguous slice of the trunk's layers (``edgemtp.pipeline_plan``) in an
``MLXBackend`` of its own, loaded from its own tensors only. Rank 0 runs the engine through
``PipelineBackend``, an ordinary ``Backend``; the other ranks ``serve``.

One trunk pass (prefill, a plain step or a verify pass over k+1 tokens): rank 0 embeds and runs
its layers and sends the hidden states on; every rank runs its layers and sends on; the last rank
applies the final norm and the head and returns logits and hidden states to rank 0 (its ring
neighbour). With a fusion head the inner layers' outputs it reads travel with the hidden states,
each filled in by the rank that holds its layer, and the last rank returns the fused feature. An
MTP step goes from rank 0 straight to the last rank, which holds the MTP layers.
Every message is preceded by a header ``[op, rows, start, depth]``: ``start`` is where the pass
begins in the receiving rank's cache, so rolling back after verification costs no message; the
accepted count reaches every rank as the start of the next pass, and each rank trims its caches
to it. The last rank gets its headers from rank 0, the middle ranks from the rank before them.

Every reply carries the status vector (``ranks.py``): per rank, seconds computing, weights, caches
and peak RSS. Rank 0 subtracts every rank's compute from a pass's wall time: what is left is
communication.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from edgemtp.checkpoint import Checkpoint
from edgemtp.config import mtp_fusion_layers
from edgemtp.distributed import Watchdog
from edgemtp.draft_vocab import load_draft_vocab
from edgemtp.errors import UserError
from edgemtp.mlx_backend.backend import MLXBackend
from edgemtp.mlx_backend.rank_weights import load_part
from edgemtp.mlx_backend.ranks import (
    STATUS_FIELDS,
    RankedBackend,
    budgets,
    fill_status,
    finish,
    no_taps,
    run_stage,
    start_serving,
    trim_to,
)
from edgemtp.mlx_backend.weights import is_mlx_dir, mtp_layer_count, read_mlx_dir
from edgemtp.pipeline_plan import RankPlan, plan_largest_context

TRUNK, MTP, STOP = 1, 2, 3


# --- loading one stage -----------------------------------------------------------


def load_stage(path: str | Path, plan: RankPlan, ranks: int, *, max_kv_size: int, dtype: str = "float32",
               draft_vocab: bool = True) -> MLXBackend:
    """An ``MLXBackend`` over layers ``[plan.first_layer, plan.end_layer)``, reading only the tensors
    this rank runs: the embedding on rank 0 (and on the last rank when the head or the MTP layers
    use it), the final norm, head and MTP layers on the last rank."""
    return load_part(path, plan.first_layer, plan.end_layer, embeds=plan.rank == 0, finishes=plan.rank == ranks - 1,
                     max_kv_size=max_kv_size, dtype=dtype, draft_vocab=draft_vocab)


# --- the exchanges ---------------------------------------------------------------


def _send(group, dst: int, *arrays: mx.array) -> None:
    # One at a time: sends evaluated together may leave in any order, and the receiver expects
    # each array's shape in turn.
    for array in arrays:
        mx.eval(mx.distributed.send(array, dst, group=group))


def _recv(group, src: int, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    array = mx.distributed.recv(shape, dtype, src, group=group)
    mx.eval(array)
    return array


def serve(stage: MLXBackend, group, watchdog: Watchdog) -> None:
    """The loop of every rank but 0: run passes until rank 0 says stop.

    Between passes a rank waits for the next one without a time limit (rank 0 may be a chat
    waiting for its user); a pass that has begun runs under the watchdog.
    """
    rank, size = group.rank(), group.size()
    last = rank == size - 1
    source = 0 if last else rank - 1  # where headers come from
    status_shape = (size * STATUS_FIELDS,)
    while True:
        with watchdog.waiting_for(source, timed=False):
            op, rows, start, depth = _recv(group, source, (4,), mx.int32).tolist()
        if not last and rank + 1 != size - 1:  # the last rank hears from rank 0 directly
            _send(group, rank + 1, mx.array([op, rows, start, depth], dtype=mx.int32))
        if op == STOP:
            return
        with watchdog.waiting_for(0 if op == MTP else rank - 1):
            if op == TRUNK:
                status = _recv(group, rank - 1, status_shape, mx.float32)
                h, *taps = [_recv(group, rank - 1, (1, rows, stage.hidden_size), stage.dtype)
                            for _ in range(1 + len(mtp_fusion_layers(stage.config) or ()))]
            else:
                status = _recv(group, 0, status_shape, mx.float32)
                hidden = np.array(_recv(group, 0, (rows, stage.hidden_size), mx.float32))
                tokens = _recv(group, 0, (rows,), mx.int32).tolist()
        began = time.perf_counter()
        trim_to(stage, start, depth if op == MTP else 0)
        if op == MTP:
            logits, h1 = stage.mtp_step(depth, hidden, tokens)
            out = [mx.array(logits), mx.array(h1)]
        else:
            h, taps = run_stage(stage, h, taps)
            out = list(finish(stage, h, taps)) if last else [h, *taps]
            mx.eval(out)
        status = mx.array(fill_status(np.array(status, dtype=np.float32), rank, stage, time.perf_counter() - began))
        with watchdog.waiting_for(0 if last else rank + 1):
            _send(group, 0 if last else rank + 1, status, *out)


class PipelineBackend(RankedBackend):
    """Rank 0's view of the pipeline: the ``Backend`` interface, each call one pass over the ranks."""

    parallel = "pipeline"

    def __init__(self, stage: MLXBackend, group, watchdog: Watchdog, plans: list[RankPlan], num_mtp_layers: int,
                 draft_ids: np.ndarray | None):
        super().__init__(stage, group, watchdog, plans, num_mtp_layers, draft_ids)
        self.last = self.size - 1
        self._mtp_lens: dict[int, int] = {}  # what the last rank's MTP caches hold, as rank 0 knows it

    def _header(self, op: int, rows: int, start: int, depth: int = 0) -> mx.array:
        return mx.array([op, rows, start, depth], dtype=mx.int32)

    def _exchange(self, op: int, send_to_first: list[mx.array], rows: int, start: int, depth: int,
                  reply: list[tuple[tuple[int, ...], mx.Dtype]]) -> list[mx.array]:
        header = self._header(op, rows, start, depth)
        status = mx.array(self._status)
        self._broken = True  # until the reply is in: a failed exchange leaves the pipeline unusable
        with self.watchdog.waiting_for(1):
            if op == TRUNK or self.last == 1:
                _send(self.group, 1, header)
        with self.watchdog.waiting_for(self.last):
            if self.last != 1:
                _send(self.group, self.last, header)
        target = 1 if op == TRUNK else self.last
        with self.watchdog.waiting_for(target):
            _send(self.group, target, status, *send_to_first)
        with self.watchdog.waiting_for(self.last):
            status = _recv(self.group, self.last, self._status.shape, mx.float32)
            out = [_recv(self.group, self.last, shape, dtype) for shape, dtype in reply]
        self._status = np.array(status)
        self._broken = False
        return out

    def trunk_step(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if not tokens:
            raise ValueError("trunk_step needs at least one token")
        began = time.perf_counter()
        start, n = self.stage.trunk_len(), len(tokens)
        h, taps = run_stage(self.stage, self.stage.trunk.model.embed_tokens(mx.array([tokens], dtype=mx.int32)),
                            no_taps(self.stage, n))
        mx.eval(h, taps)
        self._status[:] = 0
        fill_status(self._status, 0, self.stage, time.perf_counter() - began)
        logits, hidden = self._exchange(TRUNK, [h, *taps], n, start, 0,
                                        [((n, self.vocab_size), mx.float32), ((n, self.hidden_size), mx.float32)])
        self._record_trunk(time.perf_counter() - began, self._compute_seconds())
        return np.array(logits), np.array(hidden)

    def _compute_seconds(self) -> float:
        """Every rank's compute in the last pass (the ranks run one after another)."""
        return float(self._status[0::STATUS_FIELDS].sum())

    def reset(self) -> None:
        self.stage.reset()
        self._mtp_lens.clear()

    def mtp_step(self, depth: int, hidden: np.ndarray, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if self.num_mtp_layers == 0:
            raise UserError("this model has no MTP layers (num_nextn_predict_layers is 0); "
                            "use a checkpoint with MTP weights or decode without MTP drafting")
        if not tokens or hidden.shape != (len(tokens), self.hidden_size):
            raise ValueError(f"mtp_step needs hidden of shape ({len(tokens)}, {self.hidden_size}), got {hidden.shape}")
        began = time.perf_counter()
        n, start = len(tokens), self.mtp_len(depth)
        columns = self.vocab_size if self.draft_ids is None else len(self.draft_ids)
        self._status[:] = 0
        logits, h1 = self._exchange(MTP, [mx.array(hidden.astype(np.float32)), mx.array(tokens, dtype=mx.int32)],
                                    n, start, depth, [((n, columns), mx.float32), ((n, self.hidden_size), mx.float32)])
        self._mtp_lens[depth] = start + n
        self._record_mtp(time.perf_counter() - began, self._compute_seconds())
        return np.array(logits), np.array(h1)

    def mtp_len(self, depth: int) -> int:
        return self._mtp_lens.get(depth, 0)

    def mtp_rollback(self, depth: int, n: int) -> None:
        if depth in self._mtp_lens:
            self._mtp_lens[depth] -= min(n, self._mtp_lens[depth])

    def close(self) -> None:
        """Tell every other rank to stop serving (unless a failed exchange already ended the run)."""
        if self._broken:
            return
        header = self._header(STOP, 0, 0)
        with self.watchdog.waiting_for(1):
            _send(self.group, 1, header)
        if self.last != 1:
            with self.watchdog.waiting_for(self.last):
                _send(self.group, self.last, header)


# --- joining the group -----------------------------------------------------------


def join_pipeline(path: str | Path, group, *, max_kv_size: int | None, context_cap: int, dtype: str = "float32",
                  draft_vocab: bool = True) -> PipelineBackend:
    """Plan, load this rank's stage and, on rank 0, return the ``PipelineBackend``; every other
    rank serves rank 0's passes and leaves the process (exit code 0) when rank 0 closes."""
    path = Path(path)
    rank, size = group.rank(), group.size()
    plans, context = plan_largest_context(path, budgets(group), max_kv_size, dtype, context_cap)
    stage = load_stage(path, plans[rank], size, max_kv_size=context, dtype=dtype, draft_vocab=draft_vocab)
    watchdog = start_serving(stage, group, serve)
    config = stage.config
    mtp_layers = (mtp_layer_count(read_mlx_dir(path)[1]) if is_mlx_dir(path, config)
                  else Checkpoint.open(path, validate=False).num_mtp_layers)
    draft_ids = load_draft_vocab(path, int(config["vocab_size"])) if draft_vocab and mtp_layers else None
    return PipelineBackend(stage, group, watchdog, plans, mtp_layers, draft_ids)
