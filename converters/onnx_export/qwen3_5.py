"""Qwen3.5 (dense) blocks: Gated DeltaNet linear attention and gated full attention, SwiGLU MLP.

The math is transformers' ``modeling_qwen3_5.py`` (its torch fallbacks
``torch_causal_conv1d_update`` and ``torch_recurrent_gated_delta_rule``):

* Gated DeltaNet (``layer_types`` "linear_attention"): one packed projection gives the
  convolution's input (queries, keys, values), the output gate ``z`` and the per-head ``b`` and
  ``a``. A causal depthwise convolution over the layer's last ``kernel - 1`` inputs (its
  convolution state) and the step's rows, SiLU; L2-normalized queries and keys, each key head
  serving ``value heads / key heads`` value heads; then per position, in order (an ONNX ``Scan``
  over the rows, so a one-token step runs its body once)::

      S = S * exp(g);  S = S + k (x) (v - k S) * beta;  out = q S / sqrt(key dim)

  with ``g = -exp(A_log) * softplus(a + dt_bias)``, ``beta = sigmoid(b)`` and ``S`` the
  recurrent state ``(value heads, key dim, value dim)``; an RMS norm of ``out`` gated by
  ``silu(z)``, then ``out_proj``. Both states are cache inputs and outputs of the graph:
  ``past_key_values.{slot}.conv`` / ``.recurrent`` in, ``present.{slot}.conv`` / ``.recurrent``
  out, where ``{slot}`` is the layer's index (the backend double-buffers them, cache.py). With the
  ``keep_states`` input true (a verify step) the graph also returns ``snapshots.{slot}.recurrent``,
  the state after each position, and ``snapshots.{slot}.conv``, the convolution's input rows (its
  state, then the step's rows), from which a rollback takes the states at any kept position.
* Gated attention ("full_attention", and the MTP layer's block): ``q_proj`` gives each head's
  query and output gate side by side; QK norm; RoPE over the leading ``partial_rotary_factor``
  of each head (rotate-half, computed here: onnxruntime's GroupQueryAttention rotates only
  widths that are multiples of 16, and the factory's tiny models rotate 8); GroupQueryAttention
  over the shared KV buffer (llama.py); ``out * sigmoid(gate)``, ``o_proj``.

Every norm but the gated one is stored zero-centred (``1 + w``); ``released_reader`` adds the one
and maps the released names onto the ones model.py reads.

Rows: a recurrence cannot take the padded one-token steps the backend gives other graphs (the
token would enter the state twice), so these graphs pad themselves: model.py repeats the step's
last row at the input and drops it from the outputs (``PADS_ROWS``). Every MatMul and the
attention then see at least two rows, so a one-token step computes its row as a verify step
would, on every CPU (row_invariance.py). The Gated DeltaNet runs its convolution and recurrence on
the real rows only and repeats the last one again before ``out_proj``; the attention's extra
row lands in the KV buffer's spare slot as in llama.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto, helper

from edgemtp.config import partial_rotary_factor
from edgemtp.converters.onnx_export.graph import (MS_DOMAIN, Block, GraphBuilder, drop_last_row, linear,
                                                  repeat_last_row, rms_norm, swiglu_mlp)
from edgemtp.converters.onnx_export.llama import cache_layout as attention_cache_layout
from edgemtp.converters.onnx_export.llama import head_dim
from edgemtp.converters.onnx_export.rope import cos_sin_tables
from edgemtp.layout import is_zero_centred_norm, layer_types, qwen3_5_name

# transformers' l2norm epsilon (FLA's).
_L2_NORM_EPS = 1e-6


def released_reader(ckpt) -> Callable[[str], np.ndarray]:
    """``read(name)`` over a released checkpoint, by the names model.py asks for (``model.*``,
    ``lm_head.weight``, ``mtp.*`` in edgemtp's MTP convention), zero-centred norms as ``1 + w``."""
    names = [*ckpt.trunk_names(), *(name for i in range(ckpt.num_mtp_layers) for name in ckpt.mtp_names(i))]
    released = {qwen3_5_name(name): name for name in names}

    def read(name: str) -> np.ndarray:
        value = ckpt.read(released[name])
        return value + np.float32(1.0) if is_zero_centred_norm("qwen3_5", released[name]) else value

    return read


def state_shapes(config: dict) -> tuple[list[int], list[int]]:
    """Shapes of a Gated DeltaNet layer's convolution state (the last ``kernel - 1`` inputs, channels
    first as transformers keeps them) and recurrent state."""
    value_heads, key_dim, value_dim = (config["linear_num_value_heads"], config["linear_key_head_dim"],
                                       config["linear_value_head_dim"])
    channels = 2 * config["linear_num_key_heads"] * key_dim + value_heads * value_dim
    return [1, channels, config.get("linear_conv_kernel_dim", 4) - 1], [1, value_heads, key_dim, value_dim]


def cache_layout(config: dict) -> dict:
    """The full-attention layers' KV buffers (llama.py's layout), plus the Gated DeltaNet layers'
    states under ``recurrent`` (edgemtp/onnx_backend/cache.py)."""
    conv, recurrent = state_shapes(config)
    slots = [i for i, kind in enumerate(layer_types(config)) if kind == "linear_attention"]
    return {**attention_cache_layout(config),
            "recurrent": {"slots": slots,
                          "inputs": ["past_key_values.{slot}.conv", "past_key_values.{slot}.recurrent"],
                          "outputs": ["present.{slot}.conv", "present.{slot}.recurrent"],
                          "shapes": [conv, recurrent],
                          # With the keep_states input: each position's recurrent state, the conv's input rows.
                          "snapshots": ["snapshots.{slot}.recurrent", "snapshots.{slot}.conv"]}}


class Qwen3_5Layers:
    """Adds Qwen3.5 decoder blocks to ``g``: a trunk layer's kind follows ``layer_types``; blocks
    past the trunk (the MTP layer's) are full attention."""

    PADS_ROWS = True  # model.py repeats the last row at the input (module docstring)

    def __init__(self, g: GraphBuilder, read: Callable[[str], np.ndarray], config: dict, max_positions: int):
        self.g, self.read, self.config = g, read, config
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.kinds = layer_types(config)
        self.heads, self.kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim = head_dim(config)
        # GQA's lengths count the repeated row, as llama.py's do.
        self.seqlens_k = g.input("seqlens_k", np.int32, [1])
        self.total_length = g.input("total_sequence_length", np.int32, [])
        self.rotary_dim = int(self.head_dim * partial_rotary_factor(config))
        cos, sin = cos_sin_tables(config, self.rotary_dim, max_positions)
        # Rotate-half tables: each frequency twice, as transformers concatenates them.
        self._tables = (g.weight("rope.cos", np.concatenate([cos, cos], axis=1)),
                        g.weight("rope.sin", np.concatenate([sin, sin], axis=1)))
        self._rope = None  # (cos, sin) of this step's rows, built by the first attention
        self._keep = None  # the keep_states input, declared by the first Gated DeltaNet layer

    def block(self, prefix: str, layer_index: int, slot: int) -> Block:
        read = self.read
        full = layer_index >= len(self.kinds) or self.kinds[layer_index] == "full_attention"
        mixer = ((lambda x: self._gated_attention(x, prefix + "self_attn.", slot)) if full
                 else (lambda x: self._gated_delta_net(x, prefix + "linear_attn.", slot)))
        return (mixer, lambda x: swiglu_mlp(self.g, x, read, prefix + "mlp.", f"slot{slot}.mlp"),
                read(prefix + "input_layernorm.weight"), read(prefix + "post_attention_layernorm.weight"))

    # --- gated full attention -------------------------------------------------------------

    def _gated_attention(self, x: str, prefix: str, slot: int) -> str:
        g, read, name, d = self.g, self.read, f"slot{slot}.attn", self.head_dim
        # One MatMul for q_proj (query and gate per head), k_proj and v_proj.
        weight = np.concatenate([read(f"{prefix}{p}.weight") for p in ("q_proj", "k_proj", "v_proj")])
        q_gate, k, v = g.node("Split", [linear(g, x, weight, f"{name}.qkv"),
                                        g.const([2 * self.heads * d, self.kv_heads * d, self.kv_heads * d])],
                              name=f"{name}.split_qkv", outputs=3, axis=-1)
        q_gate = g.node("Reshape", [q_gate, g.const([0, 0, self.heads, 2 * d])], name=f"{name}.q_gate_heads")
        q, gate = g.node("Split", [q_gate], name=f"{name}.split_q_gate", outputs=2, axis=-1, num_outputs=2)
        q = self._rotate(rms_norm(g, q, read(prefix + "q_norm.weight"), self.eps, f"{name}.q_norm"), f"{name}.q")
        k = g.node("Reshape", [k, g.const([0, 0, self.kv_heads, d])], name=f"{name}.k_heads")
        k = self._rotate(rms_norm(g, k, read(prefix + "k_norm.weight"), self.eps, f"{name}.k_norm"), f"{name}.k")
        flat = g.const([0, 0, -1])
        packed = g.node("Concat", [g.node("Reshape", [q, flat], name=f"{name}.q_flat"),
                                   g.node("Reshape", [k, flat], name=f"{name}.k_flat"), v],
                        name=f"{name}.packed", axis=-1)

        shape = [1, self.kv_heads, "max_context", d]
        past_k = g.input(f"past_key_values.{slot}.key", np.float32, shape)
        past_v = g.input(f"past_key_values.{slot}.value", np.float32, shape)
        out, present_k, present_v = g.node(
            "GroupQueryAttention", [packed, "", "", past_k, past_v, self.seqlens_k, self.total_length],
            name=f"{name}.gqa", outputs=[f"{name}/out", f"present.{slot}.key", f"present.{slot}.value"],
            domain=MS_DOMAIN, num_heads=self.heads, kv_num_heads=self.kv_heads, do_rotary=0)
        g.output(present_k, present_k, np.float32, shape)
        g.output(present_v, present_v, np.float32, shape)
        gate = g.node("Sigmoid", [g.node("Reshape", [gate, flat], name=f"{name}.gate_flat")], name=f"{name}.gate")
        gated = g.node("Mul", [out, gate], name=f"{name}.gated")
        return linear(g, gated, read(prefix + "o_proj.weight"), f"{name}.o_proj")

    def _step_rope(self, x: str) -> tuple[str, str]:
        """cos and sin ``(1, rows, 1, rotary_dim)`` at this step's positions, for ``x`` ``(1, rows, ...)``
        (built once, for the first caller's ``x``): the rows end at ``total_sequence_length``, the
        repeated row included."""
        if self._rope is None:
            g = self.g
            rows = g.node("Cast", [g.node("Gather", [g.node("Shape", [x], name="rope.shape"),
                                                     g.const(1)], name="rope.rows", axis=0)],
                          name="rope.rows_int32", to=TensorProto.INT32)
            start = g.node("Sub", [self.total_length, rows], name="rope.start")
            positions = g.node("Range", [start, self.total_length, g.const(1, np.int32)], name="rope.positions")
            self._rope = tuple(g.node("Unsqueeze", [g.node("Gather", [table, positions], name=f"rope.{kind}_rows",
                                                             axis=0), g.const([0, 2])], name=f"rope.{kind}")
                               for kind, table in zip(("cos", "sin"), self._tables))
        return self._rope

    def _rotate(self, x: str, name: str) -> str:
        """RoPE (rotate-half) over the leading ``rotary_dim`` of each head of ``(1, rows, heads, d)``."""
        g, r = self.g, self.rotary_dim
        cos, sin = self._step_rope(x)
        rotated, passed = g.node("Split", [x, g.const([r, self.head_dim - r])], name=f"{name}.split_rotary",
                                 outputs=2, axis=-1)
        x1, x2 = g.node("Split", [rotated], name=f"{name}.halves", outputs=2, axis=-1, num_outputs=2)
        half_turn = g.node("Concat", [g.node("Neg", [x2], name=f"{name}.neg"), x1], name=f"{name}.rotate_half",
                           axis=-1)
        roped = g.node("Add", [g.node("Mul", [rotated, cos], name=f"{name}.cos"),
                               g.node("Mul", [half_turn, sin], name=f"{name}.sin")], name=f"{name}.rope")
        return g.node("Concat", [roped, passed], name=f"{name}.roped", axis=-1)

    # --- Gated DeltaNet ----------------------------------------------------------------------

    def _gated_delta_net(self, x: str, prefix: str, slot: int) -> str:
        g, read, config, name = self.g, self.read, self.config, f"slot{slot}.linear"
        value_heads, value_dim = config["linear_num_value_heads"], config["linear_value_head_dim"]
        channels, values = state_shapes(config)[0][1], value_heads * value_dim
        projections = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
        weight = np.concatenate([read(f"{prefix}{p}.weight") for p in projections])
        # The recurrence runs on the real rows only: the repeated last row leaves here and comes back
        # before out_proj (module docstring).
        projected = drop_last_row(g, linear(g, x, weight, f"{name}.in_proj"), 1, f"{name}.real_rows")
        mixed, z, b, a = g.node("Split", [projected, g.const([channels, values, value_heads, value_heads])],
                                name=f"{name}.split", outputs=4, axis=-1)
        joined, convolved = self._causal_conv(mixed, prefix, slot, name)
        out = self._delta_rule(joined, convolved, b, a, prefix, slot, name)

        # RMS norm over each value head, gated by silu(z); then the repeated row again.
        normed = rms_norm(g, out, read(prefix + "norm.weight"), self.eps, f"{name}.norm")
        z = g.node("Reshape", [z, g.const([-1, value_heads, value_dim])], name=f"{name}.z_heads")
        gated = g.node("Mul", [normed, self._silu(z, f"{name}.z_act")], name=f"{name}.gated")
        gated = g.node("Reshape", [gated, g.const([1, -1, values])], name=f"{name}.gated_rows")
        return linear(g, repeat_last_row(g, gated, 1, f"{name}.out"), read(prefix + "out_proj.weight"),
                      f"{name}.out_proj")

    def _causal_conv(self, mixed: str, prefix: str, slot: int, name: str) -> tuple[str, str]:
        """The causal depthwise convolution of ``mixed`` ``(1, n, channels)`` over the layer's
        convolution state, then SiLU: returns its input ``[state, rows]`` ``(1, channels, kernel - 1 + n)``
        and its output ``(n, channels)``; the new state (the input's last ``kernel - 1`` columns) is
        the graph's ``present.{slot}.conv``."""
        g = self.g
        conv_shape = state_shapes(self.config)[0]
        past = g.input(f"past_key_values.{slot}.conv", np.float32, conv_shape)
        joined = g.node("Concat", [past, g.node("Transpose", [mixed], name=f"{name}.channels_first", perm=[0, 2, 1])],
                        name=f"{name}.conv_input", axis=2)
        present = g.node("Slice", [joined, g.const([-conv_shape[2]]), g.const([2**62]), g.const([2])],
                         name=f"{name}.conv_state")
        g.output(f"present.{slot}.conv", present, np.float32, conv_shape)
        conv = self._depthwise_conv(joined, self.read(prefix + "conv1d.weight"), f"{name}.conv")
        rows = g.node("Transpose", [self._silu(conv, f"{name}.conv_act")], name=f"{name}.rows_first", perm=[0, 2, 1])
        return joined, g.node("Reshape", [rows, g.const([-1, conv_shape[1]])], name=f"{name}.rows")

    def _delta_rule(self, joined: str, convolved: str, b: str, a: str, prefix: str, slot: int, name: str) -> str:
        """The gated delta rule over the rows, from the convolution's output ``(n, channels)`` (queries,
        keys, values) and the projections ``b``, ``a``: returns the output ``(n, value heads, value dim)``;
        the final state is the graph's ``present.{slot}.recurrent``, and with ``keep_states`` the
        state after each position and the convolution's input rows its ``snapshots.{slot}.*``."""
        g, read, config = self.g, self.read, self.config
        key_heads, value_heads = config["linear_num_key_heads"], config["linear_num_value_heads"]
        key_dim, value_dim = config["linear_key_head_dim"], config["linear_value_head_dim"]
        (_, channels, _), state_shape = state_shapes(config)
        keys = key_heads * key_dim
        q, k, v = g.node("Split", [convolved, g.const([keys, keys, value_heads * value_dim])],
                         name=f"{name}.split_qkv", outputs=3, axis=-1)

        # Per-position inputs of the recurrence, shaped for its body's batched MatMuls.
        repeats = value_heads // key_heads
        q = self._value_heads(self._l2_norm(q, key_heads, key_dim, f"{name}.q"), repeats, key_dim, f"{name}.q")
        q = g.node("Mul", [q, g.const(key_dim ** -0.5, np.float32)], name=f"{name}.q_scaled")
        k = self._value_heads(self._l2_norm(k, key_heads, key_dim, f"{name}.k"), repeats, key_dim, f"{name}.k")
        k_column = g.node("Transpose", [k], name=f"{name}.k_column", perm=[0, 1, 3, 2])
        v = g.node("Reshape", [v, g.const([-1, value_heads, 1, value_dim])], name=f"{name}.v_rows")
        per_head = g.const([-1, value_heads, 1, 1])
        beta = g.node("Reshape", [g.node("Sigmoid", [b], name=f"{name}.beta"), per_head], name=f"{name}.beta_rows")
        softplus = g.node("Softplus", [g.node("Add", [a, g.weight(f"{name}.dt_bias", read(prefix + "dt_bias"))],
                                              name=f"{name}.a_biased")], name=f"{name}.softplus")
        minus_rate = -np.exp(read(prefix + "A_log").astype(np.float32))
        decay = g.node("Exp", [g.node("Mul", [softplus, g.weight(f"{name}.minus_A", minus_rate)],
                                      name=f"{name}.log_decay")], name=f"{name}.decay")
        decay = g.node("Reshape", [decay, per_head], name=f"{name}.decay_rows")

        past_state = g.input(f"past_key_values.{slot}.recurrent", np.float32, state_shape)
        state = g.node("Reshape", [past_state, g.const(state_shape[1:])], name=f"{name}.state_in")
        # With keep_states (a verify step) the recurrence also returns the state after every position
        # and the convolution's input rows, from which a rollback takes the states at the last kept
        # position (edgemtp/onnx_backend/cache.py); a prefill does not write them.
        scan_inputs = [state, q, k, k_column, v, decay, beta]
        branches = {keep: _recurrence(f"{name}.{'keep' if keep else 'final'}", scan_inputs, joined,
                                      g.const([-1, channels]), keep, state_shape[1:], channels)
                     for keep in (True, False)}
        snapshots = [f"snapshots.{slot}.recurrent", f"snapshots.{slot}.conv"]
        final_state, out, _, _ = g.node("If", [self._keep_states()], name=f"{name}.recurrence",
                                        outputs=[f"{name}/final_state", f"{name}/scan_out", *snapshots],
                                        then_branch=branches[True], else_branch=branches[False])
        g.output(snapshots[0], snapshots[0], np.float32, ["n", *state_shape[1:]])
        g.output(snapshots[1], snapshots[1], np.float32, ["conv_rows", channels])
        g.output(f"present.{slot}.recurrent",
                 g.node("Reshape", [final_state, g.const(state_shape)], name=f"{name}.state_out"),
                 np.float32, state_shape)
        return g.node("Reshape", [out, g.const([-1, value_heads, value_dim])], name=f"{name}.out_heads")

    def _keep_states(self) -> str:
        """The ``keep_states`` input (bool): declared by the first Gated DeltaNet layer, so a graph
        without one (the MTP layer's) does not take it."""
        if self._keep is None:
            self._keep = self.g.input("keep_states", np.bool_, [])
        return self._keep

    def _depthwise_conv(self, joined: str, weight: np.ndarray, name: str) -> str:
        """The causal depthwise convolution of ``joined`` ``(1, channels, kernel - 1 + n)`` with ``weight``
        ``(channels, 1, kernel)``: ``(1, channels, n)``, as one Mul and Add per tap in a fixed order.
        onnxruntime's grouped Conv summed a one-token step's taps differently from a longer step's
        (logits ~1e-6 apart), so plain decoding drifted from verification."""
        g, kernel = self.g, weight.shape[2]
        out = None
        for tap in range(kernel):
            end = g.const([tap - kernel + 1 if tap < kernel - 1 else 2**62])
            window = g.node("Slice", [joined, g.const([tap]), end, g.const([2])], name=f"{name}.window{tap}")
            term = g.node("Mul", [window, g.weight(f"{name}.tap{tap}", weight[None, :, 0, tap:tap + 1])],
                          name=f"{name}.tap{tap}")
            out = term if out is None else g.node("Add", [out, term], name=f"{name}.sum{tap}")
        return out

    def _silu(self, x: str, name: str) -> str:
        return self.g.node("Mul", [x, self.g.node("Sigmoid", [x], name=f"{name}.sigmoid")], name=name)

    def _l2_norm(self, x: str, heads: int, dim: int, name: str) -> str:
        """``(rows, heads * dim)`` -> ``(rows, heads, dim)``, each head scaled to unit length."""
        g = self.g
        x = g.node("Reshape", [x, g.const([-1, heads, dim])], name=f"{name}.heads")
        squares = g.node("ReduceSum", [g.node("Mul", [x, x], name=f"{name}.square"), g.const([-1])],
                         name=f"{name}.sum_squares", keepdims=1)
        inverse = g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", [squares, g.const(_L2_NORM_EPS, np.float32)],
                                                               name=f"{name}.eps")], name=f"{name}.sqrt")],
                         name=f"{name}.inverse_norm")
        return g.node("Mul", [x, inverse], name=f"{name}.l2_norm")

    def _value_heads(self, x: str, repeats: int, dim: int, name: str) -> str:
        """``(rows, key heads, dim)`` -> ``(rows, value heads, 1, dim)``: key head ``h`` serves value
        heads ``h * repeats`` to ``h * repeats + repeats - 1`` (transformers' repeat_interleave)."""
        g = self.g
        x = g.node("Unsqueeze", [x, g.const([2])], name=f"{name}.group_axis")
        if repeats > 1:
            x = g.node("Expand", [x, g.const([1, 1, repeats, 1])], name=f"{name}.repeat_heads")
        return g.node("Reshape", [x, g.const([0, -1, 1, dim])], name=f"{name}.value_heads")


def _recurrence(name: str, scan_inputs: list[str], joined: str, rows_shape: str, keep: bool,
                state_dims: list[int], channels: int):
    """A branch of the ``If`` on ``keep_states``: the recurrence over the rows (a ``Scan``), giving
    the final state, every position's output, and with ``keep`` every position's state ``(n, *state_dims)``
    and the convolution's input as rows ``(kernel - 1 + n, channels)`` (empty without)."""
    outputs = [f"{name}/final_state", f"{name}/scan_out", f"{name}/states", f"{name}/conv_rows"]
    if keep:
        columns = f"{name}/conv_columns"
        nodes = [helper.make_node("Scan", scan_inputs, outputs[:3], name=f"{name}.scan",
                                  body=_delta_rule_body(f"{name}.step", keep_states=True), num_scan_inputs=6),
                 helper.make_node("Transpose", [joined], [columns], name=f"{name}.conv_columns", perm=[0, 2, 1]),
                 helper.make_node("Reshape", [columns, rows_shape], outputs[3:], name=f"{name}.conv_rows")]
    else:
        empty = [helper.make_tensor(f"{name}.no_{part}", TensorProto.FLOAT, dims, []) for part, dims in
                 (("states", [0, *state_dims]), ("conv_rows", [0, channels]))]
        nodes = [helper.make_node("Scan", scan_inputs, outputs[:2], name=f"{name}.scan",
                                  body=_delta_rule_body(f"{name}.step", keep_states=False), num_scan_inputs=6),
                 *(helper.make_node("Constant", [], [output], name=f"{name}.{output}", value=tensor)
                   for output, tensor in zip(outputs[2:], empty))]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
                                                for output in outputs])


def _delta_rule_body(name: str, keep_states: bool):
    """One position of the gated delta rule, the ``Scan`` body. State ``S`` ``(heads, key dim,
    value dim)``; per position ``q``, ``k`` ``(heads, 1, key dim)``, ``k_column`` ``(heads, key dim,
    1)``, ``v`` ``(heads, 1, value dim)``, ``decay = exp(g)`` and ``beta`` ``(heads, 1, 1)``. With
    ``keep_states`` the new state is also a per-position output."""
    nodes = [
        helper.make_node("Mul", ["state", "decay"], ["decayed"], name=f"{name}.decay"),
        helper.make_node("MatMul", ["k", "decayed"], ["remembered"], name=f"{name}.remembered"),  # k S
        helper.make_node("Sub", ["v", "remembered"], ["error"], name=f"{name}.error"),
        helper.make_node("Mul", ["error", "beta"], ["delta"], name=f"{name}.delta"),
        helper.make_node("MatMul", ["k_column", "delta"], ["update"], name=f"{name}.update"),  # k (x) delta
        helper.make_node("Add", ["decayed", "update"], ["new_state"], name=f"{name}.new_state"),
        helper.make_node("MatMul", ["q", "new_state"], ["out"], name=f"{name}.out"),
    ]

    def value(tensor: str, rank: int):
        return helper.make_tensor_value_info(tensor, TensorProto.FLOAT, [None] * rank)

    outputs = [value("new_state", 3), value("out", 3)]
    if keep_states:
        nodes.append(helper.make_node("Identity", ["new_state"], ["kept_state"], name=f"{name}.kept_state"))
        outputs.append(value("kept_state", 3))
    inputs = [value("state", 3), *(value(tensor, 3) for tensor in ("q", "k", "k_column", "v", "decay", "beta"))]
    return helper.make_graph(nodes, name, inputs, outputs)
