"""Pipeline parallel decoding over several ranks (edgemtp/mlx_backend/pipeline.py).

The ranks are real processes on this machine talking over mx.distributed's ``ring`` backend,
started the way ``mlx.launch -n N --backend ring`` starts them (``MLX_RANK`` and a hostfile of
local addresses)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgemtp.checkpoint import Checkpoint
from edgemtp.errors import UserError
from edgemtp.mlx_backend.pipeline import load_stage
from edgemtp.pipeline_plan import plan_pipeline, split_layers
from edgemtp.planner import MemoryBudget

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_worker import run_cases  # noqa: E402

WORKER = Path(__file__).parent / "pipeline_worker.py"
ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 10
ROOMY = MemoryBudget(8 << 30, "test budget")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_ranks(tmp_path: Path, ranks: int, command: list[str], timeout: float = 60,
                stdin: int | None = None) -> list[subprocess.Popen]:
    """One process per rank, with the environment mlx.launch gives them."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "EDGEMTP_PEER_TIMEOUT": str(timeout),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return [subprocess.Popen(command, env={**env, "MLX_RANK": str(rank)}, stdin=stdin, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for rank in range(ranks)]


def finish(processes: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        results.append((process.returncode, out, err))
    return results


@pytest.mark.parametrize("arch,layers,ranks", [("llama", 3, 2), ("llama", 3, 3), ("deepseek_v3", 3, 2),
                                               ("deepseek_v3", 3, 3)])
def test_pipeline_output_equals_single_process(tiny_checkpoint, tmp_path, arch, layers, ranks):
    """Plain and MTP decoding, greedy and seeded at temperature 0.8: token for token the output of
    one process."""
    import edgemtp

    path = tiny_checkpoint(arch, mtp_layers=2, num_hidden_layers=layers)
    single = run_cases(edgemtp.load(path, backend="mlx", max_kv_size=128), MAX_TOKENS)
    results = finish(start_ranks(tmp_path, ranks, [sys.executable, str(WORKER), str(path), str(MAX_TOKENS)]))
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err}"
        assert out.strip() == "" or rank == 0
    assert json.loads(results[0][1]) == single
    assert all(len(tokens) == MAX_TOKENS for tokens in single)


def test_each_rank_reads_only_its_own_tensors(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("deepseek_v3", mtp_layers=1, num_hidden_layers=3)
    plans = plan_pipeline(path, [ROOMY] * 3, context=64)
    assert [(p.first_layer, p.end_layer) for p in plans] == [(0, 1), (1, 2), (2, 3)]
    read: list[str] = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: read.append(name) or original(self, name))
    by_rank = []
    for plan in plans:
        read.clear()
        load_stage(path, plan, 3, max_kv_size=64)
        by_rank.append(set(read))
    layer_of = {name: int(name.split(".")[2]) for names in by_rank for name in names if name.startswith("model.layers.")}
    for rank, names in enumerate(by_rank):
        assert {layer_of[n] for n in names if n in layer_of} == ({rank} if rank < 2 else {2, 3})  # 3: the MTP layer
    assert not any("embed_tokens" in n or n.startswith(("model.norm", "lm_head")) for n in by_rank[1])
    assert any(n.startswith("lm_head") for n in by_rank[2]) and not any(n.startswith("lm_head") for n in by_rank[0])
    everything = set(Checkpoint.open(path).names())
    assert set().union(*by_rank) <= everything and len(set().union(*by_rank)) >= len(everything) - 1


def test_split_follows_budgets_and_refusal_names_the_short_rank(tiny_checkpoint):
    assert split_layers([10] * 6, [0, 0], [60, 60]) == [3, 3]
    assert split_layers([10] * 6, [0, 0], [100, 25]) == [5, 1]  # 50% and 40% full; [4, 2] would fill rank 1 to 80%
    assert split_layers([10] * 6, [0, 20], [60, 60]) == [4, 2]  # the last rank also holds the head
    path = tiny_checkpoint("llama", mtp_layers=1, num_hidden_layers=3)
    small = MemoryBudget(600_000, "test budget")
    with pytest.raises(UserError, match=r"rank \d .* short; add a machine"):
        plan_pipeline(path, [small, small], context=64)


def _wait_for_output(process: subprocess.Popen, timeout: float) -> None:
    os.set_blocking(process.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.stdout.read(1):
            return
        time.sleep(0.05)
    raise AssertionError("rank 0 printed nothing")


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_rank_ends_the_run_with_one_line(tiny_checkpoint, tmp_path, how):
    """A rank killed (its sockets close) or stopped (they stay open, nothing answers) in the
    middle of a generation: rank 0 ends within the timeout with one line naming a rank."""
    path = tiny_checkpoint("llama", mtp_layers=1, num_hidden_layers=3)
    timeout = 4.0
    command = [sys.executable, "-m", "edgemtp.cli", "generate", "--model", str(path), "--no-chat", "-p", "a b c",
               "-m", "2000", "--max-kv-size", "2048", "--spec", "mtp", "--num-draft", "1"]
    processes = start_ranks(tmp_path, 3, command, timeout=timeout)
    try:
        _wait_for_output(processes[0], 300)
        os.kill(processes[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        stopped = time.monotonic()
        code = processes[0].wait(timeout=timeout + 10)
        elapsed = time.monotonic() - stopped
        err = processes[0].stderr.read()
    finally:
        for process in processes:
            process.kill()
            process.wait()
    # Before it, mlx's ring backend may print its own "[ring] Socket ... closed" lines.
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: rank 0 "), err
    assert "Traceback" not in err
    assert " rank " in errors[0][len("error: rank 0 "):] and "127.0.0.1" in errors[0]
    assert elapsed < timeout + 10


def test_onnx_under_mlx_launch_is_one_line_error(tiny_checkpoint, monkeypatch, tmp_path):
    import edgemtp

    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "hosts.json"))
    with pytest.raises(UserError, match="MLX backend only, not onnx; pass --backend mlx"):
        edgemtp.load(tiny_checkpoint("llama"), backend="onnx")


def test_inspect_ranks_prints_each_rank(tiny_checkpoint):
    from typer.testing import CliRunner

    from edgemtp.cli import app

    path = tiny_checkpoint("llama", mtp_layers=1, num_hidden_layers=3)
    result = CliRunner().invoke(app, ["inspect", str(path), "--ranks", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "pipeline over 2 machines like this one" in result.output
    assert "rank 0 │ embedding, layers 0-" in result.output
    assert "final norm, head, MTP layers" in result.output
    result = CliRunner().invoke(app, ["inspect", str(path), "--ranks", "4"], env={"COLUMNS": "200"})
    assert "4 ranks for 3 layers; launch at most 3 ranks" in result.output


def test_tui_memory_panel_shows_each_rank():
    from rich.console import Console

    from edgemtp.engine.stats import Stats
    from edgemtp.tui.streaming import StreamUpdate
    from edgemtp.tui.widgets import StatsPanel

    stats = Stats(pipeline={"ranks": [{"rank": 0, "host": "10.0.0.1", "layers": [0, 2], "weight_bytes": 2_000_000,
                                       "cache_bytes": 1_000_000, "peak_memory_bytes": 5_000_000},
                                      {"rank": 1, "host": "10.0.0.2", "layers": [2, 4], "weight_bytes": 4_000_000,
                                       "cache_bytes": 0, "peak_memory_bytes": 7_000_000}],
                            "trunk_passes": 3, "seconds_per_pass": 0.0125, "communication_seconds_per_pass": 0.0025,
                            "mtp_steps": 0, "communication_seconds_per_mtp_step": 0.0})
    update = StreamUpdate(stats=stats, weight_bytes=6_000_000, cache_bytes=1_000_000)
    console = Console(width=80, record=True)
    console.print(StatsPanel._memory(update, budget_bytes=10**9))
    lines = [" ".join(line.split()) for line in console.export_text().splitlines()]
    assert "rank 0 3.0 MB (5.0 MB peak)" in lines and "rank 1 4.0 MB (7.0 MB peak)" in lines
    assert "comm/pass 2.5 of 12.5 ms" in lines
