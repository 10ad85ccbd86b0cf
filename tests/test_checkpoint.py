"""Checkpoint reading: dtypes, FP8 block dequantization, MTP discovery and every refusal."""

from __future__ import annotations

import math
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import edit_config

from edgemtp.checkpoint import Checkpoint, dequantize_fp8_blocks
from edgemtp.errors import UserError
from edgemtp.factory import quantize_fp8_blocks


def reference_dequantize(q: np.ndarray, scale_inv: np.ndarray, block: int) -> np.ndarray:
    """Tile by tile, the way DeepSeek-V3's reference kernel reads it."""
    out = np.empty(q.shape, np.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows = slice(i * block, (i + 1) * block)
            cols = slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].astype(np.float32) * scale_inv[i, j]
    return out


@pytest.mark.parametrize("shape,block", [((50, 70), 16), ((32, 32), 16), ((5, 130), 128), ((96, 64), 48)])
def test_fp8_round_trip_matches_tile_reference(shape, block):
    weight = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    q, scale_inv = quantize_fp8_blocks(weight, block)
    assert q.dtype == ml_dtypes.float8_e4m3fn
    assert scale_inv.shape == (math.ceil(shape[0] / block), math.ceil(shape[1] / block))
    dequantized = dequantize_fp8_blocks(q.astype(np.float32), scale_inv, (block, block))
    np.testing.assert_array_equal(dequantized, reference_dequantize(q, scale_inv, block))
    # e4m3 keeps 3 mantissa bits: rounding error at most 2**-4 relative, or half the
    # subnormal spacing (2**-9 in scaled units) near zero.
    scale = np.repeat(np.repeat(scale_inv, block, 0), block, 1)[: shape[0], : shape[1]]
    assert np.all(np.abs(dequantized - weight) <= 2**-4 * np.abs(weight) + 2**-10 * scale)


def test_fp8_checkpoint_read_matches_reference_and_unquantized_weights(tiny_checkpoint):
    fp8 = Checkpoint.open(tiny_checkpoint("deepseek_v3", fp8=True, fp8_block=48))
    plain = Checkpoint.open(tiny_checkpoint("deepseek_v3"))
    assert fp8.is_fp8 and fp8.fp8_block == (48, 48) and not plain.is_fp8
    assert not any(name.endswith("_scale_inv") for name in fp8.names())
    assert fp8.names() == plain.names()

    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 72 x 64: partial tiles both ways
    assert fp8.dtype(name) == "F8_E4M3"
    raw = fp8.read_raw(name)
    scale_inv = fp8.read_raw(name + "_scale_inv")
    assert scale_inv.shape == (2, 2)
    np.testing.assert_array_equal(fp8.read(name), reference_dequantize(raw, scale_inv, 48))
    np.testing.assert_allclose(fp8.read(name), plain.read(name), rtol=2**-4, atol=1e-3)
    assert fp8.nbytes(name) == 72 * 64 + 4 * 4

    # Norms, embeddings and the router stay in high precision, and read back exactly.
    for kept in ("model.embed_tokens.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight"):
        assert fp8.dtype(kept) == "F32"
        np.testing.assert_array_equal(fp8.read(kept), plain.read(kept))


@pytest.mark.parametrize("dtype,numpy_dtype", [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)])
def test_half_precision_reads_as_exact_float32(tiny_checkpoint, dtype, numpy_dtype):
    half = Checkpoint.open(tiny_checkpoint("llama", dtype=dtype))
    full = Checkpoint.open(tiny_checkpoint("llama"))
    name = "model.layers.0.self_attn.q_proj.weight"
    values = half.read(name)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, full.read(name).astype(numpy_dtype).astype(np.float32))


def test_mtp_and_trunk_names_partition_the_weights(tiny_checkpoint):
    checkpoint = Checkpoint.open(tiny_checkpoint("llama", mtp_layers=2))
    assert checkpoint.num_mtp_layers == 2
    first, second = checkpoint.mtp_names(0), checkpoint.mtp_names(1)
    assert all(n.startswith("model.layers.2.") for n in first)
    assert all(n.startswith("model.layers.3.") for n in second)
    assert "model.layers.2.shared_head.head.weight" in first
    assert sorted(checkpoint.trunk_names() + first + second) == sorted(checkpoint.names())
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.")) for n in checkpoint.trunk_names())


# --- refusals ------------------------------------------------------------------




def test_missing_config(llama_copy):
    (llama_copy / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        Checkpoint.open(llama_copy)


def test_unknown_model_type_lists_supported(llama_copy):
    edit_config(llama_copy, model_type="gpt2")
    with pytest.raises(UserError, match="unsupported model_type 'gpt2'; edgemtp supports deepseek_v3, glm4_moe, llama"):
        Checkpoint.open(llama_copy)


def test_truncated_safetensors_names_the_file(llama_copy):
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors is truncated or corrupt"):
        Checkpoint.open(llama_copy)


def test_shape_contradicting_config(llama_copy):
    edit_config(llama_copy, intermediate_size=96)
    with pytest.raises(UserError, match=r"mlp.gate_proj.weight has shape \[128, 64\] but config.json implies \[96, 64\]"):
        Checkpoint.open(llama_copy)


def test_missing_mtp_weight_suggests_fewer_mtp_layers(llama_copy):
    weights = load_file(llama_copy / "model.safetensors")
    del weights["model.layers.2.hnorm.weight"]
    save_file(weights, llama_copy / "model.safetensors")
    with pytest.raises(UserError, match="model.layers.2.hnorm.weight is missing.*num_nextn_predict_layers to 0"):
        Checkpoint.open(llama_copy)
    # Without validation the trunk is still readable.
    assert Checkpoint.open(llama_copy, validate=False).read("model.norm.weight").shape == (64,)


def test_pickle_checkpoint_is_refused_without_unpickling(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    # Not a valid pickle at all: if anything tried to unpickle it, a different error would surface.
    (llama_copy / "pytorch_model.bin").write_bytes(b"\x80\x04this is not read")
    with pytest.raises(UserError, match="refuses to unpickle.*convert them to safetensors"):
        Checkpoint.open(llama_copy)


def test_missing_shard(tiny_checkpoint, tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint("llama", shard_bytes=100_000), path)
    next(path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(UserError, match="model-00002-of-.*missing; download the missing shard"):
        Checkpoint.open(path)
