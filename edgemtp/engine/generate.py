"""Glue between ``Model.stream`` and the decoding loop.

A ``Session`` lives as long as its ``Model`` and remembers which tokens the
trunk cache holds, so a new prompt that extends the previous conversation only
runs the new tokens (the TUI's multi-turn chat relies on it). It also owns the
drafters and the adaptive draft-length state, which are tied to the caches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from edgemtp.engine.backend import Backend
from edgemtp.engine.drafters import (DraftModelDrafter, HybridDrafter, MTPDrafter, NgramDrafter, NoDrafter,
                                     common_prefix)
from edgemtp.engine.sampling import Sampler
from edgemtp.engine.speculative import decode
from edgemtp.engine.specs import DEFAULT_SPEC, SPECS
from edgemtp.engine.stats import Stats
from edgemtp.engine.tree import NODE_BUDGET, TreeShaper
from edgemtp.engine.tuning import (AdaptiveDraftLength, FixedDraftLength, FixedHybridLength, HybridPolicy,
                                   config_digest, load_or_measure_costs)
from edgemtp.errors import UserError

# Longest draft the adaptive policy considers; beyond it acceptance of
# chained guesses is too low to pay on the models we target.
AUTO_MAX_DRAFT = 4


class Chunk(NamedTuple):
    text: str
    token_ids: list[int]
    stats: Stats


class Generation(NamedTuple):
    text: str
    tokens: list[int]
    stats: Stats


def parse_num_draft(num_draft: int | str) -> int | None:
    """``"auto"`` -> None (adaptive); a count ``N >= 0`` -> N."""
    if num_draft == "auto":
        return None
    try:
        value = int(num_draft)
    except (TypeError, ValueError):
        value = -1
    if value < 0:
        raise UserError(f"num_draft must be 'auto' or a whole number >= 0, got {num_draft!r}")
    return value


class Session:
    def __init__(self, backend: Backend, tokenizer):
        self.backend = backend
        self.tokenizer = tokenizer
        self.tokens: list[int] = []  # what the trunk cache holds
        self._drafters: dict[str, tuple] = {}  # spec -> (parameters, drafter)
        self._policies: dict[tuple, AdaptiveDraftLength] = {}
        self._shapers: dict[tuple, TreeShaper] = {}
        self._latest_run: object | None = None

    def prompt_ids(self, prompt, chat: bool) -> list[int]:
        """A string (chat-templated when ``chat``), a list of chat messages, or token ids."""
        if isinstance(prompt, str):
            if chat:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            else:
                ids = self.tokenizer.encode(prompt)
        elif prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.apply_chat_template(list(prompt))
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.backend.vocab_size]
            if bad:
                raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.backend.vocab_size - 1})")
        if not ids:
            raise UserError("the prompt is empty; give some text or token ids")
        if len(ids) >= self.backend.max_context:
            raise UserError(f"the prompt has {len(ids)} tokens but the context holds {self.backend.max_context}; "
                            "shorten it or load the model with a larger max_kv_size")
        return ids

    def _resolve(self, spec: str) -> str:
        """The spec that runs: the hybrid drafter is n-gram lookup alone on a model without MTP layers."""
        if spec not in SPECS:
            raise UserError(f"unknown spec {spec!r}; use one of {', '.join(SPECS)}")
        return "ngram" if spec == "hybrid" and self.backend.num_mtp_layers == 0 else spec

    def _make_drafter(self, spec: str, max_k: int, draft_model):
        if spec == "none" or max_k == 0:
            return NoDrafter()
        if spec in ("mtp", "mtp-tree"):
            return MTPDrafter(self.backend, max_depth=max_k)
        if spec == "ngram":
            return NgramDrafter(self.backend.vocab_size)
        if spec == "hybrid":
            return HybridDrafter(MTPDrafter(self.backend, max_depth=max_k), NgramDrafter(self.backend.vocab_size))
        if draft_model is None:
            raise UserError("--spec draft needs a draft model; pass --draft-model PATH (same tokenizer as the target)")
        return DraftModelDrafter(draft_model, self.backend.vocab_size)

    def forget(self) -> None:
        """Empty the caches; call instead of ``backend.reset()`` so the session knows."""
        self.backend.reset()
        self.tokens = []
        self._drafters.clear()

    def _drafter_and_policy(self, spec: str, num_draft, draft_model):
        spec = self._resolve(spec)
        tree = spec == "mtp-tree"
        if tree and getattr(self.backend, "trunk_step_tree", None) is None:
            raise UserError("--spec mtp-tree needs tree verification, which only the mlx backend has so far; "
                            "use --backend mlx or --spec mtp")
        fixed = parse_num_draft(num_draft)
        max_k = AUTO_MAX_DRAFT if fixed is None else fixed
        key = (spec, max_k, id(draft_model))
        # A tree's shape comes from the cost curve even when its depth is fixed.
        if (fixed is None or tree) and spec != "none" and max_k and key not in self._policies:
            # Tree steps and the hybrid drafter's drafts cost what MTP's do (a tree over more
            # rows): one measurement serves all three.
            measured = "mtp" if spec in ("hybrid", "mtp-tree") else spec
            # Measuring runs the model on empty caches, so the session starts over.
            probe = self._make_drafter(measured, max_k, draft_model)
            name = measured if draft_model is None else f"draft:{config_digest(draft_model.config)}"
            costs = load_or_measure_costs(self.backend, probe, name, max(max_k, NODE_BUDGET) if tree else max_k)
            self.forget()
            self._policies[key] = (HybridPolicy(costs, max_k, NgramDrafter.max_ngram) if spec == "hybrid"
                                   else AdaptiveDraftLength(costs, max_k))
            if tree:
                self._shapers[key] = TreeShaper(costs, max_k)
        # One drafter per cache it drafts with: two MTP drafters (mtp, mtp-tree and hybrid) would
        # fight over the same MTP caches.
        slot = "mtp" if spec in ("hybrid", "mtp-tree") else spec
        if self._drafters.get(slot, (None,))[0] != key:
            self._drafters[slot] = (key, self._make_drafter(spec, max_k, draft_model))
        drafter, shaper = self._drafters[slot][1], self._shapers.get(key)
        if spec == "none":
            return drafter, FixedDraftLength(0), None
        if fixed is not None:
            policy = FixedHybridLength(drafter, max_k) if spec == "hybrid" and max_k else FixedDraftLength(max_k)
            return drafter, policy, shaper
        policy = self._policies[key]
        if spec == "hybrid":
            policy.drafter = drafter  # the policy outlives drafters remade after a spec switch
        return drafter, policy, shaper

    def stream(self, prompt, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, spec: str = DEFAULT_SPEC, num_draft="auto",
               draft_model: Backend | None = None, chat: bool = True) -> Iterator[Chunk]:
        if max_tokens < 0:
            raise UserError(f"max_tokens must be >= 0, got {max_tokens}")
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = self.prompt_ids(prompt, chat)
        drafter, policy, shaper = self._drafter_and_policy(spec, num_draft, draft_model)
        return self._run(ids, drafter, policy, sampler, max_tokens, shaper)

    def _run(self, ids, drafter, policy, sampler, max_tokens, shaper=None) -> Iterator[Chunk]:
        keep = min(common_prefix(self.tokens, ids), len(ids) - 1, drafter.reusable_prefix(ids))
        self.backend.trunk_rollback(self.backend.trunk_len() - keep)
        self.tokens = self.tokens[:keep]
        seq, stats = list(ids), Stats()
        detokenizer = self.tokenizer.detokenizer()
        stop_ids = set(self.tokenizer.eos_token_ids)
        # A stream dropped without close() is closed by the garbage collector,
        # possibly after a newer stream started; it must then leave the session alone.
        self._latest_run = run = object()
        try:
            for new, _ in decode(self.backend, drafter, policy, sampler, seq, keep, max_tokens, stop_ids, stats,
                                 shaper):
                text = "".join(detokenizer.add(t) for t in new if t not in stop_ids)
                yield Chunk(text, new, stats)
            tail = detokenizer.flush()  # text held back waiting for the rest of a character
            if tail:
                yield Chunk(tail, [], stats)
        except GeneratorExit:  # the consumer stopped early: caches are consistent between steps
            if self._latest_run is run:
                self.tokens = seq[: self.backend.trunk_len()]
            raise
        except BaseException:  # a step failed half-way: the caches cannot be trusted
            self.forget()
            raise
        self.tokens = seq[: self.backend.trunk_len()]

    def generate(self, prompt, **options) -> Generation:
        return collect(self.stream(prompt, **options))


def collect(chunks: Iterator[Chunk]) -> Generation:
    """Run a stream to the end and gather its text and tokens."""
    texts, tokens, stats = [], [], Stats()
    for text, ids, stats in chunks:
        texts.append(text)
        tokens.extend(ids)
    return Generation("".join(texts), tokens, stats)
