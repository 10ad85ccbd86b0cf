"""``manifest.json``: what an exported ONNX directory holds and how its graphs are driven.

Layout of an export directory::

    manifest.json                  this file
    config.json, tokenizer*.json   copied from the checkpoint, so the directory is self-contained
    trunk/model.onnx(.data)        the target model
    mtp0/model.onnx(.data), ...    one graph per MTP layer
    embedding.safetensors          the token embedding, which graphs listing it in "shared_inputs"
                                   take as inputs instead of holding a copy (shared.py)
    draft_vocab.safetensors        only with "draft_vocab": the token ids the MTP graphs score

The trunk's logits are always over the full vocabulary. With ``"draft_vocab": {"file", "size"}``
the MTP graphs' logits are over the draft vocabulary instead: ``(1, n, size)``, column j for the
j-th id of the file (see edgemtp/draft_vocab.py); without it (null) they are full too.

Since version 3 every graph runs its attention on one row more than a step feeds (the last row,
repeated; see llama.py and deepseek_v3.py), so no step is ever a one-row attention. For GQA graphs
that row also passes through the KV cache, and the lengths a step passes count it. Since version 5
the embedding lives in embedding.safetensors. Since version 6 the trunk takes ``logits_from``, the
first row its output head runs on (a prompt step asks for its last row's logits only). Qwen3.5's
trunk cache also holds Gated DeltaNet states (``cache["recurrent"]``: slots, input and output
names, shapes, and the per-position snapshots a step returns when its ``keep_states`` input is
true), and its graphs pad every step themselves (``graphs_pad_rows``; an export without the key pads nothing itself).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgemtp.config import num_mtp_layers
from edgemtp.converters.onnx_export.graph import OPSET
from edgemtp.converters.onnx_export.quantize import EMBEDDING_AND_HEAD_BITS, scheme
from edgemtp.converters.onnx_export.shared import FILE_NAME as SHARED_FILE
from edgemtp.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from edgemtp.errors import UserError

FORMAT = "edgemtp-onnx"
VERSION = 6
MANIFEST = "manifest.json"


def make_manifest(config: dict, cache: dict, bits: int | None, mtp_bits: int | None, group_size: int,
                  dtype: str, max_positions: int, draft_vocab_size: int | None, affine_trunk: bool,
                  mtp_from_trunk: tuple[list[str], ...], shared_inputs: dict[str, list[str]],
                  graphs_pad_rows: bool, head_bits: int = EMBEDDING_AND_HEAD_BITS) -> dict:
    """``mtp_from_trunk``: per MTP layer, the parts its graph takes from the trunk's weights
    (``embed_tokens``, ``shared_head.head``; see edgemtp/mtp_copies.py), for ``inspect``.
    ``shared_inputs``: graph name (``trunk``, ``mtp0``...) -> the embedding tensors it takes as
    inputs from ``embedding.safetensors`` (shared.py). ``graphs_pad_rows``: every graph repeats a
    step's last row through all its MatMuls itself (Qwen3.5, onnx_export/qwen3_5.py), so the
    backend never pads a one-token step. ``head_bits``: the output heads' bits in 4-bit graphs."""
    # GQA takes explicit lengths; MLA derives positions from the length of its past inputs.
    positions = ["seqlens_k", "total_sequence_length"] if cache["kind"] == "gqa_shared_buffer" else []

    def names(kind: str, slots) -> list[str]:
        return [name.format(slot=slot) for slot in slots for name in cache[kind]]

    layers = config["num_hidden_layers"]
    # Qwen3.5's Gated DeltaNet layers (cache["recurrent"]["slots"]) take states instead of keys and values.
    recurrent = cache.get("recurrent") or {"slots": [], "inputs": [], "outputs": [], "snapshots": []}
    attention = [slot for slot in range(layers) if slot not in recurrent["slots"]]

    def state_names(kind: str) -> list[str]:
        return [name.format(slot=slot) for slot in recurrent["slots"] for name in recurrent[kind]]

    num_mtp = num_mtp_layers(config)
    return {
        "format": FORMAT, "version": VERSION, "arch": config["model_type"], "opset": OPSET, "dtype": dtype,
        "max_positions": max_positions,
        "quantization": {"trunk": _quant(bits, group_size, head_bits, affine_trunk),
                         "mtp": _quant(mtp_bits, group_size, head_bits)},
        "cache": cache,
        "embedding": SHARED_FILE,
        "trunk": {"path": "trunk/model.onnx", "cache_slots": layers, "shared_inputs": shared_inputs.get("trunk", []),
                  "inputs": ["input_ids", "logits_from", *positions, *names("inputs", attention), *state_names("inputs"),
                             *(["keep_states"] if recurrent["slots"] else [])],
                  "outputs": ["logits", "hidden", *names("outputs", attention), *state_names("outputs"),
                              *state_names("snapshots")]},
        "mtp": [{"path": f"mtp{i}/model.onnx", "cache_slots": 1,
                 "inputs": ["hidden", "input_ids", *positions, *names("inputs", [0])],
                 "outputs": ["logits", "h1", *names("outputs", [0])],
                 "from_trunk": mtp_from_trunk[i], "shared_inputs": shared_inputs.get(f"mtp{i}", [])}
                for i in range(num_mtp)],
        "draft_vocab": None if draft_vocab_size is None else {"file": DRAFT_VOCAB_FILE, "size": draft_vocab_size},
        "graphs_pad_rows": graphs_pad_rows,
    }


def _quant(bits: int | None, group_size: int, head_bits: int, affine: bool = False) -> dict:
    if bits is None:
        return {"method": "none"}
    return {"method": "MatMulNBits", "bits": bits, "block_size": group_size, "scheme": scheme(bits, affine),
            "head_bits": head_bits if bits == 4 else bits}


def weight_bytes(path: Path) -> int:
    """Bytes of every graph and weight file of the export at ``path``."""
    files = [*Path(path).glob("*/model.onnx*"), Path(path) / SHARED_FILE]
    return sum(f.stat().st_size for f in files if f.is_file())


def is_onnx_export(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {file} ({exc}); re-export the model (edgemtp.converters.onnx_export.export_onnx)") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{file} is not an edgemtp ONNX export of version {VERSION}; re-export the model (edgemtp.converters.onnx_export.export_onnx)")
    return manifest
