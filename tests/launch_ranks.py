"""Starting the ranks of a test run the way ``mlx.launch -n N --backend ring`` starts them: one
process per rank, with ``MLX_RANK`` and a hostfile of local addresses (tests/test_pipeline.py,
tests/test_tensor_parallel.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).parent / "pipeline_worker.py"
ROOT = Path(__file__).resolve().parent.parent


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


def wait_for_output(process: subprocess.Popen, timeout: float) -> None:
    os.set_blocking(process.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.stdout.read(1):
            return
        time.sleep(0.05)
    raise AssertionError("rank 0 printed nothing")


def assert_a_dead_rank_ends_the_run(path: Path, tmp_path: Path, ranks: int, how: str, parallel: str) -> None:
    """Rank 1 killed (``how="kill"``: its sockets close) or stopped (``"stop"``: they stay open,
    nothing answers) in the middle of a generation: rank 0 ends within the timeout with one line
    naming a rank and its host."""
    timeout = 4.0
    command = [sys.executable, "-m", "edgemtp.cli", "generate", "--model", str(path), "--no-chat", "-p", "a b c",
               "-m", "2000", "--max-kv-size", "2048", "--spec", "mtp", "--num-draft", "1", "--parallel", parallel]
    processes = start_ranks(tmp_path, ranks, command, timeout=timeout)
    try:
        wait_for_output(processes[0], 300)
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
