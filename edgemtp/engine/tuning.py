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
cache directory; during decoding ``CostModel`` refines it from the loop's own
timings (trunk pass, drafting, and the rest of a step), so a curve measured
on a busy machine, or drafts that cost more in the loop than alone, do not
steer the choice for long.

``HybridPolicy`` makes the same choice over two drafters: the n-gram
continuation, judged per match length and costing only its lookup, or the
MTP chain.
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
# Steps after which the position just past the chosen draft length is drafted once more, so that
# its estimate follows the text: judged only while it is drafted, a deep position estimated low
# early in an answer kept the policy at one token for the rest of it (issue 17).
EXPLORE_INTERVAL = 8
TIMING_WEIGHT = 0.1  # how much one step's timings move the online cost estimates
PRIOR_WEIGHT = 2.0  # observations a draft position needs before its own record outweighs its prior
CHEAP_DRAFT = 0.05  # a draft step below this fraction of a trunk step counts as free (n-gram lookup)


@dataclass
class Costs:
    trunk: list[float]  # trunk[n-1] = seconds for one trunk step over n tokens
    draft: float  # seconds for one draft step


@dataclass
class StepTiming:
    """Where one decoding step's seconds went: drafting ``drafted`` tokens (the policy's choice
    included), the trunk pass over ``verified`` tokens, and the whole step, which adds sampling,
    bookkeeping and whatever the stream's consumer does before asking for the next step."""

    drafted: int
    draft: float
    verified: int
    trunk: float
    total: float
    # The drafting also caught up on positions skipped before (drafters' ``caught_up``): its
    # seconds are not a draft's cost. The first MTP draft after a prompt ran the MTP layers over the
    # whole prompt; timed as a draft, it priced drafts at 25x their cost, and MTP, which then drafted
    # no more, was never timed again.
    caught_up: bool = False


class RunningMean:
    """Exponential moving average, debiased while it has seen few values."""

    def __init__(self, weight: float):
        self.weight = weight
        self.seen = 0
        self._ema = 0.0

    def add(self, value: float) -> None:
        self._ema += self.weight * (value - self._ema)
        self.seen += 1

    def blend(self, prior: float) -> float:
        """The mean, weighed against ``prior`` as if that were ``PRIOR_WEIGHT`` observations."""
        if not self.seen:
            return prior
        own = self._ema / (1 - (1 - self.weight) ** self.seen)
        weight = self.seen / (self.seen + PRIOR_WEIGHT)
        return weight * own + (1 - weight) * prior


class CostModel:
    """The seconds a step costs, as the decoding loop pays them.

    Starts from the offline curve (``Costs.trunk``) and follows the loop's own timings: a trunk
    pass over n tokens leans on its running mean once that size has been timed, and on the offline
    value scaled by how much slower the loop's passes run than the offline ones before. A step
    also pays a fixed overhead outside the trunk and the drafter (sampling, detokenizing, the
    consumer of the stream: in ``edgemtp chat`` the UI), which makes every emitted token cheaper
    when a step emits more of them.
    """

    def __init__(self, costs: Costs):
        self.offline = costs.trunk
        self._trunk = [RunningMean(TIMING_WEIGHT) for _ in costs.trunk]
        self._slowdown = RunningMean(TIMING_WEIGHT)  # loop trunk seconds / offline seconds
        self._overhead = RunningMean(TIMING_WEIGHT)

    def curve(self) -> list[float]:
        """Seconds of a trunk pass over 1, 2, ... tokens."""
        slowdown = self._slowdown.blend(1.0)
        return non_decreasing([own.blend(slowdown * offline) for own, offline in zip(self._trunk, self.offline)])

    @property
    def overhead(self) -> float:
        return self._overhead.blend(0.0)

    def record(self, timing: StepTiming) -> None:
        if timing.verified <= len(self.offline):
            self._trunk[timing.verified - 1].add(timing.trunk)
            self._slowdown.add(timing.trunk / self.offline[timing.verified - 1])
        self._overhead.add(max(0.0, timing.total - timing.trunk - timing.draft))


class FixedDraftLength:
    """Always draft ``k`` tokens (``num_draft=N``)."""

    def __init__(self, k: int):
        self.k = k
        self.min_prob = 0.0

    def choose(self, seq: list[int] | None = None) -> int:
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        pass

    def update_probe(self, acceptance: float) -> None:
        pass

    def wants_probe(self) -> bool:
        return False  # k is fixed: nothing to learn from a free guess

    def record_timing(self, timing: StepTiming) -> None:
        pass


class AdaptiveDraftLength:
    """Picks ``k`` in ``0..max_k`` each step from measured costs and acceptance.

    ``ema_weight`` is how much one observation moves the running acceptance of a
    position (see ``acceptance`` for how few observations are weighed). Drafting
    stops early when the draft's top probability is below ``min_prob``: such
    guesses are rarely accepted. ``cost_model`` is shared when several estimates
    (the hybrid drafter's) price steps of the same trunk.
    """

    def __init__(self, costs: Costs, max_k: int, ema_weight: float = 0.1, min_prob: float = 0.1,
                 cost_model: CostModel | None = None):
        self.costs = costs
        self.cost_model = cost_model or CostModel(costs)
        self.max_k = min(max_k, len(costs.trunk) - 1)
        self.min_prob = min_prob
        self._outcomes = [RunningMean(ema_weight) for _ in range(self.max_k)]  # acceptance per position
        self._since_drafted = [0] * self.max_k  # steps since each position was last drafted
        self._draft = RunningMean(TIMING_WEIGHT)  # seconds per draft token, timed in the loop
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
        for outcomes in self._outcomes:
            prior = outcomes.blend(prior)
            estimates.append(prior)
        return estimates

    @property
    def draft_cost(self) -> float:
        """Seconds per draft token: the offline measurement until the loop has timed drafts."""
        return self._draft.blend(self.costs.draft)

    def expected_rate(self, k: int, acceptance: list[float], curve: list[float] | None = None) -> float:
        """Tokens per second of drafting ``k`` at these per-position acceptance estimates."""
        curve = curve or self.cost_model.curve()
        reach, tokens = 1.0, 1.0
        for a in acceptance[:k]:
            reach *= a
            tokens += reach
        return tokens / (curve[k] + k * self.draft_cost + self.cost_model.overhead)

    def plan(self, curve: list[float], limit: int) -> tuple[int, float]:
        """The draft length to use, at most ``limit``, and the expected rate of the best one.

        The best length is sometimes drafted one deeper (``EXPLORE_INTERVAL``), so that the
        position beyond it keeps being judged."""
        acceptance = self.acceptance  # computed once: a property over every position
        lengths = range(min(limit, self.max_k) + 1)
        rates = [self.expected_rate(k, acceptance, curve) for k in lengths]
        best = max(lengths, key=rates.__getitem__)
        if 1 <= best < lengths[-1] and self._since_drafted[best] >= EXPLORE_INTERVAL:
            return best + 1, rates[best]
        return best, rates[best]

    def choose(self, seq: list[int] | None = None) -> int:
        return self.plan(self.cost_model.curve(), self.max_k)[0]

    def update(self, drafted: int, accepted: int) -> None:
        # Positions up to the first rejection were judged; later ones were not.
        for i in range(min(drafted, accepted + 1)):
            self._outcomes[i].add(float(i < accepted))
        for i in range(self.max_k):
            self._since_drafted[i] = 0 if i < drafted else self._since_drafted[i] + 1

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
            self._outcomes[0].add(acceptance)

    def record_draft(self, timing: StepTiming) -> None:
        if timing.drafted and not timing.caught_up:
            self._draft.add(timing.draft / timing.drafted)

    def record_timing(self, timing: StepTiming) -> None:
        """The loop's timings of the step just verified refine the costs the next choice uses."""
        self.cost_model.record(timing)
        self.record_draft(timing)


class HybridPolicy:
    """For the hybrid drafter: per step, copy the n-gram continuation or draft with MTP, and how
    many tokens, whichever promises more tokens per second.

    Both estimates price steps with one shared ``CostModel``. MTP keeps its per-position
    acceptance; the n-gram drafter keeps one per match length (a longer repeated suffix predicts
    its continuation better), and its drafts cost their lookup, timed in the loop like MTP's.
    Steps that do not draft probe MTP, as MTP alone does.
    """

    def __init__(self, costs: Costs, max_k: int, max_ngram: int):
        self.drafter = None  # the HybridDrafter it steers (set by the session): which continuation to copy, if any
        self.cost_model = CostModel(costs)
        self.mtp = AdaptiveDraftLength(costs, max_k, cost_model=self.cost_model)
        copying = Costs(trunk=costs.trunk, draft=0.0)  # until timed: a lookup, no model call
        self.ngram = [AdaptiveDraftLength(copying, max_k, cost_model=self.cost_model) for _ in range(max_ngram)]
        self.max_k = self.mtp.max_k
        self.min_prob = self.mtp.min_prob
        self.active = self.mtp  # the estimate whose drafter drafts this step

    def choose(self, seq: list[int] | None = None) -> int:
        curve = self.cost_model.curve()
        match, continuation = self.drafter.ngram.match(seq, self.max_k)
        k, rate = self.mtp.plan(curve, self.max_k)
        self.active, self.drafter.continuation = self.mtp, None
        if continuation:
            by_match = self.ngram[match - 1]
            copy_k, copy_rate = by_match.plan(curve, len(continuation))
            if copy_k and copy_rate > rate:
                self.active, self.drafter.continuation, k = by_match, continuation, copy_k
        return k

    def update(self, drafted: int, accepted: int) -> None:
        self.active.update(drafted, accepted)

    def wants_probe(self) -> bool:
        return self.mtp.wants_probe()

    def update_probe(self, acceptance: float) -> None:
        self.mtp.update_probe(acceptance)

    def record_timing(self, timing: StepTiming) -> None:
        self.cost_model.record(timing)
        self.active.record_draft(timing)


class FixedHybridLength(FixedDraftLength):
    """The hybrid drafter at a fixed length (``num_draft=N``): the n-gram continuation, up to N
    tokens, where the context has one; N MTP drafts elsewhere."""

    def __init__(self, drafter, k: int):
        super().__init__(k)
        self.drafter = drafter

    def choose(self, seq: list[int] | None = None) -> int:
        _, continuation = self.drafter.ngram.match(seq, self.k)
        self.drafter.continuation = continuation or None
        return len(continuation) if continuation else self.k


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
