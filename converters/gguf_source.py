"""Read a llama.cpp GGUF file as if it were a Hugging Face checkpoint.

``GGUFCheckpoint`` offers the same interface as ``edgemtp.checkpoint.Checkpoint``
(``config``, ``names()``, ``shape()``, ``read()`` -> float32, ...), so every
converter works on GGUF files without knowing about them. What differs per
llama.cpp architecture lives in one module each, which rebuilds the HF config from
the GGUF metadata, gives each tensor its HF name and shape, and undoes llama.cpp's
changes to the values:

* ``gguf_llama`` -- ``llama`` (SmolLM2, the default model; Q/K rows un-permuted);
* ``gguf_qwen35`` -- ``qwen35`` (Qwen3.5, dense), in Qwen3.5's released names, its MTP
  layer (``blk.{n_layer}.nextn.*``) included.

Quantized tensors are dequantized with the ``gguf`` package. Other GGUF architectures are
refused with a UserError.

``write_tokenizer(out_dir)`` turns the vocabulary embedded in the GGUF into
``tokenizer.json`` + ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from edgemtp.converters import gguf_llama, gguf_qwen35
from edgemtp.errors import UserError

LAYOUTS = {module.ARCHITECTURE: module for module in (gguf_llama, gguf_qwen35)}
SUPPORTED_GGUF_ARCHITECTURES = tuple(LAYOUTS)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# llama.cpp pre-tokenizer names whose regex splits digits one at a time
# (llama-vocab.cpp groups these with "\p{N}" as the first split expression).
_DIGIT_SPLITTING_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
# llama.cpp pre-tokenizer names with a split regex of their own: the regex of the models' tokenizer.json,
# as llama-vocab.cpp quotes it (Qwen3.5's also keeps combining marks, \p{M}, with their letters).
_SPLIT_REGEX_PRE = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _shortest_float(value) -> float:
    """GGUF stores float32; print it back as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


class GGUFCheckpoint:
    """A GGUF file seen through the ``Checkpoint`` interface (HF names, float32 reads)."""

    is_fp8 = False

    def __init__(self, path: Path, reader) -> None:
        self.path = path
        self._reader = reader
        self._fields = reader.fields
        self._arch_name = self._str("general.architecture")
        if self._arch_name not in LAYOUTS:
            raise UserError(
                f"{path}: GGUF architecture {self._arch_name!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}); convert from the HF checkpoint instead"
            )
        self._layout = LAYOUTS[self._arch_name]
        layers = self.config["num_hidden_layers"]
        self._tensors = {self._layout.hf_name(t.name, layers, path): t for t in reader.tensors}

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
        """``{architecture}.{key}`` from the metadata (floats as the decimals they were written from)."""
        value = self._value(f"{self._arch_name}.{key}", default)
        if value is None:
            raise UserError(f"{self.path}: GGUF metadata key '{self._arch_name}.{key}' is missing; the file is incomplete")
        return _shortest_float(value) if isinstance(value, float) else value

    @cached_property
    def config(self) -> dict:
        from edgemtp.config import with_both_rope_forms

        names = {tensor.name for tensor in self._reader.tensors}
        cfg = self._layout.config(self._arch, self.path, names)
        vocab = len(self._fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in self._fields else None
        cfg["vocab_size"] = int(self._arch("vocab_size", vocab))
        cfg["tie_word_embeddings"] = "output.weight" not in names
        cfg["torch_dtype"] = "float32"
        for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
            value = self._value(f"tokenizer.ggml.{gguf_key}")
            if value is not None:
                cfg[key] = int(value)
        return with_both_rope_forms(cfg)

    # --- tensors -------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._tensors)

    @property
    def num_mtp_layers(self) -> int:
        from edgemtp.config import num_mtp_layers

        return num_mtp_layers(self.config)

    def mtp_names(self, index: int) -> list[str]:
        from edgemtp.layout import mtp_prefix

        if index >= self.num_mtp_layers:
            raise UserError(f"{self.path}: this GGUF file has {self.num_mtp_layers} MTP layers (asked for layer {index})")
        prefix = mtp_prefix(self.config, index)
        return [name for name in self.names() if name.startswith(prefix)]

    def trunk_names(self) -> list[str]:
        mtp = {name for index in range(self.num_mtp_layers) for name in self.mtp_names(index)}
        return [name for name in self.names() if name not in mtp]

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; numpy/HF order is the reverse.
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._layout.hf_shape(name, self._stored_shape(name))

    def nbytes(self, name: str) -> int:
        """Bytes of the float32 tensor ``read`` returns."""
        return int(np.prod(self.shape(name))) * 4

    @property
    def stored_bytes(self) -> int:
        """Bytes of every tensor as the file stores it (quantized blocks included)."""
        return sum(int(tensor.n_bytes) for tensor in self._tensors.values())

    @property
    def storage(self) -> str:
        """The GGUF type that holds most of the bytes, e.g. ``"gguf Q8_0"``."""
        by_type: dict[str, int] = {}
        for tensor in self._tensors.values():
            by_type[tensor.tensor_type.name] = by_type.get(tensor.tensor_type.name, 0) + int(tensor.n_bytes)
        return f"gguf {max(by_type, key=by_type.get)}"

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
        return self._layout.to_hf(name, weight.reshape(self._stored_shape(name)), self.config)

    def validate(self) -> None:
        """Check that every tensor the config implies is present with the right shape."""
        from edgemtp.layout import expected_weights, is_optional

        for name, shape in expected_weights(self.config).items():
            if name not in self._tensors:
                if is_optional(name):
                    continue
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
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

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
        pre = self._value("tokenizer.ggml.pre")
        if pre in _SPLIT_REGEX_PRE:  # as those models' tokenizer.json: split by the regex, then bytes
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLIT_REGEX_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre in _DIGIT_SPLITTING_PRE:
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
