"""Which weights a checkpoint must hold, and with which shapes, derived from its config.

This is the single description of the Hugging Face weight layout that the tiny-checkpoint
factory writes, ``Checkpoint.validate`` checks, and the converters walk. Names are exactly
Hugging Face's (DeepSeek-V3 and GLM-4.5 experts one tensor per expert, as on the Hub).

MTP layer ``i`` lives at ``model.layers.{num_hidden_layers + i}.``: a full decoder block of
the trunk's type plus ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.{norm,head}``, and,
as DeepSeek-V3/R1 and GLM-4.5 release them, its own ``embed_tokens`` (in those
releases a copy of the trunk's embedding; see ``edgemtp.mtp_copies``).

Qwen3.5 (``qwen3_5``, and ``qwen3_5_moe`` with its routed MLPs) keeps its released names instead: the trunk under
``model.language_model.``, its one MTP layer under ``mtp.`` (``fc``, ``pre_fc_norm_embedding``,
``pre_fc_norm_hidden``, ``layers.0.`` a full-attention block, ``norm``; the head is the trunk's).
The backends map those names onto the convention above (``eh_proj``, ``enorm``, ``hnorm``,
``shared_head.norm``) when they load them. A fusion head
(``mtp_fusion_layers`` in the config, trained by edgemtp) adds ``fuse_proj`` (3H→H) to layer 0.
"""

from __future__ import annotations

import re

from edgemtp.config import QWEN3_5_TYPES, check_supported, is_qwen3_5, mtp_fusion_layers, num_mtp_layers
from edgemtp.errors import UserError

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
    if is_qwen3_5(config):
        return QWEN3_5_MTP
    return f"model.layers.{config['num_hidden_layers'] + index}."


def expected_weights(config: dict) -> Shapes:
    """Every weight the config promises, trunk first then MTP layers, name -> shape."""
    model_type = check_supported(config)
    if model_type in QWEN3_5_TYPES:
        return _qwen3_5_weights(config)
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


# --- Qwen3.5: released names (see the module docstring) ----------------------

QWEN3_5_TRUNK = "model.language_model."
QWEN3_5_MTP = "mtp."
QWEN3_5_VISION = "model.visual."  # the released checkpoints' vision tower, which edgemtp never loads


# Released MTP names -> edgemtp's MTP convention (ARCHITECTURE.md), after the ``mtp.`` prefix.
_QWEN3_5_MTP_NAMES = {"fc.": "eh_proj.", "pre_fc_norm_embedding.": "enorm.", "pre_fc_norm_hidden.": "hnorm.",
                      "norm.": "shared_head.norm.", "layers.0.": ""}


def qwen3_5_name(name: str) -> str:
    """A released Qwen3.5 tensor's name in the layout every other family uses: the trunk's under
    ``model.`` (mlx-lm's names too), the MTP layer's in edgemtp's MTP convention under ``mtp.``."""
    if name.startswith(QWEN3_5_TRUNK):
        return "model." + name.removeprefix(QWEN3_5_TRUNK)
    if name.startswith(QWEN3_5_MTP):
        part = name.removeprefix(QWEN3_5_MTP)
        for released, ours in _QWEN3_5_MTP_NAMES.items():
            if part.startswith(released):
                return QWEN3_5_MTP + ours + part.removeprefix(released)
    return name


def layer_types(config: dict) -> list[str]:
    """``"linear_attention"`` or ``"full_attention"`` per trunk layer of a Qwen3.5 config: its
    ``layer_types``, else every ``full_attention_interval``-th layer (default 4) full, as
    transformers derives them."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    interval = config.get("full_attention_interval", 4)
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(config["num_hidden_layers"])]


def attention_layers(config: dict) -> int:
    """Trunk layers that cache keys and values: all of them, but Qwen3.5's full-attention ones only."""
    if is_qwen3_5(config):
        return layer_types(config).count("full_attention")
    return int(config["num_hidden_layers"])


# The ONNX backend keeps Gated DeltaNet states after every position of a step of 2 up to this many
# tokens (a verify step of auto k: at most 4 drafts and the pending token); see onnx_backend/cache.py.
ONNX_SNAPSHOT_ROWS = 5


def recurrent_state_bytes(config: dict, backend: str = "mlx") -> int:
    """Bytes of Qwen3.5's Gated DeltaNet states, fixed whatever the context: per linear-attention
    layer a recurrent state of ``value heads x value dim x key dim`` and the convolution's last
    ``kernel - 1`` inputs, both counted as float32 (the recurrent state always is). The ONNX backend
    holds each twice (a step reads one buffer and writes the other) and a verify step's snapshots:
    ``ONNX_SNAPSHOT_ROWS`` recurrent states and convolution input rows. 0 for other models."""
    if not is_qwen3_5(config):
        return 0
    value_heads, key_dim, value_dim = (config["linear_num_value_heads"], config["linear_key_head_dim"],
                                       config["linear_value_head_dim"])
    conv_dim = 2 * config["linear_num_key_heads"] * key_dim + value_heads * value_dim
    state, conv_rows = value_heads * value_dim * key_dim, config.get("linear_conv_kernel_dim", 4) - 1
    per_layer = state + conv_rows * conv_dim
    if backend == "onnx":
        per_layer = 2 * per_layer + ONNX_SNAPSHOT_ROWS * state + (conv_rows + ONNX_SNAPSHOT_ROWS) * conv_dim
    return 4 * per_layer * layer_types(config).count("linear_attention")


_QWEN3_5_NORM = re.compile(r"norm(_embedding|_hidden)?\.weight$")


def is_zero_centred_norm(model_type: str, name: str) -> bool:
    """Whether RMSNorm weight ``name`` is stored as ``w`` for a scale of ``1 + w`` (Qwen3.5's
    norms, the MTP module's ``pre_fc_norm_*`` included, all but the gated norm inside Gated DeltaNet)."""
    return (model_type in QWEN3_5_TYPES and _QWEN3_5_NORM.search(name) is not None
            and not name.endswith("linear_attn.norm.weight"))


def _qwen3_5_weights(config: dict) -> Shapes:
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    if num_mtp_layers(config) > 1:
        raise UserError(f"mtp_num_hidden_layers is {num_mtp_layers(config)}; edgemtp reads Qwen3.5's MTP module "
                        "with one layer (as released); set it to 1 in config.json")
    shapes: Shapes = {QWEN3_5_TRUNK + "embed_tokens.weight": (vocab, hidden)}
    for layer, kind in enumerate(layer_types(config)):
        shapes.update(_qwen3_5_block(config, kind, f"{QWEN3_5_TRUNK}layers.{layer}."))
    shapes[QWEN3_5_TRUNK + "norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    if num_mtp_layers(config):
        shapes[QWEN3_5_MTP + "fc.weight"] = (hidden, 2 * hidden)
        shapes[QWEN3_5_MTP + "pre_fc_norm_embedding.weight"] = (hidden,)
        shapes[QWEN3_5_MTP + "pre_fc_norm_hidden.weight"] = (hidden,)
        shapes.update(_qwen3_5_block(config, "full_attention", QWEN3_5_MTP + "layers.0."))
        shapes[QWEN3_5_MTP + "norm.weight"] = (hidden,)
    return shapes


def _qwen3_5_block(config: dict, kind: str, prefix: str) -> Shapes:
    """A Gated DeltaNet or a gated full-attention block (``q_proj`` also yields the output gate:
    twice the query width), then a dense MLP or (``num_experts``, Qwen3.5 MoE) a routed one."""
    hidden = config["hidden_size"]
    shapes: Shapes = {prefix + "input_layernorm.weight": (hidden,)}
    if kind == "linear_attention":
        attn = prefix + "linear_attn."
        value_heads = config["linear_num_value_heads"]
        key_dim = config["linear_num_key_heads"] * config["linear_key_head_dim"]
        value_dim = value_heads * config["linear_value_head_dim"]
        conv_dim = 2 * key_dim + value_dim
        shapes.update({
            attn + "in_proj_qkv.weight": (conv_dim, hidden),
            attn + "in_proj_z.weight": (value_dim, hidden),
            attn + "in_proj_b.weight": (value_heads, hidden),
            attn + "in_proj_a.weight": (value_heads, hidden),
            attn + "conv1d.weight": (conv_dim, 1, config.get("linear_conv_kernel_dim", 4)),
            attn + "dt_bias": (value_heads,),
            attn + "A_log": (value_heads,),
            attn + "norm.weight": (config["linear_value_head_dim"],),
            attn + "out_proj.weight": (hidden, value_dim),
        })
    else:
        attn = prefix + "self_attn."
        heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
        shapes.update({
            attn + "q_proj.weight": (2 * heads * head_dim, hidden),
            attn + "k_proj.weight": (kv_heads * head_dim, hidden),
            attn + "v_proj.weight": (kv_heads * head_dim, hidden),
            attn + "o_proj.weight": (hidden, heads * head_dim),
            attn + "q_norm.weight": (head_dim,),
            attn + "k_norm.weight": (head_dim,),
        })
    shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    if config.get("num_experts"):
        shapes.update(_qwen3_5_moe_mlp(config, prefix + "mlp."))
    else:
        shapes.update(_mlp(prefix + "mlp.", hidden, config["intermediate_size"]))
    return shapes


def _qwen3_5_moe_mlp(config: dict, mlp: str) -> Shapes:
    """Qwen3.5 MoE's MLP as released (transformers' ``Qwen3_5MoeSparseMoeBlock``): a router, the routed
    experts stacked in two tensors (``gate_up_proj`` holds each expert's gate rows then its up rows),
    and one shared expert scaled by a sigmoid gate."""
    hidden, experts, expert_size = config["hidden_size"], config["num_experts"], config["moe_intermediate_size"]
    shapes: Shapes = {
        mlp + "gate.weight": (experts, hidden),
        mlp + "experts.gate_up_proj": (experts, 2 * expert_size, hidden),
        mlp + "experts.down_proj": (experts, hidden, expert_size),
        mlp + "shared_expert_gate.weight": (1, hidden),
    }
    shapes.update(_mlp(mlp + "shared_expert.", hidden, config["shared_expert_intermediate_size"]))
    return shapes


_BLOCKS = {"llama": _llama_block, "qwen2": _llama_block, "qwen3": _llama_block, "deepseek_v3": _deepseek_v3_block,
           "glm4_moe": _glm4_moe_block}
