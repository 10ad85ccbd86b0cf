"""``edgemtp convert``: any source (HF dir, GGUF, repo id) -> an MLX or ONNX model directory.

The output is built in ``OUT.partial`` and renamed to ``OUT`` only when complete,
so an error or Ctrl-C never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from edgemtp.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from edgemtp.errors import UserError

TARGETS = ("mlx", "onnx")
# Per target: bits, mtp_bits, group size and dtype when the caller gives none.
DEFAULTS = {
    "mlx": {"bits": 4, "mtp_bits": 8, "group_size": 64, "dtype": "float16"},
    "onnx": {"bits": 8, "mtp_bits": 8, "group_size": 32, "dtype": "float32", "head_bits": 8},
}


def convert(src, out, to: str = "mlx", bits: int | None = None, group_size: int | None = None,
            mtp_bits: int | None = None, dtype: str | None = None, force: bool = False,
            show_progress: bool = True, mtp_file: Path | None = None,
            draft_vocab: str | Path | None = None, genai: bool = False, head_bits: int | None = None) -> Path:
    """Convert ``src`` into ``out`` for backend ``to``; returns ``out``.

    ``mtp_file`` attaches MTP layers kept outside the source (the default model's).
    ``draft_vocab`` is a draft vocabulary file (``edgemtp draft-vocab``) stored with the output,
    so the MTP draft head scores only its tokens; ``"none"`` stores none; None takes the
    ``draft_vocab.safetensors`` of the source directory or beside ``mtp_file``, if there is one.
    ``genai`` (ONNX only) writes onnxruntime-genai's layout instead of edgemtp's (onnx_export/genai.py).
    ``head_bits`` (ONNX only) 4: a 4-bit model's output heads at 4 bits too (onnx_export/quantize.py).
    """
    from edgemtp.converters.sources import WithMTPLayers, open_source

    if to not in TARGETS:
        raise UserError(f"--to {to} is not a target; use one of {', '.join(TARGETS)}")
    if genai and to != "onnx":
        raise UserError("--genai writes onnxruntime-genai's ONNX layout; use it with --to onnx")
    if head_bits is not None and (to != "onnx" or genai):
        raise UserError("--head-bits applies to edgemtp's ONNX export; use it with --to onnx (without --genai)")
    options = DEFAULTS[to] | {k: v for k, v in {"bits": bits, "mtp_bits": mtp_bits, "group_size": group_size,
                                                 "dtype": dtype, "head_bits": head_bits}.items() if v is not None}
    if bits == 16 and mtp_bits is None:  # full precision means the MTP layers too
        options["mtp_bits"] = 16
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or choose another output path")
    if to == "mlx":
        from edgemtp.converters.mlx_export import check_options

        check_options(options["bits"], options["group_size"], options["mtp_bits"], options["dtype"])
    elif head_bits is not None:  # refused before the source is read
        from edgemtp.converters.onnx_export.export import check_options

        stored = [None if options[key] == 16 else options[key] for key in ("bits", "mtp_bits")]
        check_options(*stored, options["group_size"], options["dtype"], head_bits)

    ckpt = open_source(src)
    if to == "mlx" and dtype is None and options["bits"] == 16:
        options["dtype"] = full_precision_dtype(ckpt.config)
    if mtp_file is not None:
        ckpt = WithMTPLayers(ckpt, mtp_file)
        ckpt.validate()
    vocab_file = _draft_vocab_file(draft_vocab, ckpt, mtp_file)

    with _partial_dir(out, force) as partial:
        if to == "mlx":
            _to_mlx(ckpt, partial, options, show_progress)
            if vocab_file is not None:  # the MLX backend slices the head rows when it loads
                shutil.copyfile(vocab_file, partial / DRAFT_VOCAB_FILE)
        else:
            _to_onnx(ckpt, partial, options, show_progress, vocab_file, genai)
    return out


def full_precision_dtype(config: dict) -> str:
    """The MLX dtype that loses nothing of the source's unquantized weights: its own float dtype
    (``torch_dtype``, or ``dtype`` as transformers 5 writes it); bfloat16 for FP8 sources, whose
    block scales can exceed float16's range; else float16."""
    if (config.get("quantization_config") or {}).get("quant_method") == "fp8":
        return "bfloat16"
    stored = config.get("dtype") or config.get("torch_dtype")
    return stored if stored in ("float32", "bfloat16", "float16") else "float16"


def _draft_vocab_file(draft_vocab: str | Path | None, ckpt, mtp_file: Path | None) -> Path | None:
    """The draft vocabulary file to store with the output (checked against the model), or None."""
    from edgemtp.draft_vocab import read_draft_vocab

    if str(draft_vocab) == "none":
        return None
    if draft_vocab is None:
        beside = [Path(ckpt.path)] if Path(ckpt.path).is_dir() else []
        beside += [Path(mtp_file).parent] if mtp_file is not None else []
        found = [folder / DRAFT_VOCAB_FILE for folder in beside if (folder / DRAFT_VOCAB_FILE).is_file()]
        if not found or not ckpt.num_mtp_layers:  # without MTP layers there is no draft head to prune
            return None
        path = found[0]
    else:
        path = Path(draft_vocab)
        if not path.is_file():
            raise UserError(f"--draft-vocab {path} does not exist; pass a file made by `edgemtp draft-vocab`, or none")
        if not ckpt.num_mtp_layers:
            raise UserError("--draft-vocab applies to MTP draft heads and this model has no MTP layers; "
                            "leave --draft-vocab out")
    read_draft_vocab(path, int(ckpt.config["vocab_size"]))  # refuse a bad file before converting
    return path


@contextmanager
def _partial_dir(out: Path, force: bool):
    """Yield ``OUT.partial``; on success it replaces ``OUT``, on any failure it is removed."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left over from a killed run
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:  # includes KeyboardInterrupt: never leave a half-written model
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists() and force:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    partial.rename(out)


@contextmanager
def byte_progress(total: int, description: str, show: bool):
    """A rich progress bar over bytes (with speed and ETA) on stderr; yields ``advance(n)``."""
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _to_mlx(ckpt, out: Path, options: dict, show_progress: bool) -> None:
    from edgemtp.converters.mlx_export import export_mlx, total_bytes

    with byte_progress(total_bytes(ckpt), "converting to MLX", show_progress) as advance:
        export_mlx(ckpt, out, bits=options["bits"], group_size=options["group_size"], mtp_bits=options["mtp_bits"],
                   dtype=options["dtype"], progress=advance)


def _to_onnx(ckpt, out: Path, options: dict, show_progress: bool, draft_vocab: Path | None, genai: bool) -> None:
    # The ONNX exporter reads HF directories; other sources are first written as one.
    from edgemtp.checkpoint import Checkpoint
    from edgemtp.converters.onnx_export.export import export_onnx
    from edgemtp.converters.onnx_export.genai import export_genai

    bits = None if options["bits"] == 16 else options["bits"]
    mtp_bits = None if options["mtp_bits"] == 16 else options["mtp_bits"]

    def step(message: str, done: int, total: int) -> None:
        if show_progress:
            print(f"[{done}/{total}] {message}", flush=True)

    def export(path: Path, affine_trunk: bool = False) -> None:
        if genai:  # its MTP head scores the full vocabulary (genai.py), so no draft vocabulary
            export_genai(path, out, bits=bits, group_size=options["group_size"], mtp_bits=mtp_bits, progress=step,
                         affine_trunk=affine_trunk)
        else:
            export_onnx(path, out, bits=bits, group_size=options["group_size"], mtp_bits=mtp_bits,
                        dtype=options["dtype"], progress=step, draft_vocab=draft_vocab, affine_trunk=affine_trunk,
                        head_bits=options["head_bits"])

    if isinstance(ckpt, Checkpoint):
        export(ckpt.path)
        return
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".hf-") as tmp:
        with byte_progress(sum(ckpt.nbytes(n) for n in ckpt.names()), "unpacking to float32", show_progress) as advance:
            write_hf_dir(ckpt, Path(tmp), advance)
        export(Path(tmp), affine_trunk=ckpt.affine_4bit_blocks)


def write_hf_dir(ckpt, out: Path, advance=lambda n: None) -> Path:
    """Write ``ckpt`` as a float32 HF directory (config, one safetensors file, tokenizer)."""
    import numpy as np

    from edgemtp.config import with_both_rope_forms
    from edgemtp.converters.mlx_export import copy_tokenizer
    from edgemtp.safetensors_stream import TensorSpec, write_safetensors

    def chunks(name: str):
        def produce():
            array = ckpt.read(name)
            advance(array.nbytes)
            yield array
        return produce

    specs = [TensorSpec(name, np.dtype(np.float32), ckpt.shape(name), chunks(name)) for name in ckpt.names()]
    write_safetensors(out / "model.safetensors", specs)
    (out / "config.json").write_text(json.dumps(with_both_rope_forms(ckpt.config), indent=2) + "\n")
    copy_tokenizer(ckpt, out)
    return out
