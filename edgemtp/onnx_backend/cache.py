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

import numpy as np
import onnxruntime as ort

from edgemtp.errors import UserError


# Buffers hold rows past the usable context: GQA graphs repeat a step's last row into attention
# (converters/onnx_export/llama.py), and its keys and values land just past the step; and a
# one-token step may be padded with a copy of its token (row_invariance.py), one row more.
PADDING_ROWS = 1
SPARE_ROWS = 1 + PADDING_ROWS


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
                buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
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
                                      np.zeros((max_context + PADDING_ROWS, width), np.float32)))
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


class RecurrentCache(SharedKVCache):
    """Keys and values of the full-attention slots, and two buffers per Gated DeltaNet state.

    A step reads each state from one buffer and writes it to the other (an op cannot safely read
    and write the same buffer), and the next step swaps them. So after a step the other buffers
    still hold the states from before it, at no cost: ``restore_step_start`` swaps back to them,
    and the backend runs the kept tokens of that step again (``OnnxBackend.trunk_rollback``).
    """

    def __init__(self, layout: dict, slots: range | list[int], max_context: int):
        recurrent = layout["recurrent"]
        super().__init__(layout, [slot for slot in slots if slot not in recurrent["slots"]], max_context)
        # (input name, output name, [buffer 0, buffer 1]) per state; OrtValues share the arrays' memory.
        self._states = []
        for slot in recurrent["slots"]:
            for past, present, shape in zip(recurrent["inputs"], recurrent["outputs"], recurrent["shapes"], strict=True):
                arrays = [np.zeros(shape, np.float32) for _ in range(2)]
                self._states.append((past.format(slot=slot), present.format(slot=slot), arrays,
                                     [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]))
        self.nbytes += sum(array.nbytes for _, _, arrays, _ in self._states for array in arrays)
        self._current = 0  # which buffer holds the states at ``length``
        self.step_start: int | None = None  # the length before the last step, while its states are kept

    def bind_step(self, binding: ort.IOBinding, n: int) -> None:
        super().bind_step(binding, n)
        for past, present, _, values in self._states:
            binding.bind_ortvalue_input(past, values[self._current])
            binding.bind_ortvalue_output(present, values[1 - self._current])

    def advance(self, n: int) -> None:
        self.step_start = self.length
        super().advance(n)
        self._current = 1 - self._current

    def restore_step_start(self) -> None:
        """Return to the states and length from before the last step."""
        if self.step_start is None:
            raise ValueError("no step to return to: the states before it are gone")
        self._current = 1 - self._current
        self.length, self.step_start = self.step_start, None

    def clear(self) -> None:
        for _, _, arrays, _ in self._states:
            arrays[self._current].fill(0)
        self.length, self.step_start = 0, None

    def rollback(self, n: int) -> None:
        raise TypeError("recurrent states cannot be cut back by an offset; use OnnxBackend.trunk_rollback")


CACHE_KINDS = {"gqa_shared_buffer": SharedKVCache, "mla_latent": LatentCache}
