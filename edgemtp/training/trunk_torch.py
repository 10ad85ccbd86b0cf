"""The frozen trunk in torch (transformers), built from our own checkpoint readers.

A trunk is either a llama.cpp GGUF file (read with ``GGUFCheckpoint``: dequantized,
Q/K permutation undone) or a Hugging Face checkpoint directory (read with
``Checkpoint``). Both expose ``config`` and ``read(name) -> float32``, so the
torch model is built the same way from either.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from edgemtp.errors import UserError


def open_reader(path: str | Path):
    """A ``Checkpoint``-like reader for a GGUF file or an HF checkpoint directory."""
    path = Path(path)
    if path.suffix == ".gguf":
        from edgemtp.converters.gguf_source import GGUFCheckpoint

        return GGUFCheckpoint.open(path)
    if path.is_dir():
        from edgemtp.checkpoint import Checkpoint

        return Checkpoint.open(path)
    raise UserError(f"{path}: not a .gguf file or a checkpoint directory; pass one of those as the trunk")


def transformers_config(config: dict):
    """The transformers config object for a checkpoint's ``config.json`` dict (SDPA attention)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    cfg = AutoConfig.for_model(config["model_type"], **fields)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_trunk(reader, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A frozen ``*ForCausalLM`` holding the reader's trunk weights (MTP layers are not part of it)."""
    from transformers import AutoModelForCausalLM

    config = transformers_config(reader.config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {name: torch.from_numpy(reader.read(name)).to(dtype) for name in reader.trunk_names()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) != expected_missing:
        raise UserError(
            f"{reader.path}: trunk weights do not match the config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); check the checkpoint"
        )
    model.requires_grad_(False)
    return model.to(device).eval()


def load_tokenizer(path: str | Path, reader):
    """A transformers fast tokenizer with the trunk's chat template (training only)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        reader.write_tokenizer(tmp)
        return AutoTokenizer.from_pretrained(tmp)
