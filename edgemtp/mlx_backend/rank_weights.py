"""Loading one rank's part of a model: a slice of the trunk's layers (pipeline), or a shard of
every layer (tensor parallel), reading only the tensors that part holds.

HF and mlx-lm names agree on ``model.layers.{i}.``, ``model.embed_tokens`` and the rest, so one
renaming serves both formats. A sharded part is built the way mlx-lm shards: its ``Model.shard``
turns the placeholder modules into sharded ones, then each full tensor read from disk is cut to
the placeholder's shape before it is copied into MLX memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from edgemtp.checkpoint import Checkpoint
from edgemtp.config import load_config
from edgemtp.draft_vocab import load_draft_vocab
from edgemtp.mlx_backend.backend import MLXBackend, build_modules, parse_dtype
from edgemtp.mlx_backend.weights import (
    cast,
    is_mlx_dir,
    iter_mtp_weights,
    iter_trunk_weights,
    mtp_layer_count,
    quantize_like_saved,
    read_mlx_dir,
)
from edgemtp.mtp_copies import own_parts


def _part_name(name: str, first: int, end: int, keep_embedding: bool, finishes: bool) -> str | None:
    """A trunk tensor's name in a part holding layers ``[first, end)``, or None if it is not the part's."""
    prefix = "model.layers."
    if name.startswith(prefix):
        index, rest = name[len(prefix):].split(".", 1)
        return f"{prefix}{int(index) - first}.{rest}" if first <= int(index) < end else None
    if name.startswith("model.embed_tokens."):
        return name if keep_embedding else None
    return name if finishes else None


def shard_cutter(module: nn.Module, rank: int, ranks: int) -> Callable:
    """After ``module.shard(group)``: ``cut(name, array)`` gives this rank's part of a full tensor.

    mlx's sharding splits a tensor into ``ranks`` equal parts along one axis and keeps part
    ``rank`` (``mlx.nn.layers.distributed._shard`` with one segment, which is what the llama and
    deepseek_v3 ``shard`` methods use); the axis is the one where the sharded placeholder is
    smaller than the tensor. Works on numpy arrays and on lazily loaded MLX arrays alike."""
    shapes = {name: tuple(array.shape) for name, array in tree_flatten(module.parameters())}

    def cut(name: str, array):
        target = shapes.get(name)
        if target is None or tuple(array.shape) == target:
            return array
        axes = [axis for axis, (full, part) in enumerate(zip(array.shape, target)) if full != part]
        if len(axes) != 1 or array.shape[axes[0]] != target[axes[0]] * ranks:
            raise ValueError(f"{name}: cannot cut {tuple(array.shape)} into {ranks} parts of {target}")
        axis, size = axes[0], target[axes[0]]
        index = [slice(None)] * len(target)
        index[axis] = slice(rank * size, (rank + 1) * size)
        return array[tuple(index)]

    return cut


def load_part(path: str | Path, first_layer: int, end_layer: int, *, embeds: bool, finishes: bool,
              max_kv_size: int, dtype: str = "float32", draft_vocab: bool = True, group=None,
              kv_head_shards: int = 1) -> MLXBackend:
    """An ``MLXBackend`` over trunk layers ``[first_layer, end_layer)``. ``embeds``: it holds the
    embedding; ``finishes``: the final norm, the head and the MTP layers (and the embedding too
    when the head or the MTP layers use it). ``group``: shard every layer over it (tensor
    parallel); each trunk cache then holds ``1/kv_head_shards`` of the key/value heads."""
    path = Path(path)
    config = load_config(path)
    mlx_dir = is_mlx_dir(path, config)
    if mlx_dir:
        trunk_weights, mtp_weights = read_mlx_dir(path)  # mx.load maps lazily: unused tensors are never read
        mtp_layers = mtp_layer_count(mtp_weights) if finishes else 0

        def has_own(index: int, part: str) -> bool:
            return f"layers.{index}.{part}.weight" in mtp_weights
    else:
        ckpt = Checkpoint.open(path)
        mtp_layers = ckpt.num_mtp_layers if finishes else 0

        def has_own(index: int, part: str) -> bool:
            return part in own_parts(ckpt, index)
    trunk, mtp = build_modules(config, mtp_layers, has_own)
    tied = "lm_head" not in trunk
    keep_embedding = embeds or (finishes and (tied or any(not has_own(i, "embed_tokens") for i in range(mtp_layers))))
    inner = trunk.model
    inner.layers = inner.layers[first_layer:end_layer]
    if not keep_embedding:
        inner.pop("embed_tokens")
    if not finishes:
        inner.pop("norm")
        if not tied:
            trunk.pop("lm_head")

    def part_name(name: str) -> str | None:
        return _part_name(name, first_layer, end_layer, keep_embedding, finishes)

    compute_dtype = parse_dtype(dtype)
    if mlx_dir:
        trunk_weights = {part_name(n): a for n, a in trunk_weights.items() if part_name(n) is not None}
        mtp_weights = mtp_weights if finishes else {}
        quantizations = (config.get("quantization"), config.get("mtp_quantization", config.get("quantization")))
        for module, weights, quantization in zip((trunk, mtp), (trunk_weights, mtp_weights), quantizations):
            if quantization:  # before sharding: mlx's shard_linear shards quantized layers too
                quantize_like_saved(module, quantization, weights)
    cut = None
    if group is not None:
        trunk.shard(group)
        cut = shard_cutter(trunk, group.rank(), group.size())
    if mlx_dir:
        # mx.contiguous copies the cut part, so the full lazily loaded tensor is freed after eval.
        trunk.load_weights([(name, cast(name, mx.contiguous(cut(name, array)) if cut else array, compute_dtype))
                            for name, array in trunk_weights.items()])
        mtp.load_weights([(name, cast(name, array, compute_dtype)) for name, array in mtp_weights.items()])
    else:
        def cut_checkpoint(name: str, array):  # the reader yields full names; the cut knows the part's
            return cut(part_name(name), array)

        trunk.load_weights([(part_name(name), array) for name, array in
                            iter_trunk_weights(ckpt, compute_dtype, keep=lambda n: part_name(n) is not None,
                                               cut=cut_checkpoint if cut else None)],
                           strict=True)
        if finishes:
            mtp.load_weights(list(iter_mtp_weights(ckpt, compute_dtype)), strict=True)
    mx.eval(trunk.parameters(), mtp.parameters())
    draft_ids = load_draft_vocab(path, int(config["vocab_size"])) if draft_vocab and finishes else None
    return MLXBackend(config, trunk, mtp, max_kv_size=max_kv_size, dtype=dtype, draft_ids=draft_ids,
                      kv_head_shards=kv_head_shards, first_layer=first_layer)
