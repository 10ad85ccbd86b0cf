"""Why run-time acceptance is below the training log's: the model card's "Why run time is below torch".

    python scripts/replay_acceptance.py [--mtp FILE] [--prompts 60]   (needs pip install '.[train]')

Greedy replies of the default trunk (float32 torch, CPU) to the held-out prompts, then, with the
MTP layers teacher forced over each reply: the depth-1 agreement over every reply position (what
the training log reports), and the speculative loop replayed over the same positions, where a step
starts only where the previous one ended (what the runtime reports): position-1 acceptance per step
at k = 1, and acceptance by position at k = 3 with the mean accepted length. With greedy replies a
correct draft equals the true token, so teacher forcing gives exactly what chained drafts see.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from edgemtp.default_model import mtp_weights_path, verified_gguf_path
from edgemtp.training import data
from edgemtp.training.mtp_torch import MTPHeads
from edgemtp.training.trunk_torch import build_trunk, load_tokenizer, open_reader

PROMPTS = Path(__file__).resolve().parents[1] / "models/smollm2-135m-mtp/heldout_prompts.jsonl"


def replay(hits: list[list[bool]], k: int) -> tuple[list[int], list[int]]:
    """Steps over one reply: ``hits[d][i]`` says whether depth d+1's draft from entry i is right.
    Returns (verified, accepted) counts per draft position."""
    verified, accepted = [0] * k, [0] * k
    i, end = 0, len(hits[k - 1])
    while i < end:
        run = 0
        for d in range(k):
            verified[d] += 1
            if not hits[d][i]:
                break
            accepted[d] += 1
            run += 1
        i += run + 1  # the accepted drafts plus the trunk's own token
    return verified, accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mtp", default=None, help="MTP weights (default: the shipped ones)")
    parser.add_argument("--prompts", type=int, default=60, help="held-out prompts, from the top")
    parser.add_argument("--max-tokens", type=int, default=128, help="reply length")
    args = parser.parse_args()

    gguf = verified_gguf_path()
    reader = open_reader(gguf)
    trunk, tokenizer = build_trunk(reader), load_tokenizer(gguf, reader)
    weights = load_file(args.mtp or str(mtp_weights_path()))
    heads = MTPHeads(trunk.config, len({name.split(".")[2] for name in weights}))
    heads.load_hf_state_dict(weights)
    heads.eval()
    requests = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[: args.prompts]]
    prompts = [data.chat_prompt_ids(tokenizer, r) for r in requests]
    eos = tokenizer.eos_token_id
    replies = data.generate_replies(trunk, prompts, max_new_tokens=args.max_tokens, batch_size=8, temperature=0.0,
                                    eos_id=eos, pad_id=eos)

    agree = positions = 0
    k1, k3 = ([0], [0]), ([0] * 3, [0] * 3)
    with torch.no_grad():
        for prompt, seq in zip(prompts, replies):
            ids = torch.tensor([seq])
            hidden = trunk.model(input_ids=ids).last_hidden_state
            target = trunk.lm_head(hidden).argmax(-1)[0]
            outputs = heads(hidden, ids, trunk.model.embed_tokens, 3)
            # Entry i of depth d drafts token i+d+1; it is right when it equals the trunk's argmax
            # at i+d. Drafting starts at the last prompt position.
            start, length = len(prompt) - 1, len(seq)
            hits = []
            for depth, h in enumerate(outputs, start=1):
                drafts = heads.logits(depth, h, trunk.lm_head).argmax(-1)[0]
                hits.append([bool(drafts[i] == target[i + depth]) for i in range(start, length - depth - 1)])
            agree += sum(hits[0])
            positions += len(hits[0])
            for (verified, accepted), k in ((k1, 1), (k3, 3)):
                v, a = replay(hits, k)
                for d in range(k):
                    verified[d] += v[d]
                    accepted[d] += a[d]
    by_position = [a / v for a, v in zip(k3[1], k3[0])]
    print(f"depth-1 agreement over every reply position: {agree / positions:.3f} ({positions} positions)")
    print(f"replayed, k=1: position 1 accepted {k1[1][0] / k1[0][0]:.3f} per step ({k1[0][0]} steps)")
    print(f"replayed, k=3: acceptance by position {' / '.join(f'{x:.3f}' for x in by_position)}, "
          f"mean accepted length {1 + sum(k3[1]) / k3[0][0]:.2f} ({k3[0][0]} steps)")


if __name__ == "__main__":
    main()
