"""The pipeline split: which trunk layers each rank holds, decided from the weight files'
headers and each rank's memory budget before anything loads.

Rank 0 holds the embedding and the first layers; the last rank holds the last layers, the final
norm, the output head and the MTP layers (it drafts), and the embedding too when the head or the
MTP layers use it. Each rank caches its own layers' keys and values. The split is contiguous and
puts as many layers on each rank as keep the fullest rank, relative to its budget, as empty as
possible; a group that cannot hold the model is refused, naming the rank that is short.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgemtp.config import check_supported, load_config, num_mtp_layers
from edgemtp.errors import UserError
from edgemtp.planner import (
    BUDGET_FRACTION,
    DTYPE_BYTES,
    MAX_DRAFT,
    MIN_USEFUL_CONTEXT,
    SAFETENSORS_DTYPE_BYTES,
    MemoryBudget,
    activation_bytes,
    gib,
    kv_bytes_per_token_per_layer,
    layer_index,
    safetensors_entries,
    weight_files,
)


@dataclass(frozen=True)
class RankPlan:
    rank: int
    first_layer: int
    end_layer: int  # one past the last layer this rank runs
    weights: int
    kv_cache: int
    mtp_caches: int
    activations: int
    budget: MemoryBudget
    shards: int = 1  # tensor parallel: each of the rank's layers is this many ways split

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.mtp_caches + self.activations

    @property
    def usable(self) -> int:
        return int(self.budget.bytes * BUDGET_FRACTION)


# The trunk tensors mlx-lm's ``Model.shard`` splits over a tensor-parallel group (llama, qwen2,
# qwen3, deepseek_v3: attention projections, dense and expert MLPs, in HF and in mlx-lm names); the
# rest of a layer (norms, MLA's down-projections, the MoE router) is held whole by every rank.
_SHARDED = re.compile(r"\.(q_proj|q_b_proj|k_proj|v_proj|o_proj|kv_b_proj|embed_q|unembed_out|"
                      r"gate_proj|up_proj|down_proj)\.")


@dataclass(frozen=True)
class WeightSplit:
    """Weight bytes by where they go: per trunk layer, the embedding, norm + head, MTP layers."""

    layers: list[int]
    embedding: int
    head: int  # final norm and output head (0 for the head when tied to the embedding)
    mtp: int
    sharded: list[int]  # per trunk layer, the bytes tensor parallel splits (part of ``layers``)


def weight_split(model_dir: Path, config: dict) -> WeightSplit:
    """Read the safetensors headers (no data) of an HF checkpoint or an MLX directory."""
    files = weight_files(model_dir, config)  # checks there are weights; counts MTP copies once
    count = int(config["num_hidden_layers"])
    layers, sharded, embedding, head = [0] * count, [0] * count, 0, 0
    for path in sorted(model_dir.glob("*.safetensors")):
        if path.name.startswith(("mtp", "draft_vocab")):
            continue
        for name, (dtype, shape) in safetensors_entries(path).items():
            nbytes = SAFETENSORS_DTYPE_BYTES[dtype]
            for size in shape:
                nbytes *= size
            index = layer_index(name)
            if index is not None and index < count:
                layers[index] += nbytes
                sharded[index] += nbytes if _SHARDED.search(name) else 0
            elif index is None and "embed_tokens" in name:
                embedding += nbytes
            elif index is None:
                head += nbytes
    if not any(layers):
        raise UserError(f"{model_dir} holds no safetensors trunk layers; the pipeline runs HF checkpoints and MLX "
                        "directories (edgemtp convert --to mlx)")
    return WeightSplit(layers, embedding, head, files.mtp, sharded)


def split_layers(layer_need: list[int], fixed: list[int], usable: list[int]) -> list[int]:
    """Layers per rank (each at least one, in order) that make the fullest rank, as a share of
    its ``usable`` bytes, as empty as possible; ``fixed`` is what each rank holds besides layers."""
    ranks = len(usable)

    def counts_within(share: float) -> list[int] | None:
        counts, index = [], 0
        for rank in range(ranks):
            room = share * usable[rank] - fixed[rank]
            last_allowed = len(layer_need) - (ranks - rank - 1)  # leave one layer per later rank
            taken = 0
            while index < last_allowed and (rank == ranks - 1 or room >= layer_need[index]):
                room -= layer_need[index]
                index, taken = index + 1, taken + 1
            if taken == 0 or room < 0:
                return None
            counts.append(taken)
        return counts

    low, high = 0.0, 1.0
    while counts_within(high) is None:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if counts_within(middle) is not None else (middle, high)
    return counts_within(high)


def plan_pipeline(path: str | Path, budgets: list[MemoryBudget], context: int, dtype: str = "float32") -> list[RankPlan]:
    """One ``RankPlan`` per budget (rank); ``UserError`` naming the short rank when it does not fit."""
    model_dir = Path(path)
    config = load_config(model_dir)
    check_supported(config, model_dir / "config.json")
    ranks = len(budgets)
    weights = weight_split(model_dir, config)
    if ranks > len(weights.layers):
        raise UserError(f"{ranks} ranks for {len(weights.layers)} layers; launch at most {len(weights.layers)} ranks")
    per_token = kv_bytes_per_token_per_layer(config, DTYPE_BYTES[dtype])
    layer_need = [size + per_token * context for size in weights.layers]
    activations = activation_bytes(config, context)
    mtp_caches = per_token * MAX_DRAFT * context if num_mtp_layers(config) else 0
    # The last rank embeds too when the head is the tied embedding or the MTP layers use the
    # trunk's (an MTP layer with its own embedding counts in weights.mtp).
    last_embeds = bool(config.get("tie_word_embeddings")) or weights.mtp > 0
    fixed = [activations + (weights.embedding if rank == 0 else 0) for rank in range(ranks)]
    fixed[-1] += weights.head + weights.mtp + mtp_caches + (weights.embedding if last_embeds and ranks > 1 else 0)
    counts = split_layers(layer_need, fixed, [int(b.bytes * BUDGET_FRACTION) for b in budgets])
    plans, start = [], 0
    for rank, (count, budget) in enumerate(zip(counts, budgets)):
        end = start + count
        last = rank == ranks - 1
        plans.append(RankPlan(
            rank=rank, first_layer=start, end_layer=end,
            weights=sum(weights.layers[start:end]) + fixed[rank] - activations - (mtp_caches if last else 0),
            kv_cache=per_token * context * count, mtp_caches=mtp_caches if last else 0,
            activations=activations, budget=budget))
        start = end
    refuse_short(plans, model_dir, context)
    return plans


def refuse_short(plans: list[RankPlan], model_dir: Path, context: int) -> None:
    """A ``UserError`` naming the rank furthest over its budget, if any is."""
    short = [plan for plan in plans if plan.total > plan.usable]
    if short:
        plan = max(short, key=lambda p: p.total - p.usable)
        holds = (f"tensor parallel, 1/{plan.shards} of every layer" if plan.shards > 1
                 else f"layers {plan.first_layer}-{plan.end_layer - 1}")
        raise UserError(
            f"{model_dir} does not fit on {len(plans)} ranks at a {context}-token context: rank {plan.rank} ({holds}) "
            f"needs {gib(plan.total)} but {gib(plan.usable)} is usable ({plan.budget.source}), "
            f"{gib(plan.total - plan.usable)} short; add a machine, pass a smaller --max-kv-size, or convert with "
            "fewer bits (edgemtp convert --bits 4)")


def plan_largest_context(path: Path, budgets: list[MemoryBudget], max_kv_size: int | None, dtype: str,
                         cap: int, plan: Callable[..., list[RankPlan]] = plan_pipeline) -> tuple[list[RankPlan], int]:
    """The per-rank plans (``plan``: the pipeline's or tensor parallel's) at ``max_kv_size`` or,
    without one, at the longest context up to ``cap`` (halving) that fits every rank; the refusal
    names the rank that is short."""
    max_positions = int(load_config(path).get("max_position_embeddings") or cap)
    if max_kv_size is not None:
        if max_kv_size > max_positions:
            raise UserError(f"--max-kv-size {max_kv_size} exceeds the model's max_position_embeddings "
                            f"{max_positions}; pass --max-kv-size {max_positions} or less")
        return plan(path, budgets, max_kv_size, dtype), max_kv_size
    context = min(cap, max_positions)
    while True:
        try:
            return plan(path, budgets, context, dtype), context
        except UserError:
            if context // 2 < MIN_USEFUL_CONTEXT:
                raise
            context //= 2


def plan_rows(plans: list[RankPlan]) -> list[tuple[str, str]]:
    """(rank, what it holds) rows for ``inspect --ranks``."""
    rows = []
    for plan in plans:
        parts = ["embedding"] if plan.rank == 0 else []
        if plan.shards > 1:
            parts.append(f"1/{plan.shards} of layers {plan.first_layer}-{plan.end_layer - 1}")
        else:
            parts.append(f"layers {plan.first_layer}-{plan.end_layer - 1}")
        if plan.rank == (0 if plan.shards > 1 else len(plans) - 1):
            parts.append("final norm, head, MTP layers")
        rows.append((f"rank {plan.rank}", f"{', '.join(parts)}: weights {gib(plan.weights)}, KV cache "
                     f"{gib(plan.kv_cache + plan.mtp_caches)}, activations {gib(plan.activations)}, total "
                     f"{gib(plan.total)} of {gib(plan.usable)} usable ({plan.budget.source})"))
    return rows
