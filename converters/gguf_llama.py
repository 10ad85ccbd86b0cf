"""llama.cpp's ``llama`` GGUF layout, read back into Hugging Face llama names.

* the config is rebuilt in HF llama form from the GGUF metadata;
* tensor names are translated to HF names (``blk.3.attn_q.weight`` ->
  ``model.layers.3.self_attn.q_proj.weight``);
* llama.cpp stores Q and K projections with their rows permuted (it converts
  HF's "rotate half" RoPE layout to its interleaved one); ``to_hf`` undoes that
  so the weights match the HF layout our backends expect.
"""

from __future__ import annotations

import re

import numpy as np

from edgemtp.errors import UserError

ARCHITECTURE = "llama"

# GGUF per-layer tensor name -> HF per-layer name.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def config(value, path, tensor_names: set[str]) -> dict:
    """The HF llama config from the GGUF metadata; ``value(key, default)`` reads ``llama.{key}``."""
    hidden = int(value("embedding_length"))
    heads = int(value("attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(value("feed_forward_length")),
        "num_hidden_layers": int(value("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(value("attention.head_count_kv", heads)),
        "head_dim": int(value("rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(value("context_length")),
        "rms_norm_eps": value("attention.layer_norm_rms_epsilon"),
        "rope_theta": value("rope.freq_base", 10000.0),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
    }


def hf_name(gguf_name: str, num_hidden_layers: int, path) -> str:
    """Translate a llama GGUF tensor name into the HF llama name."""
    if gguf_name == "rope_freqs.weight":
        raise UserError(
            f"{path}: this GGUF uses llama3-style scaled RoPE (rope_freqs), which cannot be mapped back to an HF config; "
            "convert from the HF checkpoint instead"
        )
    match = _LAYER_RE.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    else:
        base, _, kind = gguf_name.rpartition(".")
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise UserError(f"GGUF tensor {gguf_name!r} has no llama equivalent; only plain llama GGUF files can be converted")


def hf_shape(name: str, stored: tuple[int, ...]) -> tuple[int, ...]:
    return stored


def to_hf(name: str, weight: np.ndarray, cfg: dict) -> np.ndarray:
    """The HF values: Q and K rows back in HF's order."""
    if name.endswith("self_attn.q_proj.weight"):
        return unpermute_rows(weight, cfg["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return unpermute_rows(weight, cfg["num_key_value_heads"])
    return weight


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py ``permute``).

    llama.cpp reorders each head's rows from ``[first half, second half]`` to
    interleaved pairs; this is the inverse.
    """
    rows = weight.shape[0]
    w = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (HF layout -> GGUF layout); used to write test GGUFs."""
    rows = weight.shape[0]
    w = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)
