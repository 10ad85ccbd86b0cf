"""What the repeated attention row costs a one-token step of the default 8-bit ONNX model.

    python scripts/repeated_row_cost.py [--rounds 8] [--steps 128]

Every llama-family GQA in an edgemtp graph sees its step's last row twice (a Pad before it, a
Slice after it; ``converters/onnx_export/llama.py`` says why), so that a one-token step sums
exactly like a row of a verify step. This script copies the default conversion into a temporary
directory, removes those Pad and Slice nodes from the trunk graph, and times one-token trunk steps
of both graphs in interleaved rounds in one process. The copy is for timing only: its GQA reads
one stale cache slot (the backend still counts the repeated row), which changes no work but makes
its tokens meaningless, so none are compared.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import onnx

import edgemtp
from edgemtp.default_model import default_model_path

PROMPT = list(range(100, 180))  # token ids: the run needs no tokenizer
REPEAT_NODES = ("repeat_last_row", "drop_last_row")  # the suffixes of the nodes' names


def without_repeated_row(model_dir: Path, out: Path) -> None:
    """Copy ``model_dir`` to ``out`` with the trunk's Pad/Slice pairs around GQA taken out."""
    shutil.copytree(model_dir, out)
    path = out / "trunk" / "model.onnx"
    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    bypass = {node.output[0]: node.input[0] for node in graph.node if node.name.endswith(REPEAT_NODES)}
    kept = [node for node in graph.node if not node.name.endswith(REPEAT_NODES)]
    for node in kept:
        node.input[:] = [bypass.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    print(f"removed {len(bypass)} nodes from the trunk graph")
    onnx.save(model, path)


def step_ms(backend, steps: int) -> float:
    """Milliseconds per one-token trunk step after ``PROMPT``."""
    backend.reset()
    backend.trunk_step(PROMPT)
    start = time.perf_counter()
    for i in range(steps):
        backend.trunk_step([200 + i % 50])
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (order reversed every other)")
    parser.add_argument("--steps", type=int, default=128, help="one-token steps timed per round")
    args = parser.parse_args()
    shipped_dir = default_model_path("onnx", bits=8)
    with tempfile.TemporaryDirectory() as tmp:
        one_row_dir = Path(tmp) / "one-row"
        without_repeated_row(shipped_dir, one_row_dir)
        backends = {"shipped": edgemtp.load(shipped_dir, backend="onnx").backend,
                    "one row": edgemtp.load(one_row_dir, backend="onnx").backend}
        times: dict[str, list[float]] = {name: [] for name in backends}
        for round_ in range(args.rounds):
            for name in backends if round_ % 2 == 0 else reversed(backends):
                times[name].append(step_ms(backends[name], args.steps))
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.2f} ms per step ({' '.join(f'{v:.2f}' for v in values)})")
    ratios = [a / b for a, b in zip(times["shipped"], times["one row"])]
    print(f"shipped / one row per round: {' '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
