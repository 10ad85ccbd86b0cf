"""Open a model for the ONNX backend: an export directory directly, or a Hugging Face
checkpoint converted once into the user cache and reused afterwards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgemtp.converters.onnx_export.manifest import VERSION, is_onnx_export
from edgemtp.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from edgemtp.onnx_backend.backend import OnnxBackend
from edgemtp.paths import cache_root


def cached_export_dir(checkpoint: Path, bits: int | None, group_size: int) -> Path:
    """Cache location keyed by the checkpoint's path, file sizes and times, and the export options."""
    files = sorted(p for p in checkpoint.iterdir() if p.suffix in (".json", ".safetensors"))
    stamp = [str(checkpoint.resolve()), VERSION, bits, group_size,
             [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    return cache_root() / "onnx" / f"{checkpoint.name}-{key}"


def _convert_with_progress(checkpoint: Path, out: Path, bits: int | None, group_size: int) -> None:
    from rich.progress import Progress

    from edgemtp.converters.onnx_export import export_onnx

    with Progress(transient=True) as bar:
        task = bar.add_task(f"Converting {checkpoint.name} to ONNX (first use only)", total=None)

        def report(stage: str, done: int, total: int) -> None:
            bar.update(task, description=f"ONNX export: {stage}", completed=done, total=total)

        # A draft vocabulary kept in the checkpoint directory prunes the MTP head, as `edgemtp convert` does.
        vocab = checkpoint / DRAFT_VOCAB_FILE
        export_onnx(checkpoint, out, bits=bits, group_size=group_size, progress=report,
                    draft_vocab=vocab if vocab.is_file() else None)


def load_onnx_backend(path: str | Path, bits: int | None = 4, group_size: int = 32, threads: int | None = None,
                      max_context: int | None = None) -> OnnxBackend:
    """``path`` is an ONNX export (manifest.json) or an HF checkpoint (converted with ``bits``)."""
    path = Path(path)
    if not is_onnx_export(path):
        export = cached_export_dir(path, bits, group_size)
        if not is_onnx_export(export):
            _convert_with_progress(path, export, bits, group_size)
        path = export
    return OnnxBackend(path, threads=threads, max_context=max_context)
