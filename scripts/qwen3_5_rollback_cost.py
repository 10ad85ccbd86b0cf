"""What a rejected draft costs Qwen3.5's Gated DeltaNet states on ONNX: recomputation against
per-position snapshots.

    python scripts/qwen3_5_rollback_cost.py [--layers 8] [--repeats 15] [--threads 2]

Builds a random ``qwen3_5`` with the 0.8B model's widths (hidden 1024, 16 linear-attention heads of
128, a full-attention layer every 4th) but ``--layers`` layers, exports it at 8 bits (both into a
temporary directory), then times, as medians over ``--repeats``:

* a verify step of 4 tokens (k = 3) after a 64-token prompt;
* the recomputation after it that the backend does (``OnnxBackend.trunk_rollback``): back to the
  states before the step (a buffer swap) and a trunk step again over the 1, 2 or 3 kept tokens;
* what per-position snapshots would add instead, estimated from below as memory copies: every
  verify step writes each linear-attention layer's states once per position (4 here), and a
  rollback copies one position's back. They are not built, so only these copies are timed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgemtp.converters.onnx_export import export_onnx
from edgemtp.factory import make_tiny
from edgemtp.onnx_backend.backend import OnnxBackend

PROMPT = list(range(100, 164))
VERIFY = [7, 8, 9, 10]


def median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
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

        def verify() -> None:
            backend.trunk_step(VERIFY)
            backend._trunk_cache.restore_step_start()  # undo it without recomputing
            del backend._trunk_tokens[len(PROMPT):]

        print(f"verify step of {len(VERIFY)} tokens: {median_ms(verify, args.repeats):.1f} ms")
        for kept in (1, 2, 3):
            def rollback(kept: int = kept) -> None:
                backend.trunk_step(VERIFY)
                backend.trunk_rollback(len(VERIFY) - kept)
                backend.trunk_rollback(kept)  # back to the prompt, a swap: not recomputed

            total = median_ms(rollback, args.repeats)
            print(f"verify step + recomputing {kept} kept token(s): {total:.1f} ms")

        states = [arrays[0] for _, _, arrays, _ in backend._trunk_cache._states]
        copies = [np.empty_like(state) for state in states]

        def snapshots() -> None:
            for _ in range(len(VERIFY) + 1):  # one write per verified position, one copy back
                for state, copy in zip(states, copies):
                    np.copyto(copy, state)

        state_mb = sum(state.nbytes for state in states) / 2**20
        print(f"snapshot copies ({len(VERIFY) + 1} x {state_mb:.1f} MiB of states): "
              f"{median_ms(snapshots, args.repeats):.1f} ms")


if __name__ == "__main__":
    main()
