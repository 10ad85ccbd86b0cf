"""The numbers ``edgemtp inspect`` shows: size, storage format and memory needs of a model.

Kept apart from printing so the converters and the memory planner can reuse them.
Parameter counts come from the config (the logical model), byte counts from the files
(what is actually stored, quantization included). No tensor data is read.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgemtp.checkpoint import Checkpoint
from edgemtp.config import load_config, num_mtp_layers
from edgemtp.layout import attention_layers, expected_weights, mtp_prefix, recurrent_state_bytes
from edgemtp.mtp_copies import MTP_TRUNK_PARTS, parts_from_trunk, trunk_copy_bytes

KV_CACHE_TOKENS = 4096
KV_CACHE_ELEMENT_BYTES = 2  # caches are kept in 16-bit floats

_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3"}


@dataclass(frozen=True)
class ModelSummary:
    path: str
    architecture: str
    num_layers: int
    num_mtp_layers: int
    hidden_size: int
    vocab_size: int
    trunk_parameters: int
    mtp_parameters: int
    storage: str  # e.g. "bfloat16", "fp8 e4m3, 128x128 blocks", "mlx 4-bit, group 64", "onnx 8-bit symmetric, block 32"
    weight_bytes: int
    # Per MTP layer, the parts it takes from the trunk ("embed_tokens", "shared_head.head") instead
    # of having its own; a copy of them in the files (released layouts) is loaded once.
    mtp_from_trunk: list[list[str]]
    trunk_copy_bytes: int  # bytes of those copies in the files (HF checkpoints only)
    kv_cache_tokens: int
    kv_cache_bytes: int  # trunk + MTP layers, 16-bit, for kv_cache_tokens positions


def summarize(path: str | Path) -> ModelSummary:
    """Describe the model at ``path`` (HF, mlx-lm or edgemtp ONNX directory, or GGUF file) without
    loading its weights."""
    if _is_gguf(Path(path)):
        return _gguf_summary(Path(path))
    config = load_config(path)
    onnx_export = _onnx_export_summary(Path(path))
    copy_bytes = 0
    if onnx_export is not None:
        where, (storage, weight_bytes, from_trunk) = str(Path(path)), onnx_export
    else:
        from edgemtp.mlx_backend.weights import is_mlx_dir  # imports mlx: only for non-ONNX directories

        mlx_quantization = config.get("quantization")
        mlx_dir = is_mlx_dir(Path(path), config)
        # MLX directories store mlx-lm's names (and packed quantized weights), not the config's layout.
        checkpoint = Checkpoint.open(path, validate=not mlx_dir)
        where, storage, weight_bytes = str(checkpoint.path), _storage(checkpoint, mlx_quantization), checkpoint.total_bytes
        if mlx_dir:
            from_trunk = _mlx_dir_from_trunk(Path(path), num_mtp_layers(config))
        else:
            from_trunk = [parts_from_trunk(checkpoint, i) for i in range(num_mtp_layers(config))]
            copy_bytes = trunk_copy_bytes(checkpoint)
    return _summary(config, where, storage, weight_bytes, from_trunk, copy_bytes)


def _summary(config: dict, where: str, storage: str, weight_bytes: int, from_trunk: list[list[str]],
             copy_bytes: int) -> ModelSummary:
    trunk, mtp = parameter_counts(config, from_trunk)
    return ModelSummary(
        path=where,
        architecture=config["model_type"],
        num_layers=config["num_hidden_layers"],
        num_mtp_layers=num_mtp_layers(config),
        hidden_size=config["hidden_size"],
        vocab_size=config["vocab_size"],
        trunk_parameters=trunk,
        mtp_parameters=mtp,
        storage=storage,
        weight_bytes=weight_bytes,
        mtp_from_trunk=from_trunk,
        trunk_copy_bytes=copy_bytes,
        kv_cache_tokens=KV_CACHE_TOKENS,
        kv_cache_bytes=kv_cache_bytes(config, KV_CACHE_TOKENS),
    )


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def _gguf_summary(path: Path) -> ModelSummary:
    """A llama.cpp GGUF file, read through the converters' reader: its config rebuilt from the
    metadata, its bytes as stored (quantized blocks included), its MTP layers (``blk.{n}.nextn.*``)."""
    from edgemtp.converters.gguf_source import GGUFCheckpoint

    checkpoint = GGUFCheckpoint.open(path)
    checkpoint.validate()
    from_trunk = [parts_from_trunk(checkpoint, i) for i in range(checkpoint.num_mtp_layers)]
    return _summary(checkpoint.config, str(path), checkpoint.storage, checkpoint.stored_bytes, from_trunk,
                    trunk_copy_bytes(checkpoint))


def _onnx_export_summary(path: Path) -> tuple[str, int, list[list[str]]] | None:
    """Storage, file bytes and what each MTP graph takes from the trunk, of an edgemtp ONNX export;
    None for other directories."""
    from edgemtp.converters.onnx_export.manifest import is_onnx_export, read_manifest, weight_bytes

    if not is_onnx_export(path):
        return None
    manifest = read_manifest(path)
    return _onnx_storage(manifest), weight_bytes(path), [entry["from_trunk"] for entry in manifest["mtp"]]


def _onnx_storage(manifest: dict) -> str:
    """E.g. "onnx 4-bit asymmetric, block 32, heads 8-bit (MTP 8-bit symmetric, block 32)"."""

    def describe(quantization: dict) -> str:
        if quantization["method"] == "none":
            return manifest["dtype"]
        text = f"{quantization['bits']}-bit {quantization['scheme']}, block {quantization['block_size']}"
        if quantization["bits"] == 4:  # exports before --head-bits kept 4-bit graphs' heads at 8
            text += f", heads {quantization.get('head_bits', 8)}-bit"
        return text

    trunk = describe(manifest["quantization"]["trunk"])
    mtp = describe(manifest["quantization"]["mtp"]) if manifest["mtp"] else None
    return f"onnx {trunk}" + (f" (MTP {mtp})" if mtp and mtp != trunk else "")


def parameter_counts(config: dict, mtp_from_trunk: list[list[str]]) -> tuple[int, int]:
    """(trunk, MTP) parameter counts implied by the config; tied embeddings count once, and so do
    the parts an MTP layer takes from the trunk (``mtp_from_trunk``, per layer)."""
    shared = {mtp_prefix(config, i) + part + ".weight" for i, parts in enumerate(mtp_from_trunk) for part in parts}
    mtp_prefixes = tuple(mtp_prefix(config, i) for i in range(num_mtp_layers(config)))
    trunk = mtp = 0
    for name, shape in expected_weights(config).items():
        if name in shared:
            continue
        if mtp_prefixes and name.startswith(mtp_prefixes):
            mtp += math.prod(shape)
        else:
            trunk += math.prod(shape)
    return trunk, mtp


def _mlx_dir_from_trunk(path: Path, layers: int) -> list[list[str]]:
    """What each MTP layer of an MLX directory takes from the trunk: the parts mtp.safetensors lacks."""
    from safetensors import safe_open

    from edgemtp.mlx_backend.weights import MTP_FILE

    names = set()
    if (path / MTP_FILE).is_file():
        with safe_open(path / MTP_FILE, framework="numpy") as handle:
            names = set(handle.keys())
    return [[part for part in MTP_TRUNK_PARTS if f"layers.{i}.{part}.weight" not in names] for i in range(layers)]


def kv_cache_elements_per_token(config: dict) -> int:
    """Cached numbers per token per layer.

    DeepSeek-V3's MLA caches one compressed latent (``kv_lora_rank``) plus the shared
    RoPE key (``qk_rope_head_dim``); Llama caches a key and a value per KV head.
    """
    if config["model_type"] == "deepseek_v3":
        return config["kv_lora_rank"] + config["qk_rope_head_dim"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * kv_heads * head_dim


def kv_cache_bytes(config: dict, tokens: int, element_bytes: int = KV_CACHE_ELEMENT_BYTES) -> int:
    """Bytes of the trunk and MTP caches for ``tokens`` positions (and Qwen3.5's fixed-size states)."""
    layers = attention_layers(config) + num_mtp_layers(config)
    return tokens * layers * kv_cache_elements_per_token(config) * element_bytes + recurrent_state_bytes(config)


def _storage(checkpoint: Checkpoint, mlx_quantization: dict | None) -> str:
    if mlx_quantization:
        return f"mlx {mlx_quantization.get('bits')}-bit, group {mlx_quantization.get('group_size')}"
    if checkpoint.is_fp8:
        rows, cols = checkpoint.fp8_block
        return f"fp8 e4m3, {rows}x{cols} blocks"
    # Name the dtype that holds most of the bytes (routers and biases may differ).
    bytes_by_dtype = Counter()
    for name in checkpoint.names():
        bytes_by_dtype[checkpoint.dtype(name)] += checkpoint.nbytes(name)
    dtype = bytes_by_dtype.most_common(1)[0][0]
    return _DTYPE_NAMES.get(dtype, dtype.lower())
