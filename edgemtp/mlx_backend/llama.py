"""Llama on MLX: mlx-lm's classes built from a Hugging Face config.

Everything model-specific the backend needs lives in the six public names
below; ``deepseek_v3.py`` and ``glm4_moe.py`` expose the same ones (``ARCHITECTURES`` in
``models.py`` picks the module by ``model_type``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from mlx_lm.models import llama

from edgemtp.config import rope_scaling, rope_theta

# Llama's attention takes mlx-lm's "causal" string mask (fast SDPA path).
MASK_AS_ARRAY = False


def model_args(config: dict) -> llama.ModelArgs:
    """mlx-lm arguments from an HF config, reading RoPE from either config form."""
    return llama.ModelArgs.from_dict(
        {
            **config,
            "rope_theta": rope_theta(config),
            "rope_scaling": rope_scaling(config),
            # mlx-lm defaults to tied embeddings, transformers to untied.
            "tie_word_embeddings": config.get("tie_word_embeddings", False),
        }
    )


def build_trunk(args: llama.ModelArgs, config: dict) -> llama.Model:
    return llama.Model(args)


def build_block(args: llama.ModelArgs, config: dict, layer_idx: int) -> llama.TransformerBlock:
    """One decoder block of the trunk's type, for an MTP layer."""
    return llama.TransformerBlock(args)


def cache_dims(args: llama.ModelArgs) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(heads, dim)`` of the cached keys and of the cached values (GQA)."""
    head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    return (args.num_key_value_heads, head_dim), (args.num_key_value_heads, head_dim)


def convert_weights(
    names: list[str], read: Callable[[str], np.ndarray], args: llama.ModelArgs
) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors -> mlx-lm tensors (same names; precomputed RoPE tables dropped)."""
    for name in names:
        if "rotary_emb.inv_freq" in name:
            continue
        yield name, read(name)
