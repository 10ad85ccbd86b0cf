"""``edgemtp bench``: one run that measures everything the README's speed table shows.

For each model (and backend) it measures, after a warm-up and as the median of several
repeats:

* plain decoding tokens/s and time to first token;
* speculative decoding tokens/s for each drafter at fixed draft lengths k = 1..4, and at
  ``auto`` in rounds interleaved with plain decoding (the hybrid drafter at ``auto`` only),
  checking that greedy output is token-for-token identical to plain decoding (MTP drafting
  verified as a tree, ``mtp-tree``, where the backend has tree verification, with the draft
  tokens it verified per pass);
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

The figures live in plain dataclasses; ``edgemtp.bench.report`` turns them into a table,
JSON, markdown and a plot.
"""

from __future__ import annotations

import gc
import platform
from pathlib import Path

from edgemtp.bench.decoding import draft_vocab_size, interleaved_auto, measure_decoding, trunk_cost_curve
from edgemtp.bench.figures import (BenchResult, Target, TargetFigures, bandwidth_fraction,
                                   expected_tokens_per_step, ideal_speedup)
from edgemtp.bench.peers.mlx_lm import mlx_lm_tokens_per_s
from edgemtp.engine.drafters import mtp_step_seconds
from edgemtp.engine.stats import peak_rss_bytes, reset_peak_rss
from edgemtp.errors import UserError

FIXED_DRAFT_LENGTHS = (1, 2, 3, 4)


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
            if hasattr(model.backend, "trunk_step_tree"):  # tree verification (MLX so far)
                draft_cost["mtp-tree"] = draft_cost["mtp"]
        if wanted("ngram"):
            draft_cost["ngram"] = 0.0  # a table lookup in Python: negligible next to a forward pass
        if "mtp" in draft_cost and wanted("hybrid"):
            draft_cost["hybrid"] = draft_cost["mtp"]  # per MTP-drafted token; copied ones cost a lookup
        if draft_model is not None:
            draft_seconds = trunk_cost_curve(draft_model.backend, repeats)[0]
            draft_cost["draft"] = draft_seconds / seconds[0]

        speculative = []
        for drafter in draft_cost:
            for k in () if drafter == "hybrid" else FIXED_DRAFT_LENGTHS:
                progress(f"[{backend_name}] {drafter} k={k}")
                figures, _ = measure_decoding(model, prompts, max_tokens=max_tokens, repeats=repeats, spec=drafter,
                                              num_draft=k, draft_model=draft_model, reference=reference)
                figures.measured_speedup = figures.tokens_per_s / plain.tokens_per_s
                # The speedup model prices a step by its draft length; a tree's pass runs more rows.
                if drafter != "mtp-tree":
                    per_step = expected_tokens_per_step(figures.acceptance_by_position, k)
                    figures.ideal_speedup = ideal_speedup(per_step, figures.draft_lengths, cost_curve,
                                                          draft_cost[drafter])
                speculative.append(figures)
        progress(f"[{backend_name}] {', '.join(draft_cost)} at auto, rounds interleaved with plain decoding")
        for figures in interleaved_auto(model, prompts, list(draft_cost), max_tokens=max_tokens, rounds=repeats,
                                        reference=reference, draft_model=draft_model):
            # Only the drafts that ran a model call cost a draft step (the hybrid's copies do not).
            if figures.spec != "mtp-tree":
                per_draft = draft_cost[figures.spec] * (1 - figures.copied_fraction)
                figures.ideal_speedup = ideal_speedup(figures.tokens_per_step, figures.draft_lengths, cost_curve,
                                                      per_draft)
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
    from edgemtp.bench.membw import DEFAULT_BUFFER_BYTES, read_bandwidth
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


def convert_targets(source: Path, backends: list[str], bits: list[int], work_dir: Path, progress=print,
                    head_bits: int | None = None) -> list[Target]:
    """Convert ``source`` once per (backend, bits) into ``work_dir``; one target each. ``head_bits``:
    as ``edgemtp convert --head-bits``, for the 4-bit conversions."""
    from edgemtp.converters.convert import convert

    targets = []
    for backend in backends:
        for count in bits:
            heads = head_bits if count == 4 else None
            name = f"{backend} {count}-bit" + (f", heads {heads}-bit" if heads else "")
            progress(f"converting {source} to {name}")
            out = convert(source, work_dir / f"{backend}-{count}bit", to=backend, bits=count, head_bits=heads)
            targets.append(Target(Path(out), backend, f"{source.name} ({name})"))
    return targets
