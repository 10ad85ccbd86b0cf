"""``edgemtp bench --peers``: the parts that need no peer (timing, ratios, the answer check, the
missing-peer line, the RoPE config the onnxruntime-genai builder gets, the report), and per peer,
when it is installed, its greedy tokens against edgemtp's plain greedy tokens on a tiny llama."""

from __future__ import annotations

import json

import pytest

from edgemtp.bench import report
from edgemtp.bench.figures import BenchResult, PeerComparison
from edgemtp.bench.peers import compare, ortgenai, timing
from edgemtp.bench.peers.worker import Worker, WorkerFailed

PROMPT_IDS = list(range(3, 60, 3))  # token ids of the tiny tokenizer's vocabulary
TOKENS = 24


def test_decode_rate_counts_tokens_after_the_first_over_the_time_after_it(monkeypatch):
    clock = iter([10.0, 10.5, 11.0, 11.5, 12.5])  # start, then one reading per non-empty chunk
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    timed = timing.time_chunks([[7], [], [8, 9], [10], [11]])
    assert timed.tokens == [7, 8, 9, 10, 11]
    assert timed.ttft_s == 0.5 and timed.decode_s == 2.0
    other = timing.PromptTiming(tokens=[1, 2, 3], ttft_s=0.1, decode_s=2.0)
    assert timing.decode_tokens_per_s([timed, other]) == pytest.approx((4 + 2) / 4.0)


def test_engine_rows_give_ratios_to_edgemtp_plain_and_speculative():
    measured = {
        compare.PLAIN: {"rates": [100.0, 110.0, 90.0], "ttfts": [0.02, 0.03], "peak_rss_bytes": 2**30, "check": "ok"},
        compare.SPECULATIVE: {"rates": [120.0], "ttfts": [0.04], "peak_rss_bytes": 2**30, "check": "ok"},
        "peer": {"rates": [150.0, 150.0], "ttfts": [0.01], "peak_rss_bytes": 2**29, "check": "ok"},
    }
    rows = {row.engine: row for row in compare.engine_rows(measured)}
    assert rows[compare.PLAIN].tokens_per_s == 100.0 and rows[compare.PLAIN].vs_plain == 1.0
    assert rows["peer"].vs_plain == 1.5 and rows["peer"].vs_speculative == 1.25
    assert rows[compare.SPECULATIVE].vs_speculative == 1.0
    assert rows[compare.PLAIN].ttft_s == 0.025
    del measured[compare.SPECULATIVE]
    assert {row.vs_speculative for row in compare.engine_rows(measured)} == {None}


def test_check_passes_same_leading_tokens_or_the_right_answer_and_refuses_the_rest():
    reference = list(range(20))
    assert compare.check_answer(reference, reference, "") == (True, "first 20 tokens = edgemtp plain")
    passed, how = compare.check_answer(reference, [0, 1, 99], "The capital is Paris.")
    assert passed and "token 3" in how
    passed, how = compare.check_answer(reference, [0, 1, 99], "The capital of France, the capital of France")
    assert not passed and "does not say Paris" in how


def test_check_passes_answers_that_part_at_near_ties_only():
    reference = list(range(20))
    near_tie = [0, 1, 2, 99, 5]  # leaves edgemtp's answer at token 4, within 0.07 of its top logit
    passed, how = compare.check_answer(reference, near_tie, "L'Étoile", lambda tokens: [0.0, 0.0, 0.0, 0.07, 0.0])
    assert passed and "first 3 tokens = edgemtp plain, then near-ties" in how and "0.07" in how
    passed, how = compare.check_answer(reference, near_tie, "The capital of France, the capital",
                                       lambda tokens: [0.0, 0.0, 3.05, 2.67, 0.0])
    assert not passed and "does not say Paris" in how
    # answers that agree long enough are never scored
    assert compare.check_answer(reference, reference, "", lambda tokens: 1 / 0)[0]


def test_logit_gaps_are_zero_on_edgemtps_own_greedy_answer_and_positive_elsewhere(tiny_checkpoint, tmp_path):
    import edgemtp

    directory = tiny_checkpoint("llama", mtp_layers=0)
    source = compare.PeerSource("tiny", directory, "mlx", 16, directory)
    prompt = [1, 5, 9, 14]
    answer = edgemtp.load(directory, backend="mlx").generate(prompt, max_tokens=6, temperature=0.0, spec="none").tokens
    assert compare.logit_gaps(source, prompt, answer) == [0.0] * len(answer)
    other = [(token + 1) % 100 for token in answer]
    assert max(compare.logit_gaps(source, prompt, other)) > 0


def test_a_missing_peer_is_one_line_saying_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(compare.importlib.util, "find_spec", lambda name: None)
    source = compare.PeerSource("m", tmp_path, "onnx", 8, tmp_path, gguf=tmp_path / "m.gguf")
    runs, notes = compare.engine_runs(source, threads=2, context=64, eos=[2], has_mtp=True)
    assert [run.name for run in runs] == [compare.PLAIN, compare.SPECULATIVE]
    assert "onnxruntime-genai: not installed; pip install 'edgemtp[peers]' adds it" in notes
    assert "llama.cpp (llama-cpp-python): not installed; pip install 'edgemtp[peers]' adds it" in notes
    assert all("\n" not in note for note in notes)


def test_builder_gets_rope_theta_in_both_forms_from_a_transformers_5_config(tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    config = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
    (source / "config.json").write_text(json.dumps(config))
    (source / "model.safetensors").write_bytes(b"weights")
    staged = ortgenai.stage_source(source, tmp_path / "staged")
    written = json.loads((staged / "config.json").read_text())
    assert written["rope_theta"] == 100000.0  # what onnxruntime-genai's builder reads
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert (staged / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((source / "config.json").read_text()) == config  # the source is left alone


def test_peer_table_in_markdown_and_json():
    rows = compare.engine_rows({
        compare.PLAIN: {"rates": [100.0], "ttfts": [0.02], "peak_rss_bytes": 300 * 2**20, "check": "first 8 tokens"},
        "llama.cpp x.gguf": {"rates": [85.0], "ttfts": [0.03], "peak_rss_bytes": 200 * 2**20, "check": "says Paris"},
    })
    peers = PeerComparison("default model", rows, ["mlx-lm: left out"],
                           {"threads": 2, "bits": 8, "max_tokens": 16, "rounds": 2, "prompts": 3, "backend": "onnx"})
    result = BenchResult(machine={}, bandwidth_gb_s=None, targets=[], settings={}, peers=peers)
    markdown = report.to_markdown(result)
    assert "| engine | tok/s | TTFT ms | peak RSS MiB | × edgemtp plain | × edgemtp spec | check |" in markdown
    assert "| llama.cpp x.gguf | 85.0 | 30 | 200 | 0.85 | – | says Paris |" in markdown
    assert "- mlx-lm: left out" in markdown
    assert json.loads(json.dumps(report.to_json(result)))["peers"]["engines"][1]["vs_plain"] == 0.85


def test_a_peer_that_crashes_natively_is_named_with_its_signal(monkeypatch, tmp_path):
    # llama-cpp-python 0.3.36's wheel segfaulted on an AMX machine with nothing on stderr; the
    # bench's line must still say what happened.
    crash = tmp_path / "crash.sh"
    crash.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crash.chmod(0o755)
    monkeypatch.setattr("sys.executable", str(crash))
    worker = Worker("llamacpp", {})
    try:
        with pytest.raises(WorkerFailed, match="the llamacpp process failed: it crashed with SIGSEGV"):
            worker.decode([PROMPT_IDS], TOKENS)
    finally:
        worker.close()


def _greedy(engine: str, spec: dict) -> list[int]:
    worker = Worker(engine, spec)
    try:
        return worker.decode([PROMPT_IDS], TOKENS)[0].tokens
    finally:
        worker.close()


def _edgemtp_plain(model_dir) -> list[int]:
    return _greedy("edgemtp", {"model": str(model_dir), "backend": "onnx", "threads": 2, "mode": "plain"})


def test_onnxruntime_genai_greedy_equals_edgemtp_plain(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    from edgemtp.converters.convert import convert

    # A transformers-5 config: the RoPE base only inside rope_parameters, and not the default 10000.
    source = tiny_checkpoint("llama", mtp_layers=0, rope_theta=100000.0)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for item in source.iterdir():
        (hf_dir / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    del config["rope_theta"], config["rope_scaling"]
    (hf_dir / "config.json").unlink()
    (hf_dir / "config.json").write_text(json.dumps(config))

    model = ortgenai.build_model(hf_dir, 16, tmp_path / "cache", progress=lambda line: None)
    assert ortgenai.build_model(hf_dir, 16, tmp_path / "cache") == model  # built once per source
    reference = _edgemtp_plain(convert(hf_dir, tmp_path / "onnx", to="onnx", bits=16))
    assert len(reference) == TOKENS
    assert _greedy("ortgenai", {"model": str(model), "threads": 2}) == reference


def test_llama_cpp_greedy_equals_edgemtp_plain(tiny_checkpoint, tmp_path):
    pytest.importorskip("llama_cpp")
    from test_gguf import write_llama_gguf

    from edgemtp.converters.convert import convert

    gguf = write_llama_gguf(tiny_checkpoint("llama_untied", mtp_layers=0), tmp_path / "tiny.gguf")
    reference = _edgemtp_plain(convert(gguf, tmp_path / "onnx", to="onnx", bits=16))
    assert len(reference) == TOKENS
    assert _greedy("llamacpp", {"model": str(gguf), "threads": 2, "eos": [], "context": 256}) == reference


@pytest.mark.parametrize("args, fragment", [
    (["--backend", "all"], "one checkpoint on one backend"),
    (["--bits", "8"], "one checkpoint on one backend"),
    (["--max-tokens", "1"], "--max-tokens of at least 2"),
    (["--head-bits", "4"], "--head-bits applies to the conversions of --model at --bits"),
])
def test_peers_bad_options_are_one_line_errors(args, fragment):
    from test_cli_basic import assert_user_error, run

    assert_user_error(run("bench", "--peers", *args), fragment)
