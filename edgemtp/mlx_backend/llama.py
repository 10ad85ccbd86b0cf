"""Llama on MLX: mlx-lm's classes built from a Hugging Face config.

Everything model-specific the backend needs lives in the six public names
below; ``deepseek_v3.py``, ``glm4_moe.py``, ``qwen2.py`` and ``qwen3.py`` expose the same
ones (``ARCHITECTURES`` in ``models.py`` picks the module by ``model_type``); the qwen modules
are llama's with mlx-lm's qwen classes (``llama_like``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType

import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama
from mlx_lm.models.base import BaseModelArgs

from edgemtp.config import rope_scaling, rope_theta

# Llama's attention takes mlx-lm's "causal" string mask (fast SDPA path).
MASK_AS_ARRAY = False


def llama_like(module: ModuleType) -> tuple[Callable, Callable, Callable]:
    """``model_args``, ``build_trunk`` and ``build_block`` for an mlx-lm model module built like
    llama's (``ModelArgs``, ``Model(args)``, ``TransformerBlock(args)``): llama, qwen2, qwen3."""

    def model_args(config: dict) -> BaseModelArgs:
        """mlx-lm arguments from an HF config, reading RoPE from either config form."""
        return module.ModelArgs.from_dict(
            {
                **config,
                "rope_theta": rope_theta(config),
                "rope_scaling": rope_scaling(config),
                # mlx-lm defaults to tied embeddings, transformers to untied.
                "tie_word_embeddings": config.get("tie_word_embeddings", False),
            }
        )

    def build_trunk(args: BaseModelArgs, config: dict) -> nn.Module:
        return module.Model(args)

    def build_block(args: BaseModelArgs, config: dict, layer_idx: int) -> nn.Module:
        """One decoder block of the trunk's type, for an MTP layer."""
        return module.TransformerBlock(args)

    return model_args, build_trunk, build_block


model_args, build_trunk, build_block = llama_like(llama)


def cache_dims(args: BaseModelArgs) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(heads, dim)`` of the cached keys and of the cached values (GQA). mlx-lm's qwen2
    arguments have no ``head_dim`` at all."""
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return (args.num_key_value_heads, head_dim), (args.num_key_value_heads, head_dim)


def convert_weights(
    names: list[str], read: Callable[[str], np.ndarray], args: BaseModelArgs
) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors -> mlx-lm tensors (same names; precomputed RoPE tables dropped)."""
    for name in names:
        if "rotary_emb.inv_freq" in name:
            continue
        yield name, read(name)
