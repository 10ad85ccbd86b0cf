"""Weight-only int4/int8 quantization with onnxruntime's own tool (MatMulNBits).

Every MatMul with a constant 2-D weight becomes MatMulNBits, and the token embedding Gather
becomes an 8-bit GatherBlockQuantized. MoE routers stay in float: expert selection is a
discrete choice that small weight errors would flip, and DeepSeek keeps them in high precision
too.

A 4-bit model keeps its token embedding and output heads at 8 bits, as llama.cpp's Q4 files
(token_embd in Q8_0) and mlx-lm's mixed recipes do: the head's rounding lands directly on the
logits, and on SmolLM2-135M a 4-bit head alone costs several percent of perplexity.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

# MatMulNBits accuracy_level 4: activations are quantized to int8 on the fly and the int8
# kernels do the math, the fastest CPU path (onnxruntime-genai's CPU default). It needs integer
# zero points: float ones (which could hold a GGUF Q4_1 block's float minimum exactly) make
# onnxruntime fall back to its float kernel, slower and no longer batch-invariant.
ACCURACY_LEVEL = 4
EMBEDDING_NODE = "embed"
HEAD_NODES = ("lm_head", "mtp.head")
EMBEDDING_AND_HEAD_BITS = 8


def symmetric(bits: int) -> bool:
    """int8 is symmetric; int4 keeps a zero point per block, which measured closer to float32
    on our parity models (top-1 agreement) at the cost of one byte per 2 blocks."""
    return bits == 8


def _quantize_matmuls(model: onnx.ModelProto, bits: int, group_size: int, exclude: list[str]) -> onnx.ModelProto:
    config = DefaultWeightOnlyQuantConfig(block_size=group_size, is_symmetric=symmetric(bits), accuracy_level=ACCURACY_LEVEL,
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


def quantize(model: onnx.ModelProto, bits: int, group_size: int) -> onnx.ModelProto:
    """Return ``model`` with its weights quantized to ``bits`` (4 or 8) in blocks of ``group_size``;
    the embedding and output heads always at 8 bits."""
    routers = [node.name for node in model.graph.node if node.name.endswith(".router")]
    # The quantizer logs one INFO line per node; keep the user's console for our progress bar.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    if bits != EMBEDDING_AND_HEAD_BITS:
        model = _quantize_matmuls(model, bits, group_size, exclude=routers + list(HEAD_NODES))
    # Whatever MatMul is left (all of them at 8 bits, the heads at 4) is quantized to 8 bits.
    model = _quantize_matmuls(model, EMBEDDING_AND_HEAD_BITS, group_size, exclude=routers)
    _quantize_embedding(model, group_size)
    return model
