"""Perplexity of the default model's trunk (SmolLM2-135M-Instruct, from its Q4_1 GGUF) after
conversion to each format at 8 and 4 bits, against its fp16 conversion: the README's table.

    python scripts/perplexity_table.py [--tokens 20480] [--only onnx4 ...]

Text: Jane Austen's *Persuasion* from ../shared/data/corpus (held out: not used for training
anything here). Every model is scored by ``edgemtp.bench.perplexity.perplexity`` in windows of 512.

MLX runs on Apple GPUs; its CPU build is far too slow for 20k tokens of a 135M model here,
so MLX conversions are scored on their own stored weights (dequantized exactly as MLX's
quantized matmul does) run through the float32 ONNX graph. The parity tests establish that
both backends compute the same function from the same weights, so this measures the MLX
format's rounding, which is what quantization fidelity is about.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

import edgemtp
from edgemtp.converters.convert import convert
from edgemtp.converters.onnx_export import export_onnx
from edgemtp.default_model import gguf_path
from edgemtp.bench.perplexity import perplexity
from edgemtp.tokenizer import Tokenizer

TOKENS = 20_480
WINDOW = 512
# The GGUF's own block size (Q4_1 blocks of 32), so requantizing can land on its grid.
GROUP_SIZE = 32
TEXT = Path(__file__).resolve().parents[2] / "shared/data/corpus/gutenberg/austen-persuasion.txt"


def mlx_dir_as_float_checkpoint(mlx_dir: Path, out: Path) -> Path:
    """The weights of a (llama) MLX directory as a float32 HF checkpoint: quantized tensors
    dequantized with ``mx.dequantize`` (at their module's own bits where the config overrides
    them, as for a 4-bit model's 8-bit embedding), the rest cast; mlx-lm's llama names are HF's."""
    import mlx.core as mx
    from safetensors.numpy import save_file

    config = json.loads((mlx_dir / "config.json").read_text())
    quantization = config.pop("quantization", None)
    saved = mx.load(str(mlx_dir / "model.safetensors"))
    weights = {}
    for name, array in saved.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        if f"{base}.scales" in saved:
            module = quantization.get(base, quantization)
            array = mx.dequantize(array, saved[f"{base}.scales"], saved[f"{base}.biases"],
                                  group_size=module["group_size"], bits=module["bits"])
        weights[name] = np.array(array.astype(mx.float32))
    out.mkdir()
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    for file in mlx_dir.glob("tokenizer*.json"):
        shutil.copy2(file, out / file.name)
    return out


def _score_mlx(workdir: Path, name: str, bits: int, dtype: str | None, ids: list[int]) -> float:
    mlx_dir = convert(gguf_path(), workdir / name, to="mlx", bits=bits, group_size=GROUP_SIZE, dtype=dtype,
                      show_progress=False)
    onnx_dir = export_onnx(mlx_dir_as_float_checkpoint(mlx_dir, workdir / f"{name}-float"), workdir / f"{name}-onnx",
                           bits=None)
    return perplexity(edgemtp.load(onnx_dir, backend="onnx"), ids, WINDOW)


def _score_onnx(workdir: Path, bits: int, ids: list[int]) -> float:
    onnx_dir = convert(gguf_path(), workdir / f"onnx{bits}", to="onnx", bits=bits, group_size=GROUP_SIZE,
                       show_progress=False)
    return perplexity(edgemtp.load(onnx_dir, backend="onnx"), ids, WINDOW)


ROWS = {"mlx8": ("mlx", 8), "mlx4": ("mlx", 4), "onnx8": ("onnx", 8), "onnx4": ("onnx", 4)}


def measure_all(workdir: Path, text: str, tokens: int = TOKENS, report=lambda key, value: None,
                rows: list[str] | None = None) -> dict:
    """``{"fp16": ppl, (format, bits): ppl, ...}`` for the default trunk on ``text``'s first ``tokens`` tokens;
    ``rows`` (names from ``ROWS``) limits the quantized conversions measured (the fp16 reference always is)."""
    reference_dir = convert(gguf_path(), workdir / "fp16", to="mlx", bits=16, dtype="float16", show_progress=False)
    ids = Tokenizer.from_dir(reference_dir).encode(text)[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"the text has only {len(ids)} tokens, {tokens} wanted")
    shutil.rmtree(reference_dir)
    results = {}
    for key, score in [("fp16", lambda: _score_mlx(workdir, "fp16-mlx", 16, "float16", ids)),
                       (("mlx", 8), lambda: _score_mlx(workdir, "mlx8", 8, None, ids)),
                       (("mlx", 4), lambda: _score_mlx(workdir, "mlx4", 4, None, ids)),
                       (("onnx", 8), lambda: _score_onnx(workdir, 8, ids)),
                       (("onnx", 4), lambda: _score_onnx(workdir, 4, ids))]:
        if key == "fp16" or rows is None or key in [ROWS[row] for row in rows]:
            results[key] = score()
            report(key, results[key])
    return results


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=TOKENS, help="number of held-out tokens to score")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), help="measure only these conversions (and fp16)")
    args = parser.parse_args()
    print(f"{args.tokens} tokens of {TEXT.name}, windows of {WINDOW}, group size {GROUP_SIZE}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        results = measure_all(Path(tmp), TEXT.read_text(encoding="utf-8"), args.tokens,
                              report=lambda key, value: print(key, f"{value:.3f}", file=sys.stderr, flush=True),
                              rows=args.only)
    reference = results["fp16"]
    print("| format | bits | perplexity | vs fp16 |")
    print("| --- | --- | --- | --- |")
    print(f"| (fp16 conversion) | 16 | {reference:.2f} | |")
    for (to, bits), value in ((key, value) for key, value in results.items() if key != "fp16"):
        print(f"| {to} | {bits} | {value:.2f} | {100 * (value / reference - 1):+.2f}% |")


if __name__ == "__main__":
    main()
