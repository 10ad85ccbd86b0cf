"""``edgemtp bench``: bandwidth, speedup model, aggregation, step costs and report writers."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from edgemtp.bench import decoding, figures, report, runner
from edgemtp.bench.peers import mlx_lm as mlx_lm_peer
from edgemtp.bench.membw import read_bandwidth
from edgemtp.bench.prompts import load_prompts
from edgemtp.engine.drafters import mtp_step_seconds
from edgemtp.engine.stats import Stats, peak_rss_bytes, reset_peak_rss
from edgemtp.errors import UserError

# --- bandwidth -------------------------------------------------------------------------


def test_bandwidth_reads_every_element():
    result = read_bandwidth(8 << 20, repeats=2, threads=2)
    assert result.bytes_read == 8 << 20
    assert result.checksum == (8 << 20) // 8  # a sum of int64 ones: every element was read
    assert result.threads == 2 and result.gb_per_s > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak RSS can be reset on Linux only")
def test_peak_rss_restarts_after_a_conversion_sized_allocation():
    """What bench and generate report as peak memory leaves out an earlier, larger peak
    (converting the default model on first use)."""
    block = np.ones(400 << 20, np.uint8)  # 400 MiB, touched
    block_peak = peak_rss_bytes()
    del block
    reset_peak_rss()
    assert peak_rss_bytes() < block_peak - (300 << 20)


# --- speedup model --------------------------------------------------------------------------


def test_expected_tokens_per_step():
    assert figures.expected_tokens_per_step([0.8, 0.5], 1) == pytest.approx(1.8)
    assert figures.expected_tokens_per_step([0.8, 0.5], 2) == pytest.approx(1 + 0.8 + 0.8 * 0.5)
    # a position never reached counts as rejected
    assert figures.expected_tokens_per_step([0.8, 0.5], 4) == pytest.approx(2.2)
    assert figures.expected_tokens_per_step([], 3) == 1.0


def test_ideal_speedup_by_hand():
    curve = [1.0, 1.1, 1.2, 1.3]
    # two drafts per step: verify 3 tokens (1.2) + 2 draft steps of 0.1
    assert figures.ideal_speedup(2.2, {2: 10}, curve, 0.1) == pytest.approx(2.2 / 1.4)
    # mixed draft lengths are weighted by their step counts
    mixed = (3 * (1.1 + 0.1) + 1 * (1.3 + 0.3)) / 4
    assert figures.ideal_speedup(2.0, {1: 3, 3: 1}, curve, 0.1) == pytest.approx(2.0 / mixed)
    # past the curve, extended along its last segment: T(6)/T(1) = 1.3 + 2 * 0.1
    assert figures.ideal_speedup(3.0, {5: 1}, curve, 0.0) == pytest.approx(3.0 / 1.5)
    assert figures.ideal_speedup(1.0, {}, curve, 0.0) == 1.0
    # a dip in the measured curve is noise: T(2) = 1.3 and T(3) = 1.2 both count as their mean
    assert figures.ideal_speedup(1.5, {1: 1}, [1.0, 1.3, 1.2, 1.4], 0.0) == pytest.approx(1.5 / 1.25)


def test_bandwidth_fraction():
    assert figures.bandwidth_fraction(10**9, 10.0, 20.0) == pytest.approx(0.5)


# --- prompts -------------------------------------------------------------------------------------


def test_default_prompts():
    prompts = load_prompts()
    assert 12 <= len(prompts) <= 20 and all(isinstance(p, str) and p for p in prompts)
    assert any(p.startswith("def ") for p in prompts)  # code-like prompts are included


def test_heldout_prompts_are_a_separate_mixed_set():
    """24 chat, story and code requests, none of them in the default prompt set or among the model
    card's held-out prompts (the MTP head's training data left those out too)."""
    import json
    from pathlib import Path

    heldout = load_prompts("heldout")
    assert len(heldout) == 24 and len(set(heldout)) == 24
    card = Path(__file__).resolve().parents[1] / "models/smollm2-135m-mtp/heldout_prompts.jsonl"
    others = set(load_prompts()) | {json.loads(line)["prompt"] for line in card.read_text().splitlines()}
    assert not others & set(heldout)
    assert sum(p.startswith("Write a Python") for p in heldout) >= 3  # code is a third of the set


@pytest.mark.parametrize("text", ["not json", "{}", "[]", '["ok", 3]'])
def test_bad_prompt_files(tmp_path, text):
    path = tmp_path / "prompts.json"
    path.write_text(text)
    with pytest.raises(UserError, match="prompts.json"):
        load_prompts(path)


# --- aggregation over prompts (a scripted fake model) ------------------------------------------------


class ScriptedModel:
    """Replays fixed generations: per prompt a token list and final Stats, per spec mode."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def stream(self, prompt, *, max_tokens, temperature, spec, num_draft=None, draft_model=None):
        self.calls.append((prompt, max_tokens, spec, num_draft))
        tokens, stats = self.script[spec][prompt]
        for i, token in enumerate(tokens[:max_tokens]):
            yield str(token), [token], stats if i == len(tokens[:max_tokens]) - 1 else Stats()


def _stats(tokens_per_s, generated, steps=0, accepted=0, acceptance=(), lengths=None):
    return Stats(steps=steps, accepted=accepted, acceptance_by_position=list(acceptance), tokens_per_s=tokens_per_s,
                 generated_tokens=generated, draft_lengths=lengths or {})


SCRIPT = {
    "none": {"a": ([1, 2, 3, 4], _stats(10.0, 4)), "b": ([5, 6], _stats(20.0, 2))},
    "mtp": {
        "a": ([1, 2, 3, 4], _stats(20.0, 4, steps=2, accepted=2, acceptance=[1.0], lengths={1: 2})),
        "b": ([5, 7], _stats(40.0, 2, steps=2, accepted=0, acceptance=[0.0], lengths={1: 2})),
    },
}


def test_plain_aggregation_is_tokens_over_seconds():
    model = ScriptedModel(SCRIPT)
    plain, outputs = decoding.measure_decoding(model, ["a", "b"], max_tokens=16, repeats=2)
    assert outputs == [[1, 2, 3, 4], [5, 6]]
    # as the engine counts it: the 3 + 1 tokens after each first token, in 3/10 + 1/20 = 0.35 s
    assert plain.tokens_per_s == pytest.approx(4 / 0.35)
    assert plain.generated_tokens == 6 and plain.identical_to_plain is None
    assert plain.ttft_s > 0
    # one short warm-up on the last prompt, then every prompt per repeat
    assert model.calls[0] == ("b", decoding.WARMUP_TOKENS, "none", None)
    assert len(model.calls) == 1 + 2 * 2


def test_speculative_aggregation_and_identity_check():
    model = ScriptedModel(SCRIPT)
    reference = [[1, 2, 3, 4], [5, 6]]
    spec, _ = decoding.measure_decoding(model, ["a", "b"], max_tokens=16, repeats=1, spec="mtp", num_draft=1,
                                     reference=reference)
    assert spec.tokens_per_s == pytest.approx(4 / (3 / 20 + 1 / 40))
    assert spec.identical_to_plain is False  # prompt b diverged
    assert spec.tokens_per_step == pytest.approx(1 + 2 / 4)
    assert spec.acceptance_by_position == pytest.approx([0.5])  # weighted by steps: (2*1 + 2*0) / 4
    assert spec.draft_lengths == {1: 4}
    same, _ = decoding.measure_decoding(model, ["a"], max_tokens=16, repeats=1, spec="mtp", num_draft=1,
                                     reference=[[1, 2, 3, 4]])
    assert same.identical_to_plain is True


def test_auto_rows_are_measured_in_rounds_interleaved_with_plain_decoding():
    model = ScriptedModel(SCRIPT)
    [mtp] = decoding.interleaved_auto(model, ["a", "b"], ["mtp"], max_tokens=16, rounds=2)
    # each round measures every variant once (a warm-up, then each prompt); the second round reversed
    specs = [spec for _, _, spec, _ in model.calls]
    assert specs == ["none"] * 3 + ["mtp"] * 3 + ["mtp"] * 3 + ["none"] * 3
    assert mtp.num_draft == "auto" and mtp.tokens_per_s == pytest.approx(4 / 0.175)
    assert mtp.measured_speedup == pytest.approx(2.0)


# --- step costs on the real MLX backend ----------------------------------------------------------


@pytest.fixture(scope="module")
def mlx_model(tmp_path_factory):
    import edgemtp
    from edgemtp.factory import make_tiny

    path = make_tiny(tmp_path_factory.mktemp("bench") / "ds", "deepseek_v3", mtp_layers=1)
    return edgemtp.load(path, backend="mlx", max_kv_size=64)


def test_cost_curve_leaves_the_cache_as_it_found_it(mlx_model):
    backend = mlx_model.backend
    context = [5, 9, 33, 7, 100, 42]
    backend.reset()
    backend.trunk_step(context)
    curve = decoding.trunk_cost_curve(backend, repeats=2)
    assert len(curve) == decoding.COST_CURVE_TOKENS and all(t > 0 for t in curve)
    assert backend.trunk_len() == len(context)
    # the next step after the timed (rolled back) ones gives exactly what it gives
    # after a fresh prefill of the same context
    after, _ = backend.trunk_step([11])
    backend.reset()
    backend.trunk_step(context)
    fresh, _ = backend.trunk_step([11])
    assert np.array_equal(after, fresh)


def test_mtp_step_cost_leaves_the_depth_cache_as_it_found_it(mlx_model):
    backend = mlx_model.backend
    context = [5, 9, 33, 7]
    backend.reset()
    _, hidden = backend.trunk_step(context)
    backend.mtp_step(1, hidden[:-1], context[1:])
    assert mtp_step_seconds(backend, repeats=2) > 0
    assert (backend.trunk_len(), backend.mtp_len(1)) == (len(context), len(context) - 1)
    # the depth-1 cache still gives what it gives after a fresh fill
    after, _ = backend.mtp_step(1, hidden[-1:], [11])
    backend.reset()
    _, hidden = backend.trunk_step(context)
    backend.mtp_step(1, hidden[:-1], context[1:])
    fresh, _ = backend.mtp_step(1, hidden[-1:], [11])
    assert np.array_equal(after, fresh)


# --- report writers --------------------------------------------------------------------------------


def _result() -> figures.BenchResult:
    plain = figures.DecodeFigures(spec="none", num_draft=None, tokens_per_s=50.0, ttft_s=0.02, generated_tokens=100)
    speculative = [
        figures.DecodeFigures(spec="mtp", num_draft=k, tokens_per_s=50.0 + 10 * k, ttft_s=0.02, generated_tokens=100,
                            acceptance_by_position=[0.8, 0.6][:k], tokens_per_step=1.5, draft_lengths={k: 60},
                            identical_to_plain=True, measured_speedup=1 + k / 5, ideal_speedup=1.3)
        for k in (1, 2)
    ] + [figures.DecodeFigures(spec="mtp", num_draft="auto", tokens_per_s=65.0, ttft_s=0.02, generated_tokens=100,
                             identical_to_plain=True, measured_speedup=1.3, ideal_speedup=1.4)]
    target = figures.TargetFigures(
        backend="mlx", model="tiny", plan=[("total", "1.00 GiB")], weight_bytes_per_token=200_000_000, plain=plain,
        speculative=speculative, cost_curve=[1.0, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6], trunk_step_s=0.02,
        draft_cost={"ngram": 0.0, "mtp": 0.12}, bandwidth_fraction=0.5, peak_rss_bytes=2**30,
        mlx_lm_tokens_per_s=40.0, mlx_lm_note="mlx-lm stream_generate")
    return figures.BenchResult(machine={"platform": "test", "processor": "test-cpu", "bandwidth_threads": 2},
                             bandwidth_gb_s=20.0, targets=[target], settings={"max_tokens": 64, "repeats": 3,
                                                                               "prompts": 2})


def test_rich_report():
    from rich.console import Console

    console = Console(record=True, width=200)
    report.print_report(_result(), console)
    text = console.export_text()
    assert "20.0 GB/s" in text and "50% of measured" in text
    assert "1.25×" in text  # ours 50 tok/s over mlx-lm's 40
    assert "0.80 0.60" in text and "auto" in text


def test_markdown_table():
    markdown = report.to_markdown(_result())
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[0] == "| " + " | ".join(report.DECODE_COLUMNS) + " |"
    assert rows[1].startswith("| plain | – | 50.0 |")
    assert rows[2] == "| mtp | 1 | 60.0 | 20 | 1.50 | 0.80 | 1.30 | 1.20 | yes |"
    assert len(rows) == 1 + 1 + 3


def test_json_has_every_figure(tmp_path):
    path = tmp_path / "bench.json"
    report.write_json(_result(), path)
    data = json.loads(path.read_text())
    target = data["targets"][0]
    assert data["bandwidth_gb_s"] == 20.0 and target["mlx_lm_ratio"] == pytest.approx(1.25)
    assert target["speculative"][1]["acceptance_by_position"] == [0.8, 0.6]
    assert target["cost_curve"][7] == 1.6 and target["draft_cost"]["mtp"] == 0.12
    assert not (tmp_path / "bench.json.partial").exists()


def test_plot_is_a_png(tmp_path):
    path = tmp_path / "bench.png"
    report.write_plot(_result(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- end to end through the CLI ---------------------------------------------------------------------


def test_bench_command_end_to_end(tmp_path, monkeypatch, tiny_checkpoint):
    from typer.testing import CliRunner

    from edgemtp.cli import app

    monkeypatch.setenv("EDGEMTP_CACHE", str(tmp_path / "cache"))  # the auto policy caches step costs there
    model = tiny_checkpoint("deepseek_v3", mtp_layers=1)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Once upon a time", "def add(a, b):"]))
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(app, [
        "bench", "--model", str(model), "--backend", "mlx", "--bits", "4", "--prompts", str(prompts), "--max-tokens", "8",
        "--repeats", "1", "--bandwidth-mb", "16", "--json", str(out / "b.json"), "--plot", str(out / "b.png"),
        "--markdown", str(out / "b.md"),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "b.json").read_text())
    target = data["targets"][0]
    rows = target["speculative"]
    drafters = ("mtp", "mtp-tree", "ngram", "hybrid")  # MLX verifies trees
    assert [(r["spec"], r["num_draft"]) for r in rows] == (
        [(d, k) for d in drafters[:3] for k in runner.FIXED_DRAFT_LENGTHS] + [(d, "auto") for d in drafters])
    # the auto rows come from rounds interleaved with plain decoding: their speedup is a ratio within rounds
    assert all(r["measured_speedup"] > 0 for r in rows if r["num_draft"] == "auto")
    # greedy speculative decoding must reproduce plain decoding token for token
    assert all(r["identical_to_plain"] is True for r in rows)
    assert target["plain"]["generated_tokens"] > 0 and len(target["cost_curve"]) == decoding.COST_CURVE_TOKENS
    assert target["weight_bytes_per_token"] > 0 and data["bandwidth_gb_s"] > 0
    # the 4-bit conversion keeps the trunk mlx-lm loadable, so the side-by-side ran
    assert target["model"].endswith("(mlx 4-bit)") and target["mlx_lm_tokens_per_s"] > 0
    assert (out / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "| plain |" in (out / "b.md").read_text()


def test_mlx_lm_rate_counts_tokens_after_the_first_like_edgemtp():
    """stream_generate reports 24 tokens over the 23 intervals after the first token; the side by
    side must compare 23 tokens over that time, as edgemtp's own rate does."""
    from types import SimpleNamespace

    last = SimpleNamespace(generation_tokens=24, generation_tps=24 / 2.3)
    decoded, seconds = mlx_lm_peer.mlx_lm_decode(last)
    assert decoded == 23 and seconds == pytest.approx(2.3)
    assert mlx_lm_peer.mlx_lm_decode(None) == (0, 0.0)
    assert mlx_lm_peer.mlx_lm_decode(SimpleNamespace(generation_tokens=1, generation_tps=0.0)) == (0, 0.0)
