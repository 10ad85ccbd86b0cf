"""``OnnxBackend``: the Backend interface (edgemtp/engine/backend.py) over onnxruntime sessions.

One session runs the trunk graph and one runs each MTP layer's graph. Every cache (the trunk's
and one per MTP depth) is a preallocated buffer bound with IO binding (see cache.py), so a
step copies no cache and a rollback is O(1), except over Qwen3.5's Gated DeltaNet states, which a
rollback copies back from a verify step's per-position snapshots (``trunk_rollback``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgemtp.checkpoint import memory_map
from edgemtp.config import load_config
from edgemtp.converters.onnx_export.manifest import read_manifest, weight_bytes
from edgemtp.converters.onnx_export.moe import gathered_bytes_per_row
from edgemtp.draft_vocab import read_draft_vocab
from edgemtp.engine.backend import prompt_step_rows
from edgemtp.errors import UserError
from edgemtp.onnx_backend.cache import CACHE_KINDS, PADDING_ROWS, SPARE_ROWS, RecurrentCache
from edgemtp.onnx_backend.row_invariance import one_row_steps_differ

DEFAULT_MAX_CONTEXT = 4096


def session_options(threads: int | None, spin: bool = True) -> ort.SessionOptions:
    """``spin``: whether the session's idle threads busy-wait for the next op (onnxruntime's
    default; it saves the wake-up latency between the many small ops of a decode step)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class _Graph:
    """A session plus its binding; runs one step against a cache.

    The binding is kept between steps: a cache's buffers (60 for SmolLM2's trunk) are bound
    once while the graph keeps running against that cache, and each step binds only its token
    ids, positions and two fresh output arrays, which come back without a copy.
    """

    def __init__(self, path: Path, threads: int | None, hidden_output: str, constants: dict[str, ort.OrtValue],
                 pad_one_token_steps: bool, spin: bool = True):
        """``constants``: inputs bound once and kept (the shared embedding, see the manifest).
        ``pad_one_token_steps``: run a one-token step as two rows (the token twice) and keep the
        first, because this CPU's kernels compute a row alone differently (row_invariance.py)."""
        if not path.is_file():
            raise UserError(f"{path} is missing; re-export the model (edgemtp.converters.onnx_export.export_onnx)")
        options = session_options(threads, spin)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.constants = constants
        self.pad_one_token_steps = pad_one_token_steps
        widths = {output.name: output.shape[-1] for output in self.session.get_outputs()}
        self.outputs = [("logits", widths["logits"]), (hidden_output, widths[hidden_output])]
        # Trunks exported since manifest version 6 run their output head from a given row on.
        self.takes_logits_from = any(given.name == "logits_from" for given in self.session.get_inputs())
        self._bound_cache = None  # the cache whose buffers the binding holds

    def run(self, cache, feeds: dict[str, np.ndarray], logits_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``logits_from``: the first of the step's rows to compute logits for (trunks that take it);
        returns those rows' logits and every row's hidden state."""
        n = feeds["input_ids"].shape[1]
        cache.check_room(n)
        # The graphs give attention an extra row themselves (manifest.py); where the MatMuls need one
        # too, the padding row is computed, written past the step in the cache, and overwritten later.
        rows = n
        if n == 1 and self.pad_one_token_steps:
            feeds = {name: np.concatenate([value, value], axis=1) for name, value in feeds.items()}
            rows = 1 + PADDING_ROWS
        binding = self.binding
        if cache is not self._bound_cache:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for name, value in self.constants.items():
                binding.bind_ortvalue_input(name, value)
            cache.bind_buffers(binding)
            self._bound_cache = cache
        if not self.takes_logits_from:
            logits_from = 0
        else:
            feeds = {**feeds, "logits_from": np.array([logits_from], np.int64)}
        cache.bind_step(binding, rows)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        # New arrays every step: callers may keep what an earlier step returned.
        (logits_name, vocab), (hidden_name, width) = self.outputs
        logits = np.empty((1, rows - logits_from, vocab), np.float32)
        hidden = np.empty((1, rows, width), np.float32)
        for name, array in ((logits_name, logits), (hidden_name, hidden)):
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
        self.session.run_with_iobinding(binding)
        cache.advance(n)
        return logits[0, : n - logits_from], hidden[0, :n]


class OnnxBackend:
    """Backend over an exported ONNX directory (manifest.json + trunk/ + mtp*/)."""

    def __init__(self, path: str | Path, threads: int | None = None, max_context: int | None = None):
        path = Path(path)
        self.manifest = manifest = read_manifest(path)
        self.config = load_config(path)
        self.vocab_size = int(self.config["vocab_size"])
        self.hidden_size = int(self.config["hidden_size"])
        self.prompt_step_rows = prompt_step_rows(gathered_bytes_per_row(self.config))  # routed experts gather per row
        # Positions stay spare for the rows graphs write past every step (cache.py).
        self.max_context = min(int(max_context or DEFAULT_MAX_CONTEXT), int(manifest["max_positions"]) - SPARE_ROWS)
        # The embedding, memory-mapped once and bound into every graph that shares it (zero-copy).
        self._embedding = memory_map(path / manifest["embedding"])  # the OrtValues below read these maps
        embedding = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self._embedding.items()}

        def constants(entry: dict) -> dict[str, ort.OrtValue]:
            return {name: embedding[name] for name in entry["shared_inputs"]}

        def needs_padding(quantization: dict) -> bool:
            if manifest.get("graphs_pad_rows"):
                return False  # every MatMul of these graphs already sees two rows or more
            return quantization["method"] != "none" and one_row_steps_differ(quantization["bits"],
                                                                             quantization["block_size"])

        self._trunk = _Graph(path / manifest["trunk"]["path"], threads, "hidden", constants(manifest["trunk"]),
                             needs_padding(manifest["quantization"]["trunk"]))
        # Each session has its own thread pool. The MTP graphs' pools must not spin: after every
        # draft they would keep busy-waiting while the trunk verifies, taking its cores (on 2
        # cores a 4-token verify step took 19 ms instead of 9, and MTP k=3 ran at 0.6x plain).
        self._mtp = [_Graph(path / entry["path"], threads, "h1", constants(entry),
                            needs_padding(manifest["quantization"]["mtp"]), spin=False)
                     for entry in manifest["mtp"]]
        self.num_mtp_layers = len(self._mtp)
        self.draft_ids = self._read_draft_vocab(path)
        self._cache_kind = CACHE_KINDS[manifest["cache"]["kind"]]
        trunk_slots = range(manifest["trunk"]["cache_slots"])
        if manifest["cache"].get("recurrent"):
            self._trunk_cache = RecurrentCache(manifest["cache"], trunk_slots, self.max_context)
        else:
            self._trunk_cache = self._cache_kind(manifest["cache"], trunk_slots, self.max_context)
        # The tokens in the trunk's cache: a rollback runs some of them again through recurrent layers.
        self._trunk_tokens: list[int] = []
        self._mtp_caches: dict[int, object] = {}  # depth -> cache, created on first use
        self._weight_bytes = weight_bytes(path)

    def _read_draft_vocab(self, path: Path) -> np.ndarray | None:
        """The token ids the MTP graphs score (their logits' columns), or None for all of them."""
        entry = self.manifest.get("draft_vocab")
        if entry is None:
            return None
        ids = read_draft_vocab(path / entry["file"], self.vocab_size)
        if len(ids) != entry["size"]:
            raise UserError(f"{path / entry['file']} holds {len(ids)} tokens but the MTP graphs score {entry['size']}; "
                            "re-export the model")
        return ids

    def _mtp_cache(self, depth: int):
        if depth < 1:
            raise ValueError(f"MTP depth is 1-based, got {depth}")
        if depth not in self._mtp_caches:
            self._mtp_caches[depth] = self._cache_kind(self.manifest["cache"], range(1), self.max_context)
        return self._mtp_caches[depth]

    # --- Backend interface -------------------------------------------------------------------

    def reset(self) -> None:
        self._trunk_cache.clear()
        self._trunk_tokens.clear()
        for cache in self._mtp_caches.values():
            cache.clear()

    def trunk_step(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(tokens, np.int64).reshape(1, -1)
        result = self._trunk.run(self._trunk_cache, {"input_ids": ids})
        self._trunk_tokens.extend(tokens)
        return result

    def trunk_prompt_step(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """``trunk_step`` returning only the last row's logits ``(1, V)`` (engine/backend.py)."""
        ids = np.asarray(tokens, np.int64).reshape(1, -1)
        logits, hidden = self._trunk.run(self._trunk_cache, {"input_ids": ids}, logits_from=len(tokens) - 1)
        self._trunk_tokens.extend(tokens)
        return logits[-1:], hidden

    def trunk_len(self) -> int:
        return self._trunk_cache.length

    def trunk_rollback(self, n: int) -> None:
        keep = self.trunk_len() - n
        if isinstance(self._trunk_cache, RecurrentCache):
            self._restore_states(keep)
        else:
            self._trunk_cache.rollback(n)
        del self._trunk_tokens[keep:]

    def _restore_states(self, keep: int) -> None:
        """Roll a trunk with Gated DeltaNet layers back to ``keep`` positions.

        Their states cannot be cut back. Within the last step the cache has them: the states from
        before it, and after each position of a verify step (cache.py). Further back, the states
        start from empty and the trunk runs again over the kept tokens, as the MLX backend does
        after every rollback. Either way they are those of a run that never saw the dropped tokens.
        Snapshots rather than that recomputation after every verify step, as measured with
        ``scripts/qwen3_5_rollback_cost.py`` (a random 8-layer qwen3_5 at the 0.8B model's widths,
        8 bits, 2 threads, on the shared 2-core CPU at a load of ~8-10): a 4-token verify step and a
        rollback keeping 1-3 of its tokens took 460-465 ms with snapshots, 621-761 ms recomputing.
        """
        cache = self._trunk_cache
        if not 0 <= keep <= cache.length:
            raise ValueError(f"cannot roll back to {keep} of {cache.length} cached positions")
        if keep == cache.length or cache.restore(keep):
            return
        if cache.step_start is not None and keep > cache.step_start:  # inside a long step: from its start
            cache.restore_step_start()
        else:
            cache.clear()
        ids = np.asarray(self._trunk_tokens[cache.length:keep], np.int64).reshape(1, -1)
        if ids.size:  # the states are what is wanted; one row of logits is the least the graph gives
            self._trunk.run(cache, {"input_ids": ids}, logits_from=ids.shape[1] - 1)

    def mtp_step(self, depth: int, hidden: np.ndarray, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if not self._mtp:
            raise UserError("this model has no MTP layers; use another draft method (e.g. spec='none')")
        graph = self._mtp[min(depth, self.num_mtp_layers) - 1]
        ids = np.asarray(tokens, np.int64).reshape(1, -1)
        hidden = np.ascontiguousarray(hidden, np.float32).reshape(1, ids.shape[1], self.hidden_size)
        logits, h1 = graph.run(self._mtp_cache(depth), {"hidden": hidden, "input_ids": ids})
        return logits, h1

    def mtp_len(self, depth: int) -> int:
        return self._mtp_cache(depth).length

    def mtp_rollback(self, depth: int, n: int) -> None:
        self._mtp_cache(depth).rollback(n)

    def weight_bytes(self) -> int:
        return self._weight_bytes

    def cache_bytes(self) -> int:
        return self._trunk_cache.nbytes + sum(cache.nbytes for cache in self._mtp_caches.values())
