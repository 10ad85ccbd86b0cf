"""What ``edgemtp bench`` measures, and the speedup model it checks the measurements against.

The figures live in plain dataclasses so that ``edgemtp.bench.report`` can turn a result, or
one saved as JSON, into a table, JSON, markdown and a plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgemtp.engine.tuning import non_decreasing


@dataclass
class DecodeFigures:
    """One decoding configuration run over the whole prompt set."""

    spec: str  # "none" (plain), "hybrid", "mtp", "mtp-tree", "ngram" or "draft"
    num_draft: int | str | None  # None for plain decoding
    tokens_per_s: float  # tokens after each prompt's first / the seconds after it, all prompts; median of repeats
    ttft_s: float  # time to first token, median over prompts and repeats
    generated_tokens: int  # per repeat, over all prompts
    acceptance_by_position: list[float] = field(default_factory=list)
    tokens_per_step: float = 1.0  # mean tokens emitted per trunk step (accepted drafts + 1)
    draft_lengths: dict[int, int] = field(default_factory=dict)  # draft length -> trunk steps
    nodes_per_step: float | None = None  # draft trees only: draft tokens verified per trunk step
    copied_fraction: float = 0.0  # share of drafted tokens copied by n-gram lookup (no model call)
    identical_to_plain: bool | None = None
    measured_speedup: float | None = None  # auto rows: median over interleaved rounds of the ratio to plain
    ideal_speedup: float | None = None


@dataclass
class TargetFigures:
    """Everything measured for one model on one backend."""

    backend: str
    model: str
    plan: list[tuple[str, str]]
    weight_bytes_per_token: int
    plain: DecodeFigures
    speculative: list[DecodeFigures]
    cost_curve: list[float]  # T(n) / T(1) for n = 1..COST_CURVE_TOKENS
    trunk_step_s: float  # T(1) in seconds
    draft_cost: dict[str, float]  # drafter -> cost of one drafted token / T(1)
    bandwidth_fraction: float  # bytes/token x plain tokens/s / measured bandwidth
    peak_rss_bytes: int  # from loading this target on (Linux); elsewhere of the whole bench process
    mlx_lm_tokens_per_s: float | None = None
    mlx_lm_note: str = ""
    draft_vocab_size: int | None = None  # tokens the MTP head scores; None: the full vocabulary

    @property
    def mlx_lm_ratio(self) -> float | None:
        """Our plain tokens/s over mlx-lm's on the same model and prompts."""
        if not self.mlx_lm_tokens_per_s:
            return None
        return self.plain.tokens_per_s / self.mlx_lm_tokens_per_s


@dataclass(frozen=True)
class Target:
    """One thing to measure: a model directory on a backend, with a name for the report.

    ``drafters`` limits the speculative measurements to these drafters (default: every one
    the model supports).
    """

    model_dir: Path
    backend: str
    label: str
    drafters: tuple[str, ...] | None = None


@dataclass
class EngineFigures:
    """One engine of ``bench --peers``: edgemtp plain, edgemtp speculative, or a peer."""

    engine: str
    tokens_per_s: float  # tokens after the first over the time after it, all prompts; median of rounds
    ttft_s: float  # median over prompts and rounds
    peak_rss_bytes: int  # of the engine's own process
    check: str  # how its greedy answer to the check prompt compared with edgemtp's plain one
    vs_plain: float  # tokens/s over edgemtp plain's
    vs_speculative: float | None  # over edgemtp speculative's; None when the model has no MTP layers


@dataclass
class PeerComparison:
    """``bench --peers``: every engine on one checkpoint, interleaved rounds, same prompts and threads."""

    model: str
    engines: list[EngineFigures]
    notes: list[str]  # one line per peer left out (not installed, failed its check...)
    settings: dict  # threads, bits, max_tokens, rounds, prompts


@dataclass
class BenchResult:
    machine: dict
    bandwidth_gb_s: float | None
    targets: list[TargetFigures]
    settings: dict
    peers: PeerComparison | None = None


# --- speedup model ----------------------------------------------------------------


def expected_tokens_per_step(acceptance_by_position: list[float], k: int) -> float:
    """``E = 1 + sum_{j=1..k} prod_{i<=j} a_i`` tokens per trunk step.

    ``a_i`` is the rate of acceptance at draft position ``i`` given that position
    ``i - 1`` was accepted (the engine's ``acceptance_by_position``); draft ``j`` is
    emitted only if drafts 1..j all are, and the trunk always adds one token of its own.
    Positions never reached in the measurement count as rejected.
    """
    expected, reach = 1.0, 1.0
    for rate in acceptance_by_position[:k]:
        reach *= rate
        expected += reach
    return expected


def ideal_speedup(tokens_per_step: float, draft_lengths: dict[int, int], cost_curve: list[float],
                  draft_cost: float) -> float:
    """Speedup over plain decoding if nothing but the measured costs were paid.

    A step drafting ``k`` tokens costs ``T(k+1) + k * draft_cost`` in units of ``T(1)``
    (one verify pass over k+1 tokens plus k draft passes) and emits ``tokens_per_step``
    tokens, where plain decoding emits 1 token per ``T(1)``. Steps are weighted by how
    often each draft length was used. The curve is first made non-decreasing, as the draft-length
    policy does: a step over more tokens never costs less, so a dip is noise (one run measured
    T(3) = 1.25 below T(2) = 1.30, which made the ideal at k = 1 lower than the one at k = 2).
    """
    cost_curve = non_decreasing(cost_curve)
    steps = sum(draft_lengths.values())
    if steps == 0:
        return 1.0
    mean_cost = sum(count * (_verify_cost(cost_curve, k + 1) + k * draft_cost)
                    for k, count in draft_lengths.items()) / steps
    return tokens_per_step / mean_cost


def _verify_cost(cost_curve: list[float], n: int) -> float:
    """``T(n) / T(1)``; past the measured curve, extended along its last segment."""
    if n <= len(cost_curve):
        return cost_curve[n - 1]
    slope = cost_curve[-1] - cost_curve[-2] if len(cost_curve) > 1 else 0.0
    return cost_curve[-1] + (n - len(cost_curve)) * slope


def bandwidth_fraction(weight_bytes_per_token: int, tokens_per_s: float, bandwidth_gb_s: float) -> float:
    """Share of the machine's read bandwidth that streaming the weights at this rate uses."""
    return weight_bytes_per_token * tokens_per_s / (bandwidth_gb_s * 1e9)


