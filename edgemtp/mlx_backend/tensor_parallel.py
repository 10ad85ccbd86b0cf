"""Tensor parallel decoding over the ranks of an ``mlx.launch`` group.

Every rank holds a 1/N shard of every trunk layer, sharded by mlx-lm's own ``Model.shard`` and
loaded from its part of each tensor (``rank_weights.load_part``; the plan: ``edgemtp.tensor_plan``).
Rank 0 also holds the embedding, the final norm, the head and the MTP layers, and runs the engine
through ``TensorParallelBackend``, an ordinary ``Backend``; the other ranks ``serve``. Only rank 0
runs the engine because its adaptive draft length follows its own timings: engines on several
ranks would choose differently and fall out of step.

One trunk pass is four collectives outside the layers, all ``mx.distributed.all_sum`` (the ranks
with nothing to say add zeros): the header ``[op, rows, start]``, the rows rank 0 embedded, then
every rank runs the same sharded layers, whose own all_sums (after attention and after the MLP)
leave every rank with the same output; rank 0 applies the final norm and head, and a last all_sum
gathers every rank's status (``ranks.py``). ``start`` is where the pass begins in the caches, so a
rollback after verification is a local offset change on rank 0 and the other ranks trim to it
with the next pass.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from edgemtp.config import load_config
from edgemtp.distributed import Watchdog
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
from edgemtp.pipeline_plan import plan_largest_context
from edgemtp.tensor_plan import kv_head_shards, plan_tensor

TRUNK, STOP = 1, 2


def _all_sum(group, array: mx.array) -> mx.array:
    array = mx.distributed.all_sum(array, group=group)
    mx.eval(array)
    return array


def _gather_status(group, stage: MLXBackend, seconds: float) -> np.ndarray:
    """Every rank's status after a pass: each fills its own slot, the all_sum joins them."""
    mine = fill_status(np.zeros(group.size() * STATUS_FIELDS, dtype=np.float32), group.rank(), stage, seconds)
    return np.array(_all_sum(group, mx.array(mine)))


def serve(stage: MLXBackend, group, watchdog: Watchdog) -> None:
    """The loop of every rank but 0: take part in rank 0's passes until it says stop.

    Between passes a rank waits for the next header without a time limit (rank 0 may be a chat
    waiting for its user); a pass that has begun runs under the watchdog.
    """
    with watchdog.waiting_for(0, timed=False):
        op, rows, start = _all_sum(group, mx.zeros(3, dtype=mx.int32)).tolist()
    while op != STOP:
        with watchdog.waiting_for(0):
            h = _all_sum(group, mx.zeros((1, rows, stage.hidden_size), dtype=stage.dtype))
            began = time.perf_counter()
            trim_to(stage, start)
            mx.eval(stage.forward_layers(h)[0])
            _gather_status(group, stage, time.perf_counter() - began)
        with watchdog.waiting_for(0, timed=False):
            op, rows, start = _all_sum(group, mx.zeros(3, dtype=mx.int32)).tolist()


class TensorParallelBackend(RankedBackend):
    """Rank 0's view of the group: the ``Backend`` interface, each trunk step one sharded pass.

    The MTP layers stay whole on rank 0 rather than sharded: a draft step then runs on rank 0
    alone, with no message at all, where a sharded MTP block would pay two all_sums per drafted
    token; they are one or a few layers, so holding them whole costs little memory.
    """

    parallel = "tensor"

    def __init__(self, stage: MLXBackend, group, watchdog: Watchdog, plans, num_mtp_layers: int,
                 draft_ids: np.ndarray | None):
        super().__init__(stage, group, watchdog, plans, num_mtp_layers, draft_ids)
        self._others = list(range(1, self.size))

    def trunk_step(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if not tokens:
            raise ValueError("trunk_step needs at least one token")
        began = time.perf_counter()
        start, n = self.stage.trunk_len(), len(tokens)
        self._broken = True  # until the pass is over: a failed collective leaves the group unusable
        with self.watchdog.waiting_for(self._others):
            _all_sum(self.group, mx.array([TRUNK, n, start], dtype=mx.int32))
            h = _all_sum(self.group, self.stage.trunk.model.embed_tokens(mx.array([tokens], dtype=mx.int32)))
            computing = time.perf_counter()
            logits, hidden = finish(self.stage, *run_stage(self.stage, h, no_taps(self.stage, n)))
            mx.eval(logits, hidden)
            compute = time.perf_counter() - computing
            self._status = _gather_status(self.group, self.stage, compute)
        self._broken = False
        # The layers' own all_sums run inside the compute (one graph); what is left of the wall
        # time is the exchange of the header, the rows and the status.
        self._record_trunk(time.perf_counter() - began, compute)
        return np.array(logits), np.array(hidden)

    def reset(self) -> None:
        self.stage.reset()  # the other ranks start their next pass at position 0

    def mtp_step(self, depth: int, hidden: np.ndarray, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        began = time.perf_counter()
        out = self.stage.mtp_step(depth, hidden, tokens)
        seconds = time.perf_counter() - began
        self._record_mtp(seconds, seconds)
        return out

    def mtp_len(self, depth: int) -> int:
        return self.stage.mtp_len(depth)

    def mtp_rollback(self, depth: int, n: int) -> None:
        self.stage.mtp_rollback(depth, n)

    def close(self) -> None:
        """Tell every other rank to stop serving (unless a failed pass already ended the run)."""
        if self._broken:
            return
        with self.watchdog.waiting_for(self._others):
            _all_sum(self.group, mx.array([STOP, 0, 0], dtype=mx.int32))


def join_tensor_parallel(path: str | Path, group, *, max_kv_size: int | None, context_cap: int,
                         dtype: str = "float32", draft_vocab: bool = True) -> TensorParallelBackend:
    """Plan, load this rank's shards and, on rank 0, return the ``TensorParallelBackend``; every
    other rank serves rank 0's passes and leaves the process (exit code 0) when rank 0 closes."""
    path = Path(path)
    config = load_config(path)
    rank, size = group.rank(), group.size()
    plans, context = plan_largest_context(path, budgets(group), max_kv_size, dtype, context_cap, plan=plan_tensor)
    stage = load_part(path, 0, int(config["num_hidden_layers"]), embeds=rank == 0, finishes=rank == 0,
                      max_kv_size=context, dtype=dtype, draft_vocab=draft_vocab, group=group,
                      kv_head_shards=kv_head_shards(config, size))
    watchdog = start_serving(stage, group, serve)
    return TensorParallelBackend(stage, group, watchdog, plans, stage.num_mtp_layers, stage.draft_ids)
