"""Where the MLX modules' weights come from: Hugging Face checkpoints or MLX directories.

Hugging Face tensors are renamed to MLX parameter names and streamed one at a time.

Trunk names are exactly mlx-lm's (after its ``sanitize``), so a trunk saved
from ``iter_trunk_weights`` is an ordinary mlx-lm model. MTP names are
relative to ``MTPStack``: ``model.layers.{N+i}.X`` becomes ``layers.{i}.X``
for the MTP-only parts (``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head``) and ``layers.{i}.block.X`` for the decoder block. An MTP
layer's copies of the trunk's embedding or head (``edgemtp.mtp_copies``) are
not yielded: the layer uses the trunk's array, so it is stored and held once.

Both generators read the checkpoint lazily (FP8 is dequantized by
``Checkpoint.read``), so a converter can write tensors as they come without
holding the model in memory; the largest tensor held at once is one stacked
expert projection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from edgemtp.checkpoint import Checkpoint
from edgemtp.errors import UserError
from edgemtp.layout import mtp_prefix
from edgemtp.mlx_backend.models import ARCHITECTURES
from edgemtp.mtp_copies import own_mtp_names

_MTP_OWN_PARTS = ("embed_tokens.", "enorm.", "hnorm.", "eh_proj.", "shared_head.", "fuse_proj.")


def cast(name: str, array: mx.array, dtype: mx.Dtype) -> mx.array:
    """``array`` in the compute dtype, except what must keep its own type."""
    # Quantized weights are integers. The MoE routing bias stays float32, as
    # mlx-lm keeps it (its cast_predicate): it decides expert selection, where
    # bf16 rounding flips choices. Gated DeltaNet's A_log stays float32 too (mlx-lm's qwen3_5
    # cast_predicate): the state decays by exp(-exp(A_log) ...) at every position.
    if not mx.issubdtype(array.dtype, mx.floating) or "e_score_correction_bias" in name or name.endswith("A_log"):
        return array
    return array.astype(dtype)


def _materialized(name: str, array, dtype: mx.Dtype) -> mx.array:
    # Evaluated right away so the float32 copy read from the checkpoint is freed
    # before the next tensor: peak memory stays one tensor above the result.
    array = cast(name, mx.array(array), dtype)
    mx.eval(array)
    return array


def iter_trunk_weights(ckpt: Checkpoint, dtype: mx.Dtype = mx.float32,
                       keep: Callable[[str], bool] = lambda name: True,
                       cut: Callable[[str, np.ndarray], np.ndarray] | None = None) -> Iterator[tuple[str, mx.array]]:
    """Yield ``(mlx_lm_name, array)`` for every trunk parameter, one at a time, in ``dtype``.
    ``keep(name)`` picks the checkpoint tensors to read (a pipeline stage reads its own only);
    ``cut(name, array)`` takes this rank's part of a tensor before it is copied (tensor parallel)."""
    arch = ARCHITECTURES[ckpt.config["model_type"]]
    args = arch.model_args(ckpt.config)
    names = [name for name in ckpt.trunk_names() if keep(name)]
    if ckpt.config.get("tie_word_embeddings", False):
        names = [name for name in names if name != "lm_head.weight"]
    for name, array in arch.convert_weights(names, ckpt.read, args):
        yield name, _materialized(name, cut(name, array) if cut else array, dtype)


def iter_mtp_weights(ckpt: Checkpoint, dtype: mx.Dtype = mx.float32) -> Iterator[tuple[str, mx.array]]:
    """Yield ``(MTPStack name, array)`` for every MTP parameter, one at a time, in ``dtype``."""
    arch = ARCHITECTURES[ckpt.config["model_type"]]
    args = arch.model_args(ckpt.config)
    for index in range(ckpt.num_mtp_layers):
        prefix = mtp_prefix(ckpt.config, index)
        for name, array in arch.convert_weights(own_mtp_names(ckpt, index), ckpt.read, args):
            part = name.removeprefix(prefix)
            where = "" if part.startswith(_MTP_OWN_PARTS) else "block."
            yield f"layers.{index}.{where}{part}", _materialized(name, array, dtype)



# --- MLX model directories ---------------------------------------------------------
#
# An MLX directory is mlx-lm's format: config.json (with a ``quantization`` key when
# quantized), ``model*.safetensors`` holding the trunk under mlx-lm's names, plus our
# ``mtp.safetensors`` holding ``MTPStack`` names (mlx-lm ignores that file).

MTP_FILE = "mtp.safetensors"


def is_mlx_dir(path: Path, config: dict) -> bool:
    """Whether ``path`` holds an MLX directory rather than a Hugging Face checkpoint."""
    return "quantization" in config or (path / MTP_FILE).exists()


def read_mlx_dir(path: Path) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """``(trunk weights, MTP weights)`` of an MLX directory, by parameter name."""
    trunk: dict[str, mx.array] = {}
    for file in sorted(path.glob("model*.safetensors")):
        trunk.update(mx.load(str(file)))
    if not trunk:
        raise UserError(f"{path} has no model*.safetensors; re-run the MLX conversion")
    mtp = mx.load(str(path / MTP_FILE)) if (path / MTP_FILE).exists() else {}
    return trunk, mtp


def mtp_layer_count(mtp_weights: dict[str, mx.array]) -> int:
    """Number of MTP layers in ``mtp.safetensors`` (names start ``layers.{i}.``)."""
    return len({name.split(".")[1] for name in mtp_weights})


def quantize_like_saved(module: nn.Module, quantization: dict, weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers wherever the saved weights carry ``scales``.

    Bits and group size are read back from the saved shapes, as mlx-lm's loader
    does, so mixed-precision conversions load too.
    """

    def predicate(path: str, layer: nn.Module):
        if f"{path}.scales" not in weights or not hasattr(layer, "to_quantized"):
            return False
        in_dims = layer.weight.shape[-1]
        return {
            "group_size": in_dims // weights[f"{path}.scales"].shape[-1],
            "bits": weights[f"{path}.weight"].shape[-1] * 32 // in_dims,
            "mode": quantization.get("mode", "affine"),
        }

    nn.quantize(
        module,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )
