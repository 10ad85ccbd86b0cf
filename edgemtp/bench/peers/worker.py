"""One engine in its own process, so that its peak RSS is its own and engines never share a
heap or a thread pool.

The parent starts ``python -m edgemtp.bench.peers.worker ENGINE SPEC_JSON`` and writes one JSON
request per line: ``{"prompts": [[ids], ...], "max_tokens": n}``. The worker decodes every prompt
greedily, timing each with ``timing.time_chunks``, and answers one JSON line: the timings and
its peak RSS so far.
"""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from edgemtp.bench.peers.timing import PromptTiming, time_chunks

# Engine name -> the module holding its ``Engine`` class.
ENGINE_MODULES = {
    "edgemtp": "edgemtp.bench.peers.edgemtp_engine",
    "ortgenai": "edgemtp.bench.peers.ortgenai",
    "llamacpp": "edgemtp.bench.peers.llamacpp",
    "mlx_lm": "edgemtp.bench.peers.mlx_lm",
}


class WorkerFailed(RuntimeError):
    """The engine's process died or answered nonsense; the message ends with its last stderr line."""


class Worker:
    """The parent's handle on one engine process."""

    def __init__(self, engine: str, spec: dict):
        self.engine = engine
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen([sys.executable, "-m", "edgemtp.bench.peers.worker", engine, json.dumps(spec)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.peak_rss_bytes = 0

    def decode(self, prompts: list[list[int]], max_tokens: int) -> list[PromptTiming]:
        """Every prompt decoded greedily once, in the worker."""
        try:
            self._process.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
            self._process.stdin.flush()
            answer = json.loads(self._process.stdout.readline())
        except (BrokenPipeError, json.JSONDecodeError):
            raise WorkerFailed(f"the {self.engine} process failed: {self._last_words()}") from None
        self.peak_rss_bytes = answer["peak_rss_bytes"]
        return [PromptTiming(**timing) for timing in answer["timings"]]

    def _last_words(self) -> str:
        """The dead process's last stderr line, or how it ended: a native crash prints nothing."""
        self._stderr.seek(0)
        lines = self._stderr.read().strip().splitlines()
        if lines:
            return lines[-1]
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "no output"
        if code < 0:
            return f"it crashed with {signal.Signals(-code).name} and printed nothing"
        return f"it exited with code {code} and printed nothing"

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait()
        self._stderr.close()


def own_peak_rss_bytes() -> int:
    """This process's peak RSS since it started. On Linux ``ru_maxrss`` would also count the
    parent's RSS at the fork (the kernel keeps the pre-exec high-water mark), so it reads the
    current address space's own mark, VmHWM."""
    from edgemtp.engine.stats import peak_rss_bytes

    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return peak_rss_bytes()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib * 1024


def main() -> None:
    engine_name, spec = sys.argv[1], json.loads(sys.argv[2])
    replies = sys.stdout
    sys.stdout = sys.stderr  # whatever an engine prints stays off the replies
    engine = importlib.import_module(ENGINE_MODULES[engine_name]).Engine(spec)
    for line in sys.stdin:
        request = json.loads(line)
        timings = [time_chunks(engine.greedy(ids, request["max_tokens"])) for ids in request["prompts"]]
        replies.write(json.dumps({"timings": [asdict(t) for t in timings], "peak_rss_bytes": own_peak_rss_bytes()}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
