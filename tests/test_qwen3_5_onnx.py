"""Qwen3.5 (``qwen3_5``) on ONNX Runtime: the exported hybrid trunk and MTP layer against
transformers, and rollback of the Gated DeltaNet states.

Random tiny models draft badly, so speculative runs reject most drafts and every rollback path
runs: back to the states before the verify step and again over its accepted tokens, or from
empty when a rollback reaches past that step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_qwen3_5 import SEQ_LEN, MTPReference, token_ids
from transformers import AutoModelForCausalLM

import edgemtp
from edgemtp.api import Model
from edgemtp.converters.onnx_export import export_onnx
from edgemtp.onnx_backend.backend import OnnxBackend

torch.set_num_threads(1)


@pytest.fixture
def export(tiny_checkpoint, tmp_path):
    """``export(variant, bits=None)``: the factory checkpoint exported to ONNX (None: float32), once."""
    built = {}

    def build(variant: str, bits: int | None = None):
        if (variant, bits) not in built:
            built[variant, bits] = export_onnx(tiny_checkpoint(variant), tmp_path / f"{variant}-{bits}", bits=bits)
        return built[variant, bits]

    return build


def transformers_logits(path, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model(torch.tensor([ids])).logits[0].numpy()


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


def states(backend: OnnxBackend) -> list[np.ndarray]:
    """The Gated DeltaNet states the trunk's next step reads."""
    cache = backend._trunk_cache
    return [pair[cache._current].copy() for layer in cache._layers for pair in layer.buffers]


def assert_same_states(backend: OnnxBackend, fresh: OnnxBackend) -> None:
    assert backend.trunk_len() == fresh.trunk_len()
    for state, expected in zip(states(backend), states(fresh), strict=True):
        assert np.abs(state - expected).max() <= 1e-5 * max(np.abs(expected).max(), 1.0)


def count_runs(backend: OnnxBackend) -> list:
    """A list that grows by one each time the trunk graph runs."""
    runs, run = [], backend._trunk.run
    backend._trunk.run = lambda *args, **options: runs.append(1) or run(*args, **options)
    return runs


@pytest.mark.parametrize("variant", ["qwen3_5", "qwen3_5_untied"])
def test_trunk_logits_match_transformers_through_steps_and_rollbacks(tiny_checkpoint, export, variant):
    path = tiny_checkpoint(variant)
    backend = OnnxBackend(export(variant), threads=1)
    ids = token_ids(SEQ_LEN, seed=3)
    expected = transformers_logits(path, ids)

    assert_close(backend.trunk_step(ids[:20])[0], expected[:20])  # prefill
    for i in range(20, 23):  # single steps
        assert_close(backend.trunk_step([ids[i]])[0], expected[i:i + 1])
    runs = count_runs(backend)
    backend.trunk_step(token_ids(5, seed=4))  # a verify step of wrong tokens, every position's states kept...
    backend.trunk_rollback(3)  # ...of which 2 stay: their states copied back
    backend.trunk_rollback(2)  # none stays: the states from before the step
    assert_close(backend.trunk_step(ids[23:26])[0], expected[23:26])
    backend.trunk_rollback(1)
    assert len(runs) == 2, "rollbacks within a verify step run nothing again"
    assert_close(backend.trunk_step(ids[25:33])[0], expected[25:33])  # longer than a verify step: no snapshots
    backend.trunk_rollback(5)  # back to its start, then 3 tokens again
    assert_close(backend.trunk_step(ids[28:30])[0], expected[28:30])
    backend.trunk_rollback(9)  # past the last step's start: from empty, 21 tokens again
    assert_close(backend.trunk_step(ids[21:26])[0], expected[21:26])

    # The parity bound: the states equal those of a plain run over the same tokens.
    fresh = OnnxBackend(export(variant), threads=1)
    fresh.trunk_step(ids[:26])
    assert_same_states(backend, fresh)
    backend.trunk_rollback(backend.trunk_len())
    assert backend.trunk_len() == 0 and not any(state.any() for state in states(backend))


@pytest.mark.parametrize(("variant", "depth"), [("qwen3_5", 1), ("qwen3_5_untied", 2)])
def test_mtp_logits_match_transformers_layers(tiny_checkpoint, export, variant, depth):
    model = Model({}, None, OnnxBackend(export(variant), threads=1))
    ids = token_ids(SEQ_LEN, seed=5)
    expected = MTPReference(tiny_checkpoint(variant)).mtp_logits(ids, depth)
    assert_close(model.mtp_logits(ids, depth=depth), expected)


def check_speculative_equals_plain(model, other_model, fresh: OnnxBackend) -> None:
    """Greedy output of every drafter equals plain decoding, with many rejected drafts, and the
    trunk's states afterwards equal those of ``fresh`` (the same model, unused) run over the same
    tokens."""
    rejections = 0
    for prompt in ("hello world", "The quick brown fox", "1 2 3 4 5 6 7 8"):
        reference = model.generate(prompt, max_tokens=48, spec="none")
        # num_draft 5: verify steps of 6 tokens, longer than those that keep snapshots (they recompute).
        for options in (dict(spec="mtp", num_draft=1), dict(spec="mtp", num_draft=3), dict(spec="ngram", num_draft=4),
                        dict(spec="mtp", num_draft=5), dict(spec="hybrid", num_draft="auto"),
                        dict(spec="draft", num_draft=2, draft_model=other_model)):
            out = model.generate(prompt, max_tokens=48, **options)
            assert out.tokens == reference.tokens, (prompt, options)
            rejections += out.stats.provenance.count("correction")
    assert rejections > 20, "the drafts must be rejected often"

    fresh.trunk_step(model._session.tokens)
    assert_same_states(model.backend, fresh)


@pytest.mark.parametrize("variant", ["qwen3_5", "qwen3_5_untied"])
def test_speculative_greedy_equals_plain_greedy_onnx(tiny_checkpoint, variant):
    model = edgemtp.load(tiny_checkpoint(variant), backend="onnx", bits=None)
    other_model = edgemtp.load(tiny_checkpoint(variant, seed=1), backend="onnx", bits=None)
    check_speculative_equals_plain(model, other_model, edgemtp.load(tiny_checkpoint(variant), backend="onnx",
                                                                    bits=None).backend)


def test_long_speculative_run_leaves_no_drift_onnx(tiny_checkpoint):
    """After hundreds of rejected drafts, the trunk's next logits and every MTP depth's draft
    logits equal a fresh teacher-forced run over the same tokens."""
    from test_engine_greedy import check_no_cache_drift

    model = edgemtp.load(tiny_checkpoint("qwen3_5"), backend="onnx", bits=None)
    out = check_no_cache_drift(model, model.tokenizer.encode("once upon a time"), 300, atol=2e-4,
                               chat=False, spec="mtp", num_draft=3)
    assert out.stats.provenance.count("correction") > 50


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_conversion_decodes_speculatively_as_plainly(tiny_checkpoint, tmp_path, bits):
    import onnx

    from edgemtp.converters.convert import convert

    out = convert(tiny_checkpoint("qwen3_5"), tmp_path / f"q{bits}", to="onnx", bits=bits, show_progress=False)
    model = edgemtp.load(out, backend="onnx")
    assert model.backend.manifest["quantization"]["trunk"]["bits"] == bits
    for graph in ("trunk", "mtp0"):
        ops = {node.op_type for node in onnx.load(out / graph / "model.onnx", load_external_data=False).graph.node}
        assert "MatMulNBits" in ops and "MatMul" not in ops, graph
    # One-token steps compute their rows bitwise as a verify step does (what greedy equality rests on).
    backend, ids = OnnxBackend(out, threads=1), token_ids(12, seed=6)
    backend.trunk_step(ids[:6])
    alone = np.concatenate([backend.trunk_step([token])[0] for token in ids[6:]])
    backend.reset()
    backend.trunk_step(ids[:6])
    np.testing.assert_array_equal(alone, backend.trunk_step(ids[6:])[0])
    other_model = edgemtp.load(tiny_checkpoint("qwen3_5", seed=1), backend="onnx", bits=bits)
    check_speculative_equals_plain(model, other_model, edgemtp.load(out, backend="onnx").backend)


def test_the_planner_counts_the_states_the_backend_holds(export):
    from edgemtp.layout import recurrent_state_bytes
    from edgemtp.onnx_backend.cache import SPARE_ROWS

    backend = OnnxBackend(export("qwen3_5"), threads=1)
    keys_and_values = 2 * 2 * (backend.max_context + SPARE_ROWS) * 32 * 4  # 1 full-attention layer, 2 KV heads of 32
    # 3 Gated DeltaNet layers: two buffers of each state (4x16x16 and 3 inputs of 128 channels), 5
    # per-position recurrent states and 3 + 5 convolution input rows, float32.
    states = 3 * 4 * (2 * (4 * 16 * 16 + 3 * 128) + 5 * 4 * 16 * 16 + 8 * 128)
    assert backend._trunk_cache.nbytes - keys_and_values == recurrent_state_bytes(backend.config, "onnx") == states
