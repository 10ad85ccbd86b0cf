"""Resolve a conversion source: an HF model directory, a ``.gguf`` file, or an HF repo id.

Every source comes back as an object with the ``edgemtp.checkpoint.Checkpoint``
interface (``config``, ``names()``, ``shape()``, ``read()``...), so the
exporters never care where the weights came from.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path

import numpy as np

from edgemtp.config import MTP_FUSION_KEY
from edgemtp.errors import UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Everything a conversion needs from a Hub repo; no pickles, no other formats.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def open_source(src: str | Path):
    """Open ``src`` as a validated checkpoint (directory, GGUF file or HF repo id)."""
    from edgemtp.checkpoint import Checkpoint
    from edgemtp.converters.gguf_source import GGUFCheckpoint

    path = Path(src)
    if path.is_dir():
        return Checkpoint.open(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf; pass a model directory, a .gguf file or a Hugging Face repo id")
        ckpt = GGUFCheckpoint.open(path)
        ckpt.validate()
        return ckpt
    if _REPO_ID.match(str(src)):
        return Checkpoint.open(download(str(src)))
    raise UserError(f"{src} does not exist; pass a model directory, a .gguf file or a Hugging Face repo id (owner/name)")


def download(repo_id: str) -> Path:
    """The local snapshot of ``repo_id`` (safetensors and configs only), fetched if not cached.

    Honours the Hugging Face cache and ``HF_HUB_OFFLINE``.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                            "unset HF_HUB_OFFLINE to download it, or pass a local directory") from None
        raise UserError(f"could not download {repo_id} (no network?) and it is not cached; "
                        "check your connection or pass a local directory") from None
    except RepositoryNotFoundError:
        raise UserError(f"Hugging Face repo {repo_id} was not found (or needs a login); check the id, "
                        "or run `huggingface-cli login` for gated models") from None


class WithMTPLayers:
    """A checkpoint plus MTP layers stored in a separate safetensors file.

    The file holds HF-named MTP weights (``model.layers.{N+i}.…``, the contract's
    MTP naming); the config gains ``num_nextn_predict_layers`` accordingly. This is
    how the trained MTP head ships next to the embedded default model's GGUF.
    """

    def __init__(self, base, mtp_file: Path):
        from safetensors import safe_open

        self.base = base
        self.path = base.path
        self.is_fp8 = False
        self._file = Path(mtp_file)
        try:
            with safe_open(self._file, framework="numpy") as f:
                self._metadata = f.metadata() or {}
                self._mtp_names = list(f.keys())
                self._shapes = {name: tuple(f.get_slice(name).get_shape()) for name in self._mtp_names}
        except Exception as exc:  # safetensors raises its own error types on bad files
            raise UserError(f"{self._file}: not a readable safetensors file ({exc}); re-install edgemtp") from None
        n = base.config["num_hidden_layers"]
        layers = {int(name.split(".")[2]) - n for name in self._mtp_names if name.startswith("model.layers.")}
        if not layers or layers != set(range(len(layers))):
            raise UserError(f"{self._file}: expected MTP weights named model.layers.{n}+i.*; re-create the file")
        self.num_mtp_layers = len(layers)

    @cached_property
    def config(self) -> dict:
        config = {**self.base.config, "num_nextn_predict_layers": self.num_mtp_layers}
        if MTP_FUSION_KEY in self._metadata:  # a fusion head (train-mtp --fusion-layers)
            config[MTP_FUSION_KEY] = json.loads(self._metadata[MTP_FUSION_KEY])
        return config

    @property
    def affine_4bit_blocks(self) -> bool:
        return self.base.affine_4bit_blocks

    def names(self) -> list[str]:
        return self.base.names() + self._mtp_names

    def trunk_names(self) -> list[str]:
        return self.base.trunk_names()

    def mtp_names(self, index: int) -> list[str]:
        prefix = f"model.layers.{self.base.config['num_hidden_layers'] + index}."
        return [name for name in self._mtp_names if name.startswith(prefix)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name] if name in self._shapes else self.base.shape(name)

    def nbytes(self, name: str) -> int:
        return 4 * int(np.prod(self.shape(name)))

    def read(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            return self.base.read(name)
        from safetensors import safe_open

        with safe_open(self._file, framework="numpy") as f:
            return f.get_tensor(name).astype(np.float32)

    def digest(self, name: str) -> str:
        """A hash of the tensor's float32 values (the MTP file and the base store different dtypes)."""
        return hashlib.blake2b(self.read(name).tobytes(), digest_size=16).hexdigest()

    def validate(self) -> None:
        from edgemtp.layout import expected_weights, is_optional

        for name, shape in expected_weights(self.config).items():
            if name in self._shapes and self._shapes[name] != shape:
                raise UserError(f"{self._file}: {name} has shape {list(self._shapes[name])}, the model needs "
                                f"{list(shape)}; the MTP weights belong to another model")
        missing = [name for index in range(self.num_mtp_layers) for name in expected_weights(self.config)
                   if name.startswith(f"model.layers.{self.base.config['num_hidden_layers'] + index}.")
                   and name not in self._shapes and not is_optional(name)]
        if missing:
            raise UserError(f"{self._file}: MTP weight {missing[0]} is missing; re-create the file")

    def write_tokenizer(self, out_dir) -> None:
        from edgemtp.converters.mlx_export import copy_tokenizer

        copy_tokenizer(self.base, Path(out_dir))
