"""Tree steps on MLX: every node at its own RoPE position, attending to the cache and its ancestors.

mlx-lm's attention rotates a step's rows from one offset, ``cache.offset``, onwards; a tree's
siblings share a position. ``NodeRoPE`` wraps each trunk layer's RoPE: while a tree step sets
``NodePositions.positions`` it rotates every row at its own position (MLX's RoPE takes one offset
per batch entry, so the rows are moved to the batch axis and back, which gives bitwise the rows a
contiguous offset gives); otherwise it is the wrapped RoPE unchanged. The mask is a boolean array
over ``cache + nodes`` (mlx-lm's MLA attention folds its mask in with ``mx.where``, so it must be
boolean there; the fused attention of GQA takes the same array).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from edgemtp.engine.tree import ancestor_mask, node_depths


class NodePositions:
    """The positions of the current tree step's rows, or None outside tree steps."""

    positions: mx.array | None = None


class NodeRoPE(nn.Module):
    def __init__(self, rope: nn.Module, positions: NodePositions):
        super().__init__()
        self.rope = rope
        self.node_positions = positions  # a plain object: no parameters

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        positions = self.node_positions.positions
        if positions is None:
            return self.rope(x, offset=offset)
        # (1, heads, rows, dim) -> (rows, heads, 1, dim): one offset per row
        return self.rope(x.swapaxes(0, 2), offset=positions).swapaxes(0, 2)


def wrap_ropes(layers, positions: NodePositions) -> None:
    """Give every attention layer of ``layers`` a ``NodeRoPE`` reading ``positions``."""
    for layer in layers:
        if hasattr(layer, "self_attn"):  # Qwen3.5's linear-attention layers have no RoPE
            layer.self_attn.rope = NodeRoPE(layer.self_attn.rope, positions)


def tree_inputs(parents: list[int], cached: int) -> tuple[mx.array, mx.array]:
    """The positions ``(n,)`` of a tree step's rows after ``cached`` cached positions, and its
    boolean mask ``(n, cached + n)``: the whole cache, then the row's ancestors and itself."""
    positions = cached + np.asarray(node_depths(parents), np.int32)
    mask = np.concatenate([np.ones((len(parents), cached), bool), ancestor_mask(parents)], axis=1)
    return mx.array(positions), mx.array(mask)
