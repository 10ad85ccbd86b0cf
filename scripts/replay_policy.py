"""The adaptive draft length replayed without timing noise, against every fixed length.

    python scripts/replay_policy.py [--prompts heldout|bench|FILE] [--max-tokens 128] [--max-k 4]
        [--ema 0.05 0.1] [--rounds 3]

The default 8-bit ONNX model answers the prompts greedily (plain decoding). Its MTP layers are then
teacher forced over each answer (``Model.mtp_logits``): draft ``d`` at a position is a hit when its
argmax is the trunk's token there. With greedy answers a correct draft equals the true token, so
these hits are exactly what chained drafts see. The loop is then replayed over the answers, each
step starting where the last one ended, with the cost curve and the MTP step measured here: fixed
lengths, and ``AdaptiveDraftLength`` at each ``--ema`` weight, kept across answers and ``--rounds``
passes over them as a session keeps it, probing on steps that do not draft as the loop does (a
probe costs one draft step and judges the first position). The replay sees the loop's choices and
outcomes but none of its timing noise, which on this shared machine is larger than the differences
between policies. Prints tokens per trunk pass and the speedup over plain decoding each would give.
"""

from __future__ import annotations

import argparse

import numpy as np

import edgemtp
from edgemtp.bench.decoding import trunk_cost_curve
from edgemtp.bench.prompts import load_prompts
from edgemtp.engine.drafters import mtp_step_seconds
from edgemtp.engine.tuning import AdaptiveDraftLength, Costs, non_decreasing


def draft_hits(model, prompt: str, max_tokens: int, depths: int) -> np.ndarray:
    """``(positions, depths)`` bool: whether each depth's teacher-forced draft is the trunk's token,
    at every position of the greedy answer where a step can start."""
    prompt_ids = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = list(prompt_ids) + model.generate(prompt, max_tokens=max_tokens, spec="none").tokens
    targets = model.logits(ids).argmax(-1)
    drafts = [model.mtp_logits(ids, depth).argmax(-1) for depth in range(1, depths + 1)]
    # A step starting at position i has ids[i + 1] pending: depth d drafts ids[i + d + 1], which is
    # the trunk's argmax at i + d. The first step after the prompt has the answer's first token pending.
    starts = range(len(prompt_ids) - 1, len(ids) - depths - 1)
    hits = [[drafts[d][i] == targets[i + d + 1] for d in range(depths)] for i in starts]
    return np.array(hits, bool).reshape(-1, depths)


def replay(answers: list[np.ndarray], costs: Costs, max_k: int, rounds: int,
           fixed: int | None = None, ema: float = 0.1) -> tuple[float, float]:
    """(tokens per trunk pass, seconds per token) of a fixed length or of the adaptive policy."""
    policy = AdaptiveDraftLength(costs, max_k, ema_weight=ema)
    tokens = steps = seconds = 0.0
    for _ in range(rounds):
        for hits in answers:
            i = 0
            while i < len(hits):
                k = fixed if fixed is not None else policy.choose()
                if fixed is None and k == 0 and policy.wants_probe():
                    policy.update_probe(float(hits[i][0]))
                    seconds += costs.draft
                accepted = 0
                while accepted < k and hits[i][accepted]:
                    accepted += 1
                tokens, steps = tokens + accepted + 1, steps + 1
                seconds += costs.trunk[k] + k * costs.draft
                policy.update(k, accepted)
                i += accepted + 1
    return tokens / steps, seconds / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="heldout", help="heldout (default), bench, or a JSON list of prompts")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-k", type=int, default=4)
    parser.add_argument("--ema", type=float, nargs="+", default=[0.05, 0.1], help="the policy's EMA weights to replay")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the answers, one policy throughout")
    args = parser.parse_args()

    model = edgemtp.load(backend="onnx")
    # Made non-decreasing as the policy's own cost model does: a dip is noise.
    costs = Costs(trunk=non_decreasing(trunk_cost_curve(model.backend, repeats=7)[: args.max_k + 1]),
                  draft=mtp_step_seconds(model.backend))
    print("cost curve T(n)/T(1): " + " ".join(f"{t / costs.trunk[0]:.2f}" for t in costs.trunk)
          + f"; MTP step / trunk step {costs.draft / costs.trunk[0]:.2f}")
    prompts = load_prompts(None if args.prompts == "bench" else args.prompts)
    answers = [draft_hits(model, prompt, args.max_tokens, args.max_k) for prompt in prompts]
    print(f"{len(answers)} answers, {sum(len(a) for a in answers)} positions")
    runs = [(f"fixed k={k}", {"fixed": k}) for k in range(args.max_k + 1)]
    runs += [(f"auto, EMA weight {ema}", {"ema": ema}) for ema in args.ema]
    for name, options in runs:
        per_pass, per_token = replay(answers, costs, args.max_k, args.rounds, **options)
        print(f"{name}: {per_pass:.2f} tokens per trunk pass, {costs.trunk[0] / per_token:.3f}x plain")


if __name__ == "__main__":
    main()
