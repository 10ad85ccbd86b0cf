"""Choosing how many tokens to draft.

A trunk step over ``n`` tokens costs ``T(n)``; on memory-bound devices
``T(n)`` barely grows with ``n``, which is why verifying drafts pays. The
adaptive policy keeps an exponential moving average of the acceptance rate at
each draft position and, before every step, picks the draft length ``k`` that
maximises expected tokens per second::

    E(k) = 1 + sum_{j=1..k} prod_{i<=j} a_i        (tokens emitted by the step)
    rate(k) = E(k) / (T(k+1) + k * draft_cost)

``k = 0`` (plain decoding) wins whenever drafts do not pay. The cost curve is
measured once per model, backend and machine and cached as JSON in the user
cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from edgemtp.engine.backend import Backend
from edgemtp.paths import cache_root


PROBE_INTERVAL = 8  # steps between probes while not drafting, when a probe costs a draft step
PRIOR_WEIGHT = 2.0  # observations a draft position needs before its own record outweighs its prior
CHEAP_DRAFT = 0.05  # a draft step below this fraction of a trunk step counts as free (n-gram lookup)


@dataclass
class Costs:
    trunk: list[float]  # trunk[n-1] = seconds for one trunk step over n tokens
    draft: float  # seconds for one draft step


class FixedDraftLength:
    """Always draft ``k`` tokens (``num_draft=N``)."""

    def __init__(self, k: int):
        self.k = k
        self.min_prob = 0.0

    def choose(self) -> int:
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        pass

    def update_probe(self, acceptance: float) -> None:
        pass

    def wants_probe(self) -> bool:
        return False  # k is fixed: nothing to learn from a free guess


class AdaptiveDraftLength:
    """Picks ``k`` in ``0..max_k`` each step from measured costs and acceptance.

    ``ema_weight`` is how much one observation moves the running acceptance of a
    position (see ``acceptance`` for how few observations are weighed). Drafting
    stops early when the draft's top probability is below ``min_prob``: such
    guesses are rarely accepted.
    """

    def __init__(self, costs: Costs, max_k: int, ema_weight: float = 0.1, min_prob: float = 0.1):
        self.costs = costs
        self.max_k = min(max_k, len(costs.trunk) - 1)
        self.ema_weight = ema_weight
        self.min_prob = min_prob
        self._ema = [0.0] * self.max_k  # running mean of outcomes per position, debiased by _seen
        self._seen = [0] * self.max_k
        # While not drafting, a guess (probe) keeps the acceptance estimate alive so drafting can
        # resume. A guess that costs real work (an MTP step) is made only every PROBE_INTERVAL
        # steps, so that a drafter that does not pay costs next to nothing.
        self.probe_interval = 1 if costs.draft < CHEAP_DRAFT * costs.trunk[0] else PROBE_INTERVAL
        self._steps_since_probe = 0

    @property
    def acceptance(self) -> list[float]:
        """Estimated acceptance per draft position.

        A position judged only a few times leans on its prior: 1 for the first position (drafting
        is tried before it is judged), the estimate of the position before it for the others.
        Deep positions are reached only when every draft before them is accepted, so they are
        judged rarely; an optimistic start there (1, as before) made a fresh session draft 4
        tokens at an acceptance of 0.4 for most of a 60-token answer, slower than plain decoding.
        """
        estimates, prior = [], 1.0
        for ema, seen in zip(self._ema, self._seen):
            own = ema / (1 - (1 - self.ema_weight) ** seen) if seen else prior
            weight = seen / (seen + PRIOR_WEIGHT)
            prior = weight * own + (1 - weight) * prior
            estimates.append(prior)
        return estimates

    def expected_rate(self, k: int, acceptance: list[float]) -> float:
        """Tokens per second of drafting ``k`` at these per-position acceptance estimates."""
        reach, tokens = 1.0, 1.0
        for a in acceptance[:k]:
            reach *= a
            tokens += reach
        return tokens / (self.costs.trunk[k] + k * self.costs.draft)

    def choose(self) -> int:
        acceptance = self.acceptance  # computed once: a property over every position
        return max(range(self.max_k + 1), key=lambda k: self.expected_rate(k, acceptance))

    def _observe(self, position: int, value: float) -> None:
        self._ema[position] += self.ema_weight * (value - self._ema[position])
        self._seen[position] += 1

    def update(self, drafted: int, accepted: int) -> None:
        # Positions up to the first rejection were judged; later ones were not.
        for i in range(min(drafted, accepted + 1)):
            self._observe(i, float(i < accepted))

    def wants_probe(self) -> bool:
        """Called on steps that do not draft: whether to guess a first draft anyway."""
        self._steps_since_probe += 1
        if self._steps_since_probe < self.probe_interval:
            return False
        self._steps_since_probe = 0
        return True

    def update_probe(self, acceptance: float) -> None:
        """Acceptance probability of a first draft that was guessed but not verified."""
        if self.max_k:
            self._observe(0, acceptance)


def cost_cache_path() -> Path:
    return cache_root() / "costs.json"


def config_digest(config: dict) -> str:
    """A short stable name for a model architecture (what its step costs depend on)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cost_key(backend: Backend, drafter_name: str) -> str:
    """Identifies what the costs depend on: architecture, weights, backend and edgemtp version,
    drafter and machine."""
    machine = f"{platform.node()}/{platform.machine()}/{os.cpu_count()}"
    # The config alone does not tell 4-bit from 8-bit weights (an ONNX export keeps the source's
    # config.json), and a release can change what a step runs: both get their own entry.
    weights = f"{backend.weight_bytes()}B|v{version('edgemtp')}"
    # A draft head over a draft vocabulary is cheaper than the full one: its own entry.
    draft_vocab = "full" if backend.draft_ids is None else len(backend.draft_ids)
    return f"{config_digest(backend.config)}|{type(backend).__name__}|{weights}|{drafter_name}|{draft_vocab}|{machine}"


def measure_trunk_costs(backend: Backend, max_tokens: int, repeats: int = 7) -> list[float]:
    """Median seconds of a trunk step over 1..max_tokens tokens after a short prefix.

    Every size runs once untimed first, and the timed rounds go through all sizes in turn: timing
    one size after another would charge warm-up (and any drift of the machine) to whichever
    size came first, and T(1) is the one every ratio is taken against.
    Leaves the caches empty (callers must drop any state tied to them).
    """
    backend.reset()
    backend.trunk_step([0] * 8)
    sizes = range(1, max_tokens + 1)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for round_ in range(repeats + 1):
        for n in sizes:
            start = time.perf_counter()
            backend.trunk_step([0] * n)
            if round_:  # round 0 is the warm-up
                times[n].append(time.perf_counter() - start)
            backend.trunk_rollback(n)
    backend.reset()
    return non_decreasing([float(np.median(times[n])) for n in sizes])


def non_decreasing(costs: list[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators, equal weights).

    A step over more tokens never costs less, so a dip in measured costs is noise; left in, a
    T(3) below T(2) would make drafting 2 look cheaper than drafting 1.
    """
    blocks: list[list[float]] = []  # [mean, count] of pooled runs
    for cost in costs:
        blocks.append([cost, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count),
                          blocks[-1][1] + count]
    return [mean for mean, count in blocks for _ in range(count)]


def load_or_measure_costs(backend: Backend, drafter, drafter_name: str, max_k: int) -> Costs:
    """Cached costs for this model/backend/drafter/machine, measured on first use."""
    path = cost_cache_path()
    key = cost_key(backend, drafter_name)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if entry and len(entry["trunk"]) >= max_k + 1:
        return Costs(trunk=entry["trunk"][: max_k + 1], draft=entry["draft"])
    costs = Costs(trunk=measure_trunk_costs(backend, max_k + 1), draft=drafter.measure_step_cost())
    backend.reset()
    cache[key] = asdict(costs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(cache, tmp, indent=1)
    os.replace(tmp.name, path)
    return costs
