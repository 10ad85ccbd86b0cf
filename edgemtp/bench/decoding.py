"""Timing edgemtp's own decoding: tokens/s and time to first token over a prompt set, acceptance
per draft position, and the cost curve of one trunk step over n tokens."""

from __future__ import annotations

import statistics
import time

from edgemtp.bench.figures import DecodeFigures
from edgemtp.engine.drafters import median_seconds

COST_CURVE_TOKENS = 8  # the cost curve covers trunk steps of 1..8 tokens
WARMUP_TOKENS = 8


def _run_prompts(model, prompts, max_tokens, spec, num_draft, draft_model):
    """One pass over the prompt set: (token lists, first-token seconds, final stats) per prompt."""
    outputs, ttfts, finals = [], [], []
    options = {"spec": spec} if spec == "none" else {"spec": spec, "num_draft": num_draft, "draft_model": draft_model}
    for prompt in prompts:
        tokens: list[int] = []
        stats = None
        start = time.perf_counter()
        first = None
        for _text, token_ids, stats in model.stream(prompt, max_tokens=max_tokens, temperature=0.0, **options):
            if first is None and token_ids:
                first = time.perf_counter() - start
            tokens.extend(token_ids)
        outputs.append(tokens)
        ttfts.append(first if first is not None else time.perf_counter() - start)
        finals.append(stats)
    return outputs, ttfts, finals


def interleaved_auto(model, prompts, specs: list[str], *, max_tokens, rounds, reference=None, draft_model=None):
    """Plain decoding and each drafter of ``specs`` at automatic draft length, in ``rounds``
    interleaved rounds (the order reversed every other round), so a slow spell of a shared
    machine falls on all of them. Returns each drafter's figures (from its last round) with
    ``tokens_per_s`` the median over rounds and ``measured_speedup`` the median of its ratio to
    plain decoding within each round."""
    order = ["none", *specs]
    rates: dict[str, list[float]] = {spec: [] for spec in order}
    figures: dict[str, DecodeFigures] = {}
    for round_ in range(rounds):
        for spec in order if round_ % 2 == 0 else reversed(order):
            figures[spec], _ = measure_decoding(model, prompts, max_tokens=max_tokens, repeats=1, spec=spec,
                                                num_draft="auto", draft_model=draft_model, reference=reference)
            rates[spec].append(figures[spec].tokens_per_s)
    for spec in specs:
        figures[spec].tokens_per_s = statistics.median(rates[spec])
        figures[spec].measured_speedup = statistics.median(r / p for r, p in zip(rates[spec], rates["none"]))
    return [figures[spec] for spec in specs]


def measure_decoding(model, prompts, *, max_tokens, repeats, spec="none", num_draft=None, draft_model=None,
                     reference=None):
    """Decode every prompt ``repeats`` times after a warm-up; returns (DecodeFigures, token lists).

    ``reference`` (plain decoding's token lists) turns on the greedy-identity check.
    The warm-up decodes the LAST prompt: the engine reuses the cached prefix a new
    prompt shares with the previous one, and prompts differ from their neighbours, so
    every timed prompt (the first included) is processed from its first differing token.
    """
    _run_prompts(model, prompts[-1:], WARMUP_TOKENS, spec, num_draft, draft_model)
    rates, ttfts = [], []
    for _ in range(repeats):
        outputs, first_token_s, finals = _run_prompts(model, prompts, max_tokens, spec, num_draft, draft_model)
        generated = sum(s.generated_tokens for s in finals)
        # The engine's tokens_per_s counts the tokens after the first over the time after it (as
        # peers are timed, bench/peers/timing.py), so pool the same tokens over the same seconds.
        after_first = [(s.generated_tokens - 1, s.tokens_per_s) for s in finals if s.tokens_per_s > 0]
        tokens = sum(n for n, _ in after_first)
        seconds = sum(n / rate for n, rate in after_first)
        rates.append(tokens / seconds if seconds > 0 else 0.0)
        ttfts.extend(first_token_s)
    figures = DecodeFigures(
        spec=spec,
        num_draft=num_draft if spec != "none" else None,
        tokens_per_s=statistics.median(rates),
        ttft_s=statistics.median(ttfts),
        generated_tokens=generated,
    )
    if spec != "none":
        _fill_acceptance(figures, finals)
    if reference is not None:
        figures.identical_to_plain = outputs == reference
    return figures, outputs


def _fill_acceptance(figures: DecodeFigures, finals) -> None:
    """Pool the per-prompt acceptance counters of one repeat (greedy: every repeat is the same).

    Per-position rates are averaged weighted by each prompt's number of trunk steps,
    which is how often position 1 was reached.
    """
    steps = sum(s.steps for s in finals)
    if steps == 0:
        return
    figures.tokens_per_step = 1 + sum(s.accepted for s in finals) / steps
    nodes, drafted = sum(s.nodes_verified for s in finals), sum(s.drafted for s in finals)
    if nodes > drafted:  # trees verified more tokens than positions
        figures.nodes_per_step = nodes / steps
    figures.copied_fraction = sum(s.copied for s in finals) / drafted if drafted else 0.0
    positions = max(len(s.acceptance_by_position) for s in finals)
    figures.acceptance_by_position = [
        sum(s.steps * s.acceptance_by_position[i] for s in finals if len(s.acceptance_by_position) > i)
        / sum(s.steps for s in finals if len(s.acceptance_by_position) > i)
        for i in range(positions)
    ]
    for s in finals:
        for k, count in s.draft_lengths.items():
            figures.draft_lengths[int(k)] = figures.draft_lengths.get(int(k), 0) + count


# --- step costs -----------------------------------------------------------------------------


def trunk_cost_curve(backend, repeats: int) -> list[float]:
    """Seconds of one trunk step over n = 1..COST_CURVE_TOKENS tokens.

    Measured on top of whatever the cache holds (a real decoding context), and every
    timed step is rolled back, so the caches end exactly as they were: the engine's
    session, which remembers what its caches hold, stays correct.
    """
    curve = []
    for n in range(1, COST_CURVE_TOKENS + 1):
        tokens = [i % backend.vocab_size for i in range(n)]

        def step(tokens=tokens):
            backend.trunk_step(tokens)
            backend.trunk_rollback(len(tokens))

        curve.append(median_seconds(step, repeats))
    return curve


def draft_vocab_size(backend) -> int | None:
    """Tokens the MTP draft head scores, or None when it scores the full vocabulary."""
    return None if backend.draft_ids is None else len(backend.draft_ids)


