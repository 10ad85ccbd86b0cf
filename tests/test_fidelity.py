"""Quantization fidelity of the converters, for both output formats (MLX and ONNX).

* float32 conversions (bits=16, dtype float32) reproduce transformers' trunk logits and the
  MTP formula's logits: max|diff| <= 1e-4 x max|logit|;
* 8-bit conversions agree with float32 on the top-1 token at >= 99% of 512 positions, 4-bit
  at >= 95%, trunk and MTP heads, on "confident" factory models (``make_tiny(confident=True)``:
  random weights with trained-LM-like margins; plain random weights predict near-uniformly,
  so any rounding flips their argmax and agreement would measure noise);
* the default model's trunk (SmolLM2-135M-Instruct from its GGUF): perplexity on >= 20k
  held-out tokens within 1% (8-bit) and 5% (4-bit) of its fp16 conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import edgemtp
from edgemtp.converters.convert import convert
from tests.test_mlx_parity import transformers_trunk
from tests.test_mtp_parity import Reference
from tests.test_onnx_parity import _dequantized_copy

FORMATS = ("mlx", "onnx")
CASES = [("llama", False), ("llama", True), ("deepseek_v3", False), ("deepseek_v3", True), ("glm4_moe", False),
         ("glm4_moe", True), ("qwen2", False), ("qwen3", False)]
POSITIONS = 512
MIN_AGREEMENT = {8: 0.99, 4: 0.95}
MAX_PERPLEXITY_INCREASE = {8: 0.01, 4: 0.05}


def float32_conversion(src: Path, out: Path, to: str) -> edgemtp.Model:
    return edgemtp.load(convert(src, out, to=to, bits=16, mtp_bits=16, dtype="float32", show_progress=False), backend=to)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize(("variant", "fp8"), CASES)
def test_float32_conversions_match_references(tiny_checkpoint, tmp_path, variant, fp8):
    src = tiny_checkpoint(variant, fp8=fp8)
    # transformers cannot run FP8 weights on CPU: references use the dequantized values.
    reference_src = _dequantized_copy(src, tmp_path / "dequantized") if fp8 else src
    ids = np.random.default_rng(7).integers(0, 384, 40).tolist()
    with torch.no_grad():
        trunk_logits, _ = transformers_trunk(reference_src, ids)
        mtp_logits = Reference(reference_src, tmp_path).mtp_logits(ids, depth=1)

    for to in FORMATS:
        model = float32_conversion(src, tmp_path / to, to)
        assert_close(model.logits(ids), trunk_logits)
        assert_close(model.mtp_logits(ids, depth=1), mtp_logits)


@pytest.fixture(scope="module")
def confident_float32(tiny_checkpoint, tmp_path_factory):
    """(checkpoint, format) -> float32 model, so each reference is converted once."""
    root = tmp_path_factory.mktemp("float32")
    cache = {}

    def get(src: Path, to: str) -> edgemtp.Model:
        if (src, to) not in cache:
            cache[src, to] = float32_conversion(src, root / f"{len(cache)}-{to}", to)
        return cache[src, to]

    return get


def top1_agreement(model: edgemtp.Model, reference: edgemtp.Model, ids: list[int]) -> tuple[float, float]:
    trunk = (model.logits(ids).argmax(-1) == reference.logits(ids).argmax(-1)).mean()
    mtp = (model.mtp_logits(ids, 1).argmax(-1) == reference.mtp_logits(ids, 1).argmax(-1)).mean()
    return float(trunk), float(mtp)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("to", FORMATS)
@pytest.mark.parametrize(("variant", "fp8"), CASES)
def test_quantized_top1_agrees_with_float32(tiny_checkpoint, confident_float32, tmp_path, variant, fp8, to, bits):
    src = tiny_checkpoint(variant, fp8=fp8, confident=True)
    reference = confident_float32(src, to)
    quantized = edgemtp.load(convert(src, tmp_path / to, to=to, bits=bits, mtp_bits=bits, show_progress=False),
                             backend=to)
    ids = np.random.default_rng(8).integers(0, 384, POSITIONS + 1).tolist()  # 512 MTP positions too

    trunk, mtp = top1_agreement(quantized, reference, ids)

    assert trunk >= MIN_AGREEMENT[bits] and mtp >= MIN_AGREEMENT[bits], (trunk, mtp)


# --- the default model's perplexity --------------------------------------------------------
# ``smollm2_perplexities`` (conftest.py): every conversion's perplexity, measured in a process of its
# own beside the rest of the suite (deselect with ``-k 'not perplexity'`` for quick local runs).


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("to", FORMATS)
def test_default_trunk_perplexity_stays_close_to_fp16(smollm2_perplexities, to, bits):
    reference = smollm2_perplexities["fp16"]
    quantized = smollm2_perplexities[to, bits]
    assert quantized <= reference * (1 + MAX_PERPLEXITY_INCREASE[bits]), (quantized, reference)
