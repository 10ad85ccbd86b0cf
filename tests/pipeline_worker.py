"""One rank of a test run over several ranks (tests/test_pipeline.py and
tests/test_tensor_parallel.py start one process per rank, as ``mlx.launch`` does):
``pipeline_worker.py MODEL MAX_TOKENS [PARALLEL]``. Rank 0 prints one JSON line: the tokens of
every case in ``CASES``, the trunk's and MTP depth 1's logits over ``PROMPT`` and the backend's
report of the ranks;
the other ranks serve inside ``edgemtp.load`` and print nothing."""

import json
import sys

import edgemtp

# (spec, num_draft, temperature, seed): plain and MTP decoding, greedy and seeded sampling.
CASES = [("none", 0, 0.0, None), ("mtp", 2, 0.0, None), ("none", 0, 0.8, 7), ("mtp", 2, 0.8, 7)]
PROMPT = [5, 17, 3, 99, 42, 8]


def run_cases(model, max_tokens: int) -> list[list[int]]:
    return [model.generate(PROMPT, spec=spec, num_draft=k, temperature=temp, seed=seed, max_tokens=max_tokens,
                           chat=False).tokens for spec, k, temp, seed in CASES]


if __name__ == "__main__":
    parallel = sys.argv[3] if len(sys.argv) > 3 else "auto"
    model = edgemtp.load(sys.argv[1], backend="mlx", max_kv_size=128, parallel=parallel)
    tokens = run_cases(model, int(sys.argv[2]))
    print(json.dumps({"tokens": tokens, "logits": model.logits(PROMPT).tolist(),
                      "mtp_logits": model.mtp_logits(PROMPT, depth=1).tolist(),
                      "report": model.backend.ranks_report()}), flush=True)
