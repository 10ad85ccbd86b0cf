"""Checkpoints written as DeepSeek-V3, Kimi-K2 and GLM-4.5 release them: every MTP layer stores a copy
of the trunk's embedding and a ``shared_head.head``. Copies equal to the trunk's tensors are stored
and held once; the inspector and the planner say so. Also: what else a released checkpoint brings
(tokenizer files, ``--bits 16``) and what it may lack (a tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from mlx.utils import tree_flatten
from safetensors import safe_open

import edgemtp
from edgemtp.checkpoint import Checkpoint
from edgemtp.converters.convert import convert
from edgemtp.errors import UserError
from edgemtp.mlx_backend.backend import MLXBackend
from edgemtp.mtp_copies import trunk_copies
from edgemtp.planner import weight_files


def stored_bytes(ckpt: Checkpoint, name: str) -> bytes:
    return ckpt.read_raw(name).tobytes()


@pytest.mark.parametrize("variant", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("mtp_head", ["own", "copy"])
def test_factory_writes_the_released_layout(tiny_checkpoint, variant, mtp_head):
    ckpt = Checkpoint.open(tiny_checkpoint(variant, mtp_layers=2, mtp_head=mtp_head, dtype="bfloat16"))
    trunk_head = "model.embed_tokens.weight" if ckpt.config.get("tie_word_embeddings") else "lm_head.weight"
    for index in range(2):
        prefix = f"model.layers.{ckpt.config['num_hidden_layers'] + index}."
        assert stored_bytes(ckpt, prefix + "embed_tokens.weight") == stored_bytes(ckpt, "model.embed_tokens.weight")
        head_is_copy = stored_bytes(ckpt, prefix + "shared_head.head.weight") == stored_bytes(ckpt, trunk_head)
        assert head_is_copy == (mtp_head == "copy")
        expected = {prefix + "embed_tokens.weight": "model.embed_tokens.weight"}
        if mtp_head == "copy":
            expected[prefix + "shared_head.head.weight"] = trunk_head
        assert trunk_copies(ckpt, index) == expected


def test_a_copy_that_differs_is_the_layers_own(tiny_checkpoint, tmp_path):
    """Identity is decided by the bytes, not the name: one changed value makes the copy the layer's own."""
    path = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("deepseek_v3", mtp_head="copy"), path)
    ckpt = Checkpoint.open(path)
    name = "model.layers.2.embed_tokens.weight"
    entry = ckpt._entries[name]
    with open(entry.file, "r+b") as f:  # flip one stored float32 in place
        f.seek(entry.offset + 4 * 1000)
        value = np.frombuffer(f.read(4), np.float32)[0]
        f.seek(entry.offset + 4 * 1000)
        f.write(np.float32(value + 1.0).tobytes())
    assert trunk_copies(Checkpoint.open(path), 0) == {"model.layers.2.shared_head.head.weight": "lm_head.weight"}


@pytest.mark.parametrize("variant", ["llama_untied", "deepseek_v3"])
def test_copies_are_stored_and_held_once(tiny_checkpoint, tmp_path, variant):
    path = tiny_checkpoint(variant, mtp_layers=2, mtp_head="copy")
    ckpt = Checkpoint.open(path)
    copy_bytes = sum(ckpt.nbytes(name) for i in range(2) for name in trunk_copies(ckpt, i))
    assert copy_bytes == 2 * 2 * ckpt.nbytes("model.embed_tokens.weight")

    # MLX: no MTP parameter holds a copy; the MTP layers use the trunk's arrays.
    backend = MLXBackend.from_checkpoint(path, max_kv_size=64)
    names = [name for name, _ in tree_flatten(backend.mtp.parameters())]
    assert not [name for name in names if "embed_tokens" in name or "shared_head.head" in name]

    # The MLX conversion writes them nowhere; inspect and the planner count them once.
    out = convert(path, tmp_path / "mlx", to="mlx", bits=16, show_progress=False)
    with safe_open(out / "mtp.safetensors", framework="numpy") as handle:
        assert not [name for name in handle.keys() if "embed_tokens" in name or "shared_head.head" in name]
    summary = json.loads(run_cli("inspect", path, "--json").stdout)
    assert summary["mtp_from_trunk"] == [["embed_tokens", "shared_head.head"]] * 2
    assert summary["trunk_copy_bytes"] == copy_bytes
    file_bytes = sum(file.stat().st_size for file in path.glob("*.safetensors"))
    assert weight_files(path, ckpt.config).total == file_bytes - copy_bytes
    onnx_dir = convert(path, tmp_path / "onnx", to="onnx", bits=8, show_progress=False)
    for converted in (out, onnx_dir):
        assert json.loads(run_cli("inspect", converted, "--json").stdout)["mtp_from_trunk"] == summary["mtp_from_trunk"]
    # ONNX: the trunk and MTP graphs take the embedding from one file instead of each holding it.
    assert_embedding_shared(onnx_dir, [True, True])

    table = run_cli("inspect", path).stdout
    assert "from the trunk: embed_tokens, shared_head.head" in table and "loaded once" in table


def test_inspect_shows_an_own_head(tiny_checkpoint):
    summary = json.loads(run_cli("inspect", tiny_checkpoint("deepseek_v3", mtp_head="own"), "--json").stdout)
    assert summary["mtp_from_trunk"] == [["embed_tokens"]]
    assert "own: decoder block, eh_proj, norms, shared_head.head" in run_cli(
        "inspect", tiny_checkpoint("deepseek_v3", mtp_head="own")).stdout


def test_bits_16_means_full_precision_for_the_mtp_layers_too(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")
    result = run_cli("convert", path, tmp_path / "mlx", "--to", "mlx", "--bits", "16")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert "quantization" not in config and "mtp_quantization" not in config
    with safe_open(tmp_path / "mlx" / "mtp.safetensors", framework="numpy") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {np.dtype(np.float32)}  # the source's dtype
    assert run_cli("convert", path, tmp_path / "onnx", "--to", "onnx", "--bits", "16").returncode == 0
    assert json.loads((tmp_path / "onnx" / "manifest.json").read_text())["quantization"]["mtp"] == {"method": "none"}
    assert "Default: 16 with --bits 16" in " ".join(run_cli("convert", "--help").stdout.split())


@pytest.mark.parametrize("to", ["mlx", "onnx"])
def test_every_tokenizer_file_is_carried(tiny_checkpoint, tmp_path, to):
    """transformers 5 keeps the chat template in chat_template.jinja: a conversion must keep it."""
    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint("llama"), source)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "chat_template.jinja").write_text(tokenizer_config.pop("chat_template"))
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (source / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))

    out = convert(source, tmp_path / to, to=to, show_progress=False)
    for name in ("chat_template.jinja", "special_tokens_map.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    model = edgemtp.load(out, backend=to, max_kv_size=128)
    expected = model.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert model._session.prompt_ids("hi", chat=True) == expected
    assert model.generate("hi", max_tokens=4, spec="none").tokens


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_token_ids_need_no_tokenizer(tiny_checkpoint, tmp_path, backend):
    path = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama"), path)
    (path / "tokenizer.json").unlink()
    model = edgemtp.load(path, backend=backend, max_kv_size=128)
    ids = [5, 17, 42, 99, 7, 3]
    assert model.logits(ids).shape == (6, 384) and model.mtp_logits(ids).shape == (5, 384)

    plain = model.generate(ids, max_tokens=12, spec="none")
    spec = model.generate(ids, max_tokens=12, spec="mtp", num_draft=2)
    assert len(plain.tokens) == 12 and spec.tokens == plain.tokens and plain.text == ""
    with pytest.raises(UserError, match="has no tokenizer.json; copy the model's tokenizer.json into it"):
        model.generate("hello")
    with pytest.raises(UserError, match="has no tokenizer.json"):
        model.generate([{"role": "user", "content": "hello"}])


def assert_embedding_shared(onnx_dir, shared_by_mtp_graph: list[bool]) -> None:
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    embedding = set(manifest["trunk"]["shared_inputs"])
    assert embedding and embedding <= set(safe_open(onnx_dir / manifest["embedding"], framework="numpy").keys())
    for entry, shared in zip(manifest["mtp"], shared_by_mtp_graph, strict=True):
        graph = onnx.load(str(onnx_dir / entry["path"]), load_external_data=False).graph
        assert (set(entry["shared_inputs"]) == embedding) == shared
        assert not embedding & {tensor.name for tensor in graph.initializer} if shared else True
        assert {value.name for value in graph.input} >= set(entry["shared_inputs"])


def run_cli(*args) -> subprocess.CompletedProcess:
    # A wide terminal, so that rich does not fold the table cells the tests read.
    return subprocess.run([sys.executable, "-m", "edgemtp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COLUMNS": "200"})
