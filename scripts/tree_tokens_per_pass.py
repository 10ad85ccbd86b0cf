"""Tokens per trunk pass of the default model with MTP chains against MTP trees (``--spec mtp-tree``),
greedy, on the bench prompts, with the draft shape chosen from the ONNX backend's cost curve.

    python scripts/tree_tokens_per_pass.py [--max-tokens 48] [--prompts N]

Tree verification runs on the MLX backend only so far, and MLX on a CPU is compute-bound (a trunk
pass over 9 rows costs about 7 one-row passes), where no side branch pays. The regime trees are
for is the memory-bound one the ONNX backend is in on the same CPU. So this script measures the
ONNX 8-bit default model's cost curve T(1..9) and MTP draft cost first, then decodes with the MLX
8-bit default model while the draft-length policy and the tree shaper use those ONNX costs: the
draft shapes, and so the tokens per pass, are what an ONNX tree step would be given; the speedup
it prints is predicted from those costs, not timed. Both modes decode the same prompts with the
same costs, and the outputs are checked against plain greedy decoding.
"""

from __future__ import annotations

import argparse

import edgemtp
from edgemtp.bench.prompts import load_prompts
from edgemtp.engine.drafters import MTPDrafter, NoDrafter, mtp_step_seconds
from edgemtp.engine.sampling import Sampler
from edgemtp.engine.speculative import decode
from edgemtp.engine.stats import Stats
from edgemtp.engine.tree import NODE_BUDGET, TreeShaper
from edgemtp.engine.tuning import AdaptiveDraftLength, Costs, FixedDraftLength, measure_trunk_costs

MAX_K = 4


def onnx_costs() -> Costs:
    backend = edgemtp.load(backend="onnx").backend
    trunk = measure_trunk_costs(backend, NODE_BUDGET + 1)
    return Costs(trunk=trunk, draft=mtp_step_seconds(backend, repeats=15))


def run(model, prompt_ids: list[int], max_tokens: int, costs: Costs | None, tree: bool) -> tuple[list[int], Stats, float]:
    """Greedy decoding from an empty cache; returns (tokens, stats, predicted seconds in units of T(1))."""
    backend = model.backend
    backend.reset()
    if costs is None:
        drafter, policy, shaper = NoDrafter(), FixedDraftLength(0), None
    else:
        drafter, policy = MTPDrafter(backend, MAX_K), AdaptiveDraftLength(costs, MAX_K)
        shaper = TreeShaper(costs, MAX_K) if tree else None
    seq, stats, tokens, predicted = list(prompt_ids), Stats(), [], 0.0
    stop_ids = set(model.tokenizer.eos_token_ids)
    before = (0, 0)
    for new, _ in decode(backend, drafter, policy, Sampler(), seq, 0, max_tokens, stop_ids, stats, shaper):
        tokens += new
        if costs is not None and stats.steps:
            nodes, drafted = stats.nodes_verified - before[0], stats.drafted - before[1]
            predicted += (costs.trunk[nodes] + drafted * costs.draft) / costs.trunk[0]
            before = (stats.nodes_verified, stats.drafted)
    return tokens, stats, predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=16, help="how many of the bench prompts")
    args = parser.parse_args()
    costs = onnx_costs()
    print("ONNX T(n)/T(1), n = 1..9:", " ".join(f"{t / costs.trunk[0]:.2f}" for t in costs.trunk),
          f"| MTP draft step {costs.draft / costs.trunk[0]:.2f} T(1)", flush=True)
    model = edgemtp.load(backend="mlx")
    totals = {mode: {"tokens": 0, "steps": 0, "nodes": 0, "predicted": 0.0, "branch": 0, "same": 0}
              for mode in ("chain", "tree")}
    for index, prompt in enumerate(load_prompts()[: args.prompts]):
        ids = model._session.prompt_ids(prompt, chat=True)
        plain, _, _ = run(model, ids, args.max_tokens, None, False)
        for mode in totals:
            tokens, stats, predicted = run(model, ids, args.max_tokens, costs, mode == "tree")
            t = totals[mode]
            # The first token comes with the prompt pass; every later one from a trunk pass.
            t["tokens"] += len(tokens) - 1
            t["steps"] += stats.steps
            t["nodes"] += stats.nodes_verified
            t["predicted"] += predicted
            t["branch"] += stats.provenance.count("branch")
            t["same"] += tokens == plain
            print(f"  prompt {index}: mtp {mode} {(len(tokens) - 1) / max(stats.steps, 1):.2f} tokens per pass, "
                  f"{stats.nodes_verified / max(stats.steps, 1):.2f} draft tokens verified per pass", flush=True)
    for mode, t in totals.items():
        print(f"mtp {mode}: {t['tokens'] / t['steps']:.2f} tokens per trunk pass, "
              f"{t['nodes'] / t['steps']:.2f} draft tokens verified per pass, {t['branch']} tokens from side branches, "
              f"predicted speedup over plain {t['tokens'] / t['predicted']:.2f}x, "
              f"{t['same']}/{args.prompts} outputs identical to plain greedy")


if __name__ == "__main__":
    main()
