"""A small graph builder around ``onnx.helper`` plus the decoder-stack wiring both architectures share.

Node names are unique and readable (``layers.3.attn.qkv``) because the quantizer selects and
excludes nodes by name. Weights are kept as numpy arrays until ``to_model`` so that the
builder never holds two copies of a tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Opset 21 is understood by onnxruntime >= 1.18; contrib ops live in "com.microsoft".
OPSET = 21
MS_DOMAIN = "com.microsoft"

_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
           np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
           np.dtype(np.bool_): TensorProto.BOOL}


class GraphBuilder:
    """Collects nodes, initializers and graph inputs/outputs; ``to_model`` makes the ModelProto."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.weights: dict[str, np.ndarray] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._constants: dict[tuple, str] = {}

    def weight(self, name: str, array: np.ndarray) -> str:
        """Register ``array`` as an initializer called ``name`` and return the name."""
        self.weights[name] = np.ascontiguousarray(array)
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), deduplicated by value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.weight(f"const.{len(self._constants)}", array)
        return self._constants[key]

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1,
             domain: str | None = None, **attrs) -> str | list[str]:
        """Add a node named ``name``; returns its output name (or names when ``outputs`` > 1 / a list)."""
        names = outputs if isinstance(outputs, list) else [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        return names[0] if isinstance(outputs, int) and outputs == 1 else names

    def input(self, name: str, dtype, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _DTYPES[np.dtype(dtype)], shape))
        return name

    def output(self, name: str, source: str, dtype, shape: list) -> None:
        """Expose ``source`` as graph output ``name`` (through an Identity when the names differ)."""
        if source != name:
            self.node("Identity", [source], name=f"output.{name}", outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, _DTYPES[np.dtype(dtype)], shape))

    def to_model(self) -> onnx.ModelProto:
        """The model; empties ``weights``. Each weight moves into the graph on its own and leaves the
        builder right away, so the float weights are held about once: a list of TensorProtos handed
        to ``make_graph`` (which copies them again) held them three times, and converting a 1.6 B
        parameter checkpoint ran out of 24 GB."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs)
        for name in list(self.weights):
            graph.initializer.add().CopyFrom(numpy_helper.from_array(self.weights.pop(name), name))
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets, producer_name="edgemtp")


def linear(g: GraphBuilder, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
    """``x @ weight.T (+ bias)`` for an HF ``(out, in)`` weight; a plain MatMul so the quantizer can take it."""
    y = g.node("MatMul", [x, g.weight(f"{name}.weight", weight.T)], name=name)
    if bias is not None:
        y = g.node("Add", [y, g.weight(f"{name}.bias", bias)], name=f"{name}.bias_add")
    return y


def repeat_last_row(g: GraphBuilder, x: str, axis: int, name: str) -> str:
    """``x`` with its last entry along ``axis`` appended once more: the extra attention row every
    step gets, so that no step is a one-row attention (see llama.py)."""
    # One edge-mode Pad (opset 18's ``axes`` input): the same bytes as Slice + Concat, one node fewer per use.
    return g.node("Pad", [x, g.const([0, 1]), "", g.const([axis])], name=f"{name}.repeat_last_row", mode="edge")


def drop_last_row(g: GraphBuilder, x: str, axis: int, name: str) -> str:
    """``x`` without its last entry along ``axis``: undoes ``repeat_last_row`` on a result."""
    return g.node("Slice", [x, g.const([0]), g.const([-1]), g.const([axis])], name=name)


def rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    return g.node("SimplifiedLayerNormalization", [x, g.weight(f"{name}.weight", weight)], name=name,
                  axis=-1, epsilon=eps, stash_type=1)


def skip_rms_norm(g: GraphBuilder, x: str, residual: str, weight: np.ndarray, eps: float, name: str) -> tuple[str, str]:
    """Fused ``s = x + residual; (rms_norm(s), s)`` — one node instead of Add + norm."""
    out = [f"{name}/normed", "", "", f"{name}/sum"]
    g.node("SkipSimplifiedLayerNormalization", [x, residual, g.weight(f"{name}.weight", weight)], name=name,
           outputs=out, domain=MS_DOMAIN, epsilon=eps)
    return out[0], out[3]


def silu_mul(g: GraphBuilder, gate: str, up: str, name: str) -> str:
    """``silu(gate) * up`` as Sigmoid + 2 Mul (ONNX has no SiLU op below opset 24)."""
    sig = g.node("Sigmoid", [gate], name=f"{name}.sigmoid")
    return g.node("Mul", [g.node("Mul", [gate, sig], name=f"{name}.silu"), up], name=f"{name}.mul")


def swiglu_mlp(g: GraphBuilder, x: str, read: Callable[[str], np.ndarray], prefix: str, name: str,
               bias: bool = False) -> str:
    """``down(silu(gate(x)) * up(x))`` with gate and up packed into one MatMul, then split."""
    gate_up = np.concatenate([read(prefix + "gate_proj.weight"), read(prefix + "up_proj.weight")])
    gate_up_bias = np.concatenate([read(prefix + "gate_proj.bias"), read(prefix + "up_proj.bias")]) if bias else None
    gate, up = g.node("Split", [linear(g, x, gate_up, f"{name}.gate_up", gate_up_bias)], name=f"{name}.split",
                      outputs=2, axis=-1, num_outputs=2)
    down_bias = read(prefix + "down_proj.bias") if bias else None
    return linear(g, silu_mul(g, gate, up, f"{name}.act"), read(prefix + "down_proj.weight"), f"{name}.down", down_bias)


# A block is (attention(x_normed) -> y, mlp(x_normed) -> y, input_norm, post_attention_norm).
Block = tuple[Callable[[str], str], Callable[[str], str], np.ndarray, np.ndarray]


def decoder_stack(g: GraphBuilder, x: str, blocks: list[Block], final_norm: np.ndarray, eps: float,
                  name: str, taps: tuple[int, ...] = ()) -> tuple[str, str] | tuple[str, str, list[str]]:
    """Run pre-norm residual blocks; returns ``(final_norm(h), h)``, and with ``taps`` (block
    indices, not the last) also the residual stream after each of those blocks.

    Each residual add is fused into the following norm (SkipSimplifiedLayerNormalization), the
    wiring onnxruntime-genai's model builder uses, so a llama layer costs ~11 nodes.
    """
    normed = rms_norm(g, x, blocks[0][2], eps, f"{name}.0.input_layernorm")
    residual = x
    tapped = {}
    for i, (attention, mlp, _, post_norm) in enumerate(blocks):
        attn_out = attention(normed)
        normed, residual = skip_rms_norm(g, attn_out, residual, post_norm, eps, f"{name}.{i}.post_attention_layernorm")
        mlp_out = mlp(normed)
        if i + 1 < len(blocks):
            normed, residual = skip_rms_norm(g, mlp_out, residual, blocks[i + 1][2], eps,
                                             f"{name}.{i + 1}.input_layernorm")
            tapped[i] = residual  # the block's output: the next norm's fused sum
    final = skip_rms_norm(g, mlp_out, residual, final_norm, eps, f"{name}.final_norm")
    return (*final, [tapped[i] for i in taps]) if taps else final


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write ``path`` (graph) and ``path.data`` beside it (every weight, one file)."""
    data = path.name + ".data"
    (path.parent / data).unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
