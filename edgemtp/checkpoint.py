"""Lazy, validated access to a Hugging Face safetensors checkpoint directory.

``Checkpoint.open(path)`` reads only ``config.json`` and the safetensors headers; tensor data
is read one tensor at a time, memory-mapped, when asked for. ``read`` always returns float32:
bf16/fp16 are widened and DeepSeek-V3 style FP8 (e4m3 weights with a ``weight_scale_inv``
grid of ``block x block`` tiles) is dequantized. The scale grids are storage details and
never appear in ``names()``.

Qwen3.5 MoE's routed experts are named stacked (``mlp.experts.gate_up_proj``, ``down_proj``, the
layout's names); a checkpoint that stores them one tensor per expert (``mlp.experts.{e}.gate_proj.weight``,
as transformers' conversion for ``qwen3_5_moe`` also reads them) shows them under the stacked names,
stacked when read.

Pickle-based checkpoints (``pytorch_model.bin``, ``*.pt``...) are refused, never loaded:
unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import ml_dtypes
import numpy as np

from edgemtp.config import check_supported, is_qwen3_5, load_config, num_mtp_layers
from edgemtp.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from edgemtp.errors import UserError
from edgemtp.layout import expected_weights, is_optional, mtp_prefix

# safetensors dtype tag -> numpy dtype (ml_dtypes supplies bf16 and fp8)
NUMPY_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),  # MLX packs quantized weights into uint32
    "U8": np.dtype(np.uint8),
}

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: the file and the absolute byte offset of its data."""

    file: Path
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * NUMPY_DTYPES[self.dtype].itemsize


class Checkpoint:
    """A model directory: its config plus lazily readable weights."""

    # Float or FP8 block-scaled (symmetric) weights: no 4-bit grid a converter must reproduce.
    affine_4bit_blocks = False

    def __init__(self, path: Path, config: dict, entries: dict[str, TensorEntry]):
        self.path = path
        self.config = config
        self._entries = entries
        # Stacked name -> the per-expert tensors it stacks, in groups concatenated along rows.
        self._stacks = per_expert_stacks(entries, config)
        self._stacked_parts = {part for groups in self._stacks.values() for group in groups for part in group}

    @classmethod
    def open(cls, path: str | Path, validate: bool = True) -> Checkpoint:
        """Open a checkpoint directory; by default also check it against its config."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path} is not a directory; pass a Hugging Face model directory "
                            f"(config.json + *.safetensors)")
        config = load_config(path)
        check_supported(config, path / "config.json")
        files = _safetensors_files(path)
        entries: dict[str, TensorEntry] = {}
        for file in files:
            entries.update(_read_header(file))
        checkpoint = cls(path, config, entries)
        if validate:
            checkpoint.validate()
        return checkpoint

    # --- names and shapes (no tensor data is read) ---------------------------

    def names(self) -> list[str]:
        """Weight names in file order, FP8 scale grids hidden, per-expert tensors under their stacked names."""
        stored = [name for name in self._entries if not name.endswith(SCALE_SUFFIX) and name not in self._stacked_parts]
        return stored + list(self._stacks)

    def __contains__(self, name: str) -> bool:
        return name in self._stacks or (name in self._entries and not name.endswith(SCALE_SUFFIX)
                                        and name not in self._stacked_parts)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._stacks:
            groups = self._stacks[name]
            rows, cols = self._entry(groups[0][0]).shape
            return (len(groups[0]), rows * len(groups), cols)
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype tag (``"BF16"``, ``"F8_E4M3"``...)."""
        return self._entry(self._stacks[name][0][0] if name in self._stacks else name).dtype

    def nbytes(self, name: str) -> int:
        """Bytes the tensor occupies on disk, including its FP8 scale grid if any."""
        if name in self._stacks:
            return sum(self.nbytes(part) for group in self._stacks[name] for part in group)
        scale = self._entries.get(name + SCALE_SUFFIX)
        return self._entry(name).nbytes + (scale.nbytes if scale else 0)

    @property
    def total_bytes(self) -> int:
        """Bytes of every stored tensor (weights, scale grids, quantization parameters)."""
        return sum(entry.nbytes for entry in self._entries.values())

    @property
    def num_mtp_layers(self) -> int:
        return num_mtp_layers(self.config)

    def mtp_names(self, index: int) -> list[str]:
        """Names of MTP layer ``index`` (0-based), i.e. under ``model.layers.{N+index}.``."""
        prefix = mtp_prefix(self.config, index)
        return [name for name in self.names() if name.startswith(prefix)]

    def trunk_names(self) -> list[str]:
        mtp = {name for index in range(self.num_mtp_layers) for name in self.mtp_names(index)}
        return [name for name in self.names() if name not in mtp]

    @property
    def is_fp8(self) -> bool:
        return any(name.endswith(SCALE_SUFFIX) for name in self._entries)

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """(rows, cols) of one FP8 scale tile, from ``quantization_config.weight_block_size``."""
        if not self.is_fp8:
            return None
        block = (self.config.get("quantization_config") or {}).get("weight_block_size")
        if not block or len(block) != 2:
            raise UserError(f"{self.path / 'config.json'}: FP8 weights need quantization_config.weight_block_size "
                            f"(e.g. [128, 128]); add it to config.json")
        return int(block[0]), int(block[1])

    # --- tensor data ------------------------------------------------------------

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor as stored (bf16, float8...), copied out of the memory map."""
        entry = self._entry(name)
        mapped = np.memmap(entry.file, dtype=NUMPY_DTYPES[entry.dtype], mode="r",
                           offset=entry.offset, shape=entry.shape)
        return np.array(mapped)

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32; FP8 block-scaled weights come back dequantized, per-expert ones stacked."""
        if name in self._stacks:
            return np.concatenate([np.stack([self.read(part) for part in group]) for group in self._stacks[name]],
                                  axis=1)
        values = self.read_raw(name).astype(np.float32)
        if name + SCALE_SUFFIX in self._entries:
            values = dequantize_fp8_blocks(values, self.read_raw(name + SCALE_SUFFIX), self.fp8_block)
        return values

    def digest(self, name: str) -> str:
        """A hash of the tensor's stored bytes (dtype, shape and FP8 scale grid included). Cached per
        process by file position and modification time: the planner and the backend each open the
        checkpoint, and one DeepSeek-V3 embedding copy is 1.9 GB to read."""
        if name in self._stacks:
            return "".join(self.digest(part) for group in self._stacks[name] for part in group)
        entries = [entry for entry in (self._entry(name), self._entries.get(name + SCALE_SUFFIX)) if entry is not None]
        return "".join(_entry_digest(entry, entry.file.stat().st_mtime_ns) for entry in entries)

    # --- validation -------------------------------------------------------------

    def validate(self) -> None:
        """Check every weight the config implies (trunk and MTP) is present with the right shape."""
        try:
            expected = expected_weights(self.config)
        except KeyError as exc:
            raise UserError(f"{self.path / 'config.json'} lacks key {exc.args[0]!r} needed for "
                            f"{self.config['model_type']}; add it or re-download config.json") from None
        missing = [name for name in expected if name not in self and not is_optional(name)]
        if missing:
            if self._is_mtp(missing[0]):
                hint = (f"set num_nextn_predict_layers to {self._complete_mtp_layers()} in config.json or use a "
                        f"checkpoint that includes the MTP weights")
            else:
                hint = "re-download or re-convert the checkpoint"
            raise UserError(f"{self.path}: weight {missing[0]} is missing ({len(missing)} missing in all); {hint}")
        for name, shape in expected.items():
            if name not in self:
                continue  # an optional weight (is_optional) that this checkpoint omits
            if self.shape(name) != shape:
                raise UserError(f"{self.path}: weight {name} has shape {list(self.shape(name))} but config.json "
                                f"implies {list(shape)}; the weights and config.json do not belong together")
            scale = self._entries.get(name + SCALE_SUFFIX)
            if scale is not None:
                rows, cols = self.fp8_block
                grid = (math.ceil(shape[0] / rows), math.ceil(shape[1] / cols))
                if scale.shape != grid:
                    raise UserError(f"{self.path}: {name}{SCALE_SUFFIX} has shape {list(scale.shape)} but a "
                                    f"{rows}x{cols} block grid needs {list(grid)}; fix weight_block_size in config.json")

    def _is_mtp(self, name: str) -> bool:
        return any(name.startswith(mtp_prefix(self.config, i)) for i in range(self.num_mtp_layers))

    def _complete_mtp_layers(self) -> int:
        """How many leading MTP layers have all their weights (for the error hint)."""
        expected = expected_weights(self.config)
        complete = 0
        for index in range(self.num_mtp_layers):
            prefix = mtp_prefix(self.config, index)
            if not all(name in self or is_optional(name) for name in expected if name.startswith(prefix)):
                break
            complete += 1
        return complete

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name} is not a weight of {self.path}") from None


_PER_EXPERT = re.compile(r"^(.+\.mlp\.experts\.)\d+\.(gate|up|down)_proj\.weight$")


def per_expert_stacks(entries, config: dict) -> dict[str, list[list[str]]]:
    """For a Qwen3.5 MoE checkpoint that stores routed experts one tensor per expert: ``{stacked name:
    groups of per-expert names}``, ``experts.gate_up_proj`` stacking each expert's gate then up
    projection (``[[gate_0..gate_E-1], [up_0..up_E-1]]``, concatenated along rows) and
    ``experts.down_proj`` the down projections. Layers with an incomplete set are left alone (the
    layout then names what is missing)."""
    if not is_qwen3_5(config) or not config.get("num_experts"):
        return {}
    prefixes = {match.group(1) for name in entries if (match := _PER_EXPERT.match(name))}
    stacks = {}
    for prefix in sorted(prefixes):
        per_kind = {kind: [f"{prefix}{e}.{kind}_proj.weight" for e in range(config["num_experts"])]
                    for kind in ("gate", "up", "down")}
        if all(name in entries for names in per_kind.values() for name in names):
            stacks[prefix + "gate_up_proj"] = [per_kind["gate"], per_kind["up"]]
            stacks[prefix + "down_proj"] = [per_kind["down"]]
    return stacks


def dequantize_fp8_blocks(values: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """``values * scale_inv`` with each scale covering one ``block`` tile (edge tiles partial)."""
    rows, cols = values.shape
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=0), block[1], axis=1)
    return values * scale[:rows, :cols]


def _safetensors_files(path: Path) -> list[Path]:
    """The weight files of a directory: the index's shards, or every ``*.safetensors``."""
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index_path} is not a valid safetensors index (no weight_map); "
                            f"re-download it or delete it to read *.safetensors directly") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise UserError(f"{file.name} is listed in {index_path.name} but missing; download the missing shard")
        return files
    # The MTP draft vocabulary may sit beside the weights (edgemtp/draft_vocab.py); it is not one.
    files = sorted(p for p in path.glob("*.safetensors") if p.name != DRAFT_VOCAB_FILE)
    if files:
        return files
    refuse_pickles(path)
    raise UserError(f"{path} has no *.safetensors weights; pass a Hugging Face model directory")


def refuse_pickles(path: Path) -> None:
    """Raise the one-line refusal when ``path`` holds pickle weights (never unpickled)."""
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickles:
        raise UserError(f"{path} holds only pickle weights ({', '.join(pickles)}); edgemtp refuses to unpickle "
                        f"(it can run arbitrary code): convert them to safetensors first")


@lru_cache(maxsize=None)
def _entry_digest(entry: TensorEntry, mtime_ns: int) -> str:
    """The hash behind ``Checkpoint.digest``, read in chunks so that a multi-gigabyte tensor is never
    held in memory (``mtime_ns`` keys the cache to the file's current contents)."""
    digest = hashlib.blake2b(f"{entry.dtype}{entry.shape}".encode(), digest_size=16)
    with open(entry.file, "rb") as f:
        f.seek(entry.offset)
        left = entry.nbytes
        while left:
            chunk = f.read(min(left, 1 << 26))
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def memory_map(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory map (nothing is read until used)."""
    return {name: np.memmap(entry.file, dtype=NUMPY_DTYPES[entry.dtype], mode="r", offset=entry.offset,
                            shape=entry.shape)
            for name, entry in _read_header(file).items()}


def _read_header(file: Path) -> dict[str, TensorEntry]:
    """Tensor locations from a safetensors header; the file is checked by ``safe_open`` first."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="numpy"):
            pass  # safe_open checks the header and that the data covers the whole file
        with open(file, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{file} is truncated or corrupt ({exc}); re-download or re-convert it") from None
    data_start = 8 + header_size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in NUMPY_DTYPES:
            raise UserError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}; "
                            f"convert the checkpoint to bf16, fp16, fp32 or block FP8")
        entries[name] = TensorEntry(file, info["dtype"], tuple(info["shape"]), data_start + info["data_offsets"][0])
    return entries
