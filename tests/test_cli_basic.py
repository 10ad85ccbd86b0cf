"""``edgemtp inspect`` and ``edgemtp make-tiny`` through the installed console script."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess

import pytest
from safetensors.numpy import load_file, save_file

from conftest import edit_config

EDGEMTP = shutil.which("edgemtp")


def run(*args: str) -> subprocess.CompletedProcess:
    assert EDGEMTP, "the edgemtp console script is not installed (pip install -e .)"
    return subprocess.run([EDGEMTP, *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout




def drop_weight(path, name):
    weights = load_file(path / "model.safetensors")
    del weights[name]
    save_file(weights, path / "model.safetensors")


def truncate_weights(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])


def pickle_only(path):
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")


BREAKAGES = {
    "missing config.json": (lambda p: (p / "config.json").unlink(), "no config.json"),
    "unknown model_type": (lambda p: edit_config(p, model_type="bert"), "unsupported model_type 'bert'"),
    "truncated safetensors": (truncate_weights, "model.safetensors is truncated or corrupt"),
    "shape contradicts config": (lambda p: edit_config(p, hidden_size=48), "but config.json implies"),
    "missing MTP weight": (lambda p: drop_weight(p, "model.layers.2.eh_proj.weight"), "num_nextn_predict_layers"),
    "pickle checkpoint": (pickle_only, "refuses to unpickle"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_inspect_rejects_bad_checkpoints_with_one_line(llama_copy, breakage):
    damage, fragment = BREAKAGES[breakage]
    damage(llama_copy)
    assert_user_error(run("inspect", llama_copy), fragment)


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_load_rejects_bad_checkpoints_with_one_line(llama_copy, breakage, backend, tmp_path):
    """``edgemtp.load`` behind ``generate --model``: the same one-line errors, on both backends."""
    damage, fragment = BREAKAGES[breakage]
    damage(llama_copy)
    env_cache = {"EDGEMTP_CACHE": str(tmp_path / "cache")}  # the ONNX path converts into the cache
    result = subprocess.run([EDGEMTP, "generate", "--model", str(llama_copy), "--backend", backend, "-p", "hi"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **env_cache})
    assert_user_error(result, fragment)
    assert not any((tmp_path / "cache").rglob("*.onnx")), "nothing half-written may be left behind"


def test_inspect_missing_directory(tmp_path):
    assert_user_error(run("inspect", tmp_path / "nope"), "does not exist")


def test_make_tiny_refusals(tmp_path, llama_copy):
    assert_user_error(run("make-tiny", llama_copy), "already exists and is not empty")
    assert_user_error(run("make-tiny", tmp_path / "a", "--arch", "mistral"), "unknown tiny-model variant")
    assert_user_error(run("make-tiny", tmp_path / "b", "--vocab-size", "100"), "vocab_size 100 is too small")
    assert_user_error(run("make-tiny", tmp_path / "c", "--dtype", "int8"), "unknown dtype")
    assert_user_error(run("make-tiny", tmp_path / "f", "--mtp-head", "shared"), "unknown MTP head")
    assert_user_error(run("make-tiny", tmp_path / "d", "--dense-layers", "2"), "apply to the MoE variants only")
    assert_user_error(run("make-tiny", tmp_path / "e", "--experts", "4"), "apply to the MoE variants only")
    assert not any(p.name != "model" for p in tmp_path.iterdir())


def test_make_tiny_dense_layers_makes_a_dense_deepseek(tmp_path):
    """The bench model's shape: every trunk layer dense, so a decode step streams all its weights."""
    from safetensors import safe_open

    out = tmp_path / "dense"
    result = run("make-tiny", out, "--arch", "deepseek_v3", "--layers", "3", "--dense-layers", "3", "--mtp-layers", "0")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["first_k_dense_replace"] == 3
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = list(f.keys())
    assert not [n for n in names if ".experts." in n]
    assert all(f"model.layers.{i}.mlp.gate_proj.weight" in names for i in range(3))


def test_make_tiny_glm4_moe_takes_the_moe_options(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "glm"
    result = run("make-tiny", out, "--arch", "glm4_moe", "--layers", "3", "--dense-layers", "2", "--experts", "4",
                 "--mtp-layers", "1")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm4_moe" and config["first_k_dense_replace"] == 2
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = list(f.keys())
    assert "model.layers.1.mlp.gate_proj.weight" in names and "model.layers.2.mlp.experts.3.up_proj.weight" in names
    assert "model.layers.3.mlp.experts.3.up_proj.weight" in names  # the MTP block is a MoE block
    assert not [n for n in names if ".experts.4." in n]
    assert "glm4_moe_no_qk_norm" in run("make-tiny", "--help").stdout


def stored_tensor_bytes(path) -> int:
    """Sum over safetensors files of file size minus header."""
    total = 0
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
        total += file.stat().st_size - 8 - header_size
    return total


def test_make_tiny_then_inspect_reports_true_numbers(tmp_path):
    out = tmp_path / "dsv3"
    made = run("make-tiny", out, "--arch", "deepseek_v3", "--mtp-layers", "2", "--fp8", "--layers", "3",
               "--shard-mb", "0.3")
    assert made.returncode == 0, made.stderr
    assert (out / "model.safetensors.index.json").is_file() and not (tmp_path / "dsv3.partial").exists()

    result = run("inspect", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    config = json.loads((out / "config.json").read_text())

    from edgemtp.checkpoint import Checkpoint
    from edgemtp.mtp_copies import own_mtp_names

    checkpoint = Checkpoint.open(out)
    trunk = sum(math.prod(checkpoint.shape(n)) for n in checkpoint.trunk_names())
    # The MTP layers' copies of the trunk's embedding count once, in the trunk.
    mtp = sum(math.prod(checkpoint.shape(n)) for i in range(2) for n in own_mtp_names(checkpoint, i))
    assert mtp < sum(math.prod(checkpoint.shape(n)) for i in range(2) for n in checkpoint.mtp_names(i))
    assert (summary["trunk_parameters"], summary["mtp_parameters"]) == (trunk, mtp)
    assert summary["num_layers"] == 3 and summary["num_mtp_layers"] == 2
    assert summary["storage"] == "fp8 e4m3, 48x48 blocks"
    assert summary["weight_bytes"] == stored_tensor_bytes(out)
    # MLA caches kv_lora_rank + qk_rope_head_dim 16-bit numbers per token and layer.
    per_token = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    assert summary["kv_cache_bytes"] == 4096 * (3 + 2) * per_token * 2

    table = run("inspect", out)
    assert table.returncode == 0 and "fp8 e4m3" in table.stdout and f"{trunk:,}" in table.stdout


def test_inspect_llama_kv_and_dtype(tiny_checkpoint):
    summary = json.loads(run("inspect", tiny_checkpoint("llama", dtype="bfloat16"), "--json").stdout)
    assert summary["storage"] == "bfloat16"
    # GQA: a key and a value for each of 2 KV heads of 16 dims, 2 trunk + 1 MTP layers.
    assert summary["kv_cache_bytes"] == 4096 * 3 * (2 * 2 * 16) * 2


def test_inspect_qwen3_kv_uses_its_explicit_head_dim(tiny_checkpoint):
    summary = json.loads(run("inspect", tiny_checkpoint("qwen3"), "--json").stdout)
    assert summary["architecture"] == "qwen3"
    # 2 KV heads of head_dim 32 (not hidden_size / heads = 16), 2 trunk + 1 MTP layers, float32.
    assert summary["kv_cache_bytes"] == 4096 * 3 * (2 * 2 * 32) * 2


def test_inspect_names_mlx_quantization(llama_copy):
    edit_config(llama_copy, quantization={"group_size": 64, "bits": 4})
    summary = json.loads(run("inspect", llama_copy, "--json").stdout)
    assert summary["storage"] == "mlx 4-bit, group 64"


def test_inspect_describes_an_onnx_export_and_its_plan(tiny_checkpoint, tmp_path):
    from edgemtp.converters.onnx_export import export_onnx

    out = export_onnx(tiny_checkpoint("llama"), tmp_path / "onnx", bits=4, mtp_bits=8)

    summary = json.loads(run("inspect", out, "--json").stdout)
    assert summary["storage"] == "onnx 4-bit asymmetric, block 32, heads 8-bit (MTP 8-bit symmetric, block 32)"
    assert summary["weight_bytes"] == sum(f.stat().st_size for f in [*out.glob("*/model.onnx*"), out / "embedding.safetensors"])
    assert summary["num_mtp_layers"] == 1
    table = run("inspect", out)
    assert table.returncode == 0 and "memory plan on this machine" in table.stdout


def test_train_mtp_refusals(tmp_path):
    args = ("train-mtp", tmp_path / "trunk", tmp_path / "out", "--data", tmp_path)
    assert_user_error(run(*args, "--warmup-steps", "0"), "--warmup-steps must be at least 1")
    assert_user_error(run(*args, "--chat-fraction", "2"), "--chat-fraction must be between 0 and 1")
    assert_user_error(run(*args, "--hard-label-weight", "-1"), "--hard-label-weight must be 0 or more")
    assert not (tmp_path / "out").exists()
