"""llama.cpp's ``qwen35`` GGUF layout (Qwen3.5, dense), read back into Qwen3.5's released HF names.

What llama.cpp's converter does to a released checkpoint (``convert_hf_to_gguf.py``'s
``Qwen3NextModel``, ``_LinearAttentionVReorderBase`` and ``_Qwen35MtpMixin``, as in
ggml-org/llama.cpp ``conversion/qwen.py`` at commit 03173d5e78f8; tensor names from
``gguf-py``'s ``MODEL_ARCH.QWEN35`` map and the ``blk.N.nextn.*`` names its loader
``src/models/qwen35.cpp`` reads), and what ``read`` here undoes:

* ``model.language_model.`` is dropped and the tensors take llama.cpp's names
  (``linear_attn.in_proj_qkv`` -> ``attn_qkv``, ``in_proj_z`` -> ``attn_gate``, ``in_proj_a`` ->
  ``ssm_alpha``, ``in_proj_b`` -> ``ssm_beta``, ``conv1d`` -> ``ssm_conv1d``, ``dt_bias`` ->
  ``ssm_dt.bias``, ``A_log`` -> ``ssm_a``, ``norm`` -> ``ssm_norm``, ``out_proj`` -> ``ssm_out``,
  ``post_attention_layernorm`` -> ``post_attention_norm``; the gated ``q_proj`` stays whole as ``attn_q``);
* the MTP layer becomes block ``num_hidden_layers`` (``block_count`` counts it,
  ``nextn_predict_layers`` says so): ``mtp.fc`` -> ``nextn.eh_proj``, ``pre_fc_norm_embedding`` ->
  ``nextn.enorm``, ``pre_fc_norm_hidden`` -> ``nextn.hnorm``, ``mtp.norm`` -> ``nextn.shared_head_norm``,
  ``mtp.layers.0.*`` -> the block's ordinary names;
* values: ``ssm_a = -exp(A_log)``; conv1d squeezed to ``(channels, kernel)``; every zero-centred
  norm stored as ``1 + w`` (all norms but ``linear_attn.norm``);
* where there are fewer key heads than value heads, the value heads of every linear-attention
  tensor are reordered from grouped by key head to tiled (``_reorder_v_heads``).
"""

from __future__ import annotations

import re

import numpy as np

from edgemtp.errors import UserError
from edgemtp.layout import QWEN3_5_MTP, QWEN3_5_TRUNK, is_zero_centred_norm, layer_types

ARCHITECTURE = "qwen35"

# llama.cpp per-block name -> the released name's part after the layer prefix.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_a": "linear_attn.A_log",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# The MTP block's own tensors -> released names.
_NEXTN_NAMES = {
    "nextn.eh_proj.weight": QWEN3_5_MTP + "fc.weight",
    "nextn.enorm.weight": QWEN3_5_MTP + "pre_fc_norm_embedding.weight",
    "nextn.hnorm.weight": QWEN3_5_MTP + "pre_fc_norm_hidden.weight",
    "nextn.shared_head_norm.weight": QWEN3_5_MTP + "norm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": QWEN3_5_TRUNK + "embed_tokens.weight",
    "output_norm.weight": QWEN3_5_TRUNK + "norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# Linear-attention tensors whose value heads llama.cpp reorders: released-name suffix -> (axis, what
# the axis holds: "v" value heads x value dim, "heads" one entry per value head, "qkv" the value part
# after the query and key channels).
_V_HEAD_AXES = {
    "linear_attn.in_proj_qkv.weight": (0, "qkv"),
    "linear_attn.conv1d.weight": (0, "qkv"),
    "linear_attn.in_proj_z.weight": (0, "v"),
    "linear_attn.out_proj.weight": (1, "v"),
    "linear_attn.in_proj_a.weight": (0, "heads"),
    "linear_attn.in_proj_b.weight": (0, "heads"),
    "linear_attn.dt_bias": (0, "heads"),
    "linear_attn.A_log": (0, "heads"),
}


def config(value, path, tensor_names: set[str]) -> dict:
    """The flat Qwen3.5 text config (``config.flat_text_config``'s form) from the GGUF metadata.
    ``value(key, default)`` reads ``qwen35.{key}``."""
    layers_in_file = int(value("block_count"))
    mtp_layers = int(value("nextn_predict_layers", 0))
    hidden = int(value("embedding_length"))
    heads = int(value("attention.head_count"))
    head_dim = int(value("attention.key_length", hidden // heads))
    value_heads = int(value("ssm.time_step_rank"))
    cfg = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "hidden_size": hidden,
        "intermediate_size": int(value("feed_forward_length")),
        "num_hidden_layers": layers_in_file - mtp_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(value("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "linear_num_key_heads": int(value("ssm.group_count")),
        "linear_num_value_heads": value_heads,
        "linear_key_head_dim": int(value("ssm.state_size")),
        "linear_value_head_dim": int(value("ssm.inner_size")) // value_heads,
        "linear_conv_kernel_dim": int(value("ssm.conv_kernel")),
        "full_attention_interval": int(value("full_attention_interval", 4)),
        "max_position_embeddings": int(value("context_length")),
        "rms_norm_eps": value("attention.layer_norm_rms_epsilon"),
        "rope_parameters": {"rope_type": "default", "rope_theta": value("rope.freq_base", 10000.0),
                            "partial_rotary_factor": int(value("rope.dimension_count", head_dim)) / head_dim},
        "hidden_act": "silu",
        "attention_bias": False,
        "mtp_num_hidden_layers": mtp_layers,
    }
    if mtp_layers > 1:
        raise UserError(f"{path}: this qwen35 GGUF has {mtp_layers} MTP layers; Qwen3.5 releases (and edgemtp) have one")
    cfg["layer_types"] = layer_types(cfg)
    return cfg


def hf_name(gguf_name: str, num_hidden_layers: int, path) -> str:
    """The released HF name of a qwen35 GGUF tensor."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match:
        layer, part = int(match.group(1)), match.group(2)
        if layer < num_hidden_layers and part in _BLOCK_NAMES:
            return f"{QWEN3_5_TRUNK}layers.{layer}.{_BLOCK_NAMES[part]}"
        if layer == num_hidden_layers and part in _NEXTN_NAMES:
            return _NEXTN_NAMES[part]
        if layer == num_hidden_layers and part in _BLOCK_NAMES:
            return f"{QWEN3_5_MTP}layers.0.{_BLOCK_NAMES[part]}"
    raise UserError(f"{path}: GGUF tensor {gguf_name!r} has no place in Qwen3.5's layout; "
                    "convert from the HF checkpoint instead")


def hf_shape(name: str, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The released shape of tensor ``name`` stored in the GGUF as ``stored``: conv1d keeps its
    middle axis of 1 (``(channels, 1, kernel)``)."""
    return (stored[0], 1, stored[1]) if name.endswith("conv1d.weight") else stored


def to_hf(name: str, weight: np.ndarray, cfg: dict) -> np.ndarray:
    """The released values of tensor ``name`` from what the GGUF stores (see the module docstring)."""
    if name.endswith("A_log"):
        weight = np.log(-weight)
    elif is_zero_centred_norm("qwen3_5", name):
        weight = weight - np.float32(1.0)
    weight = _grouped_v_heads(name, weight, cfg)
    return weight.reshape(hf_shape(name, weight.shape))


def _grouped_v_heads(name: str, weight: np.ndarray, cfg: dict) -> np.ndarray:
    """Undo llama.cpp's tiling of the value heads (``[K0 K1 .. K0 K1 ..]`` back to
    ``[K0's heads.., K1's heads..]``) where there are fewer key heads than value heads."""
    key_heads, value_heads = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    axis_and_kind = next((spec for suffix, spec in _V_HEAD_AXES.items() if name.endswith(suffix)), None)
    if axis_and_kind is None or key_heads == value_heads:
        return weight
    axis, kind = axis_and_kind
    head_dim = 1 if kind == "heads" else cfg["linear_value_head_dim"]
    if kind == "qkv":  # the query and key channels come first and are not reordered
        qk = 2 * key_heads * cfg["linear_key_head_dim"]
        return np.concatenate([weight[:qk], _untile(weight[qk:], axis, key_heads, value_heads // key_heads,
                                                    head_dim)], axis=axis)
    return _untile(weight, axis, key_heads, value_heads // key_heads, head_dim)


def _untile(weight: np.ndarray, axis: int, key_heads: int, per_key: int, head_dim: int) -> np.ndarray:
    """The inverse of llama.cpp's ``_reorder_v_heads``: ``axis`` holds ``(per_key, key_heads,
    head_dim)`` and goes back to ``(key_heads, per_key, head_dim)``."""
    shape = weight.shape
    split = weight.reshape(*shape[:axis], per_key, key_heads, head_dim, *shape[axis + 1:])
    return np.swapaxes(split, axis, axis + 1).reshape(shape)
