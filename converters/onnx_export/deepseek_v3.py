"""DeepSeek-V3 blocks: multi-head latent attention (MLA) and the sigmoid-routed MoE (moe.py).

MLA cache: per token and layer only the latent ``c`` (kv_lora_rank, after kv_a_layernorm) and
the rotated rope key (qk_rope_head_dim). The graph takes the cached rows as
``past.{slot}.latent`` ``(P, r)`` / ``past.{slot}.rope`` ``(P, dr)`` and returns only the ``n``
new rows as ``new.{slot}.*``; the backend binds views of one preallocated buffer for both, so
nothing is copied between steps and rollback is a length change. Positions are ``P + j``.

Attention uses the "absorbed" form: ``kv_b_proj`` is folded into the query (for scores) and
applied after the softmax (for values), so past latents are never expanded to full K/V.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgemtp.converters.onnx_export.graph import Block, GraphBuilder, drop_last_row, linear, repeat_last_row, rms_norm
from edgemtp.converters.onnx_export.moe import dense_or_routed_mlp
from edgemtp.converters.onnx_export.rope import attention_scale_multiplier, cos_sin_tables


def cache_layout(config: dict) -> dict:
    return {"kind": "mla_latent", "inputs": ["past.{slot}.latent", "past.{slot}.rope"],
            "outputs": ["new.{slot}.latent", "new.{slot}.rope"],
            "widths": [config["kv_lora_rank"], config["qk_rope_head_dim"]]}


def _deinterleave(rows: np.ndarray) -> np.ndarray:
    """Reorder rope rows ``(x0, x1, x2, x3, ...)`` to ``(x0, x2, ..., x1, x3, ...)``.

    transformers rotates DeepSeek's interleaved pairs; permuting the q and k rope weights the
    same way turns that into the plain rotate-half RoPE with identical dot products.
    """
    return np.concatenate([rows[0::2], rows[1::2]])


class DeepseekV3Layers:
    PADS_ROWS = False  # only attention gets the repeated row (module docstring); model.py pads nothing

    def __init__(self, g: GraphBuilder, read: Callable[[str], np.ndarray], config: dict, max_positions: int):
        self.g, self.read, self.config = g, read, config
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.heads = config["num_attention_heads"]
        self.nope, self.rope = config["qk_nope_head_dim"], config["qk_rope_head_dim"]
        self.rank, self.v_dim = config["kv_lora_rank"], config["v_head_dim"]
        self.interleaved = config.get("rope_interleave", True)
        cos, sin = cos_sin_tables(config, self.rope, max_positions)
        self.cos_table, self.sin_table = g.weight("rope.cos", cos), g.weight("rope.sin", sin)
        self._positions: tuple[str, str, str] | None = None

    def block(self, prefix: str, layer_index: int, slot: int) -> Block:
        read = self.read
        return (lambda x: self._attention(x, prefix + "self_attn.", slot),
                dense_or_routed_mlp(self.g, read, self.config, prefix + "mlp.", layer_index, slot),
                read(prefix + "input_layernorm.weight"), read(prefix + "post_attention_layernorm.weight"))

    # --- attention -------------------------------------------------------------------------

    def _position_tables(self, past_latent: str) -> tuple[str, str, str]:
        """cos/sin rows for positions ``P .. P+n-1`` and the ``(n+1, P+n)`` additive causal mask
        (its last row repeated, for the repeated query row; see ``_attention``)."""
        if self._positions is None:
            g = self.g
            past = g.node("Shape", [past_latent], name="pos.past", start=0, end=1)
            new = g.node("Shape", ["input_ids"], name="pos.new", start=1, end=2)
            total = g.node("Add", [past, new], name="pos.total")
            scalar = lambda t, n: g.node("Squeeze", [t, g.const([0])], name=n)  # noqa: E731
            past_s, total_s = scalar(past, "pos.past_scalar"), scalar(total, "pos.total_scalar")
            positions = g.node("Range", [past_s, total_s, g.const(1)], name="pos.range")
            cos = g.node("Gather", [self.cos_table, positions], name="pos.cos", axis=0)
            sin = g.node("Gather", [self.sin_table, positions], name="pos.sin", axis=0)
            keys = g.node("Range", [g.const(0), total_s, g.const(1)], name="pos.keys")
            query_col = g.node("Unsqueeze", [positions, g.const([1])], name="pos.query_col")
            visible = g.node("LessOrEqual", [keys, query_col], name="pos.visible")
            mask = g.node("Where", [visible, g.const(0.0, np.float32), g.const(-np.inf, np.float32)], name="pos.mask")
            self._positions = (cos, sin, repeat_last_row(g, mask, 0, "pos.mask"))
        return self._positions

    def _rotate(self, x: str, cos: str, sin: str, name: str) -> str:
        """Rotate-half RoPE on the last axis; cos/sin ``(n, dr/2)`` broadcast over leading axes."""
        g = self.g
        x1, x2 = g.node("Split", [x], name=f"{name}.halves", outputs=2, axis=-1, num_outputs=2)
        first = g.node("Sub", [g.node("Mul", [x1, cos], name=f"{name}.x1c"),
                               g.node("Mul", [x2, sin], name=f"{name}.x2s")], name=f"{name}.first")
        second = g.node("Add", [g.node("Mul", [x2, cos], name=f"{name}.x2c"),
                                g.node("Mul", [x1, sin], name=f"{name}.x1s")], name=f"{name}.second")
        return g.node("Concat", [first, second], name=f"{name}.concat", axis=-1)

    def _attention(self, x: str, prefix: str, slot: int) -> str:
        g, read, name = self.g, self.read, f"slot{slot}.attn"
        heads, nope, rope, rank = self.heads, self.nope, self.rope, self.rank
        past_latent = g.input(f"past.{slot}.latent", np.float32, ["past", rank])
        past_rope = g.input(f"past.{slot}.rope", np.float32, ["past", rope])
        cos, sin = self._position_tables(past_latent)[:2]
        mask = self._positions[2]

        # Queries: (1, n, heads*(nope+rope)) -> (heads, n, nope+rope), rope rows de-interleaved.
        if self.config.get("q_lora_rank"):
            q_a = linear(g, x, read(prefix + "q_a_proj.weight"), f"{name}.q_a")
            q_a = rms_norm(g, q_a, read(prefix + "q_a_layernorm.weight"), self.eps, f"{name}.q_a_norm")
            q_weight, q_in = read(prefix + "q_b_proj.weight"), q_a
        else:
            q_weight, q_in = read(prefix + "q_proj.weight"), x
        if self.interleaved:
            per_head = q_weight.reshape(heads, nope + rope, -1)
            q_weight = np.concatenate([per_head[:, :nope], np.stack([_deinterleave(h[nope:]) for h in per_head])],
                                      axis=1).reshape(heads * (nope + rope), -1)
        q = linear(g, q_in, q_weight, f"{name}.q")
        q = g.node("Reshape", [q, g.const([-1, heads, nope + rope])], name=f"{name}.q_heads")
        q = g.node("Transpose", [q], name=f"{name}.q_t", perm=[1, 0, 2])
        q_nope, q_rope = g.node("Split", [q, g.const([nope, rope])], name=f"{name}.q_split", outputs=2, axis=-1)
        q_rope = self._rotate(q_rope, cos, sin, f"{name}.q_rope")

        # New latent and rope key rows: (n, rank) after kv_a_layernorm, (n, rope) rotated.
        kv_a = read(prefix + "kv_a_proj_with_mqa.weight")
        if self.interleaved:
            kv_a = np.concatenate([kv_a[:rank], _deinterleave(kv_a[rank:])])
        kv = linear(g, x, kv_a, f"{name}.kv_a")
        kv = g.node("Reshape", [kv, g.const([-1, rank + rope])], name=f"{name}.kv_rows")
        latent, k_rope = g.node("Split", [kv, g.const([rank, rope])], name=f"{name}.kv_split", outputs=2, axis=-1)
        latent = rms_norm(g, latent, read(prefix + "kv_a_layernorm.weight"), self.eps, f"{name}.kv_norm")
        k_rope = self._rotate(k_rope, cos, sin, f"{name}.k_rope")
        g.output(f"new.{slot}.latent", latent, np.float32, ["n", rank])
        g.output(f"new.{slot}.rope", k_rope, np.float32, ["n", rope])
        all_latent = g.node("Concat", [past_latent, latent], name=f"{name}.all_latent", axis=0)
        all_rope = g.node("Concat", [past_rope, k_rope], name=f"{name}.all_rope", axis=0)

        # The attention products get one query row more than the step has: its last, repeated.
        # onnxruntime's MatMul sums a one-row product in another order than a multi-row one, and
        # plain decoding would then drift from verification (see llama.py); the extra row makes
        # every step multi-row here. It is a query only (no key or cache row) and dropped below.
        q_nope = repeat_last_row(g, q_nope, 1, f"{name}.q_nope")
        q_rope = repeat_last_row(g, q_rope, 1, f"{name}.q_rope")

        # Absorbed attention: scores = (q_nope W_uk) c^T + q_rope k_rope^T; out = (p c) W_uv^T.
        kv_b = read(prefix + "kv_b_proj.weight").reshape(heads, nope + self.v_dim, rank)
        w_uk = g.weight(f"{name}.w_uk", kv_b[:, :nope])  # (heads, nope, rank)
        w_uv_t = g.weight(f"{name}.w_uv_t", kv_b[:, nope:].transpose(0, 2, 1))  # (heads, rank, v_dim)
        q_latent = g.node("MatMul", [q_nope, w_uk], name=f"{name}.q_latent")
        scores = g.node("Add", [
            g.node("MatMul", [q_latent, g.node("Transpose", [all_latent], name=f"{name}.latent_t", perm=[1, 0])],
                   name=f"{name}.scores_latent"),
            g.node("MatMul", [q_rope, g.node("Transpose", [all_rope], name=f"{name}.rope_t", perm=[1, 0])],
                   name=f"{name}.scores_rope")], name=f"{name}.scores")
        scale = (nope + rope) ** -0.5 * attention_scale_multiplier(self.config)
        scores = g.node("Add", [g.node("Mul", [scores, g.const(scale, np.float32)], name=f"{name}.scaled"), mask],
                        name=f"{name}.masked")
        probs = g.node("Softmax", [scores], name=f"{name}.softmax", axis=-1)
        out = g.node("MatMul", [g.node("MatMul", [probs, all_latent], name=f"{name}.out_latent"), w_uv_t],
                     name=f"{name}.out_heads")
        out = drop_last_row(g, out, 1, f"{name}.drop_repeated_row")
        out = g.node("Transpose", [out], name=f"{name}.out_t", perm=[1, 0, 2])
        out = g.node("Reshape", [out, g.const([1, -1, heads * self.v_dim])], name=f"{name}.out_flat")
        return linear(g, out, read(prefix + "o_proj.weight"), f"{name}.o_proj")
