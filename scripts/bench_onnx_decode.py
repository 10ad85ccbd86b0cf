"""Plain-decoding speed of the ONNX backend on a SmolLM2-135M-shaped random model.

    python scripts/bench_onnx_decode.py [--bits 4] [--threads 2] [--tokens 128]

Builds the model with the tiny-checkpoint factory (hidden 576, 30 layers, 9 heads, 3 KV
heads, intermediate 1536, vocab 49152, tied embeddings), exports it, prefills a 32-token
prompt and times one-token trunk steps (greedy), reporting tokens/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edgemtp.converters.onnx_export import export_onnx
from edgemtp.factory import make_tiny
from edgemtp.onnx_backend.backend import OnnxBackend

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, help="4 or 8 (MatMulNBits) weights")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--tokens", type=int, default=128, help="decode steps to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny(Path(tmp) / "smollm2-shaped", "llama", mtp_layers=0, **SMOLLM2_135M)
        export = export_onnx(checkpoint, Path(tmp) / "onnx", bits=args.bits)
        backend = OnnxBackend(export, threads=args.threads, max_context=2048)
        prompt = [int(t) for t in np.random.default_rng(0).integers(0, backend.vocab_size, 32)]
        logits, _ = backend.trunk_step(prompt)
        token = int(logits[-1].argmax())
        for _ in range(8):  # warm-up
            token = int(backend.trunk_step([token])[0][-1].argmax())
        start = time.perf_counter()
        for _ in range(args.tokens):
            token = int(backend.trunk_step([token])[0][-1].argmax())
        elapsed = time.perf_counter() - start
    print(f"int{args.bits}, {args.threads} threads: {args.tokens / elapsed:.1f} tokens/s "
          f"({1000 * elapsed / args.tokens:.2f} ms/token)")


if __name__ == "__main__":
    main()
