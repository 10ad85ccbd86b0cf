"""Turning the model's chunk stream into batched UI updates.

The generation worker sees every chunk; the UI only redraws every
``REDRAW_SECONDS``. ``UpdateCollector`` sits in between, in the worker thread:
it gathers the new text, per-token provenance and per-step acceptance of every
chunk, and hands them over as one ``StreamUpdate`` per redraw
(``collect_updates``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

# Seconds between UI updates while an answer streams. Re-rendering the growing Markdown answer
# takes the same two cores decoding needs; ten updates a second still reads as live text.
REDRAW_SECONDS = 0.1
# An update may take the UI at most this share of the time: when applying and drawing one takes
# longer than REDRAW_SECONDS * UI_SHARE, the next waits proportionally longer. A full redraw of
# the chat screen (the answer's Markdown re-laid out, the stats tables) took 20-200 ms of CPU on
# this project's 2-core machine, so ten a second held the GIL and a core for much of decoding.
UI_SHARE = 0.1


@dataclass(frozen=True)
class StepRecord:
    """One verification step (or several, if one chunk covered several): k drafted, how many accepted."""

    drafted: int
    accepted: int


@dataclass
class StreamUpdate:
    text: str = ""
    pieces: list[tuple[str, str]] = field(default_factory=list)  # (token text, provenance kind)
    steps: list[StepRecord] = field(default_factory=list)
    stats: Any = None  # the engine's latest Stats (cumulative for this answer)
    weight_bytes: int = 0
    cache_bytes: int = 0


class UpdateCollector:
    def __init__(self, model) -> None:
        self.model = model
        self._detokenizer = model.tokenizer.detokenizer()
        self._last_stats = None
        self._generated = 0
        # Cumulative counters at the previous chunk; the engine may hand out one Stats object
        # and keep mutating it, so the numbers are copied rather than the object kept.
        self._steps = self._drafted = self._accepted = 0
        self._pending = StreamUpdate()

    def add(self, chunk) -> None:
        pending = self._pending
        pending.text += chunk.text
        stats = chunk.stats
        kinds = stats.provenance[self._generated : self._generated + len(chunk.token_ids)]
        for token_id, kind in zip(chunk.token_ids, kinds):
            pending.pieces.append((self._detokenizer.add(token_id), kind))
        self._generated += len(chunk.token_ids)
        if not chunk.token_ids and chunk.text and stats.provenance:
            # The engine's final flush (the end of a character split across tokens) belongs to the
            # last token; our own detokenizer still holds the same bytes back.
            pending.pieces.append((chunk.text, stats.provenance[-1]))
        # Stats are cumulative; the difference to the previous chunk is what this chunk's steps did.
        if stats.steps > self._steps and stats.drafted > self._drafted:
            pending.steps.append(StepRecord(stats.drafted - self._drafted, stats.accepted - self._accepted))
        self._steps, self._drafted, self._accepted = stats.steps, stats.drafted, stats.accepted
        self._last_stats = stats

    def take(self) -> StreamUpdate:
        """Everything gathered since the last call, plus the current memory use."""
        update, self._pending = self._pending, StreamUpdate()
        if self._last_stats is not None:
            # A private copy: the UI thread reads it while the engine goes on updating its own.
            update.stats = copy.copy(self._last_stats)
            update.stats.draft_lengths = dict(self._last_stats.draft_lengths)
        # Asked from the worker thread: the backend is only ever touched by one thread at a time.
        update.weight_bytes = self.model.backend.weight_bytes()
        update.cache_bytes = self.model.backend.cache_bytes()
        return update


def update_interval(ui_seconds: float) -> float:
    """Seconds to wait between updates when the UI took ``ui_seconds`` to apply and draw the last."""
    return max(REDRAW_SECONDS, ui_seconds / UI_SHARE)


def collect_updates(stream: Iterable, collector: UpdateCollector, post: Callable[[StreamUpdate], None],
                    stop: Callable[[], bool] = lambda: False, ui_seconds: Callable[[], float] = lambda: 0.0) -> None:
    """Feed every chunk of ``stream`` to ``collector`` and ``post`` what it gathered at most every
    ``update_interval(ui_seconds())``; the rest stays in the collector for the caller's final
    ``take()``. ``stop`` is asked before each chunk; ``ui_seconds`` says what the last update cost the UI."""
    last_post = monotonic()
    for chunk in stream:
        if stop():
            break
        collector.add(chunk)
        if monotonic() - last_post >= update_interval(ui_seconds()):
            post(collector.take())
            last_post = monotonic()
