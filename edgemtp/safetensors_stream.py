"""Write ``.safetensors`` files tensor by tensor, chunk by chunk.

``safetensors.numpy.save_file`` needs every tensor in memory at once; a multi-gigabyte
checkpoint must not. The format is simple enough to stream: an 8-byte little-endian header
length, a JSON header with each tensor's dtype, shape and byte range, then the raw
little-endian bytes in header order. We compute the header from the shapes up front and then
let each tensor produce its bytes in row chunks.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

# numpy dtype -> safetensors dtype tag
SAFETENSORS_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint8): "U8",
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its bytes come from ``chunks()``, row blocks in order, already in ``dtype``."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(path: Path, tensors: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
    """Stream ``tensors`` into ``path``; peak memory is one chunk, not the file."""
    header: dict[str, dict] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in tensors:
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[np.dtype(spec.dtype)],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8 bytes

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in tensors:
            written = 0
            for chunk in spec.chunks():
                data = np.ascontiguousarray(chunk.astype(spec.dtype, copy=False))
                f.write(data.tobytes())
                written += data.nbytes
            if written != spec.nbytes:
                raise ValueError(f"{spec.name}: produced {written} bytes, expected {spec.nbytes}")
