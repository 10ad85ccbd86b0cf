"""RoPE cos/sin tables, computed the way transformers does for each ``rope_type`` we support.

The tables are baked into the graph as initializers of shape ``(max_positions, dim / 2)`` in the
"rotate half" layout that onnxruntime's GroupQueryAttention / RotaryEmbedding expect.
"""

from __future__ import annotations

import math

import numpy as np

from edgemtp.config import rope_scaling, rope_theta
from edgemtp.errors import UserError


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_attention_factor(config: dict, dim: int) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies and the factor transformers multiplies cos/sin by."""
    base = rope_theta(config)
    # float32 like transformers, so the angles round the same way.
    inv_freq = (1.0 / np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    scaling = rope_scaling(config)
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(config, scaling, base, dim)
    raise UserError(f"rope_type {kind!r} is not supported by the ONNX exporter; use a model with "
                    "default, linear, llama3 or yarn RoPE")


def _yarn(config: dict, scaling: dict, base: float, dim: int) -> tuple[np.ndarray, float]:
    old_context = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config["max_position_embeddings"] / old_context
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def attention_scale_multiplier(config: dict) -> float:
    """DeepSeek's softmax-scale correction under YaRN (``mscale(factor, mscale_all_dim) ** 2``)."""
    scaling = rope_scaling(config)
    if not scaling or not scaling.get("mscale_all_dim"):
        return 1.0
    return _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2


def cos_sin_tables(config: dict, dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` of shape ``(max_positions, dim // 2)``, float32, attention factor applied."""
    inv_freq, factor = inv_freq_and_attention_factor(config, dim)
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return (np.cos(angles) * factor).astype(np.float32), (np.sin(angles) * factor).astype(np.float32)
