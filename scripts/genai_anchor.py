"""edgemtp's Python loop against onnxruntime-genai's C++ loop on the same graphs (issue 20's second anchor).

    edgemtp convert SRC GENAI_DIR --to onnx --genai --bits 8 [--mtp-file ...]
    python scripts/genai_anchor.py GENAI_DIR [--model EDGEMTP_DIR] [--rounds 3] [--threads 2] [--prompts N]
        [--builder-dir DIR]

Without ``--model`` it compares with the default model (ONNX, 8-bit); convert GENAI_DIR from the
same source at the same bits (for the default model: its GGUF with ``--mtp-file``
models/smollm2-135m-mtp/mtp.safetensors). Decodes the bench prompts (chat template, 48 tokens,
greedy) in interleaved rounds: edgemtp plain, onnxruntime-genai plain (og.Generator), edgemtp MTP
k=1 and k=2, onnxruntime-genai MTP k=1 and k=2 (og.MtpGenerator). Every rate is the tokens after
the first over the time after the first, summed over the prompts; prints the medians over rounds,
each engine's ratio to edgemtp plain, onnxruntime-genai's acceptance, and whether each output
equals edgemtp's plain output. ``--builder-dir`` adds onnxruntime-genai's own builder output
(``python -m onnxruntime_genai.models.builder -i HF_DIR -o DIR -p int4 -e cpu``; give the HF
config both RoPE forms) as one more plain row.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import edgemtp
from edgemtp.bench.peers.ortgenai_export import genai_greedy, load_genai
from edgemtp.bench.prompts import load_prompts

MAX_TOKENS = 48


def edgemtp_pass(model, prompts, spec: str, num_draft: int | None):
    """(tokens/s, token lists) of one pass over ``prompts`` (token ids)."""
    decoded = seconds = 0.0
    outputs = []
    options = {} if spec == "none" else {"num_draft": num_draft}
    for ids in prompts:
        times, tokens = [], []
        start = time.perf_counter()
        for _text, token_ids, _stats in model.stream(ids, max_tokens=MAX_TOKENS, temperature=0.0, spec=spec,
                                                     chat=False, **options):
            times += [time.perf_counter() - start] * len(token_ids)
            tokens += token_ids
        decoded += len(tokens) - 1
        seconds += times[-1] - times[0]
        outputs.append(tokens)
    return decoded / seconds, outputs


def genai_pass(model, head, prompts, num_draft: int | None):
    decoded = seconds = 0.0
    outputs, accepted, proposed = [], 0, 0
    for ids in prompts:
        run = genai_greedy(model, head, ids, MAX_TOKENS, max_draft_tokens=num_draft)
        decoded += len(run.tokens) - 1
        seconds += run.token_times[-1] - run.token_times[0]
        outputs.append(run.tokens)
        if run.stats:
            accepted += run.stats["draft_tokens_accepted"]
            proposed += run.stats["draft_tokens_evaluated"]
    return decoded / seconds, outputs, (accepted / proposed if proposed else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("genai_dir")
    parser.add_argument("--model", default=None, help="edgemtp ONNX directory (default: the default model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=None, help="only the first N bench prompts")
    parser.add_argument("--builder-dir", default=None,
                        help="also time onnxruntime-genai's own builder output of the same model, plain")
    args = parser.parse_args()

    model = edgemtp.load(args.model, backend="onnx", threads=args.threads)
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in load_prompts()[:args.prompts]]
    plain, _ = load_genai(args.genai_dir, threads=args.threads)
    main_for_mtp, head = load_genai(args.genai_dir, threads=args.threads, mtp=True)
    variants = {
        "edgemtp plain": lambda: edgemtp_pass(model, prompts, "none", None) + (None,),
        "genai plain": lambda: genai_pass(plain, None, prompts, None),
        "edgemtp mtp k=1": lambda: edgemtp_pass(model, prompts, "mtp", 1) + (None,),
        "genai mtp k=1": lambda: genai_pass(main_for_mtp, head, prompts, 1),
        "edgemtp mtp k=2": lambda: edgemtp_pass(model, prompts, "mtp", 2) + (None,),
        "genai mtp k=2": lambda: genai_pass(main_for_mtp, head, prompts, 2),
    }
    if args.builder_dir:
        builder, _ = load_genai(args.builder_dir, threads=args.threads)
        variants["genai builder plain"] = lambda: genai_pass(builder, None, prompts, None)
    for run in variants.values():  # warm-up: first-call allocations out of the timed rounds
        run()
    rates: dict[str, list[float]] = defaultdict(list)
    outputs, acceptance = {}, {}
    for round_ in range(args.rounds):
        for name in (list(variants) if round_ % 2 == 0 else list(reversed(variants))):
            rate, outputs[name], acceptance[name] = variants[name]()
            rates[name].append(rate)
    base = statistics.median(rates["edgemtp plain"])
    print(f"{len(prompts)} prompts x {MAX_TOKENS} tokens, {args.threads} threads, {args.rounds} interleaved rounds")
    print("variant              tok/s  x edgemtp plain  acceptance  = edgemtp plain")
    for name, values in rates.items():
        accept = "" if acceptance[name] is None else f"{acceptance[name]:.2f}"
        same = "yes" if outputs[name] == outputs["edgemtp plain"] else "no"
        print(f"{name:19} {statistics.median(values):6.1f}  {statistics.median(values) / base:15.2f}  "
              f"{accept:>10}  {same:>13}   rounds: {' '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
