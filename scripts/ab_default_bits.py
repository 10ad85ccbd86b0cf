"""The default model at 4 and at 8 bits, side by side: decode tokens/s in interleaved rounds.

    python scripts/ab_default_bits.py [--spec none|hybrid|mtp|ngram] [--rounds 4] [--prompts 6]
        [--max-tokens 64] [--backend onnx|mlx]

Loads both conversions of the embedded default model (``edgemtp.load(bits=...)``, each converted on
first use), then, per round, decodes the first N bench prompts greedily with each, in turn, and
prints each round's tokens/s (the tokens after each answer's first over the time since it, as
``generate`` reports them, pooled over the prompts) and the medians. The model card's "Why 8 bits" cites it.
"""

from __future__ import annotations

import argparse
import statistics

import edgemtp
from edgemtp.bench.prompts import load_prompts

BITS = (4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="none", help="drafter for both (default: none, plain decoding)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=6, help="how many bench prompts (from the top)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backend", default="onnx", choices=("onnx", "mlx"))
    args = parser.parse_args()

    prompts = load_prompts()[: args.prompts]
    models = {bits: edgemtp.load(backend=args.backend, bits=bits) for bits in BITS}
    rates: dict[int, list[float]] = {bits: [] for bits in BITS}
    for round_ in range(args.rounds):
        for bits, model in models.items():
            tokens = seconds = 0.0
            for prompt in prompts:
                stats = model.generate(prompt, max_tokens=args.max_tokens, spec=args.spec).stats
                # generate's rate counts the tokens after the first (which came with the prompt pass)
                # over the time since it; pooled the same way over the prompts.
                tokens += stats.generated_tokens - 1
                seconds += (stats.generated_tokens - 1) / stats.tokens_per_s
            rates[bits].append(tokens / seconds)
        print(f"round {round_ + 1}: " + ", ".join(f"{bits}-bit {rates[bits][-1]:.1f}" for bits in BITS), flush=True)
    medians = {bits: statistics.median(values) for bits, values in rates.items()}
    print(f"--spec {args.spec}, median tokens/s: " + ", ".join(f"{bits}-bit {medians[bits]:.1f}" for bits in BITS)
          + f"; 4-bit / 8-bit {medians[4] / medians[8]:.3f}")


if __name__ == "__main__":
    main()
