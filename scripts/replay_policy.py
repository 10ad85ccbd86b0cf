"""The adaptive draft length replayed without timing noise: acceptance kept per kind of step (after
a rejection or not) against one estimate over all steps.

    python scripts/replay_policy.py [--prompts heldout] [--max-tokens 128] [--max-k 4]

The default 8-bit ONNX model answers the prompts greedily (plain decoding). Its MTP layers are then
teacher forced over each answer (``Model.mtp_logits``): draft ``d`` at position ``i`` is a hit when
its argmax is the trunk's next token there. With greedy answers a correct draft equals the true
token, so these hits are exactly what chained drafts see. The loop is then replayed over each
answer, a step starting where the previous one ended, with ``AdaptiveDraftLength`` choosing every
step's length from a cost curve measured here (a trunk pass over 1..max_k+1 tokens, an MTP step
timed right after a trunk step) and learning from the replayed outcomes, once as shipped and once
with its kind of step always "no rejection" (one estimate over all steps, the policy before).
Prints tokens per trunk pass and the speedup over plain decoding that the cost curve gives each.
Timing noise on this shared machine is larger than the difference; the replay is not affected by it.
"""

from __future__ import annotations

import argparse

import numpy as np

import edgemtp
from edgemtp.bench.prompts import load_prompts
from edgemtp.engine.drafters import mtp_step_seconds
from edgemtp.bench.decoding import trunk_cost_curve
from edgemtp.engine.tuning import AdaptiveDraftLength, Costs


def draft_hits(model, prompt: str, max_tokens: int, depths: int) -> np.ndarray:
    """``(positions, depths)`` bool: whether each depth's teacher-forced draft is the trunk's token,
    at every position of the greedy answer where a step could start."""
    prompt_ids = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = list(prompt_ids) + model.generate(prompt, max_tokens=max_tokens, spec="none").tokens
    targets = model.logits(ids).argmax(-1)
    drafts = [model.mtp_logits(ids, depth).argmax(-1) for depth in range(1, depths + 1)]
    # Position i holds the pending token ids[i + 1]: depth d drafts ids[i + d + 1], the trunk's
    # argmax at i + d. The first step after the prompt starts with the answer's first token pending.
    starts = range(len(prompt_ids) - 1, len(ids) - depths - 1)
    return np.array([[drafts[d][i] == targets[i + d + 1] for d in range(depths)] for i in starts], bool).reshape(-1, depths)


def replay(answers: list[np.ndarray], costs: Costs, max_k: int, by_kind: bool) -> tuple[float, float]:
    """(tokens per trunk pass, seconds per token) of the policy over every answer."""
    tokens = steps = seconds = 0.0
    for hits in answers:
        policy = AdaptiveDraftLength(costs, max_k)
        i = 0
        while i < len(hits):
            k = policy.choose()
            accepted = 0
            while accepted < k and hits[i][accepted]:
                accepted += 1
            tokens, steps = tokens + accepted + 1, steps + 1
            seconds += costs.trunk[k] + k * costs.draft
            policy.update(k, accepted)
            if not by_kind:
                policy.after_rejection = False
            i += accepted + 1
    return tokens / steps, seconds / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="heldout", help="prompt set (load_prompts): heldout (default) or a JSON file")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-k", type=int, default=4)
    args = parser.parse_args()

    model = edgemtp.load(backend="onnx")
    backend = model.backend
    costs = Costs(trunk=trunk_cost_curve(backend, repeats=7)[: args.max_k + 1], draft=mtp_step_seconds(backend))
    print("cost curve T(n)/T(1): " + " ".join(f"{t / costs.trunk[0]:.2f}" for t in costs.trunk)
          + f"; MTP step / trunk step {costs.draft / costs.trunk[0]:.2f}")
    answers = [draft_hits(model, prompt, args.max_tokens, args.max_k) for prompt in load_prompts(args.prompts)]
    print(f"{len(answers)} answers, {sum(len(a) for a in answers)} positions")
    plain = costs.trunk[0]
    for name, by_kind in (("one estimate over all steps", False), ("per kind of step (shipped)", True)):
        per_pass, per_token = replay(answers, costs, args.max_k, by_kind)
        print(f"{name}: {per_pass:.2f} tokens per trunk pass, {plain / per_token:.3f}x plain")


if __name__ == "__main__":
    main()
