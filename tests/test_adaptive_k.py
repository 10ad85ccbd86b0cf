"""The adaptive draft length: k = 0 when drafts do not pay, k >= 1 when they do.
Costs are injected (a cost curve, not timings) so the outcome is deterministic."""

from __future__ import annotations

import json

import pytest
from fake_backend import FakeBackend, FakeTokenizer

from edgemtp.engine import tuning
from edgemtp.engine.drafters import MTPDrafter
from edgemtp.engine.generate import Session
from edgemtp.engine.tuning import AdaptiveDraftLength, Costs

# A memory-bound device: verifying 5 tokens costs 20% more than 1; a draft step 5% of a trunk step.
MEMORY_BOUND = Costs(trunk=[1.0, 1.05, 1.1, 1.15, 1.2], draft=0.05)
# A compute-bound device: a trunk step costs in proportion to its tokens.
COMPUTE_BOUND = Costs(trunk=[1.0, 2.0, 3.0, 4.0, 5.0], draft=0.05)


def run_auto(costs: Costs, monkeypatch, **model_options):
    monkeypatch.setattr("edgemtp.engine.generate.load_or_measure_costs", lambda *args: costs)
    session = Session(FakeBackend(vocab_size=64, **model_options), FakeTokenizer())
    out = session.generate([1, 2, 3], max_tokens=200, chat=False, spec="mtp", num_draft="auto")
    policy = next(iter(session._policies.values()))
    return out, policy


def test_noise_head_falls_back_to_plain_decoding(monkeypatch):
    out, policy = run_auto(MEMORY_BOUND, monkeypatch, mtp_accuracy=0.0)
    assert policy.choose() == 0
    assert out.stats.draft_lengths[0] > 150  # after a few tries, it stops drafting


def test_good_head_drafts(monkeypatch):
    out, policy = run_auto(MEMORY_BOUND, monkeypatch, num_mtp_layers=2, mtp_accuracy=0.9)
    assert policy.choose() >= 1
    assert out.stats.accepted > 100
    assert out.stats.draft_lengths.get(0, 0) < out.stats.steps / 4


def test_compute_bound_device_does_not_draft_even_with_perfect_drafts():
    policy = AdaptiveDraftLength(COMPUTE_BOUND, max_k=4)  # acceptance starts at 1: perfect drafts
    assert policy.choose() == 0


def test_acceptance_estimate_follows_outcomes():
    policy = AdaptiveDraftLength(MEMORY_BOUND, max_k=4)
    assert policy.choose() == 4
    for _ in range(60):
        policy.update(drafted=4, accepted=1)  # first draft always right, second always wrong
    assert policy.acceptance[0] == pytest.approx(1.0)
    assert policy.acceptance[1] < 0.05
    # Never reached, never judged: they lean on the position before them, not on an optimistic 1.
    assert policy.acceptance[2] == pytest.approx(policy.acceptance[1])
    assert policy.acceptance[3] == pytest.approx(policy.acceptance[1])
    assert policy.choose() == 1


def test_a_few_misses_keep_a_fresh_policy_from_drafting_deep():
    """Two steps with one accepted draft each: the first position's estimate drops toward 0.5,
    and the unjudged deeper positions follow it instead of staying at 1, so k falls from 4."""
    policy = AdaptiveDraftLength(Costs(trunk=[1.0, 1.0, 1.1, 1.2, 1.3], draft=0.1), max_k=4)
    assert policy.choose() == 4
    policy.update(drafted=4, accepted=1)
    policy.update(drafted=4, accepted=0)
    assert policy.acceptance[0] == pytest.approx(0.5 * 2 / 4 + 1.0 * 2 / 4, abs=0.03)
    assert policy.acceptance[2] == pytest.approx(policy.acceptance[1])
    assert policy.choose() < 4


def test_free_guesses_bring_drafting_back():
    policy = AdaptiveDraftLength(MEMORY_BOUND, max_k=4)
    for _ in range(60):
        policy.update(drafted=4, accepted=0)
    assert policy.choose() == 0
    for _ in range(60):
        policy.update_probe(1.0)
    assert policy.choose() >= 1


def test_costs_are_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "cost_cache_path", lambda: tmp_path / "costs.json")
    backend = FakeBackend(vocab_size=16)
    drafter = MTPDrafter(backend, max_depth=3)
    costs = tuning.load_or_measure_costs(backend, drafter, "mtp", max_k=3)
    assert len(costs.trunk) == 4 and all(t > 0 for t in costs.trunk) and costs.draft > 0
    stored = json.loads((tmp_path / "costs.json").read_text())
    assert list(stored.values()) == [{"trunk": costs.trunk, "draft": costs.draft}]
    monkeypatch.setattr(tuning, "measure_trunk_costs", lambda *a: pytest.fail("measured again"))
    assert tuning.load_or_measure_costs(backend, drafter, "mtp", max_k=2) == Costs(costs.trunk[:3], costs.draft)


def test_step_costs_of_4_and_8_bit_exports_are_cached_apart(tiny_checkpoint, tmp_path):
    """An ONNX export keeps its source's config.json, so the config alone cannot tell 4-bit
    weights from 8-bit ones, whose steps cost differently."""
    from edgemtp.converters.onnx_export import export_onnx
    from edgemtp.onnx_backend.backend import OnnxBackend

    checkpoint = tiny_checkpoint("llama", mtp_layers=1)
    four, eight = (OnnxBackend(export_onnx(checkpoint, tmp_path / f"q{bits}", bits=bits), max_context=16)
                   for bits in (4, 8))
    assert four.config == eight.config
    assert tuning.cost_key(four, "mtp") != tuning.cost_key(eight, "mtp")


def test_measured_costs_are_made_non_decreasing():
    """A dip in measured step costs is noise: it is pooled with its neighbours, nothing else moves."""
    assert tuning.non_decreasing([1.0, 1.29, 1.21, 1.58]) == pytest.approx([1.0, 1.25, 1.25, 1.58])
    assert tuning.non_decreasing([1.0, 1.3, 1.2, 1.1, 2.0]) == pytest.approx([1.0, 1.2, 1.2, 1.2, 2.0])
    assert tuning.non_decreasing([1.0, 1.1, 1.4]) == [1.0, 1.1, 1.4]
