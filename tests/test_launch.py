"""The ``edgemtp generate`` and ``edgemtp chat`` commands as ranks of an ``mlx.launch`` group.

Most ranks here are started the way ``mlx.launch --backend ring`` starts them (``MLX_RANK`` and a
hostfile of local addresses, ``start_ranks``); one test runs the real ``mlx.launch -n 2``. Each
process imports mlx and mlx-lm (seconds on this machine), so the cases are few and each one
checks as much as it can."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemtp.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from launch_ranks import finish, start_ranks  # noqa: E402

EDGEMTP = [sys.executable, "-m", "edgemtp.cli"]
GENERATE_ARGS = ["-p", "tell me a story", "-m", "12", "--max-kv-size", "256", "--json"]
LAYERS = 3


@pytest.fixture
def model_dir(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llama", mtp_layers=2, num_hidden_layers=LAYERS))


def single_process(model_dir: str, spec_args: list[str]) -> dict:
    result = CliRunner().invoke(app, ["generate", "--model", model_dir, "--backend", "mlx", *GENERATE_ARGS, *spec_args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check_pipeline_report(report: dict, ranks: int) -> None:
    """The per-rank figures of ``generate --json``: every rank's layers, memory and the time per pass."""
    assert [r["rank"] for r in report["ranks"]] == list(range(ranks))
    assert [r["host"] for r in report["ranks"]] == ["127.0.0.1"] * ranks
    layers = [r["layers"] for r in report["ranks"]]
    assert layers[0][0] == 0 and layers[-1][1] == LAYERS
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(layers, layers[1:]))
    assert all(r["weight_bytes"] > 0 and r["cache_bytes"] > 0 and r["peak_memory_bytes"] > r["weight_bytes"]
               for r in report["ranks"])
    assert report["trunk_passes"] >= 1
    assert 0 <= report["communication_seconds_per_pass"] <= report["seconds_per_pass"]


def test_generate_on_three_ranks_prints_the_single_process_output(model_dir, tmp_path):
    """Rank 0 prints what one process prints (speculative decoding), with each rank's figures; the
    others print nothing and exit 0."""
    # The default drafter (hybrid) at a fixed length: auto k may find drafting too dear on a busy machine.
    spec_args = ["--num-draft", "2"]
    expected = single_process(model_dir, spec_args)
    results = finish(start_ranks(tmp_path, 3, [*EDGEMTP, "generate", "--model", model_dir, *GENERATE_ARGS,
                                               *spec_args]))
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err}"
        assert rank == 0 or out == "", f"rank {rank} printed {out!r}"
    launched = json.loads(results[0][1])
    assert launched["tokens"] == expected["tokens"] and launched["text"] == expected["text"]
    assert len(expected["tokens"]) == 12 and not expected["stats"].get("pipeline")
    check_pipeline_report(launched["stats"]["pipeline"], 3)
    assert launched["stats"]["drafted"] > 0 and launched["stats"]["pipeline"]["mtp_steps"] > 0  # on the last rank


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not on PATH")
def test_real_mlx_launch_runs_two_ranks(model_dir, tmp_path):
    """The README's command, ``mlx.launch -n 2 --backend ring -- edgemtp generate ...`` (plain
    decoding here): one JSON answer on the merged stdout, the single process's tokens. mlx.launch
    exits 0 even when a rank fails; it says so on stderr."""
    expected = single_process(model_dir, ["--spec", "none"])
    port = 40000 + os.getpid() % 20000  # rank r listens on --starting-port + r
    result = subprocess.run(["mlx.launch", "-n", "2", "--backend", "ring", "--starting-port", str(port), "--",
                             *EDGEMTP, "generate", "--model", model_dir, *GENERATE_ARGS, "--spec", "none"],
                            capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0 and "exited with code" not in result.stderr, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    launched = json.loads(lines[0])
    assert launched["tokens"] == expected["tokens"] and launched["text"] == expected["text"]
    check_pipeline_report(launched["stats"]["pipeline"], 2)
    assert launched["stats"]["drafted"] == 0 and launched["stats"]["pipeline"]["mtp_steps"] == 0


def test_chat_under_launch_answers_on_rank_0_and_quitting_stops_every_rank(model_dir, tmp_path):
    """Rank 0 reads prompts line by line (mlx.launch copies the user's lines to every rank's stdin),
    answers each as one process would, with each rank's figures after it; /quit ends every rank."""
    import edgemtp

    prompts = ["hello there", "and then?"]
    reference = edgemtp.load(model_dir, backend="mlx", max_kv_size=256)
    messages, answers, lengths = [], [], []
    for prompt in prompts:
        messages.append({"role": "user", "content": prompt})
        answer = reference.generate(messages, max_tokens=8)
        answers.append(answer.text)
        lengths.append(len(answer.tokens))
        messages.append({"role": "assistant", "content": answer.text})

    command = [*EDGEMTP, "chat", "--model", model_dir, "--max-kv-size", "256", "--max-tokens", "8"]
    processes = start_ranks(tmp_path, 2, command, stdin=subprocess.PIPE)
    typed = "".join(f"{prompt}\n" for prompt in prompts) + "/quit\n"
    try:
        for process in processes:  # what the launcher does with each line the user types; it never sends EOF
            process.stdin.write(typed)
            process.stdin.flush()
        for process in processes:
            process.wait(timeout=120)
    finally:
        for process in processes:
            process.kill()
    (code0, out0, err0), (code1, out1, err1) = finish(processes)
    assert code0 == 0 and code1 == 0, err0 + err1
    # Each answer follows its "> " prompt and is followed by its statistics. The pipes are read in
    # text mode, which turns a "\r" in the random model's text into "\n".
    assert re.findall(r"> (.*?)\nPrompt: ", out0, re.S) == [a.replace("\r\n", "\n").replace("\r", "\n") for a in answers]
    assert re.findall(r"Generation: (\d+) tokens", out0) == [str(n) for n in lengths]
    assert out0.count("Rank 0 (127.0.0.1): layers 0-") == 2 and out0.count("Rank 1 (127.0.0.1): layers ") == 2
    assert out0.endswith("> ") and out1 == "" and "Traceback" not in err0 + err1


def test_line_chat_skips_blank_lines_and_ends_at_end_of_input(model_dir):
    import edgemtp
    from edgemtp.line_chat import run_line_chat
    from edgemtp.tui.settings import GenerationSettings

    model = edgemtp.load(model_dir, backend="mlx", max_kv_size=256)
    out = io.StringIO()
    run_line_chat(model, GenerationSettings(spec="none", max_tokens=6), io.StringIO("\n  \nhello there\n"), out)
    expected = model.generate([{"role": "user", "content": "hello there"}], spec="none", max_tokens=6).text
    assert out.getvalue().startswith(f"one prompt per line; /quit or /exit ends the chat\n> > > {expected}\nPrompt: ")
    assert out.getvalue().count("Prompt: ") == 1
    assert out.getvalue().endswith("> ") and "Rank " not in out.getvalue()  # one process: no per-rank lines
