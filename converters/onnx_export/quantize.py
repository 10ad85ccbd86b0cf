"""Weight-only int4/int8 quantization with onnxruntime's own tool (MatMulNBits).

Every MatMul with a constant 2-D weight becomes MatMulNBits, and the token embedding Gather
becomes GatherBlockQuantized. MoE routers stay in float: expert selection is a discrete
choice that small weight errors would flip, and DeepSeek keeps them in high precision too.
"""

from __future__ import annotations

import logging

import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

# MatMulNBits accuracy_level 4: activations are quantized to int8 on the fly and the int8
# kernels do the math, the fastest CPU path (onnxruntime-genai's CPU default).
ACCURACY_LEVEL = 4
EMBEDDING_NODE = "embed"


def symmetric(bits: int) -> bool:
    """int8 is symmetric; int4 keeps a zero point per block, which measured closer to float32
    on our parity models (top-1 agreement) at the cost of one byte per 2 blocks."""
    return bits == 8


def quantize(model: onnx.ModelProto, bits: int, group_size: int) -> onnx.ModelProto:
    """Return ``model`` with its weights quantized to ``bits`` (4 or 8) in blocks of ``group_size``."""
    routers = [node.name for node in model.graph.node if node.name.endswith(".router")]
    config = DefaultWeightOnlyQuantConfig(block_size=group_size, is_symmetric=symmetric(bits), accuracy_level=ACCURACY_LEVEL,
                                          op_types_to_quantize=("MatMul",), bits=bits)
    # onnxruntime quantizes a Gather (the embedding) only at 4 bits; at 8 it stays float.
    include = [EMBEDDING_NODE] if bits == 4 else None
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=routers, nodes_to_include=include,
                                     algo_config=config)
    # The quantizer logs one INFO line per node; keep the user's console for our progress bar.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer.process()
    return quantizer.model.model
