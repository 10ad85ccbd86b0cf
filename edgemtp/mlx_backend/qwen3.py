"""Qwen3 (dense) on MLX: mlx-lm's classes built from an HF config.

Exposes the same six names as ``llama.py``. Qwen3's block is llama's plus a per-head RMSNorm
of the queries and keys before RoPE (``q_norm``, ``k_norm``) and an explicit ``head_dim``;
mlx-lm's ``qwen3`` has both, so only the classes differ from llama.
"""

from __future__ import annotations

from mlx_lm.models import qwen3

from edgemtp.mlx_backend.llama import MASK_AS_ARRAY, cache_dims, convert_weights, llama_like

__all__ = ["MASK_AS_ARRAY", "build_block", "build_trunk", "cache_dims", "convert_weights", "model_args"]

model_args, build_trunk, build_block = llama_like(qwen3)
