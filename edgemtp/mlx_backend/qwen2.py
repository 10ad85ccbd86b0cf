"""Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen) on MLX: mlx-lm's classes built from an HF config.

Exposes the same six names as ``llama.py``. Qwen2's block is llama's with biased q/k/v
projections, which mlx-lm's ``qwen2`` always has, so only the classes differ from llama.
"""

from __future__ import annotations

from mlx_lm.models import qwen2

from edgemtp.mlx_backend.llama import MASK_AS_ARRAY, cache_dims, convert_weights, llama_like

__all__ = ["MASK_AS_ARRAY", "build_block", "build_trunk", "cache_dims", "convert_weights", "model_args"]

model_args, build_trunk, build_block = llama_like(qwen2)
