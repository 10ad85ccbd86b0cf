"""``edgemtp convert --to onnx --genai``: onnxruntime-genai loads the export, and its greedy output
(plain ``og.Generator`` and ``og.MtpGenerator``) is edgemtp's, token for token."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai")

import edgemtp  # noqa: E402
from edgemtp.bench.peers.ortgenai_export import genai_greedy, load_genai  # noqa: E402
from edgemtp.converters.onnx_export import export_onnx  # noqa: E402
from edgemtp.converters.onnx_export.genai import export_genai  # noqa: E402

PROMPT = [5, 17, 33, 48, 99, 120, 7]
NEW_TOKENS = 40


def _checkpoint(tiny_checkpoint, arch: str):
    # seed 2: plain random weights, whose greedy continuation of PROMPT varies (the "confident"
    # factory weights, which the fidelity tests need, repeat one token here).
    return tiny_checkpoint(arch, mtp_layers=1, seed=2)


def _before_first_near_tie(export, tokens: list[int]) -> int:
    """How many of ``tokens`` (edgemtp's greedy output) come before the first whose logit leads
    the runner-up by less than float16's rounding (2**-10 of its size)."""
    model = edgemtp.load(export, backend="onnx")
    logits = model.logits(PROMPT + tokens)[len(PROMPT) - 1:-1]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    near = np.flatnonzero(top2[:, 1] - top2[:, 0] <= np.abs(top2[:, 1]) * 2.0**-10)
    return int(near[0]) if near.size else len(tokens)


def _edgemtp_greedy(export) -> list[int]:
    model = edgemtp.load(export, backend="onnx")
    return model.generate(PROMPT, max_tokens=NEW_TOKENS, spec="none", chat=False).tokens


@pytest.mark.parametrize(("arch", "bits"), [("llama", None), ("llama", 8), ("qwen3", 8)])
def test_genai_greedy_equals_edgemtp_greedy(tiny_checkpoint, tmp_path, arch, bits):
    checkpoint = _checkpoint(tiny_checkpoint, arch)
    export = export_onnx(checkpoint, tmp_path / "edgemtp", bits=bits)
    expected = _edgemtp_greedy(export)
    assert len(set(expected)) > 3, "the reference must not be one repeated token"

    genai_dir = export_genai(checkpoint, tmp_path / "genai", bits=bits)
    plain, _ = load_genai(genai_dir, threads=1)
    assert genai_greedy(plain, None, PROMPT, NEW_TOKENS).tokens == expected

    # MtpGenerator argmaxes float16 logits (onnx_export/genai.py): it follows edgemtp up to the first
    # step whose two best logits are closer than float16 rounding.
    model, head = load_genai(genai_dir, threads=1, mtp=True)
    comparable = _before_first_near_tie(export, expected)
    assert comparable >= NEW_TOKENS // 2, "too little to compare before the first near-tie"
    for k in (1, 2):
        run = genai_greedy(model, head, PROMPT, NEW_TOKENS, max_draft_tokens=k)
        assert run.tokens[:comparable] == expected[:comparable]
        assert run.stats["draft_tokens_proposed"] > 0


def test_genai_mtp_head_logits_equal_edgemtp(tiny_checkpoint, tmp_path):
    """The head graph through onnxruntime-genai's I/O (hidden_states, attention_mask, its own
    cache) gives edgemtp's depth-1 MTP logits: row i from h[i] and token i+1."""
    checkpoint = _checkpoint(tiny_checkpoint, "llama")
    expected = edgemtp.load(export_onnx(checkpoint, tmp_path / "edgemtp", bits=None),
                            backend="onnx").mtp_logits(PROMPT, depth=1)

    model, head = load_genai(export_genai(checkpoint, tmp_path / "genai", bits=None), threads=1, mtp=True)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 8)
    trunk = og.Generator(model, params)
    trunk.append_tokens(np.asarray(PROMPT, dtype=np.int32))
    hidden = trunk.get_output("hidden_states")
    assert hidden.shape == (1, len(PROMPT), 64)

    head_params = og.GeneratorParams(head)
    head_params.set_search_options(max_length=len(PROMPT) + 8)
    head_generator = og.Generator(head, head_params)
    for i in range(len(PROMPT) - 1):  # one row a step: the head's cache grows as in MtpGenerator's drafting
        head_generator.set_hidden_states(np.ascontiguousarray(hidden[:, i:i + 1]))
        head_generator.append_tokens(np.asarray([PROMPT[i + 1]], dtype=np.int32))
        logits = head_generator.get_logits()[0, -1]
        assert np.abs(logits - expected[i]).max() <= 1e-4 * np.abs(expected[i]).max()


def test_genai_refuses_mla(tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "edgemtp.cli", "convert", str(tiny_checkpoint("deepseek_v3")),
                             str(tmp_path / "out"), "--to", "onnx", "--genai"], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "deepseek_v3" in lines[0] and "without --genai" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_genai_needs_onnx_target(tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "edgemtp.cli", "convert", str(tiny_checkpoint("llama")),
                             str(tmp_path / "out"), "--to", "mlx", "--genai"], capture_output=True, text=True)
    assert result.returncode == 2 and "--to onnx" in result.stderr
