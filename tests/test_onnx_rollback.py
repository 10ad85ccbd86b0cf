"""The ONNX caches: rolling back (prefill, step, roll back k, re-step == a fresh run), and memory that
becomes resident only where steps write."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edgemtp.converters.onnx_export import export_onnx
from edgemtp.onnx_backend.backend import OnnxBackend
from edgemtp.onnx_backend.cache import lazy_zeros


@pytest.fixture(scope="module", params=["llama", "deepseek_v3", "glm4_moe", "qwen3"])
def backend(request, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / request.param
    return OnnxBackend(export_onnx(tiny_checkpoint(request.param), out, bits=None), threads=1, max_context=64)


def _ids(count: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 384, count)]


@pytest.mark.parametrize("k", [1, 3])
def test_trunk_rollback_equals_fresh_run(backend, k):
    prompt, drafts, corrected = _ids(10, 0), _ids(4, 1), _ids(4, 2)
    backend.reset()
    backend.trunk_step(prompt)
    backend.trunk_step(drafts)
    backend.trunk_rollback(k)
    assert backend.trunk_len() == len(prompt) + len(drafts) - k
    logits, hidden = backend.trunk_step(corrected)

    backend.reset()
    fresh_logits, fresh_hidden = backend.trunk_step(prompt + drafts[:-k] + corrected)
    np.testing.assert_allclose(logits, fresh_logits[-len(corrected):], rtol=0, atol=1e-5)
    np.testing.assert_allclose(hidden, fresh_hidden[-len(corrected):], rtol=0, atol=1e-5)


def test_mtp_rollback_equals_fresh_run(backend):
    ids = _ids(12, 3)
    backend.reset()
    _, hidden = backend.trunk_step(ids)
    backend.mtp_step(1, hidden[:8], ids[1:9])
    backend.mtp_step(1, hidden[8:11], ids[9:12])
    backend.mtp_rollback(1, 3)
    assert backend.mtp_len(1) == 8 and backend.mtp_len(2) == 0
    logits, h1 = backend.mtp_step(1, hidden[8:11], ids[9:12])

    backend.reset()
    fresh_logits, fresh_h1 = backend.mtp_step(1, hidden[:11], ids[1:12])
    np.testing.assert_allclose(logits, fresh_logits[8:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(h1, fresh_h1[8:], rtol=0, atol=1e-5)


def test_context_limit_is_a_user_error(backend):
    from edgemtp.errors import UserError

    backend.reset()
    backend.trunk_step(_ids(60, 4))
    with pytest.raises(UserError, match="context is full"):
        backend.trunk_step(_ids(5, 5))
    assert backend.trunk_len() == 60


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", ["llama", "deepseek_v3", "glm4_moe", "glm4_moe_no_qk_norm", "qwen2", "qwen3"])
def test_quantized_steps_are_independent_of_step_size(tiny_checkpoint, tmp_path, arch, bits):
    """Plain decoding feeds one token per step, verification k+1: both must give bitwise the
    same logits, or greedy speculative output drifts from plain greedy output. onnxruntime's
    GroupQueryAttention sums a one-row step differently, so llama graphs give it an extra row
    (without it this tiny model's one-token logits differ by about 1e-6; a real model's
    int8-activation MatMulNBits turn such differences into flipped tokens). Where this CPU's
    4-bit MatMulNBits also sums one row differently (row_invariance.py: AVX2-only x86), the
    backend pads one-token steps. 4-bit graphs add float MatMuls (group sums and offsets) that
    must keep this too."""
    backend = OnnxBackend(export_onnx(tiny_checkpoint(arch), tmp_path / "q", bits=bits), threads=1,
                          max_context=64)
    ids = _ids(20, 5)
    full, _ = backend.trunk_step(ids)
    backend.reset()
    one_by_one = np.concatenate([backend.trunk_step([token])[0] for token in ids])
    backend.reset()
    in_threes = np.concatenate([backend.trunk_step(ids[i:i + 3])[0] for i in range(0, len(ids), 3)])
    assert np.array_equal(one_by_one, full)
    assert np.array_equal(in_threes, full)


def _resident_anon_bytes() -> int:
    status = open("/proc/self/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon:")).split()[1]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cache_buffers_become_resident_only_where_steps_write():
    # The default model's trunk: 60 buffers of (1, 3, 8192, 64) float32, 6 MiB each. With numpy's
    # huge pages the first row written into each head made 2 MiB resident: 240 MiB at token one.
    before = _resident_anon_bytes()
    buffers = [lazy_zeros((1, 3, 8192, 64)) for _ in range(60)]
    for buffer in buffers:
        buffer[0, :, 0] = 1.0
    grown = _resident_anon_bytes() - before
    assert all(buffer.sum() == 3 * 64 for buffer in buffers)
    assert grown < 8 * 2**20, f"{grown / 2**20:.0f} MiB resident after writing one row per head"


def test_prompt_steps_run_the_output_head_on_their_last_row_only(backend):
    prompt = _ids(11, 5)
    backend.reset()
    logits, hidden = backend.trunk_step(prompt)
    backend.reset()
    last, prompt_hidden = backend.trunk_prompt_step(prompt)
    assert last.shape == (1, logits.shape[1]) and prompt_hidden.shape == hidden.shape
    np.testing.assert_array_equal(prompt_hidden, hidden)
    np.testing.assert_allclose(last[0], logits[-1], rtol=0, atol=1e-5 * np.abs(logits).max())
    # The cache is the same either way: the next step gives the same logits.
    after, _ = backend.trunk_step([7])
    backend.reset()
    backend.trunk_step(prompt)
    np.testing.assert_array_equal(after, backend.trunk_step([7])[0])
