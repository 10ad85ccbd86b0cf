"""Pipeline parallel decoding over the ranks of an ``mlx.launch`` group.

Each rank holds a contiguous slice of the trunk's layers (``edgemtp.pipeline_plan``) in an
``MLXBackend`` of its own, loaded from its own tensors only. Rank 0 runs the engine through
``PipelineBackend``, an ordinary ``Backend``; the other ranks ``serve``.

One trunk pass (prefill, a plain step or a verify pass over k+1 tokens): rank 0 embeds and runs
its layers and sends the hidden states on; every rank runs its layers and sends on; the last rank
applies the final norm and the head and returns logits and hidden states to rank 0 (its ring
neighbour). An MTP step goes from rank 0 straight to the last rank, which holds the MTP layers.
Every message is preceded by a header ``[op, rows, start, depth]``: ``start`` is where the pass
begins in the receiving rank's cache, so rolling back after verification costs no message; the
accepted count reaches every rank as the start of the next pass, and each rank trims its caches
to it. The last rank gets its headers from rank 0, the middle ranks from the rank before them.

Every reply carries a status vector, per rank: seconds computing, weights, caches and peak RSS
(MiB). Rank 0 subtracts the compute from a pass's wall time: what is left is communication.
"""

from __future__ import annotations

import atexit
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from edgemtp.checkpoint import Checkpoint
from edgemtp.config import is_qwen3_5, load_config, mtp_fusion_layers
from edgemtp.distributed import Watchdog, host_of, init_group, peer_timeout
from edgemtp.draft_vocab import load_draft_vocab
from edgemtp.engine.stats import peak_rss_bytes
from edgemtp.errors import UserError
from edgemtp.mlx_backend.backend import MLXBackend, build_modules, parse_dtype
from edgemtp.mlx_backend.models import output_head
from edgemtp.mlx_backend.weights import (
    cast,
    is_mlx_dir,
    iter_mtp_weights,
    iter_trunk_weights,
    mtp_layer_count,
    quantize_like_saved,
    read_mlx_dir,
)
from edgemtp.mtp_copies import own_parts
from edgemtp.pipeline_plan import RankPlan, plan_largest_context
from edgemtp.planner import MemoryBudget, detect_memory_budget

TRUNK, MTP, STOP = 1, 2, 3
STATUS_FIELDS = 4  # per rank: compute seconds, weight MiB, cache MiB, peak RSS MiB
MIB = 2**20


# --- loading one stage -----------------------------------------------------------


def _stage_name(name: str, first: int, end: int, keep_embedding: bool, last: bool) -> str | None:
    """A trunk tensor's name in a stage holding layers ``[first, end)``, or None if it is not the
    stage's. HF and mlx-lm names agree on ``model.layers.{i}.``, ``model.embed_tokens``, the rest."""
    prefix = "model.layers."
    if name.startswith(prefix):
        index, rest = name[len(prefix):].split(".", 1)
        return f"{prefix}{int(index) - first}.{rest}" if first <= int(index) < end else None
    if name.startswith("model.embed_tokens."):
        return name if keep_embedding else None
    return name if last else None


def load_stage(path: str | Path, plan: RankPlan, ranks: int, *, max_kv_size: int, dtype: str = "float32",
               draft_vocab: bool = True) -> MLXBackend:
    """An ``MLXBackend`` over layers ``[plan.first_layer, plan.end_layer)``, reading only the tensors
    this rank runs: the embedding on rank 0 (and on the last rank when the head or the MTP layers
    use it), the final norm, head and MTP layers on the last rank."""
    path = Path(path)
    config = load_config(path)
    first_rank, last = plan.rank == 0, plan.rank == ranks - 1
    mlx_dir = is_mlx_dir(path, config)
    if mlx_dir:
        trunk_weights, mtp_weights = read_mlx_dir(path)  # mx.load maps lazily: unused tensors are never read
        mtp_layers = mtp_layer_count(mtp_weights) if last else 0

        def has_own(index: int, part: str) -> bool:
            return f"layers.{index}.{part}.weight" in mtp_weights
    else:
        ckpt = Checkpoint.open(path)
        mtp_layers = ckpt.num_mtp_layers if last else 0

        def has_own(index: int, part: str) -> bool:
            return part in own_parts(ckpt, index)
    trunk, mtp = build_modules(config, mtp_layers, has_own)
    tied = "lm_head" not in trunk
    keep_embedding = first_rank or (last and (tied or any(not has_own(i, "embed_tokens") for i in range(mtp_layers))))
    inner = trunk.model
    inner.layers = inner.layers[plan.first_layer:plan.end_layer]
    if not keep_embedding:
        inner.pop("embed_tokens")
    if not last:
        inner.pop("norm")
        if not tied:
            trunk.pop("lm_head")

    def stage_name(name: str) -> str | None:
        return _stage_name(name, plan.first_layer, plan.end_layer, keep_embedding, last)

    compute_dtype = parse_dtype(dtype)
    if mlx_dir:
        trunk_weights = {stage_name(n): a for n, a in trunk_weights.items() if stage_name(n) is not None}
        for module, weights, quantization in ((trunk, trunk_weights, config.get("quantization")),
                                              (mtp, mtp_weights if last else {},
                                               config.get("mtp_quantization", config.get("quantization")))):
            if quantization:
                quantize_like_saved(module, quantization, weights)
            module.load_weights([(name, cast(name, array, compute_dtype)) for name, array in weights.items()])
    else:
        trunk.load_weights([(stage_name(name), array) for name, array in
                            iter_trunk_weights(ckpt, compute_dtype, keep=lambda n: stage_name(n) is not None)],
                           strict=True)
        if last:
            mtp.load_weights(list(iter_mtp_weights(ckpt, compute_dtype)), strict=True)
    mx.eval(trunk.parameters(), mtp.parameters())
    draft_ids = load_draft_vocab(path, int(config["vocab_size"])) if draft_vocab and last else None
    return MLXBackend(config, trunk, mtp, max_kv_size=max_kv_size, dtype=dtype, draft_ids=draft_ids)


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


def _status(stage: MLXBackend, status: mx.array, rank: int, seconds: float) -> mx.array:
    """``status`` with this rank's slot filled in."""
    values = np.array(status, dtype=np.float32)
    values[rank * STATUS_FIELDS:(rank + 1) * STATUS_FIELDS] = [
        seconds, stage.weight_bytes() / MIB, stage.cache_bytes() / MIB, peak_rss_bytes() / MIB]
    return mx.array(values)


def _trim_to(stage: MLXBackend, start: int, depth: int = 0) -> None:
    """Roll this rank's trunk caches (or MTP depth ``depth``'s) back to ``start`` positions."""
    length = stage.mtp_len(depth) if depth else stage.trunk_len()
    if start > length:
        raise RuntimeError(f"pipeline out of step: a pass starts at {start} but this rank holds {length} positions")
    if depth:
        stage.mtp_rollback(depth, length - start)
    else:
        stage.trunk_rollback(length - start)


def _finish(stage: MLXBackend, h: mx.array) -> tuple[mx.array, mx.array]:
    """Final norm and head on the last rank: float32 ``(n, V)`` logits and ``(n, H)`` hidden states."""
    hidden = stage.trunk.model.norm(h)
    logits = output_head(stage.trunk)(hidden)
    return logits[0].astype(mx.float32), hidden[0].astype(mx.float32)


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
                h = _recv(group, rank - 1, (1, rows, stage.hidden_size), stage.dtype)
            else:
                status = _recv(group, 0, status_shape, mx.float32)
                hidden = np.array(_recv(group, 0, (rows, stage.hidden_size), mx.float32))
                tokens = _recv(group, 0, (rows,), mx.int32).tolist()
        began = time.perf_counter()
        _trim_to(stage, start, depth if op == MTP else 0)
        if op == MTP:
            logits, h1 = stage.mtp_step(depth, hidden, tokens)
            out = [mx.array(logits), mx.array(h1)]
        else:
            h = stage.forward_layers(h)
            out = list(_finish(stage, h)) if last else [h]
            mx.eval(out)
        status = _status(stage, status, rank, time.perf_counter() - began)
        with watchdog.waiting_for(0 if last else rank + 1):
            _send(group, 0 if last else rank + 1, status, *out)


class PipelineBackend:
    """Rank 0's view of the pipeline: the ``Backend`` interface, each call one pass over the ranks."""

    def __init__(self, stage: MLXBackend, group, watchdog: Watchdog, plans: list[RankPlan], num_mtp_layers: int,
                 draft_ids: np.ndarray | None):
        self.stage, self.group, self.watchdog, self.plans = stage, group, watchdog, plans
        self.size = group.size()
        self.last = self.size - 1
        self.config = stage.config
        self.vocab_size, self.hidden_size = stage.vocab_size, stage.hidden_size
        self.max_context = stage.max_context
        self.num_mtp_layers = num_mtp_layers
        self.draft_ids = draft_ids if num_mtp_layers else None
        self._broken = False
        self._mtp_lens: dict[int, int] = {}  # what the last rank's MTP caches hold, as rank 0 knows it
        self._status = np.zeros(self.size * STATUS_FIELDS, dtype=np.float32)
        self._memory = self._status.reshape(self.size, STATUS_FIELDS)[:, 1:].copy()  # MiB, from the last trunk pass
        self.reset_pass_times()

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

    def _compute_seconds(self) -> float:
        return float(self._status[0::STATUS_FIELDS].sum())

    def trunk_step(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if not tokens:
            raise ValueError("trunk_step needs at least one token")
        began = time.perf_counter()
        start, n = self.stage.trunk_len(), len(tokens)
        h = self.stage.forward_layers(self.stage.trunk.model.embed_tokens(mx.array([tokens], dtype=mx.int32)))
        mx.eval(h)
        self._status[:] = 0
        self._status[:STATUS_FIELDS] = [time.perf_counter() - began, self.stage.weight_bytes() / MIB,
                                        self.stage.cache_bytes() / MIB, peak_rss_bytes() / MIB]
        logits, hidden = self._exchange(TRUNK, [h], n, start, 0,
                                        [((n, self.vocab_size), mx.float32), ((n, self.hidden_size), mx.float32)])
        wall = time.perf_counter() - began
        self._memory = self._status.reshape(self.size, STATUS_FIELDS)[:, 1:].copy()
        self.trunk_passes += 1
        self.trunk_seconds += wall
        self.trunk_communication += wall - self._compute_seconds()
        return np.array(logits), np.array(hidden)

    def trunk_len(self) -> int:
        return self.stage.trunk_len()

    def trunk_rollback(self, n: int) -> None:
        self.stage.trunk_rollback(n)  # the other ranks trim at the start of the next pass

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
        wall = time.perf_counter() - began
        self.mtp_steps += 1
        self.mtp_seconds += wall
        self.mtp_communication += wall - self._compute_seconds()
        return np.array(logits), np.array(h1)

    def mtp_len(self, depth: int) -> int:
        return self._mtp_lens.get(depth, 0)

    def mtp_rollback(self, depth: int, n: int) -> None:
        if depth in self._mtp_lens:
            self._mtp_lens[depth] -= min(n, self._mtp_lens[depth])

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
            "ranks": [{"rank": plan.rank, "host": host_of(plan.rank), "layers": [plan.first_layer, plan.end_layer],
                       "weight_bytes": int(memory[plan.rank, 0] * MIB), "cache_bytes": int(memory[plan.rank, 1] * MIB),
                       "peak_memory_bytes": int(memory[plan.rank, 2] * MIB)} for plan in self.plans],
            "trunk_passes": self.trunk_passes,
            "seconds_per_pass": self.trunk_seconds / passes,
            "communication_seconds_per_pass": self.trunk_communication / passes,
            "mtp_steps": self.mtp_steps,
            "communication_seconds_per_mtp_step": self.mtp_communication / steps,
        }

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


def _budgets(group) -> list[MemoryBudget]:
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


def join_pipeline(path: str | Path, *, max_kv_size: int | None, context_cap: int, dtype: str = "float32",
                  draft_vocab: bool = True) -> PipelineBackend:
    """Plan, load this rank's stage and, on rank 0, return the ``PipelineBackend``; every other
    rank serves rank 0's passes and leaves the process (exit code 0) when rank 0 closes."""
    path = Path(path)
    config = load_config(path)
    if is_qwen3_5(config):  # rollback recomputes whole steps on one rank
        raise UserError(f"Qwen3.5 ({config['model_type']}) does not run over several machines yet: its linear-attention "
                        "state rolls back by recomputing a step, which the pipeline does not do; run it "
                        "in one process, without mlx.launch")
    if mtp_fusion_layers(config):  # the fused feature needs inner layers that live on other ranks
        raise UserError("a fusion MTP head (mtp_fusion_layers) does not run over several machines yet; "
                        "run it in one process, without mlx.launch, or convert without the fusion head")
    group = init_group()
    rank, size = group.rank(), group.size()
    plans, context = plan_largest_context(path, _budgets(group), max_kv_size, dtype, context_cap)
    stage = load_stage(path, plans[rank], size, max_kv_size=context, dtype=dtype, draft_vocab=draft_vocab)
    watchdog = Watchdog(rank, peer_timeout())
    # Everyone loaded: from here on, waits are short. Loading takes as long as it takes (no time
    # limit), but a rank that fails to load ends the others with one line, not a traceback.
    with watchdog.waiting_for((rank + 1) % size, timed=False):
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    if rank != 0:
        serve(stage, group, watchdog)
        raise SystemExit(0)
    config = stage.config
    mtp_layers = (mtp_layer_count(read_mlx_dir(path)[1]) if is_mlx_dir(path, config)
                  else Checkpoint.open(path, validate=False).num_mtp_layers)
    draft_ids = load_draft_vocab(path, int(config["vocab_size"])) if draft_vocab and mtp_layers else None
    backend = PipelineBackend(stage, group, watchdog, plans, mtp_layers, draft_ids)
    atexit.register(backend.close)
    return backend
