"""The MLX trunk matches transformers in float32 on every tiny-model variant,
and every way of loading it (public API, MLX directories) gives the same model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM

import edgemtp
from edgemtp.checkpoint import Checkpoint
from edgemtp.errors import UserError
from edgemtp.factory import VARIANTS
from edgemtp.mlx_backend.backend import MLXBackend
from edgemtp.mlx_backend.weights import iter_mtp_weights, iter_trunk_weights

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()  # the MTP weights are "unexpected" to transformers
SEQ_LEN = 64


def token_ids(vocab_size: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab_size, SEQ_LEN).tolist()


def transformers_trunk(path: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(logits, hidden after the final norm) from transformers in float32."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.model(torch.tensor([ids]))
        hidden = out.last_hidden_state
        logits = model.lm_head(hidden)
    return logits[0].numpy(), hidden[0].numpy()


def dequantized_copy(path: Path, out: Path) -> Path:
    """The trunk of an FP8 checkpoint rewritten in float32 (dequantized by ``Checkpoint``),
    because transformers cannot run FP8 weights on CPU."""
    ckpt = Checkpoint.open(path)
    out.mkdir()
    save_file({name: ckpt.read(name) for name in ckpt.trunk_names()}, out / "model.safetensors")
    config = {key: value for key, value in ckpt.config.items() if key != "quantization_config"}
    config["num_nextn_predict_layers"] = 0
    (out / "config.json").write_text(json.dumps(config))
    return out


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(actual - expected).max() <= 1e-4 * scale


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trunk_matches_transformers(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    backend = MLXBackend.from_checkpoint(path)
    ids = token_ids(backend.vocab_size)

    logits, hidden = backend.trunk_step(ids)
    ref_logits, ref_hidden = transformers_trunk(path, ids)

    assert logits.shape == (SEQ_LEN, backend.vocab_size) and logits.dtype == np.float32
    assert_close(logits, ref_logits)
    assert_close(hidden, ref_hidden)


@pytest.mark.parametrize("variant", ["llama_untied", "deepseek_v3", "glm4_moe"])
def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(tiny_checkpoint, tmp_path, variant):
    path = tiny_checkpoint(variant, fp8=True)
    assert Checkpoint.open(path).is_fp8
    backend = MLXBackend.from_checkpoint(path)
    ids = token_ids(backend.vocab_size, seed=2)

    logits, hidden = backend.trunk_step(ids)
    ref_logits, ref_hidden = transformers_trunk(dequantized_copy(path, tmp_path / "dequantized"), ids)

    assert_close(logits, ref_logits)
    assert_close(hidden, ref_hidden)


def test_incremental_steps_match_one_pass(tiny_checkpoint):
    """Prefill then token-by-token decoding through the cache equals one full pass."""
    backend = MLXBackend.from_checkpoint(tiny_checkpoint("deepseek_v3"))
    ids = token_ids(backend.vocab_size, seed=3)
    full, _ = backend.trunk_step(ids)

    backend.reset()
    pieces = [backend.trunk_step(ids[:40])[0]]
    pieces += [backend.trunk_step(ids[i : i + 1])[0] for i in range(40, 50)]
    pieces.append(backend.trunk_step(ids[50:])[0])

    assert backend.trunk_len() == SEQ_LEN
    assert_close(np.concatenate(pieces), full)


def test_bfloat16_compute_stays_close_to_float32(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    ids = token_ids(384, seed=4)
    full, _ = MLXBackend.from_checkpoint(path).trunk_step(ids)
    half_backend = MLXBackend.from_checkpoint(path, dtype="bfloat16")
    half, _ = half_backend.trunk_step(ids)

    assert half.dtype == np.float32
    assert half_backend.weight_bytes() * 2 == MLXBackend.from_checkpoint(path).weight_bytes()
    # bf16 keeps ~3 significant digits; 5% of the logit range is far below any wiring mistake.
    assert np.abs(half - full).max() <= 0.05 * np.abs(full).max()


def test_public_load_gives_the_backend_logits_and_a_tokenizer(tiny_checkpoint):
    path = tiny_checkpoint("deepseek_v3")
    model = edgemtp.load(path, backend="mlx", max_kv_size=128)
    ids = model.tokenizer.encode("hello world")

    assert model.config["model_type"] == "deepseek_v3"
    np.testing.assert_array_equal(model.logits(ids), MLXBackend.from_checkpoint(path).trunk_step(ids)[0])
    with pytest.raises(UserError, match="outside the vocabulary"):
        model.logits([model.backend.vocab_size])
    with pytest.raises(UserError, match="exceed the context"):
        model.logits([0] * 129)
    with pytest.raises(UserError, match="backend 'tpu'"):
        edgemtp.load(path, backend="tpu")
    with pytest.raises(UserError, match="dtype"):
        edgemtp.load(path, backend="mlx", dtype="int3")
    # An option of the other backend is named as such, not a TypeError from deep inside.
    with pytest.raises(UserError, match="the onnx backend has no load option draft_vocab"):
        edgemtp.load(path, backend="onnx", draft_vocab=False)
    with pytest.raises(UserError, match="the mlx backend has no load option bits"):
        edgemtp.load(path, backend="mlx", bits=4)


def test_import_edgemtp_stays_light():
    code = "import sys, edgemtp; print(sorted({'mlx', 'numpy', 'torch'} & set(sys.modules)), edgemtp.load.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Nothing numerical was imported before ``edgemtp.load`` was touched.
    assert result.stdout.split() == ["[]", "edgemtp.api"]


def write_mlx_dir(source: Path, out: Path, trunk: dict, mtp: dict, config: dict) -> Path:
    """What the MLX converter writes: mlx-lm's layout plus ``mtp.safetensors``."""
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), trunk)
    mx.save_safetensors(str(out / "mtp.safetensors"), mtp)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    return out


def both_heads(backend: MLXBackend, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    backend.reset()
    logits, hidden = backend.trunk_step(ids)
    return logits, backend.mtp_step(1, hidden[:-1], ids[1:])[0]


def test_mlx_dir_streamed_from_checkpoint_loads_identically(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("deepseek_v3")
    ckpt = Checkpoint.open(path)
    trunk, mtp = dict(iter_trunk_weights(ckpt)), dict(iter_mtp_weights(ckpt))
    out = write_mlx_dir(path, tmp_path / "mlx", trunk, mtp, ckpt.config)
    ids = token_ids(ckpt.config["vocab_size"], seed=5)

    model = edgemtp.load(out, backend="mlx")

    for got, expected in zip(both_heads(model.backend, ids), both_heads(MLXBackend.from_checkpoint(path), ids)):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("variant", ["llama", "deepseek_v3", "glm4_moe", "qwen2", "qwen3"])
def test_quantized_mlx_dir_loads_identically(tiny_checkpoint, tmp_path, variant):
    path = tiny_checkpoint(variant)
    backend = MLXBackend.from_checkpoint(path)
    quantization = {"group_size": 64, "bits": 4}
    for module in (backend.trunk, backend.mtp):
        nn.quantize(module, **quantization, class_predicate=lambda _, layer: hasattr(layer, "to_quantized")
                    and layer.weight.shape[-1] % 64 == 0)
    config = {**backend.config, "quantization": quantization}
    out = write_mlx_dir(path, tmp_path / "mlx4", dict(tree_flatten(backend.trunk.parameters())),
                        dict(tree_flatten(backend.mtp.parameters())), config)
    ids = token_ids(backend.vocab_size, seed=6)

    loaded = edgemtp.load(out, backend="mlx").backend

    assert loaded.weight_bytes() == backend.weight_bytes() < MLXBackend.from_checkpoint(path).weight_bytes() / 3
    for got, expected in zip(both_heads(loaded, ids), both_heads(backend, ids)):
        np.testing.assert_array_equal(got, expected)
