"""Checkpoint (HF directory or GGUF) -> MLX model directory.

The output directory loads both in mlx-lm (``mlx_lm.load``) and in edgemtp's
MLX backend:

* ``config.json`` — the source config with both RoPE forms, FP8
  ``quantization_config`` dropped (weights are dequantized), and mlx-lm's
  ``"quantization": {"group_size", "bits"}`` when the trunk is quantized, with
  mlx-lm's per-module entries (``"model.embed_tokens": {"group_size", "bits": 8}``)
  for the embedding and heads that a 4-bit model keeps at 8 bits;
  ``num_nextn_predict_layers`` is kept and ``"mtp_quantization"`` records how
  the MTP layers are stored;
* ``model.safetensors`` — trunk weights under mlx-lm's sanitized names
  (``edgemtp.mlx_backend.weights.iter_trunk_weights`` does the renaming:
  experts stacked into ``switch_mlp``, ``kv_b_proj`` split into
  ``embed_q``/``unembed_out``);
* ``mtp.safetensors`` — the MTP layers under ``MTPStack`` names
  (``layers.{i}.…``); mlx-lm only loads ``model*.safetensors``, so it ignores them;
* the tokenizer files.

Quantized tensors use ``mx.quantize``'s affine layout (written by ``affine_quantize``) with
float32 scales and biases: MLX's
CPU quantized matmul is several times faster with float32 scales than bf16.
Tensors are produced, quantized and written one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from edgemtp.config import with_both_rope_forms
from edgemtp.errors import UserError
from edgemtp.tokenizer import copy_tokenizer_files
from edgemtp.converters.safetensors_writer import SafetensorsAppender

BITS = (4, 8, 16)  # 16 = not quantized, stored in --dtype
GROUP_SIZES = (32, 64, 128)
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}

# The MoE router's weight belongs to a plain parameter in mlx-lm, not a quantizable module.
_NEVER_QUANTIZED = (".mlp.gate.weight",)
EMBEDDING_AND_HEAD_BITS = 8
_EMBEDDING_AND_HEADS = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight")



def check_options(bits: int, group_size: int, mtp_bits: int, dtype: str) -> None:
    """Refuse settings MLX cannot store."""
    for flag, value in (("--bits", bits), ("--mtp-bits", mtp_bits)):
        if value not in BITS:
            raise UserError(f"{flag} {value} is not supported for MLX; use one of {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise UserError(f"--group-size {group_size} is not supported by MLX; use one of {', '.join(map(str, GROUP_SIZES))}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")


def _quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    # Same choice as mlx-lm's nn.quantize: matrices whose input dimension splits into groups.
    return name.endswith(".weight") and len(shape) >= 2 and shape[-1] % group_size == 0 and not name.endswith(_NEVER_QUANTIZED)


def affine_quantize(weight: np.ndarray, group_size: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(packed uint32, scales, biases)`` in ``mx.quantize``'s affine layout, with GGUF Q4_1's rule:
    per group, scale = (max - min) / (2**bits - 1) and bias = min.

    ``mx.quantize`` instead nudges each group's grid so that 0 is exactly representable, which
    moves almost every block of an already-quantized Q4_1 source off its grid (a second
    rounding); this rule reproduces such a block exactly at group size 32.
    """
    leading = weight.shape[:-1]  # (out,) or (experts, out)
    groups = weight.astype(np.float32).reshape(*leading, -1, group_size)
    low, high = groups.min(-1), groups.max(-1)
    scales = (high - low) / (2**bits - 1)
    steps = np.where(scales == 0, 1, scales)  # a constant group: every value is its bias
    levels = np.round((groups - low[..., None]) / steps[..., None]).clip(0, 2**bits - 1).astype(np.uint32)
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    packed = (levels.reshape(*leading, -1, per_word) << shifts).sum(-1, dtype=np.uint32)
    return packed, scales.astype(np.float32), low.astype(np.float32)


def _bits_for(name: str, bits: int) -> int:
    # A 4-bit model keeps its token embedding and output heads at 8 bits, as llama.cpp's Q4
    # files (token_embd in Q8_0) and mlx-lm's mixed recipes do: the head's rounding lands
    # directly on the logits, and on SmolLM2-135M a 4-bit head alone costs several percent of
    # perplexity. The embedding is the head when they are tied.
    return EMBEDDING_AND_HEAD_BITS if bits < EMBEDDING_AND_HEAD_BITS and name.endswith(_EMBEDDING_AND_HEADS) else bits


def _write_tensors(path: Path, tensors: Iterator[tuple[str, "object"]], bits: int, group_size: int, dtype: str,
                   progress: Callable[[int], None]) -> dict[str, dict]:
    """Write ``tensors`` to ``path``; return mlx-lm's per-module overrides (module path ->
    ``{"group_size", "bits"}``) for the modules stored at other than ``bits``."""
    import mlx.core as mx

    out = SafetensorsAppender(path)
    overrides = {}
    for name, array in tensors:
        source_bytes = array.size * 4
        if bits < 16 and _quantizable(name, array.shape, group_size):
            base = name.removesuffix(".weight")
            tensor_bits = _bits_for(name, bits)
            if tensor_bits != bits:
                overrides[base] = {"group_size": group_size, "bits": tensor_bits}
            weight, scales, biases = affine_quantize(np.array(array.astype(mx.float32)), group_size, tensor_bits)
            out.add(f"{base}.weight", weight)
            out.add(f"{base}.scales", scales)
            out.add(f"{base}.biases", biases)
        elif "e_score_correction_bias" in name or name.endswith("A_log"):
            # Routing decisions and Gated DeltaNet's decay rates stay float32, as in mlx-lm.
            out.add(name, np.array(array.astype(mx.float32)))
        else:
            out.add(name, np.array(array.astype(mx.float32)).astype(DTYPES[dtype]))
        del array
        progress(source_bytes)
    out.close()
    return overrides


def _mlx_config(config: dict, bits: int, group_size: int, mtp_bits: int, num_mtp_layers: int,
                trunk_overrides: dict, mtp_overrides: dict) -> dict:
    config = with_both_rope_forms(config)
    config.pop("quantization_config", None)  # FP8 weights are dequantized on the way
    config.pop("quantization", None)
    config.pop("mtp_quantization", None)
    if bits < 16:
        config["quantization"] = {"group_size": group_size, "bits": bits, **trunk_overrides}
    if num_mtp_layers and mtp_bits < 16:
        config["mtp_quantization"] = {"group_size": group_size, "bits": mtp_bits, **mtp_overrides}
    return config


def copy_tokenizer(ckpt, out_dir: Path) -> None:
    """Tokenizer files next to the weights: built from a GGUF vocab, or copied from the HF directory
    (all that it has: a checkpoint without a tokenizer still converts, for use on token ids)."""
    if hasattr(ckpt, "write_tokenizer"):
        ckpt.write_tokenizer(out_dir)
        return
    copy_tokenizer_files(Path(ckpt.path), out_dir)


def total_bytes(ckpt) -> int:
    """float32 bytes the conversion reads (the progress bar's total)."""
    return sum(4 * int(np.prod(ckpt.shape(name))) for name in ckpt.names())


def export_mlx(ckpt, out_dir: str | Path, *, bits: int = 4, group_size: int = 64, mtp_bits: int = 8,
               dtype: str = "float16", progress: Callable[[int], None] = lambda n: None) -> Path:
    """Write the MLX directory for ``ckpt`` into ``out_dir`` (which must exist and be empty).

    ``progress(n)`` is called with the float32 bytes of each source tensor consumed.
    """
    from edgemtp.mlx_backend.weights import iter_mtp_weights, iter_trunk_weights
    import mlx.core as mx

    check_options(bits, group_size, mtp_bits, dtype)
    out_dir = Path(out_dir)
    trunk_overrides = _write_tensors(out_dir / "model.safetensors", iter_trunk_weights(ckpt, mx.float32), bits,
                                     group_size, dtype, progress)
    mtp_overrides = {}
    if ckpt.num_mtp_layers:
        mtp_overrides = _write_tensors(out_dir / "mtp.safetensors", iter_mtp_weights(ckpt, mx.float32), mtp_bits,
                                       group_size, dtype, progress)
    config = _mlx_config(ckpt.config, bits, group_size, mtp_bits, ckpt.num_mtp_layers, trunk_overrides, mtp_overrides)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(ckpt, out_dir)
    return out_dir
