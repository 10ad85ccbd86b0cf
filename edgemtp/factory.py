"""Tiny (or not so tiny) random checkpoints in exact Hugging Face layout, for tests and benchmarks.

``make_tiny`` writes a complete model directory: ``config.json`` (both RoPE forms),
safetensors weights (one file, or shards plus ``model.safetensors.index.json``), and a
byte-level BPE tokenizer with a ChatML chat template so string prompts work end to end.
Only numpy, ml_dtypes, safetensors' file format and ``tokenizers`` are used: no torch.

Weights are generated and written one row chunk at a time, so a multi-gigabyte model needs
memory for one chunk only. Every tensor draws from its own random stream seeded by
``(seed, name, chunk)``, so values do not depend on sharding or write order.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import zlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import ml_dtypes
import numpy as np

from edgemtp.config import is_qwen3_5, with_both_rope_forms
from edgemtp.errors import UserError
from edgemtp.layout import expected_weights, is_fp8_quantized, is_mtp_embedding, is_zero_centred_norm, layer_types
from edgemtp.mtp_copies import trunk_head_name
from edgemtp.safetensors_stream import TensorSpec, write_safetensors

# All input dimensions are multiples of 64 so the models also quantize with MLX's group
# sizes; the default FP8 block (48) then leaves partial edge blocks everywhere.
_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
}

_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 512,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "tie_word_embeddings": False,
    "attention_bias": False,
}

# Qwen2.5-0.5B in miniature (also the shape of DeepSeek-R1-Distill-Qwen): llama's block with
# q/k/v biases (always on in Qwen2, no config key) and no o_proj bias, tied embeddings.
# Only keys Qwen2Config reads; sliding-window attention off as in every released Qwen2.5.
_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
}

# Qwen3-0.6B in miniature: per-head RMSNorm on queries and keys (q_norm, k_norm), no biases, and
# an explicit head_dim twice hidden_size / num_attention_heads (Qwen3-0.6B: 128 against 64).
_QWEN3 = {
    **{key: value for key, value in _QWEN2.items() if key not in ("architectures", "model_type")},
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "head_dim": 32,
    "attention_bias": False,
}

# GLM-4.5's shape at toy size. head_dim is explicit (heads * head_dim != hidden_size, as in the
# release) and 32 so that the rotated half (16) gives cos/sin tables of width 8, the smallest
# onnxruntime's GroupQueryAttention rotates partially.
_GLM4_MOE = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "use_qk_norm": True,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
}

# Qwen3.5-0.8B's text model in miniature, in the released (vision-language) config: three Gated
# DeltaNet layers then one gated full-attention layer (layer_types follows num_hidden_layers, every
# full_attention_interval-th layer full), QK norm, a quarter of head_dim rotated, tied embeddings as
# in 0.8B and 2B, one MTP layer under mtp.*. make_tiny nests these keys in text_config.
_QWEN3_5 = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "full_attention_interval": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mtp_use_dedicated_embeddings": False,
}

# Qwen3.5 MoE in miniature (Qwen3_5MoeForConditionalGeneration): the same hybrid trunk with a routed MLP in every layer,
# the MTP layer's included (a router, stacked experts, a gated shared expert), and no dense MLP.
_QWEN3_5_MOE = {
    **{key: value for key, value in _QWEN3_5.items() if key != "intermediate_size"},
    "architectures": ["Qwen3_5MoeForConditionalGeneration"],
    "model_type": "qwen3_5_moe",
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "tie_word_embeddings": False,
}

# Named variants: a base config plus the features a test wants to exercise.
VARIANTS: dict[str, dict] = {
    "llama": _LLAMA,  # GQA (4 query heads, 2 KV heads), tied embeddings
    "llama_untied": {**_LLAMA, "tie_word_embeddings": False},
    "deepseek_v3": _DEEPSEEK_V3,  # MLA with q_lora_rank, grouped MoE, shared expert, YaRN
    "deepseek_v3_no_qlora": {**_DEEPSEEK_V3, "q_lora_rank": None},
    "qwen2": _QWEN2,
    "qwen3": _QWEN3,
    "glm4_moe": _GLM4_MOE,  # GQA, partial RoPE, q/k/v biases, QK norm, grouped MoE, shared expert
    "glm4_moe_no_qk_norm": {**_GLM4_MOE, "use_qk_norm": False},  # GLM-4.5's released setting
    "qwen3_5": _QWEN3_5,  # Gated DeltaNet + gated attention, partial RoPE, QK norm, tied embeddings
    "qwen3_5_untied": {**_QWEN3_5, "tie_word_embeddings": False},  # as Qwen3.5-9B
    "qwen3_5_moe": _QWEN3_5_MOE,  # Qwen3.5's trunk with routed experts and a shared expert in every layer
}

# Config keys that may be overridden although the base configs leave them out.
# mtp_fusion_layers: a fusion head (layer 0 gets fuse_proj; ARCHITECTURE.md, "The MTP convention").
_EXTRA_OVERRIDES = {"head_dim", "bos_token_id", "mtp_fusion_layers"}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
_CHUNK_ELEMENTS = 1 << 22  # ~16 MB of float32 per generated chunk
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
MTP_HEADS = ("own", "copy")


def make_tiny(
    out_dir: str | Path,
    arch: str = "llama",
    mtp_layers: int = 1,
    fp8: bool = False,
    seed: int = 0,
    *,
    dtype: str = "float32",
    fp8_block: int = 48,
    shard_bytes: int | None = None,
    confident: bool = False,
    mtp_head: str = "own",
    force: bool = False,
    **overrides,
) -> Path:
    """Write a random checkpoint of variant ``arch`` (a key of ``VARIANTS``) to ``out_dir``.

    ``overrides`` replace config.json keys (``hidden_size``, ``num_hidden_layers``,
    ``vocab_size``, ``n_routed_experts``, ...). ``fp8`` stores projections as float8 e4m3
    with ``fp8_block``-sized scale blocks like DeepSeek-V3. ``shard_bytes`` splits the
    weights into several files. ``confident`` shapes the random weights so that next-token
    predictions have clear margins like a trained LM's (see ``_confident_rows``); fidelity
    tests need it because plain random weights predict near-uniformly. The directory
    appears only when complete.

    MTP layers are written in the released DeepSeek-V3 / GLM-4.5 layout: each stores a copy of
    the trunk's embedding as ``embed_tokens`` and a ``shared_head.head``, which ``mtp_head``
    makes the layer's own random head ("own") or a copy of the trunk's output head ("copy").
    """
    config = tiny_config(arch, mtp_layers, **overrides)
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    if mtp_head not in MTP_HEADS:
        raise UserError(f"unknown MTP head {mtp_head!r}; choose one of {', '.join(MTP_HEADS)}")
    tokenizer = _trained_tokenizer(config["vocab_size"])
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    config.update(eos_token_id=eos_id, bos_token_id=config.get("bos_token_id"), torch_dtype=dtype)
    if fp8:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [fp8_block, fp8_block],
        }

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already exists and is not empty; choose another path or pass --force")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    tensors = _tensor_specs(config, seed, _DTYPES[dtype], fp8_block if fp8 else None, confident, mtp_head)
    _write_weights(partial, tensors, shard_bytes)
    (partial / "config.json").write_text(json.dumps(_released_config(config), indent=2) + "\n")
    (partial / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}, indent=2) + "\n")
    tokenizer.save(str(partial / "tokenizer.json"))
    (partial / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n")

    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def tiny_config(arch: str = "llama", mtp_layers: int = 1, **overrides) -> dict:
    """The config.json ``make_tiny`` writes for a variant (without tokenizer ids)."""
    if arch not in VARIANTS:
        raise UserError(f"unknown tiny-model variant {arch!r}; choose one of {', '.join(VARIANTS)}")
    base = copy.deepcopy(VARIANTS[arch])
    unknown = set(overrides) - set(base) - _EXTRA_OVERRIDES
    if unknown:
        raise UserError(f"unknown config override(s) {', '.join(sorted(unknown))} for {arch}; "
                        f"choose among {', '.join(sorted(set(base) | _EXTRA_OVERRIDES))}")
    if mtp_layers < 0:
        raise UserError(f"mtp_layers must be >= 0, got {mtp_layers}")
    base.update(overrides)
    if is_qwen3_5(base):
        if mtp_layers > 1:
            raise UserError("qwen3_5 checkpoints carry one MTP layer, as released; pass mtp_layers 0 or 1")
        base["layer_types"] = layer_types(base)
        base["mtp_num_hidden_layers"] = mtp_layers
    else:
        base["num_nextn_predict_layers"] = mtp_layers
    if base["vocab_size"] < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size {base['vocab_size']} is too small for a byte-level tokenizer; use at least "
                        f"{256 + len(SPECIAL_TOKENS)}")
    return with_both_rope_forms(base)


def _released_config(config: dict) -> dict:
    """The config.json as the family releases it: Qwen3.5's text keys nested in ``text_config``
    under a vision-language top level (no vision tower is written); other families flat."""
    if not is_qwen3_5(config):
        return config
    outer = ("architectures", "model_type", "quantization_config")
    text = {key: value for key, value in config.items() if key not in outer}
    top = {key: config[key] for key in outer if key in config}
    return {**top, "tie_word_embeddings": config["tie_word_embeddings"], "torch_dtype": config["torch_dtype"],
            "text_config": {**text, "model_type": config["model_type"] + "_text"}}


# --- weights ----------------------------------------------------------------


def _tensor_specs(config: dict, seed: int, dtype, fp8_block: int | None, confident: bool,
                  mtp_head: str) -> list[TensorSpec]:
    """One spec per stored tensor (FP8 weights are followed by their scale grid)."""
    specs = []
    for stored, shape in expected_weights(config).items():
        # A copy of a trunk tensor is generated under the trunk tensor's name: same values, same bytes.
        name = _copied_from(stored, config, mtp_head)
        if fp8_block and is_fp8_quantized(name):
            grid = (math.ceil(shape[0] / fp8_block), math.ceil(shape[1] / fp8_block))
            specs.append(TensorSpec(stored, np.dtype(ml_dtypes.float8_e4m3fn), shape,
                                    _fp8_chunks(name, shape, seed, fp8_block, confident, scales=False)))
            specs.append(TensorSpec(stored + "_scale_inv", np.dtype(np.float32), grid,
                                    _fp8_chunks(name, shape, seed, fp8_block, confident, scales=True)))
        else:
            # The router's correction bias stays float32, as in DeepSeek-V3.
            tensor_dtype = np.float32 if name.endswith("e_score_correction_bias") else dtype
            chunks = _value_chunks(name, shape, seed, confident)
            if is_zero_centred_norm(config["model_type"], name):
                chunks = _shifted(chunks, -1.0)  # stored as w for a scale of 1 + w
            specs.append(TensorSpec(stored, np.dtype(tensor_dtype), shape, chunks))
    return specs


def _copied_from(name: str, config: dict, mtp_head: str) -> str:
    """The trunk tensor whose copy ``name`` is in a released-layout MTP layer, else ``name``."""
    if is_mtp_embedding(name):
        return "model.embed_tokens.weight"
    if mtp_head == "copy" and name.endswith(".shared_head.head.weight"):
        return trunk_head_name(config)
    return name


def _row_chunks(shape: tuple[int, ...], multiple: int = 1) -> Iterator[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of about ``_CHUNK_ELEMENTS`` elements, sized in ``multiple``s."""
    row_size = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    rows = max(multiple, (_CHUNK_ELEMENTS // max(row_size, 1)) // multiple * multiple)
    for start in range(0, shape[0], rows):
        yield start, min(start + rows, shape[0])


def _random_rows(name: str, shape: tuple[int, ...], seed: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the float32 initial value of weight ``name``.

    Scales keep activations O(1) so tiny models give varied, finite logits: matrices
    ~N(0, 1/fan_in), norm weights ~1 with noise, a random MoE correction bias so routing
    is not decided by ties.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), start])
    values = rng.standard_normal((stop - start, *shape[1:]), dtype=np.float32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * values
    if name.endswith("e_score_correction_bias"):
        return 0.2 * values
    if len(shape) == 1:  # biases
        return 0.02 * values
    return values / np.float32(math.sqrt(shape[-1]))


# ``confident``: residual branches (attention and MLP outputs) are scaled by this factor.
_CONFIDENT_RESIDUAL_SCALE = 0.1


def _initial_rows(name: str, shape: tuple[int, ...], seed: int, start: int, stop: int, confident: bool) -> np.ndarray:
    return _confident_rows(name, shape, seed, start, stop) if confident else _random_rows(name, shape, seed, start, stop)


def _confident_rows(name: str, shape: tuple[int, ...], seed: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of weight ``name`` in a random model that predicts with confidence.

    A trained LM's final hidden state points at the output embedding of the token it
    predicts, so the top logit stands well clear of the rest; random weights instead give
    near-uniform predictions (median top-1 margin ~0.2 logits) whose argmax flips under any
    rounding, which makes top-1 agreement meaningless. (Scaling the logits would not help:
    the argmax and the relative rounding error are scale-invariant.) Here:

    * every output head (``lm_head``, ``shared_head.head``) equals the token embedding, so the
      token in the residual stream scores far above the others;
    * residual branches (``o_proj``, ``down_proj``, experts included) are scaled down so the
      embedding stays visible in the final hidden state while every layer still moves the
      logits and often changes the prediction;
    * the MTP ``eh_proj`` adds an identity on its embedding half, so MTP layers are
      confident about their input token in the same way.
    """
    if name.endswith(("lm_head.weight", "shared_head.head.weight")):
        return _embedding_rows(shape, seed, start, stop)
    rows = _random_rows(name, shape, seed, start, stop)
    if name.endswith(("o_proj.weight", "down_proj.weight", "linear_attn.out_proj.weight")):
        return rows * np.float32(_CONFIDENT_RESIDUAL_SCALE)
    if name.endswith(("eh_proj.weight", "mtp.fc.weight")):
        index = np.arange(start, stop)
        rows[index - start, index] += 1.0
    return rows


def _embedding_rows(shape: tuple[int, ...], seed: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``model.embed_tokens.weight`` exactly as written (its own chunking)."""
    name = "model.embed_tokens.weight"
    pieces = [_random_rows(name, shape, seed, a, b)[max(start, a) - a : min(stop, b) - a]
              for a, b in _row_chunks(shape) if a < stop and b > start]
    return np.concatenate(pieces)


def _value_chunks(name: str, shape: tuple[int, ...], seed: int, confident: bool):
    def chunks() -> Iterator[np.ndarray]:
        for start, stop in _row_chunks(shape):
            yield _initial_rows(name, shape, seed, start, stop, confident)
    return chunks


def _shifted(chunks, offset: float):
    def shifted() -> Iterator[np.ndarray]:
        for chunk in chunks():
            yield chunk + np.float32(offset)
    return shifted


def _fp8_chunks(name: str, shape: tuple[int, ...], seed: int, block: int, confident: bool, scales: bool):
    """Chunks of either the float8 weight or its ``weight_scale_inv`` grid (recomputed, not stored)."""
    def chunks() -> Iterator[np.ndarray]:
        for start, stop in _row_chunks(shape, multiple=block):
            quantized, scale_inv = quantize_fp8_blocks(_initial_rows(name, shape, seed, start, stop, confident), block)
            yield scale_inv if scales else quantized
    return chunks


def quantize_fp8_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3 style block FP8: ``weight ~= q * scale_inv`` per ``block x block`` tile.

    Edge tiles may be partial. Returns (q as float8_e4m3fn, scale_inv float32 grid).
    """
    rows, cols = weight.shape
    grid_rows, grid_cols = math.ceil(rows / block), math.ceil(cols / block)
    padded = np.zeros((grid_rows * block, grid_cols * block), np.float32)
    padded[:rows, :cols] = weight
    tiles = padded.reshape(grid_rows, block, grid_cols, block)
    amax = np.abs(tiles).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, amax / _FP8_MAX, 1.0).astype(np.float32)
    scaled = tiles / scale_inv[:, None, :, None]
    quantized = scaled.reshape(padded.shape)[:rows, :cols].astype(ml_dtypes.float8_e4m3fn)
    return quantized, scale_inv


def _write_weights(out: Path, tensors: list[TensorSpec], shard_bytes: int | None) -> None:
    if not shard_bytes:
        write_safetensors(out / "model.safetensors", tensors)
        return
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in tensors:
        # A scale grid stays in the shard of its weight (it follows it in the list).
        starts_new = shards[-1] and size + spec.nbytes > shard_bytes and not spec.name.endswith("_scale_inv")
        if starts_new:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / filename, shard)
        weight_map.update({spec.name: filename for spec in shard})
    index = {"metadata": {"total_size": sum(spec.nbytes for spec in tensors)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- tokenizer --------------------------------------------------------------


@lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (Path(__file__).parent / "tiny_corpus.txt").read_text(encoding="utf-8")
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    return tokenizer.to_str()


def _trained_tokenizer(vocab_size: int):
    """A byte-level BPE with at most ``vocab_size`` tokens (fewer if the corpus runs out of merges)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json(vocab_size))


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }
