"""The embedded default model on a fresh machine: no network, no cache, just the installed package.

The generate test runs the installed ``edgemtp`` console script with the Hub forced offline, no
proxy, and an empty user cache, so it also proves the first-use conversion (GGUF + trained MTP
layer -> ONNX) needs nothing but what pip installed. It takes about half a minute, most of it
the conversion.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from edgemtp.config import SUPPORTED_MODEL_TYPES
from edgemtp.default_model import registry

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")
COMMON_WORDS = {"the", "a", "and", "to", "of", "was", "in", "he", "she", "it", "his", "her", "cat", "with", "on"}


def offline_fresh_environment(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}
    env["HF_HUB_OFFLINE"] = "1"
    env["EDGEMTP_CACHE"] = str(cache / "edgemtp")
    env["XDG_CACHE_HOME"] = str(cache)  # Hugging Face's cache, empty too (it reads this on every OS)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    executable = shutil.which("edgemtp")
    assert executable, "the edgemtp console script is not installed; run `pip install -e .`"
    return subprocess.run([executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_default_model_generates_english_offline_from_an_empty_cache(tmp_path):
    cache = tmp_path / "cache"
    result = run_cli("generate", "-p", "Tell me a short story about a cat.", "--json", "-m", "48",
                     "--backend", "onnx", env=offline_fresh_environment(cache))
    assert result.returncode == 0, result.stderr
    # The conversion progress precedes the JSON object, which is the last line.
    output = json.loads(result.stdout.strip().splitlines()[-1])

    # The first use converted the model into the fresh cache, not into some earlier one.
    converted = list((cache / "edgemtp" / "default").glob("onnx-8bit-*"))
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()

    text = output["text"]
    letters = [c for c in text if c.isalpha()]
    assert len(letters) > 50
    assert sum(c.isascii() for c in letters) / len(letters) > 0.95
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert len(words & COMMON_WORDS) >= 4, text
    assert 0 < len(output["tokens"]) == output["stats"]["generated_tokens"] <= 48
    # The trained MTP layer was attached and its drafts were verified and (partly) accepted.
    assert output["stats"]["drafted"] > 0
    assert 0 < output["stats"]["accepted"] <= output["stats"]["drafted"]


def test_models_command_lists_the_registry():
    # 80 columns: each model's convert command must still come out whole (wrapped at spaces).
    result = run_cli("models", env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    for model in registry():
        assert model["name"] in words
        assert " ".join(model["convert"].split()) in " ".join(words)
        assert model["architecture"] in SUPPORTED_MODEL_TYPES
        if "parameters_b" in model:  # released checkpoints: their size at 4 and 8 bits
            assert 0 < model["size_gb"]["4"] < model["size_gb"]["8"]
            assert f"about {model['size_gb']['4']:,} GB at 4 bits" in " ".join(words)
    assert {"deepseek_v3", "glm4_moe", "qwen2", "qwen3"} <= {model["architecture"] for model in registry()}
    assert "(default)" in result.stdout
    listed = json.loads(run_cli("models", "--json").stdout)
    assert listed == registry()


def test_load_picks_the_default_models_bits(tmp_path, monkeypatch):
    """``edgemtp.load(bits=4)`` without a path loads the default model's 4-bit conversion (it was
    silently the 8-bit one before)."""
    import edgemtp

    monkeypatch.setenv("EDGEMTP_CACHE", str(tmp_path / "edgemtp"))
    model = edgemtp.load(backend="onnx", bits=4, max_kv_size=64)
    converted = list((tmp_path / "edgemtp" / "default").glob("onnx-*"))
    assert [p.name.split("-")[1] for p in converted] == ["4bit"]
    assert json.loads((converted[0] / "manifest.json").read_text())["quantization"]["trunk"]["bits"] == 4
    assert model.generate("Hello!", max_tokens=4, spec="none").stats.generated_tokens > 0
