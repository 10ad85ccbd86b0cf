"""Auto k against every fixed k, in one run: the README's "auto k against fixed k" figures.

    python scripts/ab_draft_lengths.py [--rounds 2] [--heldout 30]

Decodes two prompt sets greedily with the default 8-bit ONNX model: the bench prompts (48 tokens
each) and the first ``--heldout`` held-out chat prompts of the model card (128 tokens each). The
variants (plain decoding, MTP at k = 1..4 and at auto) run in interleaved rounds, the order
reversed every other round, so a slow spell of the machine falls on all of them. Every variant
starts each round with a fresh adaptive policy (step costs come from the cache) that then learns
across the prompt set, as a chat session would. Each variant is measured the way ``edgemtp bench``
measures it (``measure_decoding``, one repeat). Reports tokens/s per round, the median ratio to
plain, auto's draft lengths, and whether every variant wrote plain decoding's tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import edgemtp
from edgemtp.bench.decoding import measure_decoding
from edgemtp.bench.prompts import load_prompts

HELDOUT = Path(__file__).resolve().parents[1] / "models/smollm2-135m-mtp/heldout_prompts.jsonl"
VARIANTS = {"plain": ("none", 0), **{f"k={k}": ("mtp", k) for k in range(1, 5)}, "auto": ("mtp", "auto")}


def run(model, prompts: list[str], rounds: int, max_tokens: int) -> None:
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    same, auto_lengths = True, Counter()
    for round_ in range(rounds):
        names = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
        outputs = {}
        for name in names:
            model._session._policies.clear()  # a fresh adaptive policy per variant and round
            spec, num_draft = VARIANTS[name]
            figures, outputs[name] = measure_decoding(model, prompts, max_tokens=max_tokens, repeats=1,
                                                      spec=spec, num_draft=num_draft)
            rates[name].append(figures.tokens_per_s)
            if name == "auto":
                auto_lengths.update(figures.draft_lengths)
        same = same and all(out == outputs["plain"] for out in outputs.values())
    plain = statistics.median(rates["plain"])
    for name, values in rates.items():
        print(f"  {name:6} {[round(r, 1) for r in values]} tokens/s, median x{statistics.median(values) / plain:.2f} plain")
    print(f"  auto's steps by draft length: {dict(sorted(auto_lengths.items()))}")
    print(f"  every variant wrote plain decoding's tokens: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant")
    parser.add_argument("--heldout", type=int, default=30, help="held-out prompts to use (at most 60)")
    args = parser.parse_args()
    model = edgemtp.load(backend="onnx")
    heldout = [json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines()][: args.heldout]
    for name, prompts, max_tokens in (("bench", load_prompts(), 48), ("held-out", heldout, 128)):
        print(f"{name} prompts ({len(prompts)}, {max_tokens} tokens each):")
        run(model, prompts, args.rounds, max_tokens)


if __name__ == "__main__":
    main()
