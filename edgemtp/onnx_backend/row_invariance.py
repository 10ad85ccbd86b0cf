"""Whether a one-token step computes its row exactly as a verify step would, on this CPU.

Speculative decoding is lossless only if the trunk gives a token the same logits in a one-token
step (plain decoding, the bonus token) as inside a multi-token verify step. onnxruntime picks its
MatMulNBits kernels by CPU and row count, and some one-row kernels sum in another order. Measured
with onnxruntime 1.32: the 4-bit int8-activation kernel's one-row results differ (by ~1e-5) on an
AVX2-only AMD EPYC, and did not on an AVX-512 VNNI one; 8-bit matched on both. The graphs already
give attention its multi-row path (converters/onnx_export/llama.py); where this probe finds the
MatMuls differ too, the backend pads one-token steps with a copy of the token instead.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from edgemtp.converters.onnx_export.quantize import ACCURACY_LEVEL


@cache
def one_row_steps_differ(bits: int, block_size: int) -> bool:
    """Whether this machine's ``bits``-bit MatMulNBits computes a row alone differently from the
    same row among others (probed once per process on random weights; a few milliseconds)."""
    k, n = 8 * block_size, 64
    rng = np.random.default_rng(0)
    weights = helper.make_tensor("B", TensorProto.UINT8, [n, k // block_size, block_size * bits // 8],
                                 rng.integers(0, 256, n * k * bits // 8, dtype=np.uint8).tobytes(), raw=True)
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [n * k // block_size],
                                rng.random(n * k // block_size, dtype=np.float32).tobytes(), raw=True)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block_size, accuracy_level=ACCURACY_LEVEL)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "rows", n])],
                              [weights, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, k), dtype=np.float32)
    alone, among = session.run(None, {"x": x[:, :1]})[0], session.run(None, {"x": x})[0]
    return not np.array_equal(alone[0, 0], among[0, 0])
