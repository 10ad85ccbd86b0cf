"""Read a llama.cpp GGUF file as if it were a Hugging Face checkpoint.

``GGUFCheckpoint`` offers the same interface as ``edgemtp.checkpoint.Checkpoint``
(``config``, ``names()``, ``shape()``, ``read()`` -> float32, ...), so every
converter works on GGUF files without knowing about them:

* the config is rebuilt in HF llama form from the GGUF metadata;
* tensor names are translated to HF names (``blk.3.attn_q.weight`` ->
  ``model.layers.3.self_attn.q_proj.weight``);
* quantized tensors are dequantized with the ``gguf`` package;
* llama.cpp stores Q and K projections with their rows permuted (it converts
  HF's "rotate half" RoPE layout to its interleaved one); ``read`` undoes that
  so the weights match the HF layout our backends expect.

``write_tokenizer(out_dir)`` turns the vocabulary embedded in the GGUF into
``tokenizer.json`` + ``tokenizer_config.json``.

Only the ``llama`` architecture is supported (that covers SmolLM2, the
default model); other GGUF architectures are refused with a UserError.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import numpy as np

from edgemtp.errors import UserError

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

# GGUF per-layer tensor name -> HF per-layer name (llama).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# llama.cpp pre-tokenizer names whose regex splits digits one at a time
# (llama-vocab.cpp groups these with "\p{N}" as the first split expression).
_DIGIT_SPLITTING_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}


def hf_name(gguf_name: str) -> str:
    """Translate a llama GGUF tensor name into the HF llama name."""
    match = _LAYER_RE.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    else:
        base, _, kind = gguf_name.rpartition(".")
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise UserError(f"GGUF tensor {gguf_name!r} has no llama equivalent; only plain llama GGUF files can be converted")


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py ``permute``).

    llama.cpp reorders each head's rows from ``[first half, second half]`` to
    interleaved pairs; this is the inverse.
    """
    rows = weight.shape[0]
    w = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (HF layout -> GGUF layout); used to write test GGUFs."""
    rows = weight.shape[0]
    w = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _shortest_float(value) -> float:
    """GGUF stores float32; print it back as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


class GGUFCheckpoint:
    """A GGUF file seen through the ``Checkpoint`` interface (HF names, float32 reads)."""

    is_fp8 = False
    num_mtp_layers = 0  # llama.cpp GGUFs carry no MTP layers

    def __init__(self, path: Path, reader) -> None:
        self.path = path
        self._reader = reader
        self._fields = reader.fields
        arch = self._str("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise UserError(
                f"{path}: GGUF architecture {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}); convert from the HF checkpoint instead"
            )
        if any(t.name == "rope_freqs.weight" for t in reader.tensors):
            raise UserError(
                f"{path}: this GGUF uses llama3-style scaled RoPE (rope_freqs), which cannot be mapped back to an HF config; "
                "convert from the HF checkpoint instead"
            )
        self._tensors = {hf_name(t.name): t for t in reader.tensors}

    @classmethod
    def open(cls, path: str | Path) -> "GGUFCheckpoint":
        from gguf import GGUFReader

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such GGUF file; check the path")
        try:
            reader = GGUFReader(path)
            # Touch every tensor's byte range now, so a truncated file fails here
            # (np.memmap would otherwise fail later, mid-conversion).
            end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
        except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on bad bytes
            raise UserError(f"{path}: not a readable GGUF file ({exc}); re-download it") from None
        if end > path.stat().st_size:
            raise UserError(f"{path}: GGUF file is truncated ({path.stat().st_size} of {end} bytes); re-download it")
        return cls(path, reader)

    # --- metadata ------------------------------------------------------------

    def _value(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def _str(self, key: str) -> str:
        value = self._value(key)
        if value is None:
            raise UserError(f"{self.path}: GGUF metadata key {key!r} is missing; the file is incomplete")
        return value

    def _arch(self, key: str, default=None):
        value = self._value(f"llama.{key}", default)
        if value is None:
            raise UserError(f"{self.path}: GGUF metadata key 'llama.{key}' is missing; the file is incomplete")
        return value

    @cached_property
    def config(self) -> dict:
        from edgemtp.config import with_both_rope_forms

        hidden = int(self._arch("embedding_length"))
        heads = int(self._arch("attention.head_count"))
        kv_heads = int(self._arch("attention.head_count_kv", heads))
        vocab = len(self._fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in self._fields else None
        vocab = int(self._arch("vocab_size", vocab))
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(self._arch("feed_forward_length")),
            "num_hidden_layers": int(self._arch("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": int(self._arch("rope.dimension_count", hidden // heads)),
            "max_position_embeddings": int(self._arch("context_length")),
            "rms_norm_eps": _shortest_float(self._arch("attention.layer_norm_rms_epsilon")),
            "rope_theta": _shortest_float(self._arch("rope.freq_base", 10000.0)),
            "hidden_act": "silu",
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "mlp_bias": False,
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "torch_dtype": "float32",
        }
        for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
            value = self._value(f"tokenizer.ggml.{gguf_key}")
            if value is not None:
                cfg[key] = int(value)
        return with_both_rope_forms(cfg)

    # --- tensors -------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._tensors)

    def trunk_names(self) -> list[str]:
        return self.names()

    def mtp_names(self, i: int) -> list[str]:
        raise UserError(f"{self.path}: GGUF files carry no MTP layers (asked for MTP layer {i})")

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; numpy/HF order is the reverse.
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def nbytes(self, name: str) -> int:
        """Bytes of the float32 tensor ``read`` returns."""
        return int(np.prod(self.shape(name))) * 4

    @property
    def affine_4bit_blocks(self) -> bool:
        """Whether some weights are stored as 4-bit blocks with a float minimum (Q4_1, Q4_K): a
        4-bit ONNX export keeps that form so the blocks are reproduced exactly (quantize.py)."""
        from gguf import GGMLQuantizationType

        affine = {GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K}
        return any(tensor.tensor_type in affine for tensor in self._tensors.values())

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise UserError(f"{self.path}: no tensor named {name!r} in this GGUF file") from None

    def read(self, name: str) -> np.ndarray:
        from gguf import quants

        tensor = self._tensor(name)
        weight = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        weight = weight.reshape(self.shape(name))
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rows(weight, self.config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rows(weight, self.config["num_key_value_heads"])
        return weight

    def validate(self) -> None:
        """Check that every tensor the config implies is present with the right shape."""
        from edgemtp.layout import expected_weights

        for name, shape in expected_weights(self.config).items():
            if name not in self._tensors:
                raise UserError(f"{self.path}: tensor {name!r} is missing from the GGUF file; re-download it")
            if self.shape(name) != shape:
                raise UserError(
                    f"{self.path}: tensor {name!r} has shape {self.shape(name)} but the metadata implies {shape}; "
                    "the file is inconsistent, re-download it"
                )

    # --- tokenizer -----------------------------------------------------------

    def write_tokenizer(self, out_dir: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` built from the GGUF vocabulary."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer, config = self._build_tokenizer()
        tokenizer.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def _build_tokenizer(self):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

        model = self._value("tokenizer.ggml.model")
        if model != "gpt2":
            raise UserError(
                f"{self.path}: GGUF tokenizer type {model!r} is not supported (only byte-level BPE, 'gpt2'); "
                "convert from the HF checkpoint instead"
            )
        tokens = self._value("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in self._value("tokenizer.ggml.merges", [])]
        token_types = self._value("tokenizer.ggml.token_type", [1] * len(tokens))

        tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if self._value("tokenizer.ggml.pre") in _DIGIT_SPLITTING_PRE:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tokenizer.pre_tokenizer = byte_level
        tokenizer.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, ...) must be matched whole and never split.
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == _TOKEN_CONTROL]
        )
        tokenizer.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, token_types) if kind == _TOKEN_USER_DEFINED]
        )

        def token(key: str) -> str | None:
            idx = self._value(f"tokenizer.ggml.{key}")
            return None if idx is None else tokens[int(idx)]

        bos, eos = token("bos_token_id"), token("eos_token_id")
        add_bos = bool(self._value("tokenizer.ggml.add_bos_token", False))
        if add_bos and bos is not None:
            bos_id = int(self._value("tokenizer.ggml.bos_token_id"))
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            )
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eos,
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
            "add_bos_token": add_bos,
            "model_max_length": int(self._arch("context_length")),
            "clean_up_tokenization_spaces": False,
        }
        template = self._value("tokenizer.chat_template")
        if template is not None:
            config["chat_template"] = template
        return tokenizer, {k: v for k, v in config.items() if v is not None}
