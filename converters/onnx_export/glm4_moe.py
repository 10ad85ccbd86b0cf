"""GLM-4.5 blocks: GroupQueryAttention with partial RoPE, q/k/v biases and optional QK norm, then
DeepSeek-V3's sigmoid-routed MoE (moe.py).

The cache, its shared past/present buffer and the repeated last row are exactly llama.py's (read
its docstring): every step hands GQA one row more than it has, so one-token steps equal
verification bitwise.

Partial RoPE stays inside GQA: onnxruntime rotates the leading ``2 * cos.shape[1]`` dimensions of
each head, rotate-half within them, and passes the rest through, as transformers' GLM-4.5 does.
It requires that width to be a multiple of 16 (GLM-4.5 rotates 64 of 128).

QK norm (``use_qk_norm``) normalises each head's query and key before RoPE, so with it the
projections go to GQA as separate query, key and value inputs; without it as one packed input.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgemtp.config import partial_rotary_factor
from edgemtp.converters.onnx_export.graph import (MS_DOMAIN, Block, GraphBuilder, drop_last_row, linear,
                                                  repeat_last_row, rms_norm)
from edgemtp.converters.onnx_export.llama import head_dim
from edgemtp.converters.onnx_export.moe import dense_or_routed_mlp
from edgemtp.converters.onnx_export.rope import cos_sin_tables
from edgemtp.errors import UserError

# onnxruntime's GQA: "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8".
_ROTARY_MULTIPLE = 16


class Glm4MoeLayers:
    """Adds GLM-4.5 decoder blocks to ``g``; declares the position inputs GQA needs once."""

    def __init__(self, g: GraphBuilder, read: Callable[[str], np.ndarray], config: dict, max_positions: int):
        self.g, self.read, self.config = g, read, config
        self.eps = config.get("rms_norm_eps", 1e-5)
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = head_dim(config)
        rotary_dim = int(self.head_dim * partial_rotary_factor(config))
        if rotary_dim % _ROTARY_MULTIPLE:
            raise UserError(f"the ONNX exporter needs RoPE over a multiple of {_ROTARY_MULTIPLE} dimensions "
                            f"(onnxruntime's GroupQueryAttention); this model rotates {rotary_dim} of {self.head_dim}")
        # seqlens_k and total_sequence_length count the repeated row (llama.py).
        self.seqlens_k = g.input("seqlens_k", np.int32, [1])
        self.total_length = g.input("total_sequence_length", np.int32, [])
        cos, sin = cos_sin_tables(config, rotary_dim, max_positions)
        self.cos, self.sin = g.weight("rope.cos", cos), g.weight("rope.sin", sin)

    def block(self, prefix: str, layer_index: int, slot: int) -> Block:
        read = self.read
        return (lambda x: self._attention(x, prefix + "self_attn.", slot),
                dense_or_routed_mlp(self.g, read, self.config, prefix + "mlp.", layer_index, slot),
                read(prefix + "input_layernorm.weight"), read(prefix + "post_attention_layernorm.weight"))

    def _attention(self, x: str, prefix: str, slot: int) -> str:
        g, read, name = self.g, self.read, f"slot{slot}.attn"
        projections = ("q_proj", "k_proj", "v_proj")
        qkv = np.concatenate([read(f"{prefix}{p}.weight") for p in projections])
        has_bias = self.config.get("attention_bias", False)
        qkv_bias = np.concatenate([read(f"{prefix}{p}.bias") for p in projections]) if has_bias else None
        packed = linear(g, x, qkv, f"{name}.qkv", qkv_bias)
        if self.config.get("use_qk_norm", False):
            widths = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
            q, k, v = g.node("Split", [packed, g.const(widths)], name=f"{name}.qkv_split", outputs=3, axis=-1)
            q = self._head_norm(q, read(prefix + "q_norm.weight"), f"{name}.q_norm")
            k = self._head_norm(k, read(prefix + "k_norm.weight"), f"{name}.k_norm")
            qkv_inputs = [repeat_last_row(g, t, 1, f"{name}.{part}") for t, part in zip((q, k, v), "qkv")]
        else:  # GQA splits a packed input itself when key and value are left empty
            qkv_inputs = [repeat_last_row(g, packed, 1, f"{name}.qkv"), "", ""]

        shape = [1, self.kv_heads, "max_context", self.head_dim]
        past_k = g.input(f"past_key_values.{slot}.key", np.float32, shape)
        past_v = g.input(f"past_key_values.{slot}.value", np.float32, shape)
        padded_out, present_k, present_v = g.node(
            "GroupQueryAttention",
            [*qkv_inputs, past_k, past_v, self.seqlens_k, self.total_length, self.cos, self.sin],
            name=f"{name}.gqa", outputs=[f"{name}/padded_out", f"present.{slot}.key", f"present.{slot}.value"],
            domain=MS_DOMAIN, num_heads=self.heads, kv_num_heads=self.kv_heads, do_rotary=1, rotary_interleaved=0)
        out = drop_last_row(g, padded_out, 1, f"{name}.drop_last_row")
        g.output(present_k, present_k, np.float32, shape)
        g.output(present_v, present_v, np.float32, shape)
        return linear(g, out, read(prefix + "o_proj.weight"), f"{name}.o_proj")  # GLM's o_proj has no bias

    def _head_norm(self, x: str, weight: np.ndarray, name: str) -> str:
        """RMS norm over each head's ``head_dim`` values of ``(1, n, heads * head_dim)`` rows."""
        g = self.g
        heads = g.node("Reshape", [x, g.const([0, 0, -1, self.head_dim])], name=f"{name}.heads")  # 0: kept
        normed = rms_norm(g, heads, weight, self.eps, name)
        return g.node("Reshape", [normed, g.const([0, 0, -1])], name=f"{name}.rows")
