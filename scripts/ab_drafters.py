"""The drafters side by side on the held-out prompts: the README's hybrid drafter figures.

    python scripts/ab_drafters.py [--rounds 2] [--max-tokens 128] [--every 1]

Decodes the bundled held-out chat, story and code prompts (``edgemtp bench --prompts heldout``;
``--every 2`` takes every second one) greedily with the default 8-bit ONNX model: plain decoding
and the mtp, ngram and hybrid drafters at automatic draft length, in interleaved rounds (the order
reversed every other round), as ``edgemtp bench`` measures its auto rows. Prints per drafter the
tokens per trunk pass, the median within-round tokens/s ratio to plain decoding, the ideal ratio
predicted from its acceptance and the measured cost curve, measured / ideal, the share of drafts
copied by n-gram lookup, and whether every output equals plain decoding's.
"""

from __future__ import annotations

import argparse

import edgemtp
from edgemtp.bench.decoding import interleaved_auto, measure_decoding, trunk_cost_curve
from edgemtp.bench.figures import ideal_speedup
from edgemtp.bench.prompts import load_prompts
from edgemtp.engine.drafters import mtp_step_seconds

DRAFTERS = ["mtp", "ngram", "hybrid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--every", type=int, default=1, help="take every N-th held-out prompt")
    args = parser.parse_args()
    prompts = load_prompts("heldout")[:: args.every]
    model = edgemtp.load(backend="onnx")
    _, reference = measure_decoding(model, prompts, max_tokens=args.max_tokens, repeats=1)
    seconds = trunk_cost_curve(model.backend, 5)
    curve = [s / seconds[0] for s in seconds]
    mtp_cost = mtp_step_seconds(model.backend) / seconds[0]
    draft_cost = {"mtp": mtp_cost, "ngram": 0.0, "hybrid": mtp_cost}
    print(f"{len(prompts)} held-out prompts x {args.max_tokens} tokens, {args.rounds} interleaved rounds")
    print("cost curve T(n)/T(1): " + " ".join(f"{c:.2f}" for c in curve) + f"; MTP draft step / trunk step {mtp_cost:.2f}")
    for figures in interleaved_auto(model, prompts, DRAFTERS, max_tokens=args.max_tokens, rounds=args.rounds,
                                    reference=reference):
        ideal = ideal_speedup(figures.tokens_per_step, figures.draft_lengths, curve,
                              draft_cost[figures.spec] * (1 - figures.copied_fraction))
        print(f"{figures.spec:7} tokens/pass {figures.tokens_per_step:.2f}  x{figures.measured_speedup:.2f} plain  "
              f"ideal x{ideal:.2f}  measured/ideal {figures.measured_speedup / ideal:.0%}  "
              f"copied {figures.copied_fraction:.0%}  accept by pos "
              + " ".join(f"{a:.2f}" for a in figures.acceptance_by_position)
              + f"  identical to plain: {figures.identical_to_plain}")


if __name__ == "__main__":
    main()
