"""Weight-only int4/int8 quantization to onnxruntime's MatMulNBits.

Every MatMul with a constant 2-D weight becomes MatMulNBits, and the token embedding Gather
becomes an 8-bit GatherBlockQuantized. MoE routers stay in float: expert selection is a
discrete choice that small weight errors would flip, and DeepSeek keeps them in high precision
too.

8 bits: onnxruntime's own quantizer, symmetric blocks.

4 bits from float weights: onnxruntime's own quantizer, asymmetric blocks with integer zero
points (``w = scale * (q - zero_point)``, q and zero point in 0..15), onnxruntime-genai's int4
recipe and the form its int8-activation kernel runs fastest. On the bandwidth-bound bench model
of the README it decoded 1.13-1.32x faster than the affine form below, from 15% smaller files
(``scripts/ab_int4_schemes.py``).

4 bits from weights that already lie on affine grids (a GGUF Q4_1 file, ``affine=True``): affine
groups (``w = scale * q + minimum``, q in 0..15, float minimum), the rule of GGUF's Q4_1 and of
MLX's quantization, so the grid is reproduced exactly. Integer zero points cannot do that:
re-quantizing a Q4_1 group onto such a grid shifts all 32 of its weights by the same amount, an
error the group's activations add up coherently (+20% perplexity on SmolLM2-135M). Float zero
points exist but send onnxruntime to a float kernel that dequantizes on every call. So the
float part is computed beside the integer kernel::

    x @ W  =  MatMulNBits(x; q, scale, zero point 8)  +  group_sums(x) @ offsets

with ``offsets = minimum + 8 * scale`` per group and column (float32) and ``group_sums(x)``
the sum of x over each group of input features, one small float MatMul shared by the
MatMuls that read the same input. The three small extra nodes per MatMul make SmolLM2-135M
decode about 15% (1 thread) to 20% (2 threads) slower than integer zero points did; its 4-bit
conversion went from +20% to +0.4% perplexity against fp16.

A 4-bit model keeps its token embedding and output heads at 8 bits, as llama.cpp's Q4 files
(token_embd in Q8_0) and mlx-lm's mixed recipes do: the head's rounding lands directly on the
logits, and on SmolLM2-135M a 4-bit head alone costs several percent of perplexity. ``head_bits=4``
puts the output heads at 4 bits too, as onnxruntime-genai's int4 recipe does, for like-for-like
comparisons with it: on this project's 2-core CPU SmolLM2-135M then decoded 2-8% faster than with
8-bit heads, for 9% more perplexity (docs/bench.md). The embedding stays at 8 bits either way: a
step gathers one row of it.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer,
                                                             MatMulNBitsQuantizer)

# MatMulNBits accuracy_level 4: activations are quantized to int8 on the fly and the int8
# kernels do the math, the fastest CPU path (onnxruntime-genai's CPU default). It needs integer
# zero points: float ones make onnxruntime fall back to its float kernel, slower and no longer
# batch-invariant.
ACCURACY_LEVEL = 4
EMBEDDING_NODE = "embed"
HEAD_NODES = ("lm_head", "mtp.head")
EMBEDDING_AND_HEAD_BITS = 8
INT4_LEVELS = 15  # codes 0..15
# The zero point MatMulNBits assumes for 4-bit weights given none. Centred codes keep the
# int8-activation kernel's rounding error small: codes 0..15 with zero point 0 measured
# +0.9% perplexity on SmolLM2-135M, centred ones +0.1%.
INT4_ZERO_POINT = 8


def scheme(bits: int, affine: bool = False) -> str:
    """How ``bits``-bit weights are stored (see the module docstring); recorded in the manifest."""
    if bits == 8:
        return "symmetric"
    return "affine" if affine else "asymmetric"


def _quantize_matmuls(model: onnx.ModelProto, bits: int, group_size: int, exclude: list[str],
                      symmetric: bool = True) -> onnx.ModelProto:
    """onnxruntime's quantizer on every constant-weight MatMul not in ``exclude``: symmetric blocks,
    or asymmetric ones with integer zero points."""
    config = DefaultWeightOnlyQuantConfig(block_size=group_size, is_symmetric=symmetric, accuracy_level=ACCURACY_LEVEL,
                                          op_types_to_quantize=("MatMul",), bits=bits)
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _quantize_embedding(model: onnx.ModelProto, group_size: int) -> None:
    """Replace the embedding Gather by an 8-bit GatherBlockQuantized, in place (if the hidden
    size splits into blocks).

    onnxruntime's tool quantizes a Gather only to 4 bits, so the blocks are computed here:
    symmetric, scale = max|w| / 127 per block of ``group_size`` (GGUF's Q8_0 rule, so a Q8_0
    embedding is reproduced exactly), stored as uint8 around an explicit zero point of 128.
    """
    graph = model.graph
    node = next(node for node in graph.node if node.name == EMBEDDING_NODE)
    table_name, ids = node.input
    initializer = next(tensor for tensor in graph.initializer if tensor.name == table_name)
    rows, cols = initializer.dims
    if cols % group_size:
        return  # blocks must tile each row; such an embedding stays float
    table = numpy_helper.to_array(initializer).astype(np.float32)
    blocks = table.reshape(rows, cols // group_size, group_size)
    scales = np.abs(blocks).max(-1) / 127
    safe = np.where(scales == 0, 1, scales)
    quantized = (np.round(blocks / safe[..., None]) + 128).clip(1, 255).astype(np.uint8).reshape(rows, cols)
    zero_points = np.full(scales.shape, 128, np.uint8)

    prefix = f"{table_name}_Q8"
    graph.initializer.extend([numpy_helper.from_array(quantized, prefix),
                              numpy_helper.from_array(scales.astype(np.float32), f"{prefix}_scales"),
                              numpy_helper.from_array(zero_points, f"{prefix}_zero_points")])
    gather = helper.make_node("GatherBlockQuantized", [prefix, ids, f"{prefix}_scales", f"{prefix}_zero_points"],
                              list(node.output), name=EMBEDDING_NODE, domain="com.microsoft",
                              bits=EMBEDDING_AND_HEAD_BITS, block_size=group_size, gather_axis=0, quantize_axis=1)
    position = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(position, gather)
    if not any(table_name in other.input for other in graph.node):  # a tied head keeps its own copy
        graph.initializer.remove(initializer)


def quantize(model: onnx.ModelProto, bits: int, group_size: int, affine: bool = False,
             head_bits: int = EMBEDDING_AND_HEAD_BITS) -> onnx.ModelProto:
    """Return ``model`` with its weights quantized to ``bits`` (4 or 8) in blocks of ``group_size``;
    the embedding at 8 bits, the output heads at 8 unless ``head_bits`` is 4 (with ``bits`` 4).
    ``affine``: 4-bit weights keep a float minimum per group (for weights already on such grids,
    see the module docstring)."""
    routers = [node.name for node in model.graph.node if node.name.endswith(".router")]
    # The quantizer logs one INFO line per node; keep the user's console for our progress bar.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    keep_float = list(routers)
    heads = [] if head_bits == 4 else list(HEAD_NODES)  # left to the 8-bit pass below
    if bits == 4 and affine:
        keep_float += _quantize_matmuls_affine(model.graph, group_size, exclude={*routers, *heads})
    elif bits == 4:
        model = _quantize_matmuls(model, 4, group_size, exclude=[*routers, *heads], symmetric=False)
    # Whatever constant-weight MatMul is left (all of them at 8 bits; at 4, the heads unless head_bits
    # is 4) is quantized to 8 bits.
    model = _quantize_matmuls(model, EMBEDDING_AND_HEAD_BITS, group_size, exclude=keep_float)
    _quantize_embedding(model, group_size)
    return model


def affine_groups(weight: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit affine quantization of a ``(K, N)`` MatMul weight in groups of ``group_size`` along K.

    Returns ``codes`` ``(N, groups, group_size)`` uint8 in 0..15, ``scales`` ``(N, groups)`` and
    ``offsets`` ``(groups, N)`` (float32) such that, for ``k = j * group_size + i``::

        weight[k, n] ~= scales[n, j] * (codes[n, j, i] - 8) + offsets[j, n]

    Per group: ``scale = (max - min) / 15``, ``q = round((w - min) / scale)``, offset ``min + 8 * scale``
    (exact when the weights already lie on such a grid, as a GGUF Q4_1 checkpoint's do). A last
    partial group is padded by repeating its last row, which leaves its minimum and maximum alone.
    """
    k, n = weight.shape
    groups = -(-k // group_size)
    padded = np.pad(weight.astype(np.float32), ((0, groups * group_size - k), (0, 0)), mode="edge")
    blocks = padded.T.reshape(n, groups, group_size)
    low, high = blocks.min(-1), blocks.max(-1)
    scales = (high - low) / INT4_LEVELS
    safe = np.where(scales == 0, 1, scales)  # a constant group: every code 0, the offset carries it
    codes = np.round((blocks - low[..., None]) / safe[..., None]).clip(0, INT4_LEVELS).astype(np.uint8)
    offsets = low + INT4_ZERO_POINT * scales
    return codes, scales.astype(np.float32), np.ascontiguousarray(offsets.T, dtype=np.float32)


def _quantize_matmuls_affine(graph: onnx.GraphProto, group_size: int, exclude: set[str]) -> list[str]:
    """Replace every constant-weight MatMul not in ``exclude`` by the affine int4 form of the
    module docstring, in place. Returns the names of the float MatMuls it adds (which must stay
    float)."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    group_sums: dict[str, str] = {}  # input name -> its group sums
    float_matmuls: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or node.name in exclude:
            nodes.append(node)
            continue
        x, name = node.input[0], node.name
        k, n = weight.dims
        codes, scales, offsets = affine_groups(numpy_helper.to_array(weight), group_size)
        if x not in group_sums:
            group_sums[x] = _group_sums(graph, nodes, initializers, x, k, group_size, f"{name}.group_sums")
            float_matmuls.append(f"{name}.group_sums")
        # MatMulNBits' layout: (N, groups, group_size / 2) bytes, two codes a byte, low nibble first.
        packed = DefaultWeightOnlyQuantizer.pack_int8_to_int4(codes).reshape(*codes.shape[:2], group_size // 2)
        graph.initializer.extend([numpy_helper.from_array(packed, f"{name}.q4"),
                                  numpy_helper.from_array(scales, f"{name}.q4_scales"),
                                  numpy_helper.from_array(offsets, f"{name}.q4_offsets")])
        integer_part = helper.make_node("MatMulNBits", [x, f"{name}.q4", f"{name}.q4_scales"], [f"{name}/int4"],
                                        name=name, domain="com.microsoft", K=k, N=n, bits=4, block_size=group_size,
                                        accuracy_level=ACCURACY_LEVEL)
        float_part = helper.make_node("MatMul", [group_sums[x], f"{name}.q4_offsets"], [f"{name}/group_offsets"],
                                      name=f"{name}.group_offsets")
        total = helper.make_node("Add", [f"{name}/int4", f"{name}/group_offsets"], list(node.output),
                                 name=f"{name}.plus_group_offsets")
        nodes += [integer_part, float_part, total]
        float_matmuls.append(float_part.name)
        if readers[weight.name] == 1:
            graph.initializer.remove(weight)
    del graph.node[:]
    graph.node.extend(nodes)
    return float_matmuls


def _group_sums(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], initializers: dict, x: str, k: int,
                group_size: int, name: str) -> str:
    """Append a node computing x's sums over each group of ``group_size`` input features:
    ``x @ indicator`` with ``indicator[i, j] = 1`` when feature i is in group j (any rank of x,
    a last partial group included). Indicators are shared by every MatMul with the same K."""
    indicator = f"group_indicator.{k}x{group_size}"
    if indicator not in initializers:
        features = np.arange(k)
        table = np.zeros((k, -(-k // group_size)), np.float32)
        table[features, features // group_size] = 1
        initializers[indicator] = numpy_helper.from_array(table, indicator)
        graph.initializer.append(initializers[indicator])
    nodes.append(helper.make_node("MatMul", [x, indicator], [f"{name}/out"], name=name))
    return f"{name}/out"
