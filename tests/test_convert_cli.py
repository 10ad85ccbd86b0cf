"""``edgemtp convert``: output safety and one-line errors (exit code 2) for every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgemtp.cli", "convert", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def assert_user_error(result, fragment: str):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


@pytest.fixture
def llama_copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint("llama"), tmp_path / "src")


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_converts_then_refuses_existing_output_without_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_cli(tiny_checkpoint("llama"), out, "--bits", "8").returncode == 0
    assert (out / "model.safetensors").is_file() and not (tmp_path / "out.partial").exists()
    assert_user_error(run_cli(tiny_checkpoint("llama"), out), "--force")
    assert run_cli(tiny_checkpoint("llama"), out, "--bits", "4", "--force").returncode == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_failure_leaves_no_output_and_no_partial(llama_copy, tmp_path):
    _edit_config(llama_copy, hidden_size=96)  # shapes now contradict the config
    result = run_cli(llama_copy, tmp_path / "out")
    assert_user_error(result, "shape")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_config(llama_copy, tmp_path):
    (llama_copy / "config.json").unlink()
    assert_user_error(run_cli(llama_copy, tmp_path / "out"), "config.json")


def test_unsupported_model_type_lists_supported(llama_copy, tmp_path):
    _edit_config(llama_copy, model_type="gpt2")
    assert_user_error(run_cli(llama_copy, tmp_path / "out"), "deepseek_v3, glm4_moe, llama")


def test_truncated_safetensors(llama_copy, tmp_path):
    weights = llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_user_error(run_cli(llama_copy, tmp_path / "out"), "model.safetensors")


def test_truncated_gguf(tiny_checkpoint, tmp_path):
    from tests.test_gguf import write_llama_gguf

    path = write_llama_gguf(tiny_checkpoint("llama_untied", mtp_layers=0), tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-500])
    assert_user_error(run_cli(path, tmp_path / "out"), "truncated")


def test_mtp_weights_promised_but_missing(llama_copy, tmp_path):
    _edit_config(llama_copy, num_nextn_predict_layers=2)  # the checkpoint has one MTP layer
    assert_user_error(run_cli(llama_copy, tmp_path / "out"), "num_nextn_predict_layers")


@pytest.mark.parametrize("flags,fragment", [(["--bits", "3"], "--bits"), (["--group-size", "48"], "--group-size"),
                                            (["--mtp-bits", "2"], "--mtp-bits"), (["--dtype", "int8"], "--dtype"),
                                            (["--to", "tflite"], "--to"),
                                            (["--to", "onnx", "--head-bits", "4"], "--bits 4"),
                                            (["--to", "onnx", "--bits", "4", "--head-bits", "6"], "--head-bits 6"),
                                            (["--bits", "4", "--head-bits", "4"], "--to onnx")])
def test_options_the_target_cannot_do(tiny_checkpoint, tmp_path, flags, fragment):
    assert_user_error(run_cli(tiny_checkpoint("llama"), tmp_path / "out", *flags), fragment)


def test_offline_repo_id_not_cached(tmp_path):
    result = run_cli("nobody-here/not-a-cached-model", tmp_path / "out",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_user_error(result, "HF_HUB_OFFLINE")


def test_nonexistent_path(tmp_path):
    assert_user_error(run_cli(tmp_path / "nope", tmp_path / "out"), "does not exist")
