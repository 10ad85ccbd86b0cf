"""HF / GGUF -> MLX directories that mlx-lm loads (quantization fidelity: tests/test_fidelity.py)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from safetensors import safe_open

from edgemtp.converters.convert import convert


def _logits(model_dir, ids) -> np.ndarray:
    model, _ = mlx_lm.load(str(model_dir))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3", "glm4_moe", "qwen2", "qwen3"])
def test_mlx_lm_loads_and_generates(tiny_checkpoint, tmp_path, arch):
    src = tiny_checkpoint(arch)
    out = convert(src, tmp_path / "mlx", to="mlx", bits=4, group_size=32, mtp_bits=8, show_progress=False)
    config = json.loads((out / "config.json").read_text())
    # A 4-bit trunk keeps its embedding and (untied) head at 8 bits, in mlx-lm's per-module form.
    eight_bits = {"group_size": 32, "bits": 8}
    head = {} if json.loads((src / "config.json").read_text()).get("tie_word_embeddings") else {"lm_head": eight_bits}
    assert config["quantization"] == {"group_size": 32, "bits": 4, "model.embed_tokens": eight_bits, **head}
    assert config["mtp_quantization"] == {"group_size": 32, "bits": 8}
    assert config["num_nextn_predict_layers"] == 1
    assert "rope_parameters" in config and "rope_theta" in config
    model, tokenizer = mlx_lm.load(str(out))
    text = mlx_lm.generate(model, tokenizer, "Hello there", max_tokens=6)
    assert len(tokenizer.encode(text, add_special_tokens=False)) >= 3
    with safe_open(out / "mtp.safetensors", framework="numpy") as f:
        names = set(f.keys())
    assert "layers.0.eh_proj.weight" in names and "layers.0.eh_proj.scales" in names
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        trunk = set(f.keys())
    assert not any(name.startswith("model.layers.2.") for name in trunk)  # MTP layer stays out of the trunk
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        def stored_bits(module):  # a group of 32 values at b bits fills b uint32 words
            return f.get_tensor(f"{module}.weight").shape[-1] // f.get_tensor(f"{module}.scales").shape[-1]

        assert stored_bits("model.embed_tokens") == 8 and stored_bits("model.layers.0.self_attn.o_proj") == 4
    if arch in ("deepseek_v3", "glm4_moe"):
        assert "model.layers.1.mlp.switch_mlp.gate_proj.weight" in trunk
    if arch == "deepseek_v3":
        assert "model.layers.0.self_attn.embed_q.weight" in trunk
        assert "model.layers.0.self_attn.unembed_out.weight" in trunk
        with safe_open(out / "model.safetensors", framework="numpy") as f:
            assert f.get_tensor("model.layers.1.mlp.switch_mlp.gate_proj.scales").dtype == np.float32


def test_affine_quantize_matches_mlx_layout_and_keeps_q4_1_blocks_exact():
    from edgemtp.converters.mlx_export import affine_quantize

    rng = np.random.default_rng(0)
    # Q4_1-style blocks: level * scale + min, with levels 0 and 15 present in every block.
    levels = rng.integers(0, 16, (48, 4, 32)).astype(np.float32)
    levels[..., 0], levels[..., 1] = 0, 15
    weight = (levels * rng.uniform(0.01, 0.1, (48, 4, 1)) + rng.uniform(-1, 0, (48, 4, 1))).astype(np.float32)
    weight = weight.reshape(48, 128)
    for bits in (4, 8):
        packed, scales, biases = affine_quantize(weight, 32, bits)
        restored = np.array(mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), group_size=32, bits=bits))
        tolerance = 1e-6 if bits == 4 else np.abs(weight).max() / 255
        np.testing.assert_allclose(restored, weight, atol=tolerance, rtol=0)


def test_gguf_source_converts_like_its_float32_weights(tiny_checkpoint, tmp_path):
    from tests.test_gguf import write_llama_gguf

    src = tiny_checkpoint("llama_untied", mtp_layers=0)
    gguf_file = write_llama_gguf(src, tmp_path / "tiny.gguf")
    ids = list(range(1, 200))
    from_gguf = _logits(convert(gguf_file, tmp_path / "from_gguf", bits=16, dtype="float32", show_progress=False), ids)
    from_hf = _logits(convert(src, tmp_path / "from_hf", bits=16, dtype="float32", show_progress=False), ids)
    np.testing.assert_allclose(from_gguf, from_hf, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "from_gguf" / "tokenizer.json").is_file()
