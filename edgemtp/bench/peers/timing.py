"""Timing greedy decoding the same way for every engine.

An engine yields its output in chunks of token ids (peers one token at a time, edgemtp's
speculative mode several). Decode speed is the tokens after the first over the time after the
first token came out, as ``edgemtp.bench.decoding`` counts edgemtp's own; the time to the first
token is reported apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class PromptTiming:
    """One prompt decoded once."""

    tokens: list[int]
    ttft_s: float  # from the call to the first token
    decode_s: float  # from the first token to the last


def time_chunks(chunks: Iterable[list[int]]) -> PromptTiming:
    """Consume ``chunks`` (lists of token ids), timing the first and the last."""
    tokens: list[int] = []
    start = time.perf_counter()
    first = last = None
    for chunk in chunks:
        if not chunk:
            continue
        last = time.perf_counter()
        if first is None:
            first = last
        tokens.extend(chunk)
    if first is None:
        return PromptTiming([], time.perf_counter() - start, 0.0)
    return PromptTiming(tokens, first - start, last - first)


def decode_tokens_per_s(timings: list[PromptTiming]) -> float:
    """Tokens after each prompt's first over the time after it, summed over the prompts."""
    tokens = sum(max(len(t.tokens) - 1, 0) for t in timings)
    seconds = sum(t.decode_s for t in timings)
    return tokens / seconds if seconds > 0 else 0.0
