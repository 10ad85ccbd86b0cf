"""Llama blocks: GroupQueryAttention with a shared past/present KV buffer, SwiGLU MLP.

Qwen2 and Qwen3 blocks too: Qwen2 adds q/k/v biases (no o_proj bias), Qwen3 RMS-normalizes each
query and key head (``q_norm``, ``k_norm``) before RoPE; since GQA rotates inside the op, those
norms run on the packed QKV before it enters GQA.

The KV cache of every layer is one preallocated ``(1, kv_heads, max_context, head_dim)`` buffer
bound as both ``past_key_values.{slot}.*`` and ``present.{slot}.*`` (GQA's
past_present_share_buffer mode): the op writes the new rows in place at ``seqlens_k``, so a
step copies nothing and rolling back is just a smaller ``seqlens_k`` next time. RoPE runs
inside GQA (``do_rotary``) from cos/sin tables baked into the graph.

GQA always sees one row more than the step has: the step's last row, repeated. onnxruntime's
GQA sums its one-row case differently from its multi-row case (a float rounding, which the
int8 activations of the next MatMulNBits turn into logit changes of up to ~1), and plain
decoding would then drift from verification. Every other op of the block gives bitwise the same
row whatever the row count, so only attention needs the extra row; the repeated row's keys and
values land in the cache's spare slot just past the step and the next step overwrites them.
Hence ``seqlens_k`` and ``total_sequence_length`` count that row too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgemtp.converters.onnx_export.graph import (MS_DOMAIN, Block, GraphBuilder, drop_last_row, linear,
                                                  repeat_last_row, rms_norm, swiglu_mlp)
from edgemtp.config import partial_rotary_factor
from edgemtp.converters.onnx_export.rope import cos_sin_tables
from edgemtp.errors import UserError
from edgemtp.layout import attention_biases, has_qk_norm


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def cache_layout(config: dict) -> dict:
    """Manifest description of one slot's cache (see edgemtp/onnx_backend/cache.py)."""
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return {"kind": "gqa_shared_buffer", "inputs": ["past_key_values.{slot}.key", "past_key_values.{slot}.value"],
            "outputs": ["present.{slot}.key", "present.{slot}.value"],
            "shape": [1, kv_heads, "max_context", head_dim(config)]}


# onnxruntime's GQA: "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8".
_PARTIAL_ROTARY_MULTIPLE = 16


class LlamaLayers:
    """Adds llama (qwen2, qwen3) decoder blocks to ``g``; declares the position inputs GQA needs once.

    The attention also serves GLM-4.5 (glm4_moe.py): its biases and QK norm follow the model type
    (``edgemtp.layout``), and partial RoPE stays inside GQA, which rotates the leading
    ``2 * cos.shape[1]`` dimensions of each head (rotate-half) and passes the rest through, as
    transformers' GLM-4.5 does; that width must be a multiple of 16 (GLM-4.5 rotates 64 of 128).
    """

    PADS_ROWS = False  # only attention gets the repeated row (module docstring); model.py pads nothing

    def __init__(self, g: GraphBuilder, read: Callable[[str], np.ndarray], config: dict, max_positions: int):
        self.g, self.read, self.config = g, read, config
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = head_dim(config)
        rotary_dim = int(self.head_dim * partial_rotary_factor(config))
        if rotary_dim < self.head_dim and rotary_dim % _PARTIAL_ROTARY_MULTIPLE:
            raise UserError(f"the ONNX exporter needs RoPE over a multiple of {_PARTIAL_ROTARY_MULTIPLE} dimensions "
                            f"(onnxruntime's GroupQueryAttention); this model rotates {rotary_dim} of {self.head_dim}")
        # seqlens_k = total length after this step, its repeated row included (module docstring),
        # minus 1; total_sequence_length = that length.
        self.seqlens_k = g.input("seqlens_k", np.int32, [1])
        self.total_length = g.input("total_sequence_length", np.int32, [])
        cos, sin = cos_sin_tables(config, rotary_dim, max_positions)
        self.cos, self.sin = g.weight("rope.cos", cos), g.weight("rope.sin", sin)

    def block(self, prefix: str, layer_index: int, slot: int) -> Block:
        read = self.read
        return (lambda x: self._attention(x, prefix + "self_attn.", slot),
                lambda x: swiglu_mlp(self.g, x, read, prefix + "mlp.", f"slot{slot}.mlp",
                                     bias=self.config.get("mlp_bias", False)),
                read(prefix + "input_layernorm.weight"), read(prefix + "post_attention_layernorm.weight"))

    def _attention(self, x: str, prefix: str, slot: int) -> str:
        g, read, name = self.g, self.read, f"slot{slot}.attn"
        projections = ("q_proj", "k_proj", "v_proj")
        # One packed QKV MatMul; GQA splits it itself when key/value inputs are left empty.
        qkv = np.concatenate([read(f"{prefix}{p}.weight") for p in projections])
        has_qkv_bias, has_o_bias = attention_biases(self.config)
        qkv_bias = np.concatenate([read(f"{prefix}{p}.bias") for p in projections]) if has_qkv_bias else None
        packed = linear(g, x, qkv, f"{name}.qkv", qkv_bias)
        if has_qk_norm(self.config):
            packed = self._qk_norm(packed, prefix, name)

        shape = [1, self.kv_heads, "max_context", self.head_dim]
        past_k = g.input(f"past_key_values.{slot}.key", np.float32, shape)
        past_v = g.input(f"past_key_values.{slot}.value", np.float32, shape)
        padded = repeat_last_row(g, packed, 1, f"{name}.qkv")  # axis 1: the rows of (1, rows, width)
        padded_out, present_k, present_v = g.node(
            "GroupQueryAttention",
            [padded, "", "", past_k, past_v, self.seqlens_k, self.total_length, self.cos, self.sin],
            name=f"{name}.gqa", outputs=[f"{name}/padded_out", f"present.{slot}.key", f"present.{slot}.value"],
            domain=MS_DOMAIN, num_heads=self.heads, kv_num_heads=self.kv_heads, do_rotary=1, rotary_interleaved=0)
        out = drop_last_row(g, padded_out, 1, f"{name}.drop_last_row")
        g.output(present_k, present_k, np.float32, shape)
        g.output(present_v, present_v, np.float32, shape)
        o_bias = read(prefix + "o_proj.bias") if has_o_bias else None
        return linear(g, out, read(prefix + "o_proj.weight"), f"{name}.o_proj", o_bias)

    def _qk_norm(self, packed: str, prefix: str, name: str) -> str:
        """Packed QKV with every query and key head RMS-normalized (Qwen3, GLM-4.5), values untouched."""
        g = self.g
        widths = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        q, k, v = g.node("Split", [packed, g.const(widths)], name=f"{name}.split_qkv", outputs=3, axis=-1)
        q = self._head_norm(q, weight_name=prefix + "q_norm.weight", name=f"{name}.q_norm")
        k = self._head_norm(k, weight_name=prefix + "k_norm.weight", name=f"{name}.k_norm")
        return g.node("Concat", [q, k, v], name=f"{name}.qk_normed", axis=-1)

    def _head_norm(self, x: str, weight_name: str, name: str) -> str:
        """RMSNorm over each ``head_dim`` slice of ``(1, rows, heads * head_dim)``."""
        g = self.g
        heads = g.node("Reshape", [x, g.const([0, 0, -1, self.head_dim])], name=f"{name}.split_heads")
        normed = rms_norm(g, heads, self.read(weight_name), self.config.get("rms_norm_eps", 1e-6), name)
        return g.node("Reshape", [normed, g.const([0, 0, -1])], name=f"{name}.join_heads")

