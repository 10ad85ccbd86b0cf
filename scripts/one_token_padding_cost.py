"""What padding one-token steps costs 4-bit ONNX plain decoding, and whether it is needed here.

    python scripts/one_token_padding_cost.py [--rounds 4] [--tokens 96]

Where onnxruntime's 4-bit MatMulNBits computes a lone row differently from the same row among
others (``edgemtp/onnx_backend/row_invariance.py``; AVX2-only x86 with onnxruntime 1.32), the
backend runs one-token steps as two rows so that plain decoding equals verification. This script
converts the default model at 4 bits (cached after the first run), then decodes greedily one token
per step with the padding on and off, in interleaved rounds, and prints tokens/s of both, their
median ratio, whether this CPU needs the padding, and whether the two runs wrote the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

from edgemtp.default_model import default_model_path
from edgemtp.onnx_backend.backend import OnnxBackend
from edgemtp.onnx_backend.row_invariance import one_row_steps_differ

PROMPT = list(range(100, 140))  # token ids: the run needs no tokenizer


def decode(backend: OnnxBackend, padded: bool, tokens: int) -> tuple[float, list[int]]:
    """Greedy one-token steps after ``PROMPT``: (tokens/s, tokens)."""
    backend._trunk.pad_one_token_steps = padded
    backend.reset()
    logits, _ = backend.trunk_step(PROMPT)
    token, out = int(logits[-1].argmax()), []
    start = time.perf_counter()
    for _ in range(tokens):
        logits, _ = backend.trunk_step([token])
        token = int(logits[-1].argmax())
        out.append(token)
    return tokens / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()

    path = default_model_path("onnx", bits=4)
    backend = OnnxBackend(path, threads=2, max_context=1024)
    for padded in (True, False):  # warm-up
        decode(backend, padded, 8)
    speeds: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, list[int]] = {}
    for round_ in range(args.rounds):
        for padded in (True, False) if round_ % 2 == 0 else (False, True):
            speed, outputs[padded] = decode(backend, padded, args.tokens)
            speeds[padded].append(speed)
    block = backend.manifest["quantization"]["trunk"]["block_size"]
    print(f"this CPU needs the padding: {one_row_steps_differ(4, block)}")
    print(f"padded   tok/s: {[round(s, 1) for s in speeds[True]]}")
    print(f"unpadded tok/s: {[round(s, 1) for s in speeds[False]]}")
    print(f"median padded/unpadded: {statistics.median(speeds[True]) / statistics.median(speeds[False]):.2f}")
    print(f"same tokens: {outputs[True] == outputs[False]}")


if __name__ == "__main__":
    main()
