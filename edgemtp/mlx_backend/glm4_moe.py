"""GLM-4.5 (GQA with partial RoPE, DeepSeek-style MoE) on MLX: mlx-lm's classes built from an HF config.

Exposes the same six names as ``llama.py``. GLM-4.5 stores its experts one tensor per expert
like DeepSeek-V3, so the weights are stacked into ``switch_mlp`` the same way. MTP blocks sit
past ``first_k_dense_replace`` and so are MoE blocks, as mlx-lm builds them from ``layer_idx``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from mlx_lm.models import glm4_moe

from edgemtp.config import partial_rotary_factor, rope_scaling, rope_theta
from edgemtp.errors import UserError
from edgemtp.mlx_backend.deepseek_v3 import stacked_experts

# GQA attention takes mlx-lm's "causal" string mask (fast SDPA path).
MASK_AS_ARRAY = False

# transformers' Glm4MoeConfig defaults for keys a config may leave out; mlx-lm requires them.
_TRANSFORMERS_DEFAULTS = {"use_qk_norm": False, "attention_bias": False, "n_group": 1, "topk_group": 1,
                          "norm_topk_prob": True, "routed_scaling_factor": 1.0, "n_shared_experts": 1,
                          "first_k_dense_replace": 1, "tie_word_embeddings": False}


def model_args(config: dict) -> glm4_moe.ModelArgs:
    """mlx-lm arguments from an HF config, reading RoPE from either config form."""
    if rope_scaling(config) is not None:
        # mlx-lm's glm4_moe builds a plain nn.RoPE and would silently ignore the scaling.
        raise UserError(f"glm4_moe with rope_scaling {rope_scaling(config)['rope_type']!r} is not supported on MLX "
                        "(mlx-lm implements plain RoPE only); use the onnx backend")
    return glm4_moe.ModelArgs.from_dict(
        {
            **_TRANSFORMERS_DEFAULTS,
            **config,
            "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            "rope_theta": rope_theta(config),
            "rope_scaling": None,
            "partial_rotary_factor": partial_rotary_factor(config),
        }
    )


def build_trunk(args: glm4_moe.ModelArgs, config: dict) -> glm4_moe.Model:
    return glm4_moe.Model(args)


def build_block(args: glm4_moe.ModelArgs, config: dict, layer_idx: int) -> glm4_moe.DecoderLayer:
    """One decoder block for an MTP layer; ``layer_idx`` (past the trunk) makes it a MoE block."""
    return glm4_moe.DecoderLayer(args, layer_idx=layer_idx)


def cache_dims(args: glm4_moe.ModelArgs) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(heads, dim)`` of the cached keys and of the cached values (GQA)."""
    return (args.num_key_value_heads, args.head_dim), (args.num_key_value_heads, args.head_dim)


def convert_weights(
    names: list[str], read: Callable[[str], np.ndarray], args: glm4_moe.ModelArgs
) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors -> mlx-lm tensors: per-expert projections stacked into ``switch_mlp``
    (mlx-lm's ``Model.sanitize``), everything else under its own name."""
    for name in names:
        if "rotary_emb.inv_freq" in name:
            continue
        stacked = stacked_experts(name, read, args.n_routed_experts)
        yield from stacked if stacked is not None else [(name, read(name))]
