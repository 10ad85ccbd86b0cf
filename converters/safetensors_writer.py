"""Write a ``.safetensors`` file from tensors that arrive one at a time.

``edgemtp.safetensors_stream.write_safetensors`` needs every shape before the
first byte (the header comes first). A converter only learns an output shape
when it has produced the tensor (experts stacked, weights quantized), so this
writer appends each tensor's bytes to a side file as it comes, then writes the
header and copies the data behind it. Memory stays at one tensor plus a copy
buffer; the disk briefly holds the data twice.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from edgemtp.safetensors_stream import SAFETENSORS_DTYPES

_COPY_BUFFER = 64 << 20
# MLX packs quantized weights into uint32.
_DTYPE_TAGS = {**SAFETENSORS_DTYPES, np.dtype(np.uint32): "U32"}


class SafetensorsAppender:
    """``add(name, array)`` tensors in order, then ``close()`` to produce ``path``."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, dict] = {"__metadata__": metadata or {"format": "mlx"}}
        self._offset = 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._header[name] = {
            "dtype": _DTYPE_TAGS[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [self._offset, self._offset + array.nbytes],
        }
        self._data.write(memoryview(array).cast("B"))
        self._offset += array.nbytes

    def close(self) -> None:
        self._data.close()
        header = json.dumps(self._header, separators=(",", ":")).encode("utf-8")
        header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, _COPY_BUFFER)
        self._data_path.unlink()

    def __len__(self) -> int:
        return len(self._header) - 1
