"""``edgemtp generate``: streams text, --json gives the same tokens as the library, bad flags exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import edgemtp
from edgemtp.cli import app
from edgemtp.errors import UserError


def _invoke(args: list[str], stdin: str | None):
    # main() turns UserError into exit code 2; the bare app lets us see the exception itself.
    return CliRunner().invoke(app, ["generate", *args], input=stdin)


@pytest.fixture
def model_dir(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMTP_CACHE", str(tmp_path / "cache"))  # the auto policy caches step costs there
    return str(tiny_checkpoint("deepseek_v3", mtp_layers=1))


def test_json_output_matches_the_library(model_dir):
    result = _invoke(["--model", model_dir, "--backend", "mlx", "-p", "hello", "-m", "12", "--json",
                      "--temp", "0.7", "--seed", "3", "--num-draft", "2"], None)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = edgemtp.api.load(model_dir, backend="mlx").generate("hello", max_tokens=12, temperature=0.7, seed=3,
                                                                  num_draft=2)
    assert data["tokens"] == expected.tokens and data["text"] == expected.text
    assert data["stats"]["generated_tokens"] == 12 and data["stats"]["drafted"] > 0


def test_streams_text_and_reads_the_prompt_from_stdin(model_dir):
    result = _invoke(["--model", model_dir, "--backend", "mlx", "-p", "-", "-m", "8", "--no-chat", "--spec", "none"],
                     "once upon a time")
    assert result.exit_code == 0, result.output
    expected = edgemtp.api.load(model_dir, backend="mlx").generate("once upon a time", max_tokens=8, chat=False,
                                                                  spec="none")
    assert result.stdout == expected.text + "\n"
    assert "Generation: 8 tokens" in result.stderr


@pytest.mark.parametrize("flags", [["--num-draft", "two"], ["--spec", "medusa"], ["--temp", "-1"], ["--top-p", "0"],
                                   ["--top-k", "-2"], ["-m", "0"], ["--spec", "draft"]])
def test_bad_flags_are_user_errors(model_dir, flags):
    result = _invoke(["--model", model_dir, "--backend", "mlx", "-p", "hi", *flags], None)
    assert isinstance(result.exception, UserError), result.output
