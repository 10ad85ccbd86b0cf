"""The public entry point: ``edgemtp.load(path)`` returns a ``Model``.

A ``Model`` bundles a checkpoint's config, its tokenizer and a ``Backend``
(see ``edgemtp/engine/backend.py``). The methods here are the teacher-forced
views used to check models against references; decoding goes through the
engine.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgemtp.config import load_config
from edgemtp.distributed import launched
from edgemtp.draft_vocab import scatter_logits
from edgemtp.engine.backend import Backend
from edgemtp.engine.generate import Chunk, Generation, Session, collect
from edgemtp.engine.specs import DEFAULT_SPEC
from edgemtp.errors import UserError
from edgemtp.tensor_plan import check_parallel, choose_parallel
from edgemtp.tokenizer import IdsOnlyTokenizer, Tokenizer, load_tokenizer


def default_backend() -> str:
    """MLX where it runs on the GPU (Apple Silicon) or under ``mlx.launch``, ONNX Runtime elsewhere."""
    if platform.system() == "Darwin" and platform.machine() == "arm64" or launched():
        return "mlx"
    return "onnx"


# Without an explicit max_kv_size the planner's "longest context that fits" is used, up to this
# many tokens: caches are preallocated, and a model with a 128k-token window would otherwise
# reserve gigabytes that a laptop chat never fills.
DEFAULT_CONTEXT_CAP = 32768


def _load_mlx(path: Path, max_kv_size: int, **options) -> Backend:
    from edgemtp.mlx_backend.backend import MLXBackend

    return MLXBackend.load(path, max_kv_size=max_kv_size, **options)


def _load_onnx(path: Path, max_kv_size: int, **options) -> Backend:
    # An ONNX export directory is used as is; an HF checkpoint is converted into the user
    # cache on first use (options: bits, group_size, threads).
    from edgemtp.converters.onnx_export.manifest import is_onnx_export
    from edgemtp.onnx_backend.loading import load_onnx_backend

    conversion = sorted(set(options) & {"bits", "group_size"})
    if conversion and is_onnx_export(path):  # they would be ignored: the export is quantized already
        raise UserError(f"{path} is an ONNX export, quantized when it was converted; {' and '.join(conversion)} "
                        "apply to a Hugging Face checkpoint converted on load: drop them, or pass the checkpoint")

    return load_onnx_backend(path, max_context=max_kv_size, **options)


def planned_context(path: Path, backend: str, max_kv_size: int | None) -> int:
    """The cache length to preallocate, decided by the memory planner before anything loads.

    Raises ``UserError`` (with the fix: fewer bits or a shorter context) when the model does not
    fit, or ``max_kv_size`` does not.
    """
    from edgemtp.planner import plan_for

    plan = plan_for(path, context=max_kv_size, backend=backend)
    return plan.max_kv_size if max_kv_size is not None else min(plan.max_kv_size, DEFAULT_CONTEXT_CAP)


# Backend name -> function building it from a model directory and load options.
_BACKEND_LOADERS = {"mlx": _load_mlx, "onnx": _load_onnx}
# The load options each backend takes (besides max_kv_size), checked before anything loads.
_BACKEND_OPTIONS = {"mlx": ("dtype", "draft_vocab"), "onnx": ("bits", "group_size", "threads")}


def load(path: str | Path | None = None, backend: str | None = None, max_kv_size: int | None = None,
         parallel: str = "auto", **options) -> Model:
    """Load a model directory for inference.

    ``backend`` is ``"mlx"`` or ``"onnx"`` (default: ``default_backend()``).
    ``max_kv_size``: tokens of cache preallocated per layer; default: the longest context the
    memory planner finds room for (at most the model's window and ``DEFAULT_CONTEXT_CAP``).
    A model that cannot fit is refused before loading. Other ``options`` go to the backend; for
    MLX: ``dtype`` (``"float32"``, ``"float16"`` or ``"bfloat16"``) and ``draft_vocab`` (False: the
    MTP head scores the full vocabulary even when the model stores a draft vocabulary); for ONNX:
    ``threads``, and ``bits`` and ``group_size`` for a Hugging Face checkpoint converted on first
    use. Without ``path``, ``bits`` (4 or 8) picks the default model's conversion on either backend.

    Under ``mlx.launch`` (several ranks) the MLX backend runs over the group: ``parallel`` is
    ``"pipeline"`` (``edgemtp.mlx_backend.pipeline``), ``"tensor"``
    (``edgemtp.mlx_backend.tensor_parallel``) or ``"auto"`` (``tensor_plan.choose_parallel``). Only
    rank 0 returns; every other rank serves rank 0's passes and exits when rank 0's process ends.
    """
    backend = backend or default_backend()
    if path is None:  # the embedded default model, converted for this backend (at ``bits``) on first use
        from edgemtp.default_model import default_model_path

        path = default_model_path(backend, options.pop("bits", None))
    path = Path(path)
    if backend not in _BACKEND_LOADERS:
        raise UserError(f"backend {backend!r} is not available; use one of {', '.join(_BACKEND_LOADERS)}")
    unknown = sorted(set(options) - set(_BACKEND_OPTIONS[backend]))
    if unknown:
        raise UserError(f"the {backend} backend has no load option {', '.join(unknown)}; "
                        f"its options are {', '.join(_BACKEND_OPTIONS[backend])} (and max_kv_size)")
    check_parallel(parallel)
    if launched():  # one rank of several (mlx.launch): the model is split over the group
        if backend != "mlx":
            raise UserError(f"several machines (mlx.launch) run on the MLX backend only, not {backend}; "
                            "pass --backend mlx or leave --backend out")
        from edgemtp.mlx_backend.pipeline import join_pipeline
        from edgemtp.mlx_backend.ranks import join_group
        from edgemtp.mlx_backend.tensor_parallel import join_tensor_parallel

        group = join_group(path)
        kind = choose_parallel(parallel, load_config(path), group.size(), path)
        join = join_tensor_parallel if kind == "tensor" else join_pipeline
        ranked = join(path, group, max_kv_size=max_kv_size, context_cap=DEFAULT_CONTEXT_CAP, **options)
        return Model(ranked.config, load_tokenizer(path), ranked)
    context = planned_context(path, backend, max_kv_size)
    loaded = _BACKEND_LOADERS[backend](path, max_kv_size=context, **options)
    return Model(loaded.config, load_tokenizer(path), loaded)


class Model:
    """A loaded model: ``config`` (dict), ``tokenizer`` and ``backend``."""

    def __init__(self, config: dict, tokenizer: Tokenizer | IdsOnlyTokenizer, backend: Backend):
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        self._session = Session(backend, tokenizer)  # decoding state kept across calls (prefix reuse)
        self._draft_models: dict[str, Model] = {}

    def _check_ids(self, token_ids: list[int], at_least: int) -> list[int]:
        ids = [int(t) for t in token_ids]
        if len(ids) < at_least:
            raise UserError(f"need at least {at_least} token ids, got {len(ids)}")
        bad = [t for t in ids if not 0 <= t < self.backend.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.backend.vocab_size - 1})")
        return ids

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Trunk logits ``(T, V)`` float32 for every position of a fresh sequence."""
        ids = self._check_ids(token_ids, at_least=1)
        self._session.forget()  # the decoding session must not trust its cached prefix
        logits, _ = self.backend.trunk_step(ids)
        return logits

    def mtp_logits(self, token_ids: list[int], depth: int = 1) -> np.ndarray:
        """Teacher-forced MTP logits ``(T - depth, V)`` at ``depth``.

        Row ``i`` predicts ``token_ids[i + depth + 1]``: depth 1 combines the
        trunk's hidden state at ``i`` with ``token_ids[i + 1]``, and each
        further depth feeds on the previous depth's hidden states.
        """
        if depth < 1:
            raise UserError(f"MTP depth must be at least 1, got {depth}")
        ids = self._check_ids(token_ids, at_least=depth + 1)
        self._session.forget()  # the decoding session must not trust its cached prefix
        _, hidden = self.backend.trunk_step(ids)
        for d in range(1, depth + 1):
            logits, hidden = self.backend.mtp_step(d, hidden[:-1], ids[d:])
        # A draft head's logits widened to the vocabulary: -inf on the tokens it does not score.
        return scatter_logits(logits, self.backend.draft_ids, self.backend.vocab_size)

    def stream(self, prompt, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, spec: str = DEFAULT_SPEC, num_draft: int | str = "auto",
               draft_model: str | Path | Model | None = None, chat: bool = True) -> Iterator[Chunk]:
        """Generate text piece by piece with speculative decoding.

        ``prompt``: a string (wrapped in the chat template when ``chat``), a list
        of chat messages (``{"role", "content"}``) or a list of token ids.
        ``spec``: ``"hybrid"`` (the default: n-gram continuation where the context
        repeats, the MTP layers elsewhere, chosen per step; n-gram alone on a model
        without MTP layers), ``"mtp"`` (the model's MTP layers), ``"draft"``
        (``draft_model``, a path or a loaded ``Model`` with the same tokenizer),
        ``"ngram"`` (prompt lookup) or ``"none"``. ``num_draft``: ``"auto"`` (adaptive) or
        a fixed number of draft tokens per step. Output is the target model's
        own: greedy at temperature 0, its sampling distribution otherwise.
        Calls on the same model reuse the cached prefix shared with the previous
        prompt. Yields ``Chunk(text, token_ids, stats)``.
        """
        return self._session.stream(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, seed=seed, spec=spec, num_draft=num_draft,
                                    draft_model=self._draft_backend(draft_model), chat=chat)

    def generate(self, prompt, **options) -> Generation:
        """Like ``stream`` but returns the whole ``Generation(text, tokens, stats)``."""
        return collect(self.stream(prompt, **options))

    def _draft_backend(self, draft_model) -> Backend | None:
        if draft_model is None:
            return None
        if isinstance(draft_model, Model):
            return draft_model.backend
        key = str(draft_model)
        if key not in self._draft_models:  # load once, keep its cache across calls
            self._draft_models[key] = load(draft_model)
        return self._draft_models[key].backend
