"""Preallocated cache buffers bound to onnxruntime through IO binding.

A cache never moves: each graph step writes its new rows in place, and rolling back ``n``
positions only lowers ``length`` (the next step overwrites the dropped rows). ``bind_buffers``
binds what stays bound from step to step (once, while a graph keeps using the same cache);
``bind_step`` what changes every step.

* ``SharedKVCache`` (llama, GroupQueryAttention): per slot one ``(1, kv_heads, max_context,
  head_dim)`` OrtValue bound as both past and present; GQA appends at ``seqlens_k``.
* ``LatentCache`` (DeepSeek MLA): per slot a ``(max_context, width)`` array; the past input is
  the view ``[:length]`` and the new-rows output is bound to the view ``[length:length+n]``.
* ``RecurrentCache`` (Qwen3.5): ``SharedKVCache`` for the full-attention layers, plus each Gated
  DeltaNet layer's convolution and recurrent states, which a step reads whole and writes whole.
  They cannot be cut back by an offset; see the class for how a rollback returns to an earlier state.
"""

from __future__ import annotations

import mmap

import numpy as np
import onnxruntime as ort

from edgemtp.errors import UserError
from edgemtp.layout import ONNX_SNAPSHOT_ROWS


# Buffers hold rows past the usable context: GQA graphs repeat a step's last row into attention
# (converters/onnx_export/llama.py), and its keys and values land just past the step; and a
# one-token step may be padded with a copy of its token (row_invariance.py), one row more.
PADDING_ROWS = 1
SPARE_ROWS = 1 + PADDING_ROWS


def lazy_zeros(shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """A zeroed float32 array whose pages become resident only as steps write them.

    ``np.zeros`` asks Linux for transparent huge pages on arrays of 4 MiB and more, and then the
    first row a step writes into each head's span of a KV buffer makes a whole 2 MiB page
    resident: the default model's 8,190-position cache took 240 MiB at its first token. An
    anonymous map without huge pages grows 4 KiB at a time instead.
    """
    count = int(np.prod(shape))
    region = mmap.mmap(-1, max(count * 4, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere the pages are small anyway
        region.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(region, np.float32, count).reshape(shape)


class _Cache:
    def __init__(self, max_context: int):
        self.max_context = max_context
        self.length = 0

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_context:
            raise UserError(f"the context is full ({self.length} + {n} > {self.max_context} tokens); "
                            "start a new conversation or load the model with a larger max_context")

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} cached positions")
        self.length -= n

    def advance(self, n: int) -> None:
        self.length += n

    def clear(self) -> None:
        self.length = 0


class SharedKVCache(_Cache):
    def __init__(self, layout: dict, slots: range | list[int], max_context: int):
        super().__init__(max_context)
        shape = [max_context + SPARE_ROWS if d == "max_context" else d for d in layout["shape"]]
        self._pairs = []  # (input name, output name, OrtValue) per bound buffer
        for slot in slots:
            for past, present in zip(layout["inputs"], layout["outputs"], strict=True):
                buffer = ort.OrtValue.ortvalue_from_numpy(lazy_zeros(shape))
                self._pairs.append((past.format(slot=slot), present.format(slot=slot), buffer))
        self.nbytes = len(self._pairs) * int(np.prod(shape)) * 4

    def bind_buffers(self, binding: ort.IOBinding) -> None:
        for past, present, buffer in self._pairs:
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)

    def bind_step(self, binding: ort.IOBinding, n: int) -> None:
        total = self.length + n + 1  # GQA also sees the repeated row
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))


class LatentCache(_Cache):
    def __init__(self, layout: dict, slots: range | list[int], max_context: int):
        super().__init__(max_context)
        self._buffers = []  # (input name, output name, array) per bound buffer
        for slot in slots:
            for past, new, width in zip(layout["inputs"], layout["outputs"], layout["widths"], strict=True):
                self._buffers.append((past.format(slot=slot), new.format(slot=slot),
                                      lazy_zeros((max_context + PADDING_ROWS, width))))
        self.nbytes = sum(buffer.nbytes for _, _, buffer in self._buffers)
        self._keep_alive: list[ort.OrtValue] = []

    def bind_buffers(self, binding: ort.IOBinding) -> None:
        pass  # the bound views move with ``length``: bind_step

    def bind_step(self, binding: ort.IOBinding, n: int) -> None:
        # OrtValues made from numpy views share the buffer's memory (no copy); keep them alive
        # until the run that uses them is over.
        self._keep_alive = []
        for past, new, buffer in self._buffers:
            past_view = ort.OrtValue.ortvalue_from_numpy(buffer[: self.length])
            new_view = ort.OrtValue.ortvalue_from_numpy(buffer[self.length: self.length + n])
            binding.bind_ortvalue_input(past, past_view)
            binding.bind_ortvalue_output(new, new_view)
            self._keep_alive += [past_view, new_view]


# Steps of 2 up to this many tokens keep each position's Gated DeltaNet states; a longer step (a
# prefill) does not.
SNAPSHOT_ROWS = ONNX_SNAPSHOT_ROWS


class _LayerStates:
    """One Gated DeltaNet layer's states: two buffers each for the convolution state ``(1, channels,
    kernel - 1)`` and the recurrent state ``(1, heads, key dim, value dim)``, and the buffers its
    per-position snapshots are written to (``layout["recurrent"]`` lists the convolution first)."""

    def __init__(self, layout: dict, slot: int):
        self.inputs = [name.format(slot=slot) for name in layout["inputs"]]
        self.outputs = [name.format(slot=slot) for name in layout["outputs"]]
        self.snapshot_names = [name.format(slot=slot) for name in layout["snapshots"]]
        conv_shape, state_shape = layout["shapes"]
        # buffers[i][b]: state i (convolution, recurrent) in buffer b; OrtValues share the arrays' memory.
        self.buffers = [[np.zeros(shape, np.float32) for _ in range(2)] for shape in (conv_shape, state_shape)]
        self.values = [[ort.OrtValue.ortvalue_from_numpy(array) for array in pair] for pair in self.buffers]
        self.kernel_rows = conv_shape[2]  # kernel - 1
        # The recurrent state after each position, and the convolution's input rows (its state and the
        # step's rows), of the last step that kept them.
        self.states = np.zeros((SNAPSHOT_ROWS, *state_shape[1:]), np.float32)
        self.conv_rows = np.zeros((self.kernel_rows + SNAPSHOT_ROWS, conv_shape[1]), np.float32)
        self.nbytes = sum(array.nbytes for pair in self.buffers for array in pair) + self.states.nbytes + \
            self.conv_rows.nbytes

    def restore(self, current: int, kept: int) -> None:
        """Write the states after the first ``kept`` positions of the last step into buffer ``current``."""
        conv, state = (pair[current] for pair in self.buffers)
        state[0] = self.states[kept - 1]
        conv[0] = self.conv_rows[kept: kept + self.kernel_rows].T


class RecurrentCache(SharedKVCache):
    """Keys and values of the full-attention slots, and the Gated DeltaNet layers' states.

    A step reads each state from one buffer and writes it to the other (an op cannot safely read
    and write the same buffer), and the next step swaps them. So after a step the other buffers
    still hold the states from before it, at no cost, and a step of 2 to ``SNAPSHOT_ROWS`` tokens
    also writes every position's states: a rollback into that step copies the states at its last
    kept position back (``restore``). Before the last step, the backend recomputes
    (``OnnxBackend.trunk_rollback``).
    """

    def __init__(self, layout: dict, slots: range | list[int], max_context: int):
        recurrent = layout["recurrent"]
        super().__init__(layout, [slot for slot in slots if slot not in recurrent["slots"]], max_context)
        self._layers = [_LayerStates(recurrent, slot) for slot in recurrent["slots"]]
        self.nbytes += sum(layer.nbytes for layer in self._layers)
        self._current = 0  # which buffer holds the states at ``length``
        self.step_start: int | None = None  # the length before the last step, while its states are kept
        self._snapshot_rows = 0  # positions of the last step whose states are kept
        self._keep_alive: list[ort.OrtValue] = []

    def bind_step(self, binding: ort.IOBinding, n: int) -> None:
        super().bind_step(binding, n)
        # A one-token step needs no snapshot: a rollback into it keeps none of it (the other buffers).
        keep = 1 < n <= SNAPSHOT_ROWS
        binding.bind_cpu_input("keep_states", np.array(keep))
        self._snapshot_rows = n if keep else 0
        # Views of the snapshot buffers (no copy); kept alive until the run that writes them is over.
        self._keep_alive = []
        for layer in self._layers:
            for i in range(2):
                binding.bind_ortvalue_input(layer.inputs[i], layer.values[i][self._current])
                binding.bind_ortvalue_output(layer.outputs[i], layer.values[i][1 - self._current])
            rows = self._snapshot_rows
            views = (layer.states[:rows], layer.conv_rows[:layer.kernel_rows + rows] if rows else layer.conv_rows[:0])
            for name, view in zip(layer.snapshot_names, views):
                value = ort.OrtValue.ortvalue_from_numpy(view)
                binding.bind_ortvalue_output(name, value)
                self._keep_alive.append(value)

    def advance(self, n: int) -> None:
        self.step_start = self.length
        super().advance(n)
        self._current = 1 - self._current

    def restore(self, keep: int) -> bool:
        """Return to the states after ``keep`` positions if the last step started there or kept its
        states for that position; False (and nothing changed) if not."""
        if self.step_start is None or not self.step_start <= keep < self.length:
            return False
        kept = keep - self.step_start
        if kept == 0:  # the other buffers hold those states
            self._current = 1 - self._current
            self.length, self.step_start = keep, None
            return True
        if kept > self._snapshot_rows:
            return False
        for layer in self._layers:
            layer.restore(self._current, kept)
        self.length = keep  # the step's start stays in the other buffers, its snapshots up to here valid
        return True

    def restore_step_start(self) -> None:
        """Return to the states and length from before the last step."""
        if self.step_start is None:
            raise ValueError("no step to return to: the states before it are gone")
        self.restore(self.step_start)

    def clear(self) -> None:
        for layer in self._layers:
            for pair in layer.buffers:
                pair[self._current].fill(0)
        self.length, self.step_start, self._snapshot_rows = 0, None, 0

    def rollback(self, n: int) -> None:
        raise TypeError("recurrent states cannot be cut back by an offset; use OnnxBackend.trunk_rollback")


CACHE_KINDS = {"gqa_shared_buffer": SharedKVCache, "mla_latent": LatentCache}
