"""The token embedding that the trunk graph and the MTP graphs gather from, stored once.

Every MTP layer that uses the trunk's embedding (all but those with their own, see
edgemtp/mtp_copies.py) gathers from the same table as the trunk. Instead of each graph holding a
copy, the table's tensors (8-bit blocks, scales and zero points, or the float table) leave the
graphs and become graph inputs of the same names, written once to ``embedding.safetensors``. The
backend memory-maps that file and binds the same arrays into every session (onnxruntime reads a
bound array in place), so the table is also held once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgemtp.converters.onnx_export.quantize import EMBEDDING_NODE

FILE_NAME = "embedding.safetensors"


def embedding_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The initializers the embedding node reads (the gather's ids are a graph input), by name."""
    node = next(node for node in model.graph.node if node.name == EMBEDDING_NODE)
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer
            if tensor.name in node.input}


def same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name])
                                        for name in a)


def detach(model: onnx.ModelProto, names: list[str]) -> None:
    """Turn the initializers ``names`` of ``model`` into graph inputs, in place. (Only the gather
    reads them: a tied output head has its own transposed MatMul weight.)"""
    graph = model.graph
    for tensor in [tensor for tensor in graph.initializer if tensor.name in names]:
        graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        graph.initializer.remove(tensor)
