"""4-bit ONNX weights (converters/onnx_export/quantize.py): from float weights, asymmetric blocks with
integer zero points; from weights on GGUF Q4_1 grids, affine (scale and float minimum per group):
MatMulNBits with integer codes plus a float MatMul of the inputs' group sums."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgemtp
from edgemtp.converters.onnx_export import export_onnx
from edgemtp.converters.onnx_export.graph import GraphBuilder, linear
from edgemtp.converters.onnx_export.quantize import EMBEDDING_NODE, affine_groups, quantize


def q4_1_grid_weight(k: int, n: int, group_size: int, seed: int = 0) -> np.ndarray:
    """A ``(K, N)`` MatMul weight as a GGUF Q4_1 file holds it: per group of ``group_size`` along
    K, ``minimum + step * q`` with float16 minimum and step and q in 0..15, each group using both
    0 and 15; one group is constant (step 0)."""
    rng = np.random.default_rng(seed)
    groups = -(-k // group_size)
    minimum = rng.normal(0, 0.05, (groups, n)).astype(np.float16).astype(np.float32)
    step = rng.uniform(0.002, 0.01, (groups, n)).astype(np.float16).astype(np.float32)
    step[0, 0] = 0
    q = rng.integers(0, 16, (groups * group_size, n))
    q[::group_size] = 0
    q[1::group_size] = 15
    group = np.arange(k) // group_size
    return (minimum[group] + step[group] * q[:k]).astype(np.float32)


def dequantize(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    n = codes.shape[0]
    values = scales[..., None] * (codes.astype(np.float32) - 8) + offsets.T[..., None]
    return values.reshape(n, -1)[:, :k].T


@pytest.mark.parametrize(("k", "group_size"), [(96, 32), (80, 32), (80, 64)])
def test_affine_groups_reproduce_a_q4_1_grid(k, group_size):
    weight = q4_1_grid_weight(k, 6, group_size)

    codes, scales, offsets = affine_groups(weight, group_size)

    assert codes.shape == (6, -(-k // group_size), group_size) and codes.max() <= 15
    np.testing.assert_allclose(dequantize(codes, scales, offsets, k), weight, rtol=0, atol=1e-7)


def int8_exact_table(rows: int, k: int, group_size: int) -> np.ndarray:
    """Embedding rows of integers in -127..127 with 127 in every block: the 8-bit embedding
    (scale max|x| / 127) and MatMulNBits' int8 activation quantization both keep them exact, so
    any difference from float is the 4-bit weights'."""
    table = np.random.default_rng(1).integers(-127, 128, (rows, k)).astype(np.float32)
    table[:, ::group_size] = 127
    return table


def toy_model(table: np.ndarray, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``input_ids -> embed -> y = sum of x @ W`` over ``weights`` (name -> (K, N) weight)."""
    g = GraphBuilder("toy")
    ids = g.input("input_ids", np.int64, [1, "n"])
    x = g.node("Gather", [g.weight("embed.weight", table), ids], name=EMBEDDING_NODE, axis=0)
    outputs = [linear(g, x, weight.T, name) for name, weight in weights.items()]
    y = outputs[0] if len(outputs) == 1 else g.node("Sum", outputs, name="sum")
    g.output("y", y, np.float32, [1, "n", next(iter(weights.values())).shape[1]])
    return g.to_model()


def run(model: onnx.ModelProto, ids: list[int]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"input_ids": np.asarray([ids], np.int64)})[0]


IDS = [3, 0, 5, 2]


@pytest.mark.parametrize(("k", "group_size"), [(96, 32), (80, 32), (80, 64)])
def test_int4_matmul_computes_x_at_a_q4_1_weight_exactly(k, group_size):
    table, weight = int8_exact_table(6, k, group_size), q4_1_grid_weight(k, 40, group_size)

    quantized = quantize(toy_model(table, {"proj": weight}), bits=4, group_size=group_size, affine=True)

    assert [node.op_type for node in quantized.graph.node if node.name == "proj"] == ["MatMulNBits"]
    expected = table[IDS].astype(np.float64) @ weight.astype(np.float64)
    np.testing.assert_allclose(run(quantized, IDS)[0], expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_matmuls_reading_one_input_share_its_group_sums():
    table = int8_exact_table(6, 64, 32)
    model = toy_model(table, {"a": q4_1_grid_weight(64, 16, 32, seed=2), "b": q4_1_grid_weight(64, 16, 32, seed=3)})
    expected = run(model, IDS)

    quantized = quantize(model, bits=4, group_size=32, affine=True)

    group_sums = [node for node in quantized.graph.node if node.name.endswith(".group_sums")]
    assert len(group_sums) == 1 and group_sums[0].op_type == "MatMul"
    np.testing.assert_allclose(run(quantized, IDS), expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def integer_zero_point_grid_weight(k: int, n: int, group_size: int, seed: int = 0) -> np.ndarray:
    """A ``(K, N)`` weight whose groups are ``scale * (q - zero_point)`` with an integer zero point
    in 1..14 and q in 0..15, each group using both 0 and 15 (so its range gives back the scale)."""
    rng = np.random.default_rng(seed)
    groups = -(-k // group_size)
    scale = rng.uniform(0.002, 0.01, (groups, n)).astype(np.float32)
    zero_point = rng.integers(1, 15, (groups, n))
    q = rng.integers(0, 16, (groups * group_size, n))
    q[::group_size] = 0
    q[1::group_size] = 15
    group = np.arange(k) // group_size
    return (scale[group] * (q[:k] - zero_point[group])).astype(np.float32)


@pytest.mark.parametrize(("k", "group_size"), [(96, 32), (128, 64)])
def test_int4_from_float_uses_integer_zero_points_and_reproduces_their_grid(k, group_size):
    table, weight = int8_exact_table(6, k, group_size), integer_zero_point_grid_weight(k, 40, group_size)

    quantized = quantize(toy_model(table, {"proj": weight}), bits=4, group_size=group_size)

    (node,) = [node for node in quantized.graph.node if node.op_type == "MatMulNBits"]
    assert len(node.input) == 4 and node.input[3]  # A, B, scales, zero points: no float part
    assert not [node for node in quantized.graph.node if node.name.endswith(".group_sums")]
    expected = table[IDS].astype(np.float64) @ weight.astype(np.float64)
    np.testing.assert_allclose(run(quantized, IDS)[0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def _node_bits(path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {node.name: {a.name: a.i for a in node.attribute}["bits"] for node in graph.node if node.op_type == "MatMulNBits"}


@pytest.mark.parametrize("head_bits", [8, 4])
@pytest.mark.parametrize(("affine", "expected_scheme"), [(False, "asymmetric"), (True, "affine")])
def test_4bit_export_puts_heads_at_head_bits_and_records_the_scheme(tiny_checkpoint, tmp_path, affine, expected_scheme,
                                                                    head_bits):
    out = export_onnx(tiny_checkpoint("llama_untied"), tmp_path / "onnx", bits=4, affine_trunk=affine,
                      head_bits=head_bits)

    bits = _node_bits(out / "trunk" / "model.onnx")
    head, = (name for name in bits if name.startswith("lm_head"))
    assert bits[head] == head_bits and 4 in bits.values()
    assert sorted(set(bits.values())) == ([4, 8] if head_bits == 8 else [4])
    quantization = json.loads((out / "manifest.json").read_text())["quantization"]["trunk"]
    assert quantization == {"method": "MatMulNBits", "bits": 4, "block_size": 32, "scheme": expected_scheme,
                            "head_bits": head_bits}


def test_4bit_heads_keep_speculation_equal_to_plain_decoding(tiny_checkpoint, tmp_path):
    out = export_onnx(tiny_checkpoint("llama", mtp_layers=1), tmp_path / "onnx", bits=4, head_bits=4)
    mtp_bits = _node_bits(out / "mtp0" / "model.onnx")
    assert mtp_bits[next(name for name in mtp_bits if name.startswith("mtp.head"))] == 4
    model = edgemtp.load(out, backend="onnx")
    prompt = list(range(3, 40, 3))
    plain = model.generate(prompt, max_tokens=48, spec="none", chat=False)
    speculative = model.generate(prompt, max_tokens=48, spec="mtp", num_draft=3, chat=False)
    assert len(plain.tokens) == 48 and speculative.tokens == plain.tokens
    assert speculative.stats.drafted > 0
