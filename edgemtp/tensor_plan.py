"""Tensor parallel: whether a model can be split N ways, what each rank then holds, and which
split (pipeline or tensor parallel) a launch uses.

Every rank holds a 1/N shard of every trunk layer (mlx-lm's ``Model.shard``: attention heads and
MLP columns, experts sliced the same way) plus the parts of each layer that are not split. Rank 0
also holds the embedding, the final norm, the head and the MTP layers (whole: see
``mlx_backend/tensor_parallel.py``); the other ranks hold no more than their shards. Keys and
values are cached by head, so a rank caches its own heads' (1/N); MLA (deepseek_v3) caches one
latent that every head reads, so each rank caches all of it.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgemtp.config import check_supported, load_config, num_mtp_layers
from edgemtp.errors import UserError
from edgemtp.pipeline_plan import RankPlan, refuse_short, weight_split
from edgemtp.planner import (
    DTYPE_BYTES,
    MAX_DRAFT,
    MemoryBudget,
    activation_bytes,
    kv_bytes_per_token_per_layer,
)

PARALLEL_CHOICES = ("auto", "pipeline", "tensor")

# Architectures whose mlx-lm class has ``shard`` and that edgemtp runs sharded (tested on llama and
# deepseek_v3; qwen2 and qwen3 share llama's classes and sharding). The value: whether the key/value
# cache is split by head with them.
_SHARDABLE = {"llama": True, "qwen2": True, "qwen3": True, "deepseek_v3": False}


def tensor_refusal(config: dict, ranks: int) -> str | None:
    """Why this model cannot be split ``ranks`` ways (None when it can)."""
    model_type = config.get("model_type")
    if model_type not in _SHARDABLE:
        return (f"{model_type} layers cannot be split over ranks here (tensor parallel runs "
                f"{', '.join(sorted(_SHARDABLE))})")
    sizes = {"num_attention_heads": config["num_attention_heads"], "intermediate_size": config["intermediate_size"]}
    if _SHARDABLE[model_type]:
        sizes["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    else:
        sizes["moe_intermediate_size"] = config.get("moe_intermediate_size") or config["intermediate_size"]
    uneven = [f"{name} {value}" for name, value in sizes.items() if int(value) % ranks]
    if uneven:
        return f"{', '.join(uneven)} not divisible by {ranks} ranks"
    quantization = config.get("quantization")
    if quantization:  # a sharded-to-all layer's input is split: each rank's part must hold whole groups
        group = int(quantization["group_size"])
        inputs = {"intermediate_size": int(config["intermediate_size"]) // ranks}
        if "moe_intermediate_size" in sizes:
            inputs["moe_intermediate_size"] = int(sizes["moe_intermediate_size"]) // ranks
        short = [f"{name}/{ranks}" for name, value in inputs.items() if value % group]
        if short:
            return f"{', '.join(short)} is not a multiple of the quantization group size {group}"
    return None


def kv_head_shards(config: dict, ranks: int) -> int:
    """How many ways each rank's key/value cache is split (1 for MLA's shared latent)."""
    return ranks if _SHARDABLE.get(config.get("model_type")) else 1


def plan_tensor(path: str | Path, budgets: list[MemoryBudget], context: int, dtype: str = "float32") -> list[RankPlan]:
    """One ``RankPlan`` per rank (all layers, ``shards`` ways); ``UserError`` when the model cannot
    be split that way or a rank is short, naming why."""
    model_dir = Path(path)
    config = load_config(model_dir)
    check_supported(config, model_dir / "config.json")
    ranks = len(budgets)
    refusal = tensor_refusal(config, ranks)
    if refusal:
        raise UserError(f"{model_dir} cannot run tensor parallel over {ranks} ranks: {refusal}; "
                        "pass --parallel pipeline")
    weights = weight_split(model_dir, config)
    count = len(weights.layers)
    layers = sum(weights.layers) - sum(weights.sharded) + sum(weights.sharded) // ranks
    per_token = kv_bytes_per_token_per_layer(config, DTYPE_BYTES[dtype])
    kv_cache = per_token * context * count // kv_head_shards(config, ranks)
    mtp_caches = per_token * MAX_DRAFT * context if num_mtp_layers(config) else 0
    activations = activation_bytes(config, context)
    plans = [RankPlan(rank=rank, first_layer=0, end_layer=count,
                      weights=layers + (weights.embedding + weights.head + weights.mtp if rank == 0 else 0),
                      kv_cache=kv_cache, mtp_caches=mtp_caches if rank == 0 else 0, activations=activations,
                      budget=budget, shards=ranks)
             for rank, budget in enumerate(budgets)]
    refuse_short(plans, model_dir, context)
    return plans


def rdma_launch() -> bool:
    """Whether ``mlx.launch`` started this group on its ``jaccl`` backend (RDMA over Thunderbolt 5)."""
    return bool(os.environ.get("MLX_IBV_DEVICES") or os.environ.get("MLX_JACCL_COORDINATOR"))


def check_parallel(requested: str) -> None:
    if requested not in PARALLEL_CHOICES:
        raise UserError(f"--parallel {requested!r} is not a choice; use one of {', '.join(PARALLEL_CHOICES)}")


def choose_parallel(requested: str, config: dict, ranks: int, model_dir: Path) -> str:
    """``"pipeline"`` or ``"tensor"`` for ``--parallel requested``.

    ``auto`` picks tensor parallel only over RDMA (jaccl) and for a model that can be split: it
    runs two all_sums per layer per pass (after attention and after the MLP), each one a network
    round trip, where the pipeline sends one message per rank per pass. Over TCP (``ring``) those
    round trips cost more than splitting the work saves; over RDMA they take microseconds, and
    tensor parallel is how mlx-lm runs DeepSeek there. An explicit ``tensor`` that cannot be
    honoured is refused in one line.
    """
    refusal = tensor_refusal(config, ranks)
    if requested == "tensor" and refusal:
        raise UserError(f"{model_dir} cannot run tensor parallel over {ranks} ranks: {refusal}; "
                        "pass --parallel pipeline (or auto)")
    if requested == "auto":
        return "tensor" if rdma_launch() and not refusal else "pipeline"
    return requested

