"""Temperature > 0: speculative sampling must be lossless. The empirical joint
distribution of the first three sampled tokens (the first from the prompt, the
next two from one speculative step drafting 2 tokens) must match the target's
exact distribution, for good, bad and deterministic drafters alike."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from fake_backend import FakeBackend, FakeTokenizer
from scipy.stats import chisquare

from edgemtp.engine.generate import Session
from edgemtp.engine.sampling import Sampler

VOCAB = 5
PROMPT = [1, 2, 1, 2, 1]  # repetitive, so the n-gram drafter always has a guess
SAMPLES = 20_000

# name -> (target model options, generate options, draft model options or None).
# The MTP cases cover a good head (two layers, warped sampling) and pure noise
# (one layer reused at depth 2). Each case takes a few seconds of Python per 10k samples.
CASES = {
    "mtp-noise": (dict(mtp_accuracy=0.0), dict(spec="mtp"), None),
    "mtp-2-layers-warped": (dict(num_mtp_layers=2, mtp_accuracy=0.8, mtp_blur=0.5),
                            dict(spec="mtp", temperature=0.7, top_k=4, top_p=0.9), None),
    "ngram": (dict(), dict(spec="ngram"), None),
    "draft-model": (dict(), dict(spec="draft"), dict(noise=1.5)),
    # n-gram continuations (one-hot q) where the last token occurred before, MTP drafts (their q) after a new one
    "hybrid": (dict(num_mtp_layers=2, mtp_accuracy=0.6), dict(spec="hybrid"), None),
}


def exact_joint(backend: FakeBackend, sampler: Sampler) -> dict[tuple, float]:
    out = {}
    for tokens in itertools.product(range(VOCAB), repeat=3):
        prob = 1.0
        for i, t in enumerate(tokens):
            prob *= sampler.probs(backend.target_logits(tuple(PROMPT) + tokens[:i]))[0, t]
        out[tokens] = prob
    return out


@pytest.mark.parametrize("case", CASES)
def test_first_tokens_follow_the_target_distribution(case):
    model_options, options, draft_options = CASES[case]
    options = dict(dict(temperature=1.0), **options)
    backend = FakeBackend(vocab_size=VOCAB, sharpness=1.5, **model_options)
    if draft_options is not None:
        options["draft_model"] = FakeBackend(vocab_size=VOCAB, sharpness=1.5, **draft_options)
    session = Session(backend, FakeTokenizer())
    counts: dict[tuple, int] = {}
    accepted = rejected = 0
    for seed in range(SAMPLES):
        out = session.generate(PROMPT, max_tokens=4, seed=seed, num_draft=2, chat=False, **options)
        key = tuple(out.tokens[:3])
        counts[key] = counts.get(key, 0) + 1
        accepted += out.stats.accepted
        rejected += out.stats.provenance.count("correction")
    assert accepted > 0 and rejected > 0, "the drafter must be both right and wrong sometimes"

    assert sum(counts.values()) == SAMPLES
    check_target_distribution(counts, backend, options)


def check_target_distribution(counts: dict[tuple, int], backend: FakeBackend, options: dict) -> None:
    """``counts`` of sampled first three tokens follow the target's joint distribution under the
    sampling ``options`` (chi-square)."""
    warp = {k: options[k] for k in ("temperature", "top_k", "top_p") if k in options}
    expected = exact_joint(backend, Sampler(**warp))
    samples = sum(counts.values())
    assert set(counts) <= {k for k, p in expected.items() if p > 0}, "sampled a token the target excludes"
    # Chi-square over cells expected at least 5 times; the rare cells pooled into one.
    keys = sorted(expected, key=expected.get, reverse=True)
    common = [k for k in keys if expected[k] * samples >= 5]
    rare = [k for k in keys if expected[k] * samples < 5]
    observed = [counts.get(k, 0) for k in common] + [sum(counts.get(k, 0) for k in rare)]
    wanted = [expected[k] * samples for k in common] + [sum(expected[k] for k in rare) * samples]
    observed, wanted = np.array(observed), np.array(wanted)
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    wanted *= observed.sum() / wanted.sum()  # rounding of tiny probabilities
    assert chisquare(observed, wanted).pvalue > 0.001
