"""``export_onnx``: an HF checkpoint directory -> an edgemtp ONNX directory (see manifest.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
from safetensors.numpy import save_file

from edgemtp.checkpoint import Checkpoint
from edgemtp.converters.onnx_export.graph import save_model
from edgemtp.converters.onnx_export.manifest import MANIFEST, make_manifest
from edgemtp.converters.onnx_export.model import ARCHS, build_mtp, build_trunk, checkpoint_reader
from edgemtp.converters.onnx_export.quantize import EMBEDDING_AND_HEAD_BITS, quantize
from edgemtp.converters.onnx_export.shared import FILE_NAME as SHARED_FILE
from edgemtp.converters.onnx_export.shared import detach, embedding_tensors, same_tensors
from edgemtp.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from edgemtp.draft_vocab import read_draft_vocab
from edgemtp.errors import UserError
from edgemtp.mtp_copies import own_parts, parts_from_trunk
from edgemtp.tokenizer import copy_tokenizer_files

SUPPORTED_BITS = (4, 8, None)

# progress(stage description, graphs done, graphs total)
Progress = Callable[[str, int, int], None]


def check_options(bits: int | None, mtp_bits: int | None, group_size: int, dtype: str,
                  head_bits: int = EMBEDDING_AND_HEAD_BITS) -> None:
    """Refuse what the exporter cannot write (a ``UserError`` naming the fix)."""
    for value in (bits, mtp_bits):
        if value not in SUPPORTED_BITS:
            raise UserError(f"unsupported bit width {value}; use 4, 8 or none (float32 weights)")
    if head_bits not in (4, EMBEDDING_AND_HEAD_BITS):
        raise UserError(f"--head-bits {head_bits} is not supported; use 4 or 8")
    if head_bits == 4 and bits != 4:
        raise UserError("--head-bits 4 puts the output heads of a 4-bit model at 4 bits; add --bits 4, "
                        "or leave --head-bits out")
    if dtype != "float32":
        raise UserError(f"dtype {dtype!r} is not supported by the ONNX exporter; use float32 "
                        "(weights are still int4/int8 with --bits)")
    if group_size < 16 or group_size & (group_size - 1):
        raise UserError(f"group size {group_size} must be a power of two >= 16 (MatMulNBits); use 32, 64 or 128")


def export_onnx(checkpoint: str | Path, out_dir: str | Path, bits: int | None = 4, group_size: int = 32,
                mtp_bits: int | None = None, dtype: str = "float32", progress: Progress | None = None,
                draft_vocab: str | Path | None = None, affine_trunk: bool = False,
                head_bits: int = EMBEDDING_AND_HEAD_BITS) -> Path:
    """Convert ``checkpoint`` into ``out_dir``: trunk graph, one graph per MTP layer, manifest.

    ``bits`` 4 or 8 quantizes the trunk's MatMuls (MatMulNBits); None keeps float weights.
    ``mtp_bits`` does the same for the MTP graphs (default: same as ``bits``). Activations and
    caches are float32: onnxruntime's CPU kernels are fastest and most complete in float32, so
    ``dtype`` accepts only "float32" for now. ``draft_vocab`` (a file from ``edgemtp
    draft-vocab``) makes the MTP graphs score only its tokens; it is copied into the export.
    ``affine_trunk``: the trunk's weights already lie on 4-bit affine grids (a GGUF Q4_1 file), which
    a 4-bit trunk then reproduces exactly (quantize.py); MTP weights always come as float.
    ``head_bits`` 4: the output heads of the 4-bit graphs at 4 bits too (quantize.py).
    """
    mtp_bits = bits if mtp_bits is None else mtp_bits
    check_options(bits, mtp_bits, group_size, dtype, head_bits)
    ckpt = Checkpoint.open(checkpoint)
    config = ckpt.config
    if config["model_type"] not in ARCHS:
        raise UserError(f"{config['model_type']} has no ONNX export yet; convert it --to mlx and run it with "
                        "--backend mlx")
    draft_ids = read_draft_vocab(draft_vocab, int(config["vocab_size"])) if draft_vocab is not None else None
    out, partial = empty_partial_dir(out_dir)

    max_positions = int(config.get("max_position_embeddings", 4096))
    read = checkpoint_reader(ckpt)
    graphs = [("trunk", lambda: build_trunk(config, read, max_positions), bits, affine_trunk)]
    graphs += [(f"mtp{i}", lambda i=i: build_mtp(config, read, i, max_positions, own_parts(ckpt, i), draft_ids),
                 mtp_bits, False)
               for i in range(ckpt.num_mtp_layers)]
    embedding: dict = {}  # the trunk's embedding tensors, written once (shared.py)
    shared_inputs: dict[str, list[str]] = {}  # graph -> the embedding tensors it takes as inputs
    for done, (name, build, graph_bits, affine) in enumerate(graphs):
        model = build_graph(name, build, graph_bits, group_size, affine, progress, done, len(graphs), head_bits)
        table = embedding_tensors(model)
        embedding = embedding or table  # the trunk comes first
        # An MTP graph shares the table when it gathers from the same bytes: not when the layer has
        # its own embedding, or when it is quantized differently from the trunk's.
        if same_tensors(table, embedding):
            detach(model, list(table))
            shared_inputs[name] = sorted(table)
        (partial / name).mkdir()
        save_model(model, partial / name / "model.onnx")
        del model
    save_file(embedding, partial / SHARED_FILE)
    if progress:
        progress("done", len(graphs), len(graphs))

    # The config and tokenizer files go beside the graphs so the export loads without the checkpoint.
    shutil.copy2(ckpt.path / "config.json", partial / "config.json")
    copy_tokenizer_files(ckpt.path, partial)
    if draft_ids is not None:
        shutil.copyfile(draft_vocab, partial / DRAFT_VOCAB_FILE)
    cache = ARCHS[config["model_type"]][1](config)
    from_trunk = tuple(parts_from_trunk(ckpt, i) for i in range(ckpt.num_mtp_layers))
    manifest = make_manifest(config, cache, bits, mtp_bits, group_size, dtype, max_positions,
                             None if draft_ids is None else len(draft_ids), affine_trunk, from_trunk, shared_inputs,
                             ARCHS[config["model_type"]][0].PADS_ROWS, head_bits)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return publish(partial, out)


def empty_partial_dir(out_dir: str | Path) -> tuple[Path, Path]:
    """``(out, partial)``: the export is written into the empty ``partial`` and renamed to ``out``
    by ``publish``; an ``out`` that already holds something is refused."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another output directory or delete it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return out, partial


def publish(partial: Path, out: Path) -> Path:
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out


def build_graph(name: str, build: Callable[[], onnx.ModelProto], bits: int | None, group_size: int, affine: bool,
                progress: Progress | None, done: int, total: int,
                head_bits: int = EMBEDDING_AND_HEAD_BITS) -> onnx.ModelProto:
    """``build()``, quantized to ``bits`` unless None (its output heads to ``head_bits`` where
    ``bits`` is 4), reporting both stages to ``progress``."""
    if progress:
        progress(f"building {name}", done, total)
    model = build()
    if bits is not None:
        if progress:
            progress(f"quantizing {name} to int{bits}", done, total)
        model = quantize(model, bits, group_size, affine, head_bits)
    return model
