"""Which weights a checkpoint must hold, and with which shapes, derived from its config.

This is the single description of the Hugging Face weight layout that the tiny-checkpoint
factory writes, ``Checkpoint.validate`` checks, and the converters walk. Names are exactly
Hugging Face's (DeepSeek-V3 and GLM-4.5 experts one tensor per expert, as on the Hub).

MTP layer ``i`` lives at ``model.layers.{num_hidden_layers + i}.``: a full decoder block of
the trunk's type plus ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.{norm,head}``, and,
as DeepSeek-V3/R1 and GLM-4.5 release them, its own ``embed_tokens`` (in those
releases a copy of the trunk's embedding; see ``edgemtp.mtp_copies``). A fusion head
(``mtp_fusion_layers`` in the config, trained by edgemtp) adds ``fuse_proj`` (3H→H) to layer 0.
"""

from __future__ import annotations

import re

from edgemtp.config import check_supported, mtp_fusion_layers, num_mtp_layers

Shapes = dict[str, tuple[int, ...]]

# Projections stored in FP8 with a block scale grid. Embeddings, norms, the MoE router
# and the output heads stay in high precision, as in DeepSeek-V3's own FP8 release.
_FP8_QUANTIZED = re.compile(
    r"\.(self_attn\.(q_proj|k_proj|v_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(\w+\.)*(gate_proj|up_proj|down_proj)"
    r"|eh_proj)\.weight$"
)


def is_fp8_quantized(name: str) -> bool:
    """Whether an FP8 checkpoint stores ``name`` as float8 with a ``weight_scale_inv`` grid."""
    return _FP8_QUANTIZED.search(name) is not None


# An MTP layer's own embedding table (a trunk layer never has one).
_MTP_EMBEDDING = re.compile(r"^model\.layers\.\d+\.embed_tokens\.weight$")


def is_mtp_embedding(name: str) -> bool:
    """Whether ``name`` is an MTP layer's ``embed_tokens`` (released checkpoints store one per layer)."""
    return _MTP_EMBEDDING.match(name) is not None


def is_optional(name: str) -> bool:
    """Weights a checkpoint may omit: an MTP layer without ``shared_head.head`` uses the
    trunk's output head, one without ``embed_tokens`` the trunk's embedding (as MTP layers
    trained by edgemtp do; released checkpoints store both)."""
    return name.endswith(".shared_head.head.weight") or is_mtp_embedding(name)


def mtp_prefix(config: dict, index: int) -> str:
    """Weight-name prefix of MTP layer ``index`` (0-based)."""
    return f"model.layers.{config['num_hidden_layers'] + index}."


def expected_weights(config: dict) -> Shapes:
    """Every weight the config promises, trunk first then MTP layers, name -> shape."""
    model_type = check_supported(config)
    block = _BLOCKS[model_type]
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    layers = config["num_hidden_layers"]

    shapes: Shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        shapes.update(block(config, layer, f"model.layers.{layer}."))
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)

    for index in range(num_mtp_layers(config)):
        prefix = mtp_prefix(config, index)
        shapes[prefix + "embed_tokens.weight"] = (vocab, hidden)
        shapes[prefix + "enorm.weight"] = (hidden,)
        shapes[prefix + "hnorm.weight"] = (hidden,)
        shapes[prefix + "eh_proj.weight"] = (hidden, 2 * hidden)
        shapes.update(block(config, layers + index, prefix))
        shapes[prefix + "shared_head.norm.weight"] = (hidden,)
        shapes[prefix + "shared_head.head.weight"] = (vocab, hidden)
        if index == 0 and mtp_fusion_layers(config) is not None:
            shapes[prefix + "fuse_proj.weight"] = (hidden, 3 * hidden)
    return shapes


def _mlp(prefix: str, hidden: int, intermediate: int, bias: bool = False) -> Shapes:
    shapes = {
        prefix + "gate_proj.weight": (intermediate, hidden),
        prefix + "up_proj.weight": (intermediate, hidden),
        prefix + "down_proj.weight": (hidden, intermediate),
    }
    if bias:
        shapes.update({prefix + "gate_proj.bias": (intermediate,), prefix + "up_proj.bias": (intermediate,),
                       prefix + "down_proj.bias": (hidden,)})
    return shapes


def attention_biases(config: dict) -> tuple[bool, bool]:
    """Whether the q/k/v projections and ``o_proj`` have biases. Qwen2 always biases q, k and v
    and never o (its config has no switch); GLM-4.5 biases q, k and v when ``attention_bias``;
    llama and qwen3 bias all four when ``attention_bias``."""
    bias = bool(config.get("attention_bias", False))
    if config["model_type"] == "qwen2":
        return True, False
    if config["model_type"] == "glm4_moe":
        return bias, False
    return bias, bias


def has_qk_norm(config: dict) -> bool:
    """Whether attention RMS-normalizes each query and key head before RoPE (Qwen3; GLM-4.5 when
    ``use_qk_norm``)."""
    return config["model_type"] == "qwen3" or bool(config.get("use_qk_norm", False))


def _gqa_attention(config: dict, attn: str) -> Shapes:
    """q/k/v/o projections of grouped-query attention, their biases and QK norms."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    shapes: Shapes = {
        attn + "q_proj.weight": (heads * head_dim, hidden),
        attn + "k_proj.weight": (kv_heads * head_dim, hidden),
        attn + "v_proj.weight": (kv_heads * head_dim, hidden),
        attn + "o_proj.weight": (hidden, heads * head_dim),
    }
    qkv_bias, o_bias = attention_biases(config)
    if qkv_bias:
        shapes.update({attn + "q_proj.bias": (heads * head_dim,), attn + "k_proj.bias": (kv_heads * head_dim,),
                       attn + "v_proj.bias": (kv_heads * head_dim,)})
    if o_bias:
        shapes[attn + "o_proj.bias"] = (hidden,)
    if has_qk_norm(config):
        shapes.update({attn + "q_norm.weight": (head_dim,), attn + "k_norm.weight": (head_dim,)})
    return shapes


def _llama_block(config: dict, layer: int, prefix: str) -> Shapes:
    """Llama's decoder block, which qwen2 (q/k/v biases) and qwen3 (QK norm) extend."""
    hidden = config["hidden_size"]
    shapes: Shapes = {prefix + "input_layernorm.weight": (hidden,)}
    shapes.update(_gqa_attention(config, prefix + "self_attn."))
    shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    shapes.update(_mlp(prefix + "mlp.", hidden, config["intermediate_size"], config.get("mlp_bias", False)))
    return shapes


def _deepseek_v3_block(config: dict, layer: int, prefix: str) -> Shapes:
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    q_rank = config.get("q_lora_rank")
    kv_rank = config["kv_lora_rank"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    attn = prefix + "self_attn."

    shapes: Shapes = {prefix + "input_layernorm.weight": (hidden,)}
    if q_rank:
        shapes[attn + "q_a_proj.weight"] = (q_rank, hidden)
        shapes[attn + "q_a_layernorm.weight"] = (q_rank,)
        shapes[attn + "q_b_proj.weight"] = (heads * (nope + rope), q_rank)
    else:
        shapes[attn + "q_proj.weight"] = (heads * (nope + rope), hidden)
    shapes[attn + "kv_a_proj_with_mqa.weight"] = (kv_rank + rope, hidden)
    shapes[attn + "kv_a_layernorm.weight"] = (kv_rank,)
    shapes[attn + "kv_b_proj.weight"] = (heads * (nope + v_dim), kv_rank)
    shapes[attn + "o_proj.weight"] = (hidden, heads * v_dim)
    shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    shapes.update(_dense_or_routed_mlp(config, layer, prefix + "mlp."))
    return shapes


def _glm4_moe_block(config: dict, layer: int, prefix: str) -> Shapes:
    """GQA attention with q/k/v biases (none on o_proj) and optional per-head QK norm, then
    DeepSeek's MLP layout (dense leading layers, routed and shared experts after)."""
    hidden = config["hidden_size"]
    shapes: Shapes = {prefix + "input_layernorm.weight": (hidden,)}
    shapes.update(_gqa_attention(config, prefix + "self_attn."))
    shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    shapes.update(_dense_or_routed_mlp(config, layer, prefix + "mlp."))
    return shapes


def _dense_or_routed_mlp(config: dict, layer: int, mlp: str) -> Shapes:
    """DeepSeek-style MLP: dense below ``first_k_dense_replace``, else a router with a correction
    bias, per-expert projections and optional shared experts."""
    hidden = config["hidden_size"]
    if layer < config.get("first_k_dense_replace", 0):
        return _mlp(mlp, hidden, config["intermediate_size"])
    shapes: Shapes = {}
    experts = config["n_routed_experts"]
    expert_size = config["moe_intermediate_size"]
    shapes[mlp + "gate.weight"] = (experts, hidden)
    shapes[mlp + "gate.e_score_correction_bias"] = (experts,)
    for expert in range(experts):
        shapes.update(_mlp(f"{mlp}experts.{expert}.", hidden, expert_size))
    if config.get("n_shared_experts"):
        shapes.update(_mlp(mlp + "shared_experts.", hidden, expert_size * config["n_shared_experts"]))
    return shapes


_BLOCKS = {"llama": _llama_block, "qwen2": _llama_block, "qwen3": _llama_block, "deepseek_v3": _deepseek_v3_block,
           "glm4_moe": _glm4_moe_block}
