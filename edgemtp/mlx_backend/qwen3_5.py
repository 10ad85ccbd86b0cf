"""Qwen3.5 (dense ``qwen3_5`` and MoE ``qwen3_5_moe``) on MLX: mlx-lm's ``qwen3_5`` text model built
from an HF config (mlx-lm's ``qwen3_5_moe`` model is that same text model with ``num_experts`` set).

Exposes the same six names as ``llama.py``. The trunk is mlx-lm's ``TextModel`` (parameters
``model.*`` and ``lm_head``), which is what mlx-lm's ``Model`` wraps as ``language_model``, so a
conversion loads in mlx-lm too. ``convert_weights`` does what mlx-lm's ``sanitize`` does to a
released checkpoint (``model.language_model.`` prefix dropped, vision tower skipped, conv1d
weights to MLX's channels-last layout, zero-centred norms stored as ``1 + w``, MoE experts' stacked
``gate_up_proj`` split into ``switch_mlp``'s gate and up projections as mlx-lm's ``qwen3_5_moe``
sanitize does) and maps the MTP module's names onto edgemtp's MTP convention (``layout.qwen3_5_name``):

    mtp.fc -> eh_proj, mtp.pre_fc_norm_embedding -> enorm, mtp.pre_fc_norm_hidden -> hnorm,
    mtp.layers.0.* -> the block, mtp.norm -> shared_head.norm (the head is the trunk's).

Its Gated DeltaNet layers keep a convolution and a recurrent state instead of keys and values
(``cache.RecurrentStateCache``; the backend creates one per layer with ``is_linear``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from mlx_lm.models import qwen3_5

from edgemtp.config import partial_rotary_factor, rope_theta
from edgemtp.errors import UserError
from edgemtp.layout import QWEN3_5_VISION, is_zero_centred_norm, layer_types, qwen3_5_name

# The full-attention layers take mlx-lm's "causal" string mask (fast SDPA path).
MASK_AS_ARRAY = False

# A MoE layer's routed experts as released (two stacked tensors) and as mlx-lm's SwitchGLU holds them.
_STACKED_GATE_UP, _STACKED_DOWN = "experts.gate_up_proj", "experts.down_proj"


def model_args(config: dict) -> qwen3_5.TextModelArgs:
    """mlx-lm arguments from an HF config (flattened, see ``config.flat_text_config``)."""
    interval = config.get("full_attention_interval", 4)
    if layer_types(config) != layer_types({**config, "layer_types": None, "full_attention_interval": interval}):
        # mlx-lm places the full-attention layers by full_attention_interval alone.
        raise UserError("this qwen3_5 config's layer_types do not follow full_attention_interval "
                        f"({interval}); mlx-lm cannot build it, use the onnx backend")
    return qwen3_5.TextModelArgs.from_dict(
        {
            **config,
            "full_attention_interval": interval,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta(config),
                                "partial_rotary_factor": partial_rotary_factor(config)},
            "tie_word_embeddings": config.get("tie_word_embeddings", False),
            # transformers' Qwen3_5MoeTopKRouter always renormalizes the chosen experts' weights.
            "norm_topk_prob": True,
        }
    )


def build_trunk(args: qwen3_5.TextModelArgs, config: dict) -> qwen3_5.TextModel:
    return qwen3_5.TextModel(args)


def build_block(args: qwen3_5.TextModelArgs, config: dict, layer_idx: int) -> qwen3_5.DecoderLayer:
    """The MTP layer's block: a full-attention decoder layer. mlx-lm picks the kind from the
    layer index, so it is built as the first full-attention layer's index."""
    return qwen3_5.DecoderLayer(args, layer_idx=args.full_attention_interval - 1)


def cache_dims(args: qwen3_5.TextModelArgs) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(heads, dim)`` of the cached keys and values of the full-attention layers (GQA)."""
    return (args.num_key_value_heads, args.head_dim), (args.num_key_value_heads, args.head_dim)


def convert_weights(
    names: list[str], read: Callable[[str], np.ndarray], args: qwen3_5.TextModelArgs
) -> Iterator[tuple[str, np.ndarray]]:
    """Released tensors -> MLX tensors (see the module docstring); the vision tower is skipped."""
    for name in names:
        if name.startswith(QWEN3_5_VISION) or "rotary_emb.inv_freq" in name:
            continue
        value = read(name)
        if name.endswith("conv1d.weight"):
            value = np.moveaxis(value, 2, 1)  # (channels, 1, kernel) -> (channels, kernel, 1)
        if is_zero_centred_norm("qwen3_5", name):
            value = value + np.float32(1.0)
        name = qwen3_5_name(name)
        if name.endswith(_STACKED_GATE_UP):
            switch = name.removesuffix(_STACKED_GATE_UP) + "switch_mlp."
            half = value.shape[1] // 2  # each expert's gate rows, then its up rows
            yield switch + "gate_proj.weight", value[:, :half]
            yield switch + "up_proj.weight", value[:, half:]
        elif name.endswith(_STACKED_DOWN):
            yield name.removesuffix(_STACKED_DOWN) + "switch_mlp.down_proj.weight", value
        else:
            yield name, value
