"""DeepSeek-V3 (MLA attention, MoE) on MLX: mlx-lm's classes built from an HF config.

Exposes the same six names as ``llama.py``. mlx-lm's MLA attention caches
only the normalized KV latent and the rotated RoPE key (it absorbs
``kv_b_proj`` into ``embed_q``/``unembed_out``), so the cache per layer is
``kv_lora_rank + qk_rope_head_dim`` numbers per token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import numpy as np
from mlx_lm.models import deepseek_v3

from edgemtp.config import rope_scaling, rope_theta

# mlx-lm's MLA folds the mask into the RoPE scores with ``mx.where``, so it
# needs a boolean array rather than the "causal" string.
MASK_AS_ARRAY = True

_EXPERT = re.compile(r"^(?P<mlp>.*\.mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


def model_args(config: dict) -> deepseek_v3.ModelArgs:
    """mlx-lm arguments from an HF config, reading RoPE from either config form."""
    return deepseek_v3.ModelArgs.from_dict(
        {**config, "rope_theta": rope_theta(config), "rope_scaling": rope_scaling(config)}
    )


def build_trunk(args: deepseek_v3.ModelArgs, config: dict) -> deepseek_v3.Model:
    model = deepseek_v3.Model(args)
    for layer in model.model.layers:
        _match_rope_layout(layer, config)
    return model


def build_block(
    args: deepseek_v3.ModelArgs, config: dict, layer_idx: int
) -> deepseek_v3.DeepseekV3DecoderLayer:
    """One decoder block for an MTP layer. ``layer_idx`` is the layer's index in
    the checkpoint (past the trunk, so past ``first_k_dense_replace``: DeepSeek's
    MTP blocks are MoE blocks)."""
    layer = deepseek_v3.DeepseekV3DecoderLayer(args, layer_idx=layer_idx)
    _match_rope_layout(layer, config)
    return layer


def _match_rope_layout(layer: deepseek_v3.DeepseekV3DecoderLayer, config: dict) -> None:
    # mlx-lm always rotates interleaved pairs (DeepSeek's released layout);
    # transformers does so only while ``rope_interleave`` is true (its default).
    layer.self_attn.rope.traditional = bool(config.get("rope_interleave", True))


def stacked_experts(
    name: str, read: Callable[[str], np.ndarray], experts: int
) -> list[tuple[str, np.ndarray]] | None:
    """mlx-lm's ``switch_mlp`` tensor for a per-expert HF weight (all experts stacked, as
    mlx-lm's ``sanitize`` does): None for other weights, nothing for experts past 0 (they are
    stacked together with expert 0)."""
    expert = _EXPERT.match(name)
    if not expert:
        return None
    if expert["expert"] != "0":
        return []
    mlp, proj = expert["mlp"], expert["proj"]
    stacked = np.stack([read(f"{mlp}.experts.{e}.{proj}.weight") for e in range(experts)])
    return [(f"{mlp}.switch_mlp.{proj}.weight", stacked)]


def cache_dims(args: deepseek_v3.ModelArgs) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(heads, dim)`` of the cached KV latent ("keys") and RoPE key ("values")."""
    return (1, args.kv_lora_rank), (1, args.qk_rope_head_dim)


def convert_weights(
    names: list[str], read: Callable[[str], np.ndarray], args: deepseek_v3.ModelArgs
) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors -> mlx-lm tensors, one output tensor at a time.

    Same result as mlx-lm's ``Model.sanitize`` (minus its FP8 dequantization,
    which ``Checkpoint.read`` already did with the checkpoint's own block size):
    per-expert projections are stacked into ``switch_mlp``, and ``kv_b_proj`` is
    split per head into ``embed_q`` (absorbed into the query) and ``unembed_out``.
    """
    for name in names:
        if "rotary_emb.inv_freq" in name:
            continue
        stacked = stacked_experts(name, read, args.n_routed_experts)
        if stacked is not None:
            yield from stacked
        elif name.endswith("self_attn.kv_b_proj.weight"):
            prefix = name.removesuffix("kv_b_proj.weight")
            heads, nope = args.num_attention_heads, args.qk_nope_head_dim
            per_head = read(name).reshape(heads, nope + args.v_head_dim, args.kv_lora_rank)
            yield prefix + "embed_q.weight", np.ascontiguousarray(per_head[:, :nope, :].swapaxes(-1, -2))
            yield prefix + "unembed_out.weight", np.ascontiguousarray(per_head[:, nope:, :])
        else:
            yield name, read(name)
