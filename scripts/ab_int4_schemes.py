"""The two 4-bit ONNX forms of one float checkpoint, decoding side by side: the README's figure.

    python scripts/ab_int4_schemes.py CHECKPOINT WORK_DIR [--rounds 3] [--prompts 0 5] [--max-tokens 24]

Exports CHECKPOINT (an HF directory of float weights) at 4 bits twice into WORK_DIR, unless already
there: ``asymmetric`` (integer zero points, what ``edgemtp convert --bits 4`` writes for float
weights) and ``affine`` (float minimum per group, what it writes for GGUF Q4_1 weights); see
converters/onnx_export/quantize.py. Then decodes the chosen bench prompts greedily with each, plain,
in interleaved rounds (the order reversed every other round) within one process, and prints
tokens/s per round and the size of each trunk's files.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import edgemtp
from edgemtp.bench.decoding import measure_decoding
from edgemtp.bench.prompts import load_prompts
from edgemtp.converters.onnx_export import export_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, nargs="+", default=[0, 5], help="indices into the bench prompts")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    paths = {}
    for scheme in ("asymmetric", "affine"):
        paths[scheme] = args.work_dir / scheme
        if not (paths[scheme] / "manifest.json").is_file():
            print(f"exporting {scheme} to {paths[scheme]}", flush=True)
            export_onnx(args.checkpoint, paths[scheme], bits=4, affine_trunk=scheme == "affine")
    models = {scheme: edgemtp.load(path, backend="onnx") for scheme, path in paths.items()}
    all_prompts = load_prompts()
    prompts = [all_prompts[i] for i in args.prompts]
    rates: dict[str, list[float]] = {scheme: [] for scheme in models}
    for round_ in range(args.rounds):
        for scheme in (list(models) if round_ % 2 == 0 else list(reversed(models))):
            figures, _ = measure_decoding(models[scheme], prompts, max_tokens=args.max_tokens, repeats=1)
            rates[scheme].append(figures.tokens_per_s)
    for scheme, values in rates.items():
        size = sum(f.stat().st_size for f in (paths[scheme] / "trunk").iterdir())
        print(f"{scheme:10} trunk files {size / 1e6:,.0f} MB, plain decoding {[round(r, 1) for r in values]} tokens/s, "
              f"median {statistics.median(values):.1f}")
    ratio = statistics.median(rates["asymmetric"]) / statistics.median(rates["affine"])
    print(f"asymmetric / affine: {ratio:.2f}x")


if __name__ == "__main__":
    main()
