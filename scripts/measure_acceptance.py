"""Speculative acceptance of the embedded default model on its held-out prompts: the model card's
"Measured acceptance" table.

    python scripts/measure_acceptance.py --backend onnx --bits 8 [--prompts 60] [--max-tokens 128]
        [--num-draft 3] [--full-head] [--general N] [--model DIR]

Every held-out prompt (``models/smollm2-135m-mtp/heldout_prompts.jsonl``, never trained on) is
answered greedily twice through the public API: with MTP speculation at a fixed k drafts per
step (default 3, what ``edgemtp generate --json --num-draft 3`` runs) and plainly (``--spec none``).
``--full-head`` measures the conversion whose MTP head scores the full vocabulary instead of the
shipped draft vocabulary. The
speculative answer must equal the plain one token for token; the script says how many differ.

Acceptance by position is pooled over all prompts: position i's hits divided by the number of
times position i was verified, summed over every step of every prompt. Averaging per-prompt ratios
instead would let a prompt that stopped after 3 steps count as much as one that ran 40, and would
bias the figure toward short, often atypical answers; pooling gives the probability a random
verified draft at that position is accepted, which is what speed depends on. Mean accepted length
is pooled the same way: all generated tokens over all trunk steps (the trunk's own token included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import edgemtp
from edgemtp.default_model import DEFAULT_BITS, default_model_path

PROMPTS = Path(__file__).resolve().parents[1] / "models/smollm2-135m-mtp/heldout_prompts.jsonl"
# Code and QA prompts held out of train-mtp's data (edgemtp.training.data.heldout_general, which needs torch).
GENERAL_PROMPTS = Path(__file__).resolve().parents[1] / "edgemtp/training/heldout_general.jsonl"


def heldout_prompts(limit: int, general: int = 0) -> list[dict]:
    """The first ``limit`` held-out prompts, then the first ``general`` code and QA prompts of
    ``edgemtp/training/heldout_general.jsonl`` each: ``{"id", "source", "prompt"}``."""
    chosen = [json.loads(line) for line in PROMPTS.read_text().splitlines()[:limit]]
    extra = [json.loads(line) for line in GENERAL_PROMPTS.read_text().splitlines()]
    return chosen + [entry for kind in ("code", "qa") for entry in [e for e in extra if e["source"] == kind][:general]]


def pooled(reached: list[int], hits: list[int], steps: int, tokens: int) -> dict:
    return {"acceptance_by_position": [h / r if r else 0.0 for h, r in zip(hits, reached)],
            "drafted_by_position": reached, "mean_accepted_length": tokens / steps, "steps": steps}


def check_cli_matches(prompt: str, backend: str, model_dir: Path, max_tokens: int, num_draft: int, stats) -> None:
    """The CLI's ``--json`` must report the same greedy run as the library call it wraps."""
    command = ["edgemtp", "generate", "--model", str(model_dir), "--backend", backend, "-p", prompt,
               "-m", str(max_tokens), "--spec", "mtp", "--num-draft", str(num_draft), "--json"]
    cli = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["stats"]
    for key in ("drafted", "accepted", "steps", "acceptance_by_position", "generated_tokens"):
        if cli[key] != getattr(stats, key):
            sys.exit(f"`edgemtp generate --json` reports {key}={cli[key]}, the library {getattr(stats, key)}")


def decode_seconds(stats) -> float:
    # The engine times decoding only: every token after the first (which comes with the prompt pass).
    return (stats.generated_tokens - 1) / stats.tokens_per_s if stats.tokens_per_s else 0.0


def measure(backend: str, bits: int, num_prompts: int, max_tokens: int, num_draft: int, full_head: bool,
            check_cli: bool, json_path: str | None, model_dir: Path | None = None, general: int = 0) -> dict:
    model_dir = model_dir or default_model_path(backend, bits, draft_vocab=not full_head)
    model = edgemtp.load(model_dir, backend=backend)
    reached, hits = [0] * num_draft, [0] * num_draft
    steps = tokens = mismatches = plain_tokens = 0
    spec_seconds = plain_seconds = 0.0  # decoding time only, as the stats time it
    by_source: dict[str, dict] = {}  # source -> pooled counts of its prompts
    prompts = heldout_prompts(num_prompts, general)
    for n, entry in enumerate(prompts, start=1):
        prompt = entry["prompt"]
        spec = model.generate(prompt, max_tokens=max_tokens, temperature=0, spec="mtp", num_draft=num_draft)
        plain = model.generate(prompt, max_tokens=max_tokens, temperature=0, spec="none")
        stats = spec.stats
        source = by_source.setdefault(entry["source"], {"reached": [0] * num_draft, "hits": [0] * num_draft,
                                                        "steps": 0, "tokens": 0})
        for i, (r, h) in enumerate(zip(stats.verified_by_position, stats.accepted_by_position)):
            reached[i] += r
            hits[i] += h
            source["reached"][i] += r
            source["hits"][i] += h
        source["steps"] += stats.steps
        source["tokens"] += stats.generated_tokens
        steps += stats.steps
        tokens += stats.generated_tokens
        spec_seconds += decode_seconds(stats)
        plain_tokens += plain.stats.generated_tokens
        plain_seconds += decode_seconds(plain.stats)
        mismatches += spec.tokens != plain.tokens
        if check_cli and n == 1:
            check_cli_matches(prompt, backend, model_dir, max_tokens, num_draft, stats)
        print(f"[{n}/{len(prompts)}] {stats.generated_tokens} tokens, "
              f"{stats.accepted}/{stats.drafted} drafts accepted", file=sys.stderr, flush=True)
        result = {
            "backend": backend, "bits": bits, "model": str(model_dir), "prompts": n, "max_tokens": max_tokens, "num_draft": num_draft,
            "draft_head": "full vocabulary" if full_head else "draft vocabulary",
            **pooled(reached, hits, steps, tokens),
            "generated_tokens": tokens,
            "by_source": {name: pooled(c["reached"], c["hits"], c["steps"], c["tokens"]) for name, c in by_source.items()},
            # Decoding rates pooled over prompts (prompt processing excluded: the plain run of a
            # prompt reuses the speculative run's prompt cache, so timing whole calls would favour it).
            "spec_tokens_per_s": (tokens - n) / spec_seconds,
            "plain_tokens_per_s": (plain_tokens - n) / plain_seconds,
            "outputs_differing_from_plain": mismatches,
            "date": date.today().isoformat(),
        }
        if json_path:  # after every prompt, so an interrupted run still leaves its figures so far
            Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def markdown_row(r: dict) -> str:
    by_position = " / ".join(f"{a:.3f}" for a in r["acceptance_by_position"])
    return (f"| {r['backend']} | {r['bits']} | {r['prompts']} x {r['max_tokens']} | {by_position} | "
            f"{r['mean_accepted_length']:.2f} | {r['spec_tokens_per_s']:.1f} / {r['plain_tokens_per_s']:.1f} | "
            f"{r['prompts'] - r['outputs_differing_from_plain']}/{r['prompts']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=sorted(DEFAULT_BITS), default="onnx")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=8, help="weight bits of the conversion")
    parser.add_argument("--prompts", type=int, default=60, help="how many held-out prompts (from the top)")
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens per answer")
    parser.add_argument("--num-draft", type=int, default=3, help="fixed drafts per step (k)")
    parser.add_argument("--full-head", action="store_true",
                        help="measure the conversion whose MTP head scores the full vocabulary")
    parser.add_argument("--no-cli-check", action="store_true",
                        help="skip comparing the first prompt with `edgemtp generate --json`")
    parser.add_argument("--json", help="also write the figures to this file (rewritten after every prompt)")
    parser.add_argument("--model", type=Path,
                        help="a converted model directory to measure instead of the default model's conversion "
                             "(e.g. `edgemtp convert GGUF OUT --mtp-file` of a train-mtp head); --bits is then only a label")
    parser.add_argument("--general", type=int, default=0,
                        help="also answer the first N code and the first N QA prompts of edgemtp/training/heldout_general.jsonl")
    args = parser.parse_args()

    if args.num_draft < 1:
        parser.error(f"--num-draft must be at least 1, got {args.num_draft}")
    result = measure(args.backend, args.bits, args.prompts, args.max_tokens, args.num_draft, args.full_head,
                     not args.no_cli_check, args.json, args.model, args.general)
    positions = " / ".join(str(i) for i in range(1, args.num_draft + 1))
    print(f"| backend | bits | prompts x max tokens | acceptance by position {positions} | "
          f"mean accepted length (k={args.num_draft}) | tokens/s spec / plain | same output as plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(markdown_row(result))
    for name, figures in result["by_source"].items():
        by_position = " / ".join(f"{a:.3f}" for a in figures["acceptance_by_position"])
        print(f"{name}: acceptance by position {by_position}, mean accepted length "
              f"{figures['mean_accepted_length']:.2f} over {figures['steps']} steps")


if __name__ == "__main__":
    main()
