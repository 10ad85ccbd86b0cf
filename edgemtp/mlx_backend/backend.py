"""``MLXBackend``: the engine's ``Backend`` interface on MLX.

Holds the trunk (an mlx-lm model), the MTP layers and one preallocated cache
per trunk layer and per MTP depth. Each call runs one forward pass, evaluates
it, and hands numpy float32 back to the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from edgemtp.checkpoint import Checkpoint
from edgemtp.config import check_supported, load_config, mtp_fusion_layers
from edgemtp.draft_vocab import load_draft_vocab
from edgemtp.errors import UserError
from edgemtp.mlx_backend.cache import PreallocatedKVCache, RecurrentStateCache
from edgemtp.mlx_backend.models import (
    ARCHITECTURES,
    MTPLayer,
    MTPStack,
    head_rows,
    is_recurrent,
    output_head,
    run_layers,
    run_trunk,
)
from edgemtp.mlx_backend.tree import NodePositions, tree_inputs, wrap_ropes
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

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
DEFAULT_MAX_KV_SIZE = 4096


def parse_dtype(dtype: str) -> mx.Dtype:
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_modules(config: dict, mtp_layers: int, has_own: Callable[[int, str], bool]) -> tuple[nn.Module, MTPStack]:
    """The trunk (an mlx-lm model) and the MTP stack, with placeholder weights. ``has_own(index,
    part)``: whether MTP layer ``index`` has its own ``"shared_head.head"`` / ``"embed_tokens"``."""
    arch = ARCHITECTURES[config["model_type"]]
    args = arch.model_args(config)
    trunk = arch.build_trunk(args, config)
    layers = config["num_hidden_layers"]
    mtp = MTPStack(
        [
            MTPLayer(
                arch.build_block(args, config, layer_idx=layers + index),
                config["hidden_size"],
                config["vocab_size"],
                config["rms_norm_eps"],
                has_head=has_own(index, "shared_head.head"),
                has_embedding=has_own(index, "embed_tokens"),
                fused=index == 0 and mtp_fusion_layers(config) is not None,
            )
            for index in range(mtp_layers)
        ]
    )
    return trunk, mtp


class MLXBackend:
    """Trunk + MTP layers + their caches; see ``edgemtp.engine.backend.Backend``."""

    def __init__(
        self, config: dict, trunk, mtp: MTPStack, *, max_kv_size: int = DEFAULT_MAX_KV_SIZE, dtype: str = "float32",
        draft_ids: np.ndarray | None = None, kv_head_shards: int = 1, first_layer: int = 0,
    ):
        """``draft_ids`` (a draft vocabulary, see ``edgemtp.draft_vocab``) makes the MTP heads
        score only those tokens; ``mtp_step``'s logits then have one column per scored token.
        ``kv_head_shards``: a tensor-parallel rank's trunk caches hold that share of the key/value
        heads (its layers are sharded, its MTP layers are not)."""
        if not isinstance(max_kv_size, int) or max_kv_size < 1:
            raise UserError(f"max_kv_size must be a positive number of tokens, got {max_kv_size!r}")
        arch = ARCHITECTURES[config["model_type"]]
        self.config = config
        self.trunk = trunk
        self.mtp = mtp
        self.dtype = parse_dtype(dtype)
        self.vocab_size = int(config["vocab_size"])
        self.hidden_size = int(config["hidden_size"])
        self.num_mtp_layers = len(mtp.layers)
        self.max_context = max_kv_size
        self.first_layer = first_layer  # index in the whole trunk of this backend's first layer (a pipeline stage)
        self._mask_as_array = arch.MASK_AS_ARRAY
        self._cache_dims = arch.cache_dims(arch.model_args(config))
        (key_heads, key_dim), (value_heads, value_dim) = self._cache_dims
        self._trunk_cache_dims = ((key_heads // kv_head_shards, key_dim), (value_heads // kv_head_shards, value_dim))
        # A pipeline stage before the last one holds neither the final norm nor the head.
        self._head = output_head(trunk) if "norm" in trunk.model else None
        # A fusion head's trunk hands MTP depth 1 the fused feature (models.run_trunk).
        fusion_layers = mtp_fusion_layers(config) if self.num_mtp_layers else None
        self.fusion = (fusion_layers, mtp.layers[0]) if fusion_layers else None
        self.draft_ids = draft_ids if self.num_mtp_layers else None
        if self.draft_ids is not None:
            self._prune_mtp_heads(self.draft_ids)
        # Arrays built at construction but kept outside parameters() (YaRN's RoPE frequencies)
        # are still lazy and tied to the loading thread's stream; evaluate them now so that any
        # thread (the TUI decodes in a worker) can run the model.
        mx.eval([value for module in (trunk, mtp) for sub in module.modules()
                 for value in sub.values() if isinstance(value, mx.array)])
        self._node_positions = NodePositions()
        wrap_ropes(trunk.model.layers, self._node_positions)
        self._trunk_caches = [RecurrentStateCache() if is_recurrent(layer)
                              else self._new_cache(self._trunk_cache_dims) for layer in trunk.model.layers]
        self._recurrent = [cache for cache in self._trunk_caches if isinstance(cache, RecurrentStateCache)]
        # The tokens in the trunk's caches: a rollback re-runs some of them through recurrent layers.
        self._trunk_tokens: list[int] = []
        # One cache per depth; depths past the last MTP layer reuse it with their own cache.
        self._mtp_caches = {depth: self._new_cache() for depth in range(1, self.num_mtp_layers + 1)}

    @classmethod
    def load(cls, path: str | Path, *, max_kv_size: int = DEFAULT_MAX_KV_SIZE, dtype: str = "float32",
             draft_vocab: bool = True) -> MLXBackend:
        """Load a Hugging Face checkpoint directory or an MLX directory (see ``weights.is_mlx_dir``).

        ``draft_vocab``: use the directory's ``draft_vocab.safetensors``, if any (False: MTP heads
        score the full vocabulary).
        """
        path = Path(path)
        if is_mlx_dir(path, load_config(path)):
            return cls.from_mlx_dir(path, max_kv_size=max_kv_size, dtype=dtype, draft_vocab=draft_vocab)
        return cls.from_checkpoint(path, max_kv_size=max_kv_size, dtype=dtype, draft_vocab=draft_vocab)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path | Checkpoint, *, max_kv_size: int = DEFAULT_MAX_KV_SIZE, dtype: str = "float32",
        draft_vocab: bool = True,
    ) -> MLXBackend:
        """Build the modules from a Hugging Face checkpoint (directory or opened) and load its weights."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
        compute_dtype = parse_dtype(dtype)
        trunk, mtp = build_modules(ckpt.config, ckpt.num_mtp_layers,
                                    lambda index, part: part in own_parts(ckpt, index))
        trunk.load_weights(list(iter_trunk_weights(ckpt, compute_dtype)), strict=True)
        mtp.load_weights(list(iter_mtp_weights(ckpt, compute_dtype)), strict=True)
        mx.eval(trunk.parameters(), mtp.parameters())
        draft_ids = load_draft_vocab(ckpt.path, int(ckpt.config["vocab_size"])) if draft_vocab else None
        return cls(ckpt.config, trunk, mtp, max_kv_size=max_kv_size, dtype=dtype, draft_ids=draft_ids)

    @classmethod
    def from_mlx_dir(
        cls, path: str | Path, *, max_kv_size: int = DEFAULT_MAX_KV_SIZE, dtype: str = "float32",
        draft_vocab: bool = True,
    ) -> MLXBackend:
        """Load an MLX directory (mlx-lm's format plus ``mtp.safetensors``), quantized or not."""
        path = Path(path)
        config = load_config(path)
        check_supported(config, path / "config.json")
        compute_dtype = parse_dtype(dtype)
        trunk_weights, mtp_weights = read_mlx_dir(path)
        trunk, mtp = build_modules(
            config, mtp_layer_count(mtp_weights), lambda index, part: f"layers.{index}.{part}.weight" in mtp_weights
        )
        # The MTP layers may be quantized at their own bits (--mtp-bits) even when the trunk is not.
        mtp_quantization = config.get("mtp_quantization", config.get("quantization"))
        for module, weights, quantization in ((trunk, trunk_weights, config.get("quantization")),
                                              (mtp, mtp_weights, mtp_quantization)):
            if quantization:
                quantize_like_saved(module, quantization, weights)
            module.load_weights([(name, cast(name, array, compute_dtype)) for name, array in weights.items()])
        mx.eval(trunk.parameters(), mtp.parameters())
        draft_ids = load_draft_vocab(path, int(config["vocab_size"])) if draft_vocab else None
        return cls(config, trunk, mtp, max_kv_size=max_kv_size, dtype=dtype, draft_ids=draft_ids)

    def _prune_mtp_heads(self, draft_ids: np.ndarray) -> None:
        """Give every MTP layer a head over the draft vocabulary only.

        A layer's own head is replaced by its kept rows; layers that use the trunk's head share
        one copy of its kept rows (the trunk keeps its full head for verification).
        """
        rows = mx.array(draft_ids)
        trunk_rows = None
        for layer in self.mtp.layers:
            if "head" in layer.shared_head:
                layer.shared_head.head = head_rows(layer.shared_head.head, rows)
                continue
            if trunk_rows is None:
                trunk_rows = head_rows(self.trunk.lm_head if "lm_head" in self.trunk else self.trunk.model.embed_tokens,
                                       rows)
            layer.shared_head.head = trunk_rows

    def _new_cache(self, dims: tuple[tuple[int, int], tuple[int, int]] | None = None) -> PreallocatedKVCache:
        keys_dims, values_dims = dims or self._cache_dims
        return PreallocatedKVCache(keys_dims, values_dims, self.max_context, self.dtype)

    def _check_room(self, used: int, n: int) -> None:
        if used + n > self.max_context:
            raise UserError(f"{used + n} tokens exceed the context of {self.max_context}; "
                            "load the model with a larger max_kv_size")

    def _to_numpy(self, x: mx.array) -> np.ndarray:
        return np.array(x[0].astype(mx.float32))

    # --- trunk ------------------------------------------------------------------

    def reset(self) -> None:
        for cache in self._trunk_caches + list(self._mtp_caches.values()):
            if isinstance(cache, RecurrentStateCache):
                cache.clear()
            else:
                cache.trim(cache.offset)
        self._trunk_tokens.clear()

    def _run_trunk(self, ids: mx.array) -> tuple[mx.array, mx.array]:
        """One trunk step over ``ids`` ``(1, n)``, its start marked in every recurrent cache."""
        for cache in self._recurrent:
            cache.mark()
        return run_trunk(self.trunk, ids, self._trunk_caches, self._mask_as_array, fusion=self.fusion)

    def trunk_step(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if not tokens:
            raise ValueError("trunk_step needs at least one token")
        self._check_room(self.trunk_len(), len(tokens))
        logits, hidden = self._run_trunk(mx.array([tokens], dtype=mx.int32))
        mx.eval(logits, hidden)
        self._trunk_tokens.extend(tokens)
        return self._to_numpy(logits), self._to_numpy(hidden)

    def forward_layers(self, h: mx.array, taps: tuple[int, ...] = ()) -> tuple[mx.array, list[mx.array]]:
        """``h`` ``(1, n, H)`` through this backend's trunk layers, appending to their caches (a
        pipeline stage, ``edgemtp.mlx_backend.pipeline``, holds a slice of the trunk's layers).
        Returns the output and the outputs of the layers at the indices ``taps`` of this slice."""
        self._check_room(self.trunk_len(), h.shape[1])
        return run_layers(self.trunk.model.layers, h, self._trunk_caches, self._mask_as_array, taps=taps)

    def trunk_step_tree(self, tokens: list[int], parents: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if self._recurrent:  # a recurrent state runs through rows in order: siblings would mix
            raise UserError("--spec mtp-tree needs a trunk whose layers all attend (keys and values); "
                            "Qwen3.5's linear-attention layers cannot verify a tree: use --spec mtp")
        self._check_room(self.trunk_len(), len(tokens))
        positions, mask = tree_inputs(parents, self.trunk_len())
        self._node_positions.positions = positions
        try:
            logits, hidden = run_trunk(self.trunk, mx.array([tokens], dtype=mx.int32), self._trunk_caches,
                                       self._mask_as_array, mask, self.fusion)
            mx.eval(logits, hidden)
        finally:
            self._node_positions.positions = None
        self._trunk_tokens.extend(tokens)
        return self._to_numpy(logits), self._to_numpy(hidden)

    def trunk_keep(self, count: int, rows: list[int]) -> None:
        """Of the last ``count`` positions (a tree step), keep ``rows`` in order: the accepted path."""
        step = self._trunk_tokens[-count:]
        self._trunk_tokens[-count:] = [step[row] for row in rows]
        for cache in self._trunk_caches:
            cache.keep(count, rows)
        mx.eval([array for cache in self._trunk_caches for array in (cache.keys, cache.values)])

    def greedy_tokens(self, token: int, count: int) -> Iterator[int]:
        """Plain greedy decoding after the pending ``token``: yields up to ``count`` tokens.

        Pipelined the way mlx-lm's ``generate_step`` is: the step that consumes a token is built
        and queued (``mx.async_eval``) before that token is read back, so Python builds the next
        graph while the model computes instead of after it. Each yielded token is the pending
        one; when the consumer stops, the step already queued for it is rolled back, so the trunk
        holds what ``trunk_step`` calls would have left.
        """
        self._check_room(self.trunk_len(), count)

        def step(y: mx.array) -> mx.array:
            logits, _ = self._run_trunk(y.reshape(1, 1))
            return mx.argmax(logits[0, -1], keepdims=True)

        y = step(mx.array([token], dtype=mx.int32))
        self._trunk_tokens.append(token)
        mx.async_eval(y)
        ahead = False  # whether a step for the last yielded token is queued
        try:
            for i in range(count):
                ahead = i + 1 < count
                if ahead:
                    next_y = step(y)
                    mx.async_eval(next_y)
                value = int(y.item())
                if ahead:
                    self._trunk_tokens.append(value)
                yield value
                if ahead:
                    y = next_y
        finally:
            if ahead:
                self.trunk_rollback(1)

    def trunk_len(self) -> int:
        return self._trunk_caches[0].offset

    def trunk_rollback(self, n: int) -> None:
        keep = self.trunk_len() - min(n, self.trunk_len())
        if self._recurrent:
            self._recompute_to(keep)
        else:
            for cache in self._trunk_caches:
                cache.trim(n)
        del self._trunk_tokens[keep:]

    def _recompute_to(self, keep: int) -> None:
        """Roll a trunk with recurrent layers back to ``keep`` positions.

        Recurrent states cannot be cut back, so every cache returns to the start of the last step
        (or to empty, when ``keep`` lies before it) and the trunk runs again over the kept tokens
        after that point: the states then hold exactly what a run that never saw the dropped
        tokens holds. The key/value caches are cut to the same point and rewritten alongside.
        """
        start = self._recurrent[0].marked_offset
        if keep < start:
            start = 0
        for cache in self._trunk_caches:
            if isinstance(cache, PreallocatedKVCache):
                cache.trim(cache.offset - start)
            elif start:
                cache.restore()
            else:
                cache.clear()
        if keep > start:
            self._run_trunk(mx.array([self._trunk_tokens[start:keep]], dtype=mx.int32))
            mx.eval([array for cache in self._recurrent for array in cache.arrays()],
                    [(cache.keys, cache.values) for cache in self._trunk_caches
                     if isinstance(cache, PreallocatedKVCache)])

    # --- MTP --------------------------------------------------------------------

    def _mtp_cache(self, depth: int) -> PreallocatedKVCache:
        if self.num_mtp_layers == 0:
            raise UserError("this model has no MTP layers (num_nextn_predict_layers is 0); "
                            "use a checkpoint with MTP weights or decode without MTP drafting")
        if depth < 1:
            raise ValueError(f"MTP depth is 1-based, got {depth}")
        if depth not in self._mtp_caches:
            self._mtp_caches[depth] = self._new_cache()
        return self._mtp_caches[depth]

    def mtp_step(self, depth: int, hidden: np.ndarray, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        cache = self._mtp_cache(depth)
        if not tokens or hidden.shape != (len(tokens), self.hidden_size):
            raise ValueError(f"mtp_step needs hidden of shape ({len(tokens)}, {self.hidden_size}), got {hidden.shape}")
        self._check_room(cache.offset, len(tokens))
        layer = self.mtp.layers[min(depth, self.num_mtp_layers) - 1]
        embeddings = layer.embed(mx.array([tokens], dtype=mx.int32), self.trunk.model.embed_tokens)
        h1 = layer(embeddings, mx.array(hidden[None]).astype(self.dtype), cache, self._mask_as_array)
        logits = layer.logits(h1, self._head)
        mx.eval(logits, h1)
        logits = self._to_numpy(logits)
        return logits, self._to_numpy(h1)

    def mtp_len(self, depth: int) -> int:
        cache = self._mtp_caches.get(depth)
        return cache.offset if cache is not None else 0

    def mtp_rollback(self, depth: int, n: int) -> None:
        if depth in self._mtp_caches:
            self._mtp_caches[depth].trim(n)

    # --- memory -----------------------------------------------------------------

    def weight_bytes(self) -> int:
        params = tree_flatten(self.trunk.parameters()) + tree_flatten(self.mtp.parameters())
        # By identity: MTP layers may share one draft head (see _prune_mtp_heads).
        return sum({id(array): array.nbytes for _, array in params}.values())

    def cache_bytes(self) -> int:
        return sum(cache.nbytes for cache in self._trunk_caches + list(self._mtp_caches.values()))
