"""What a rejected draft costs Qwen3.5's Gated DeltaNet states on ONNX: per-position snapshots
against recomputation.

    python scripts/qwen3_5_rollback_cost.py [--layers 8] [--repeats 15] [--threads 2]

Builds a random ``qwen3_5`` with the 0.8B model's widths (hidden 1024, 16 linear-attention heads of
128, a full-attention layer every 4th) but ``--layers`` layers, exports it at 8 bits (both into a
temporary directory), and after a 64-token prompt times, as medians over ``--repeats``, a verify
step of 4 tokens (k = 3) followed by a rollback that keeps 1, 2 or 3 of them, both ways:

* snapshots (the backend's way): the step also writes every position's states, and the rollback
  copies the kept position's back (``RecurrentCache.restore``);
* recomputation (as the MLX backend does): the step writes no snapshots, and the rollback returns to
  the states from before the step and runs the trunk again over the kept tokens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from edgemtp.converters.onnx_export import export_onnx
from edgemtp.factory import make_tiny
from edgemtp.onnx_backend import cache
from edgemtp.onnx_backend.backend import OnnxBackend

PROMPT = list(range(100, 164))
VERIFY = [7, 8, 9, 10]


def median_ms(backend: OnnxBackend, kept: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.trunk_step(VERIFY)
        backend.trunk_rollback(len(VERIFY) - kept)
        times.append(time.perf_counter() - start)
        backend.trunk_rollback(kept)  # back to the prompt (untimed)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny(Path(tmp) / "hf", "qwen3_5", vocab_size=8192, hidden_size=1024, intermediate_size=3584,
                               num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                               head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                               linear_key_head_dim=128, linear_value_head_dim=128)
        backend = OnnxBackend(export_onnx(checkpoint, Path(tmp) / "onnx", bits=8), threads=args.threads)
        backend.trunk_step(PROMPT)
        snapshot_rows = cache.SNAPSHOT_ROWS
        for kept in (1, 2, 3):
            cache.SNAPSHOT_ROWS = snapshot_rows
            snapshots = median_ms(backend, kept, args.repeats)
            cache.SNAPSHOT_ROWS = 0  # no step keeps snapshots: every rollback recomputes
            recomputed = median_ms(backend, kept, args.repeats)
            print(f"verify step of {len(VERIFY)} + rollback keeping {kept}: snapshots {snapshots:.0f} ms, "
                  f"recomputation {recomputed:.0f} ms")


if __name__ == "__main__":
    main()
