"""A/B behind the README's "one-token steps are no longer padded" figures.

    python scripts/ab_one_token_steps.py [--rounds 3] [--max-tokens 48]

Decodes the bench prompts greedily with the default 8-bit ONNX model, plain and with MTP (auto k),
in interleaved rounds of two variants: "new" runs one-token steps as they are (the graphs repeat a
row into attention themselves), "old" pads them to two rows as edgemtp 0.2.0 did, which runs every
MatMulNBits on two rows. Reports tokens/s per round, the median ratio, and whether the two variants
wrote the same tokens (they must: the padded row only adds work).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import edgemtp
from edgemtp.bench.decoding import measure_decoding
from edgemtp.bench.prompts import load_prompts
from edgemtp.onnx_backend import backend as onnx_backend

NEW_RUN = onnx_backend._Graph.run


def padded_run(graph, cache, feeds):
    """0.2.0's one-token step: the token fed twice, the second row's output and cache row dropped."""
    if feeds["input_ids"].shape[1] != 1:
        return NEW_RUN(graph, cache, feeds)
    logits, hidden = NEW_RUN(graph, cache, {name: np.concatenate([v, v], axis=1) for name, v in feeds.items()})
    cache.rollback(1)
    return logits[:1], hidden[:1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per prompt")
    args = parser.parse_args()
    model = edgemtp.load(backend="onnx")
    prompts = load_prompts()
    for spec in ("none", "mtp"):
        rates: dict[str, list[float]] = {"old": [], "new": []}
        outputs: dict[str, list[list[int]]] = {}
        for round_ in range(args.rounds):
            order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
            for variant in order:
                onnx_backend._Graph.run = padded_run if variant == "old" else NEW_RUN
                figures, outputs[variant] = measure_decoding(model, prompts, max_tokens=args.max_tokens, repeats=1,
                                                             spec=spec, num_draft="auto")
                rates[variant].append(figures.tokens_per_s)
        onnx_backend._Graph.run = NEW_RUN
        ratio = statistics.median(rates["new"]) / statistics.median(rates["old"])
        print(f"spec={spec}: old {[round(r, 1) for r in rates['old']]} new {[round(r, 1) for r in rates['new']]} "
              f"tokens/s, median new/old {ratio:.2f}, same tokens: {outputs['old'] == outputs['new']}")


if __name__ == "__main__":
    main()
