"""``edgemtp bench``: one run that measures everything the README's speed table shows.

For each model (and backend) it measures, after a warm-up and as the median of several
repeats:

* plain decoding tokens/s and time to first token;
* speculative decoding tokens/s for each drafter at fixed draft lengths k = 1..4 and at
  ``auto``, checking that greedy output is token-for-token identical to plain decoding;
* the cost curve ``T(n) / T(1)`` of one trunk step over n tokens, and the cost of one
  draft step relative to a trunk step (an MTP step timed right after a trunk step, as
  decoding runs it);
* acceptance per draft position and tokens emitted per trunk step;
* the speedup speculative decoding *should* give from those measurements (ideal) next
  to the one it gives (measured);
* a roofline: bytes of weights each decode step reads, and what fraction of the
  machine's measured read bandwidth plain decoding achieves;
* peak RSS from loading the model on (a conversion before it not counted, on Linux), and on MLX mlx-lm's own ``stream_generate`` side by side;
* for the default model, whose MTP head scores a draft vocabulary (edgemtp/draft_vocab.py),
  the same model with a full-vocabulary MTP head, MTP drafting only: what the draft
  vocabulary saves in draft cost and loses in acceptance.

The figures live in plain dataclasses; ``edgemtp.benchreport`` turns them into a table,
JSON, markdown and a plot.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from edgemtp.engine.drafters import median_seconds, mtp_step_seconds
from edgemtp.engine.stats import peak_rss_bytes, reset_peak_rss
from edgemtp.engine.tuning import non_decreasing
from edgemtp.errors import UserError

DRAFT_LENGTHS: tuple[int | str, ...] = (1, 2, 3, 4, "auto")
COST_CURVE_TOKENS = 8  # the cost curve covers trunk steps of 1..8 tokens
WARMUP_TOKENS = 8


# --- figures -------------------------------------------------------------------


@dataclass
class DecodeFigures:
    """One decoding configuration run over the whole prompt set."""

    spec: str  # "none" (plain), "mtp", "ngram" or "draft"
    num_draft: int | str | None  # None for plain decoding
    tokens_per_s: float  # generated tokens / decode seconds over all prompts; median of repeats
    ttft_s: float  # time to first token, median over prompts and repeats
    generated_tokens: int  # per repeat, over all prompts
    acceptance_by_position: list[float] = field(default_factory=list)
    tokens_per_step: float = 1.0  # mean tokens emitted per trunk step (accepted drafts + 1)
    draft_lengths: dict[int, int] = field(default_factory=dict)  # draft length -> trunk steps
    identical_to_plain: bool | None = None
    measured_speedup: float | None = None
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
class BenchResult:
    machine: dict
    bandwidth_gb_s: float
    targets: list[TargetFigures]
    settings: dict


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


# --- prompts -----------------------------------------------------------------------


def load_prompts(path: str | Path | None = None) -> list[str]:
    """The prompt set: a JSON list of strings (default: the bundled ``bench_prompts.json``)."""
    if path is None:
        text = resources.files("edgemtp").joinpath("bench_prompts.json").read_text(encoding="utf-8")
        where = "bench_prompts.json"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read prompts file {path} ({exc.strerror}); pass a JSON list of strings") from None
        where = str(path)
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON ({exc}); it must hold a list of prompt strings") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise UserError(f"{where} must hold a non-empty JSON list of non-empty strings")
    return prompts


# --- measuring decoding ---------------------------------------------------------------


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
        seconds = sum(s.generated_tokens / s.tokens_per_s for s in finals if s.tokens_per_s > 0)
        rates.append(generated / seconds if seconds > 0 else 0.0)
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
    positions = max(len(s.acceptance_by_position) for s in finals)
    figures.acceptance_by_position = [
        sum(s.steps * s.acceptance_by_position[i] for s in finals if len(s.acceptance_by_position) > i)
        / sum(s.steps for s in finals if len(s.acceptance_by_position) > i)
        for i in range(positions)
    ]
    for s in finals:
        for k, count in s.draft_lengths.items():
            figures.draft_lengths[int(k)] = figures.draft_lengths.get(int(k), 0) + count


# --- measuring step costs ------------------------------------------------------------------


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


# --- mlx-lm side by side -----------------------------------------------------------------------


def mlx_lm_decode(last) -> tuple[int, float]:
    """(tokens decoded after the first, seconds they took) from ``stream_generate``'s last response.

    mlx-lm's ``generation_tps`` is ``generation_tokens`` over the time since the first token came
    out, so it counts the first token but not its time: n intervals, n + 1 tokens (+4% at 24
    tokens). edgemtp's rate is the tokens after the first over that same time; so is this one.
    """
    if last is None or last.generation_tps <= 0:
        return 0, 0.0
    return last.generation_tokens - 1, last.generation_tokens / last.generation_tps


def mlx_lm_tokens_per_s(model_dir: Path, prompt_ids: list[list[int]], max_tokens: int, repeats: int):
    """mlx-lm's ``stream_generate`` tokens/s on the same directory and prompt tokens.

    Returns ``(tokens_per_s, note)``; tokens/s is None (with the reason in the note)
    when mlx-lm cannot load the directory.
    """
    import mlx_lm

    try:
        model, tokenizer = mlx_lm.load(str(model_dir))
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        return None, f"mlx-lm cannot load {model_dir.name}: {str(exc).splitlines()[0]}"

    def one_pass(ids_list, tokens):
        generated = seconds = 0.0
        for ids in ids_list:
            last = None
            for last in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=tokens):
                pass
            decoded, took = mlx_lm_decode(last)
            generated += decoded
            seconds += took
        return generated / seconds if seconds else 0.0

    one_pass(prompt_ids[-1:], WARMUP_TOKENS)
    return statistics.median(one_pass(prompt_ids, max_tokens) for _ in range(repeats)), "mlx-lm stream_generate"


# --- one target ----------------------------------------------------------------------------------


def bench_target(plan, label: str, prompts: list[str], *, max_tokens: int, repeats: int, bandwidth_gb_s: float,
                 draft_dir: Path | None = None, drafters_wanted: tuple[str, ...] | None = None,
                 progress=print) -> TargetFigures:
    """Measure one planned model directory on its backend (see the module docstring);
    ``drafters_wanted`` limits which drafters are measured."""
    import edgemtp
    from edgemtp.planner import wired_limit

    model_dir, backend_name = plan.model_dir, plan.backend
    progress(f"[{backend_name}] loading {model_dir}")
    reset_peak_rss()  # from here on: this target's inference (not an earlier conversion or target)
    load_options = {"max_kv_size": plan.max_kv_size} if backend_name == "mlx" else {}
    model = edgemtp.load(model_dir, backend=backend_name, **load_options)

    def wanted(drafter: str) -> bool:
        return drafters_wanted is None or drafter in drafters_wanted

    draft_model = edgemtp.load(draft_dir, backend=backend_name) if draft_dir and wanted("draft") else None

    with wired_limit():
        progress(f"[{backend_name}] plain decoding")
        plain, reference = measure_decoding(model, prompts, max_tokens=max_tokens, repeats=repeats)

        # Right after plain decoding the cache holds the last prompt and its output.
        progress(f"[{backend_name}] cost curve")
        seconds = trunk_cost_curve(model.backend, repeats)
        cost_curve = [s / seconds[0] for s in seconds]
        draft_cost = {}  # drafter -> cost of one draft step / T(1), in the order measured below
        if model.backend.num_mtp_layers > 0 and wanted("mtp"):
            draft_cost["mtp"] = mtp_step_seconds(model.backend, repeats) / seconds[0]
        if wanted("ngram"):
            draft_cost["ngram"] = 0.0  # a table lookup in Python: negligible next to a forward pass
        if draft_model is not None:
            draft_seconds = trunk_cost_curve(draft_model.backend, repeats)[0]
            draft_cost["draft"] = draft_seconds / seconds[0]

        speculative = []
        for drafter in draft_cost:
            for k in DRAFT_LENGTHS:
                progress(f"[{backend_name}] {drafter} k={k}")
                figures, _ = measure_decoding(model, prompts, max_tokens=max_tokens, repeats=repeats, spec=drafter,
                                              num_draft=k, draft_model=draft_model, reference=reference)
                figures.measured_speedup = figures.tokens_per_s / plain.tokens_per_s
                per_step = (expected_tokens_per_step(figures.acceptance_by_position, k) if isinstance(k, int)
                            else figures.tokens_per_step)
                figures.ideal_speedup = ideal_speedup(per_step, figures.draft_lengths, cost_curve, draft_cost[drafter])
                speculative.append(figures)

    result = TargetFigures(
        backend=backend_name,
        model=label,
        plan=plan.as_rows(),
        weight_bytes_per_token=plan.weights.trunk_stream,
        plain=plain,
        speculative=speculative,
        cost_curve=cost_curve,
        trunk_step_s=seconds[0],
        draft_cost=draft_cost,
        bandwidth_fraction=bandwidth_fraction(plan.weights.trunk_stream, plain.tokens_per_s, bandwidth_gb_s),
        peak_rss_bytes=peak_rss_bytes(),
        draft_vocab_size=draft_vocab_size(model.backend),
    )
    if backend_name == "mlx":
        progress("[mlx] mlx-lm stream_generate")
        prompt_ids = [model.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        # The planner budgeted for one copy of the weights: free ours before mlx-lm loads its own.
        del model, draft_model
        gc.collect()
        result.mlx_lm_tokens_per_s, result.mlx_lm_note = mlx_lm_tokens_per_s(model_dir, prompt_ids, max_tokens,
                                                                             repeats)
    return result


def run_bench(targets: list[Target], prompts: list[str], *, max_tokens: int, repeats: int,
              draft_dir: Path | None = None, bandwidth_bytes: int | None = None, progress=print) -> BenchResult:
    """Measure the machine's bandwidth once, then every target.

    Every target is planned first, so a model that cannot fit is refused before
    anything is measured or loaded.
    """
    from edgemtp.membw import DEFAULT_BUFFER_BYTES, read_bandwidth
    from edgemtp.planner import plan_for

    if max_tokens < 1 or repeats < 1:
        raise UserError("--max-tokens and --repeats must be at least 1")
    plans = [plan_for(target.model_dir, backend=target.backend) for target in targets]
    progress("measuring memory read bandwidth")
    bandwidth = read_bandwidth(bandwidth_bytes or DEFAULT_BUFFER_BYTES, repeats=max(repeats, 3))
    figures = [
        bench_target(plan, target.label, prompts, max_tokens=max_tokens, repeats=repeats,
                     bandwidth_gb_s=bandwidth.gb_per_s, draft_dir=draft_dir, drafters_wanted=target.drafters,
                     progress=progress)
        for plan, target in zip(plans, targets)
    ]
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "bandwidth_threads": bandwidth.threads}
    settings = {"max_tokens": max_tokens, "repeats": repeats, "prompts": len(prompts)}
    return BenchResult(machine=machine, bandwidth_gb_s=bandwidth.gb_per_s, targets=figures, settings=settings)


def default_model_targets(backends: list[str], bits: list[int]) -> list[Target]:
    """The embedded default model per backend and bits (default: the backend's default bits).

    When it ships a draft vocabulary, each conversion is followed by one whose MTP head scores
    the full vocabulary, measured with MTP drafting only: the comparison the draft vocabulary
    has to win.
    """
    from edgemtp.default_model import DEFAULT_BITS, default_model_path, draft_vocab_path

    targets = []
    for backend in backends:
        for count in bits or [DEFAULT_BITS[backend]]:
            label = f"default model {count}-bit ({backend})"
            targets.append(Target(default_model_path(backend, count), backend, label))
            if draft_vocab_path() is not None:
                targets.append(Target(default_model_path(backend, count, draft_vocab=False), backend,
                                      f"{label}, full-vocabulary MTP head", drafters=("mtp",)))
    return targets


def convert_targets(source: Path, backends: list[str], bits: list[int], work_dir: Path, progress=print) -> list[Target]:
    """Convert ``source`` once per (backend, bits) into ``work_dir``; one target each."""
    from edgemtp.converters.convert import convert

    targets = []
    for backend in backends:
        for count in bits:
            progress(f"converting {source} to {backend} {count}-bit")
            out = convert(source, work_dir / f"{backend}-{count}bit", to=backend, bits=count)
            targets.append(Target(Path(out), backend, f"{source.name} ({backend} {count}-bit)"))
    return targets
