"""Qwen3.5 from llama.cpp GGUF files (``qwen35``), MTP layer included.

The GGUFs are written here from factory checkpoints the way llama.cpp's converter writes them
(``convert_hf_to_gguf.py``'s ``Qwen3NextModel``, ``_LinearAttentionVReorderBase`` and
``_Qwen35MtpMixin``, ggml-org/llama.cpp ``conversion/qwen.py`` at 03173d5e78f8), with the ``gguf``
package's own ``QWEN35`` tensor-name map, independently of the reader under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_gguf import add_tensor, add_vocab, finish, hf_weights
from test_qwen3_5 import SEQ_LEN, assert_trunk_and_mtp_match_transformers, token_ids

from edgemtp.converters.gguf_source import GGUFCheckpoint
from edgemtp.errors import UserError

F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0

# _Qwen35MtpMixin.filter_tensors: the MTP module's own tensors as block n's DeepSeek-style names.
_MTP_REMAP = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
              "norm": "shared_head.norm"}
# gguf-py's QWEN35 tensors for those names (blk.{bid}.nextn.*).
_NEXTN = {"eh_proj": gguf.MODEL_TENSOR.NEXTN_EH_PROJ, "enorm": gguf.MODEL_TENSOR.NEXTN_ENORM,
          "hnorm": gguf.MODEL_TENSOR.NEXTN_HNORM, "shared_head.norm": gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM}


def reorder_v_heads(tensor: np.ndarray, dim: int, num_k_heads: int, num_v_per_k: int, head_dim: int) -> np.ndarray:
    """llama.cpp's ``_reorder_v_heads``: value heads grouped by key head -> tiled."""
    shape = list(tensor.shape)
    tensor = tensor.reshape(*shape[:dim], num_k_heads, num_v_per_k, head_dim, *shape[dim + 1:])
    return np.swapaxes(tensor, dim, dim + 1).reshape(shape)


def llama_cpp_tensor(name: str, data: np.ndarray, text: dict) -> tuple[str, np.ndarray]:
    """One released tensor as llama.cpp's converter turns it (before the GGUF name lookup)."""
    k_heads, v_heads = text["linear_num_key_heads"], text["linear_num_value_heads"]
    k_dim, v_dim = text["linear_key_head_dim"], text["linear_value_head_dim"]
    n = text["num_hidden_layers"]
    # _Qwen35MtpMixin.filter_tensors
    if name.startswith("mtp."):
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[1] == "layers":
            name = f"model.layers.{n + int(parts[2])}.{parts[3]}"
        else:
            name = f"model.layers.{n}.{_MTP_REMAP[parts[1]]}.{parts[2]}"
    # _LinearAttentionVReorderBase.modify_tensors
    if k_heads != v_heads and "linear_attn." in name:
        per_k = v_heads // k_heads
        if ".in_proj_qkv." in name:
            qk = 2 * k_heads * k_dim
            data = np.concatenate([data[:qk], reorder_v_heads(data[qk:], 0, k_heads, per_k, v_dim)])
        elif ".in_proj_z." in name:
            data = reorder_v_heads(data, 0, k_heads, per_k, v_dim)
        elif ".in_proj_b." in name or ".in_proj_a." in name:
            data = reorder_v_heads(data, 0, k_heads, per_k, 1)
        elif ".A_log" in name or ".dt_bias" in name:
            data = reorder_v_heads(data[:, None], 0, k_heads, per_k, 1)[:, 0]
        elif ".conv1d" in name:
            data = data.squeeze()
            qk = 2 * k_heads * k_dim
            data = np.concatenate([data[:qk], reorder_v_heads(data[qk:], 0, k_heads, per_k, v_dim)])
        elif ".out_proj." in name:
            data = reorder_v_heads(data, 1, k_heads, per_k, v_dim)
    # Qwen3NextModel.modify_tensors
    if name.endswith(".A_log"):
        data = -np.exp(data)
    elif name.endswith(".dt_bias"):
        name = name.rpartition(".dt_bias")[0] + ".dt_proj.bias"
    elif "conv1d" in name:
        data = data.squeeze()
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        data = data + 1
    # Qwen2MoeModel.modify_tensors
    return name.replace("language_model.", ""), data


def write_qwen35_gguf(ckpt_dir: Path, path: Path, qtype=F32, mtp: bool = True) -> Path:
    """A factory qwen3_5 checkpoint as llama.cpp's ``qwen35`` GGUF (``mtp=False``: as ``--no-mtp`` writes it)."""
    text = json.loads((ckpt_dir / "config.json").read_text())["text_config"]
    mtp_layers = text["mtp_num_hidden_layers"] if mtp else 0
    blocks = text["num_hidden_layers"] + mtp_layers
    rope = text["rope_parameters"]
    writer = gguf.GGUFWriter(path, "qwen35")
    writer.add_block_count(blocks)
    writer.add_context_length(text["max_position_embeddings"])
    writer.add_embedding_length(text["hidden_size"])
    writer.add_feed_forward_length(text["intermediate_size"])
    writer.add_head_count(text["num_attention_heads"])
    writer.add_head_count_kv(text["num_key_value_heads"])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(text["rms_norm_eps"])
    writer.add_key_length(text["head_dim"])
    writer.add_value_length(text["head_dim"])
    writer.add_ssm_conv_kernel(text["linear_conv_kernel_dim"])
    writer.add_ssm_state_size(text["linear_key_head_dim"])
    writer.add_ssm_group_count(text["linear_num_key_heads"])
    writer.add_ssm_time_step_rank(text["linear_num_value_heads"])
    writer.add_ssm_inner_size(text["linear_value_head_dim"] * text["linear_num_value_heads"])
    writer.add_full_attention_interval(text["full_attention_interval"])
    writer.add_rope_dimension_count(int(text["head_dim"] * rope["partial_rotary_factor"]))
    writer.add_rope_dimension_sections(rope["mrope_section"] + [0])
    if mtp_layers:
        writer.add_nextn_predict_layers(mtp_layers)
    add_vocab(writer, ckpt_dir, pre="qwen35")

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, blocks)
    for released, data in hf_weights(ckpt_dir).items():
        if released.startswith("mtp.") and not mtp:
            continue
        name, data = llama_cpp_tensor(released, data, text)
        base, _, suffix = name.rpartition(".")
        part = base.split(".", 3)[-1]
        if part in _NEXTN:  # the installed gguf-py's QWEN35 map predates its nextn entries
            gguf_name = gguf.TENSOR_NAMES[_NEXTN[part]].format(bid=int(base.split(".")[2])) + "." + suffix
        else:
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        add_tensor(writer, gguf_name, np.ascontiguousarray(data), qtype)
    return finish(writer, path)


@pytest.fixture(scope="module")
def qwen35_gguf(tiny_checkpoint, tmp_path_factory):
    """``(HF checkpoint, its F32 GGUF)`` per variant, written once."""
    made = {}

    def make(variant: str) -> tuple[Path, Path]:
        if variant not in made:
            path = tiny_checkpoint(variant)
            made[variant] = path, write_qwen35_gguf(path, tmp_path_factory.mktemp(variant) / "model.gguf")
        return made[variant]

    return make


def test_f32_gguf_reads_back_the_released_checkpoint(qwen35_gguf):
    path, gguf_path = qwen35_gguf("qwen3_5")
    ckpt = GGUFCheckpoint.open(gguf_path)
    ckpt.validate()
    text = json.loads((path / "config.json").read_text())["text_config"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                "linear_value_head_dim", "linear_conv_kernel_dim", "full_attention_interval", "layer_types",
                "mtp_num_hidden_layers", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert ckpt.config[key] == text[key], key
    assert ckpt.config["model_type"] == "qwen3_5" and ckpt.num_mtp_layers == 1
    for key in ("rope_theta", "partial_rotary_factor"):
        assert ckpt.config["rope_parameters"][key] == text["rope_parameters"][key], key

    source = hf_weights(path)
    assert sorted(ckpt.names()) == sorted(source)
    assert sorted(ckpt.mtp_names(0)) == sorted(name for name in source if name.startswith("mtp."))
    for name, expected in source.items():
        assert ckpt.shape(name) == expected.shape, name
        # Norms come back from 1 + w and A_log from -exp(A_log): float32 rounding only.
        np.testing.assert_allclose(ckpt.read(name), expected, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("variant", ["qwen3_5", "qwen3_5_untied"])
def test_gguf_converts_to_mlx_with_its_mtp_layer(qwen35_gguf, tmp_path, variant):
    from edgemtp.converters.convert import convert
    from edgemtp.mlx_backend.backend import MLXBackend

    path, gguf_path = qwen35_gguf(variant)
    out = convert(gguf_path, tmp_path / "mlx", to="mlx", bits=16, dtype="float32", show_progress=False)
    assert (out / "mtp.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert_trunk_and_mtp_match_transformers(MLXBackend.load(out), path, token_ids(SEQ_LEN, seed=21))


def test_gguf_converts_to_onnx_with_its_mtp_layer(qwen35_gguf, tmp_path):
    from edgemtp.converters.convert import convert
    from edgemtp.onnx_backend.backend import OnnxBackend

    path, gguf_path = qwen35_gguf("qwen3_5_untied")
    out = convert(gguf_path, tmp_path / "onnx", to="onnx", bits=16, show_progress=False)
    assert (out / "tokenizer.json").is_file()
    assert_trunk_and_mtp_match_transformers(OnnxBackend(out, threads=1), path, token_ids(SEQ_LEN, seed=21))


def test_q8_0_gguf_reads_within_quantization_error(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen3_5")
    ckpt = GGUFCheckpoint.open(write_qwen35_gguf(path, tmp_path / "q8.gguf", Q8_0))
    ckpt.validate()
    quantized = 0
    for name, weight in hf_weights(path).items():
        got = ckpt.read(name)
        if weight.ndim != 2:  # norms, conv1d, A_log, dt_bias stay F32
            np.testing.assert_allclose(got, weight, rtol=1e-6, atol=1e-6, err_msg=name)
            continue
        # Each 32-value block of a stored row is scaled by its absolute maximum / 127; the value heads
        # of linear attention were reordered before quantizing, so the bound uses the largest block.
        step = np.abs(weight).max() / 127
        assert np.abs(got - weight).max() <= step * 1.01, name
        assert np.corrcoef(got.ravel(), weight.ravel())[0, 1] > 0.999, name
        quantized += 1
    assert quantized >= 20 and ckpt.storage == "gguf Q8_0"


def test_inspect_shows_the_gguf_mtp_layer(qwen35_gguf):
    from typer.testing import CliRunner

    from edgemtp.cli import app
    from edgemtp.summary import summarize

    path, gguf_path = qwen35_gguf("qwen3_5")
    ours, source = summarize(gguf_path), summarize(path)
    assert (ours.architecture, ours.num_layers, ours.num_mtp_layers) == ("qwen3_5", 4, 1)
    assert (ours.trunk_parameters, ours.mtp_parameters) == (source.trunk_parameters, source.mtp_parameters) > (0, 0)
    assert ours.mtp_from_trunk == source.mtp_from_trunk == [["embed_tokens", "shared_head.head"]]
    assert ours.storage == "gguf F32" and 0 < ours.weight_bytes < gguf_path.stat().st_size

    result = CliRunner().invoke(app, ["inspect", str(gguf_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "MTP layer 0" in result.output and "gguf F32" in result.output
    refused = CliRunner().invoke(app, ["inspect", str(gguf_path), "--ranks", "2"])  # main() prints UserErrors
    assert isinstance(refused.exception, UserError) and "edgemtp convert" in str(refused.exception)


def test_tokenizer_splits_text_as_qwen3_5s_tokenizer_json(qwen35_gguf, tmp_path):
    """llama.cpp's "qwen35" pre-tokenizer: single digits, contractions in any case, combining marks
    kept with their letters (GPT-2's regex, the fallback, splits all three differently)."""
    from tokenizers import Tokenizer, decoders

    _, gguf_path = qwen35_gguf("qwen3_5")
    GGUFCheckpoint.open(gguf_path).write_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str("It'S cafe\u0301 2024!\n")]
    texts = [decoders.ByteLevel().decode([piece]) for piece in pieces]
    assert texts == ["It", "'S", " cafe\u0301", " ", "2", "0", "2", "4", "!\n"]
    assert tokenizer.decode(tokenizer.encode("It'S cafe\u0301 2024!\n").ids) == "It'S cafe\u0301 2024!\n"


def test_gguf_without_its_mtp_layer_converts_the_trunk(tiny_checkpoint, tmp_path):
    """A file written with llama.cpp's ``--no-mtp`` (or by a converter that predates MTP)."""
    from edgemtp.converters.convert import convert

    path = tiny_checkpoint("qwen3_5")
    gguf_path = write_qwen35_gguf(path, tmp_path / "trunk.gguf", mtp=False)
    assert GGUFCheckpoint.open(gguf_path).num_mtp_layers == 0
    out = convert(gguf_path, tmp_path / "mlx", to="mlx", bits=16, dtype="float32", show_progress=False)
    assert not (out / "mtp.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["mtp_num_hidden_layers"] == 0
