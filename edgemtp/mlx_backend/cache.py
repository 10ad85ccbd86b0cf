"""A key/value cache preallocated once and written by position.

mlx-lm's ``KVCache`` grows in 256-token steps by concatenation; for
speculative decoding we want the opposite trade: one buffer of
``max_size`` positions allocated up front (gpt-fast style), so appending is a
slice write and rolling back rejected draft tokens is just moving ``offset``
back, O(1) and without copying.

The same class serves both attention kinds because it never looks inside the
tensors: for GQA (llama) it holds keys and values ``(1, kv_heads, T, head_dim)``;
for MLA (deepseek_v3) mlx-lm's attention passes the normalized KV latent
``(1, 1, T, kv_lora_rank)`` as "keys" and the rotated RoPE key
``(1, 1, T, qk_rope_head_dim)`` as "values", so only the latent is cached.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import create_attention_mask



class PreallocatedKVCache:
    """Fixed-capacity cache with the interface mlx-lm's attention layers call."""

    def __init__(self, keys_dims: tuple[int, int], values_dims: tuple[int, int], max_size: int, dtype: mx.Dtype):
        """``keys_dims``/``values_dims`` are ``(heads, head_dim)``; ``max_size`` is in tokens."""
        self.max_size = max_size
        self.keys = mx.zeros((1, keys_dims[0], max_size, keys_dims[1]), dtype)
        self.values = mx.zeros((1, values_dims[0], max_size, values_dims[1]), dtype)
        mx.eval(self.keys, self.values)
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write ``keys``/``values`` at the current offset; return everything cached so far."""
        start, end = self.offset, self.offset + keys.shape[2]
        if end > self.max_size:  # callers check first; MLX would silently clip the write
            raise ValueError(f"cache holds {self.max_size} positions, {end} requested")
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def trim(self, n: int) -> int:
        """Forget the last ``n`` positions (they are overwritten by the next write)."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def keep(self, count: int, rows: list[int]) -> None:
        """Of the last ``count`` positions (a tree step), keep ``rows`` (ascending), moved to the
        front of them in that order; the rest is forgotten."""
        start = self.offset - count
        index = mx.array([start + row for row in rows])
        end = start + len(rows)
        self.keys[..., start:end, :] = self.keys[..., index, :]
        self.values[..., start:end, :] = self.values[..., index, :]
        self.offset = end

    def is_trimmable(self) -> bool:
        return True

    def size(self) -> int:
        return self.offset

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """Causal mask for ``n`` new queries over ``offset + n`` keys (mlx-lm's helper)."""
        return create_attention_mask(n, self.offset, return_array, window_size)

    @property
    def nbytes(self) -> int:
        """Bytes reserved by the buffers (they are allocated up front)."""
        return self.keys.nbytes + self.values.nbytes


class RecurrentStateCache:
    """The state of one Gated DeltaNet layer (qwen3_5): the last ``kernel - 1`` inputs of its causal
    convolution (``[0]``) and its recurrent state (``[1]``), behind the interface mlx-lm's
    ``GatedDeltaNet`` calls (``ArraysCache``'s indexing, ``lengths``, ``advance``).

    Unlike keys and values, a recurrent state cannot be cut back to an earlier position. ``mark()``
    keeps the state at the start of a step (references to immutable MLX arrays, so nothing is
    copied) and ``restore()`` returns to it; the backend then runs the trunk again over the
    positions of that step that were kept (``MLXBackend.trunk_rollback``).
    """

    lengths = None  # no padded batches: every position of a step is real

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.state: list[mx.array | None] = [None, None]
        self.offset = 0
        self.mark()

    def __getitem__(self, index: int) -> mx.array | None:
        return self.state[index]

    def __setitem__(self, index: int, value: mx.array) -> None:
        self.state[index] = value

    def advance(self, n: int) -> None:
        self.offset += n

    def mark(self) -> None:
        """Remember the current state as the start of the next step."""
        self._marked = (self.offset, list(self.state))

    @property
    def marked_offset(self) -> int:
        return self._marked[0]

    def restore(self) -> None:
        """Return to the state ``mark()`` remembered."""
        self.offset, self.state = self._marked[0], list(self._marked[1])

    def arrays(self) -> list[mx.array]:
        return [array for array in self.state if array is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of the current state (allocated by the layer on its first step)."""
        return sum(array.nbytes for array in self.arrays())
