"""The engine on real backends (MLX, ONNX Runtime) with tiny factory checkpoints:
speculative greedy decoding equals plain greedy decoding, and a long run leaves
no drift in the trunk or MTP caches.

Random tiny models have untrained MTP heads (drafts almost always rejected), so
the rollback paths are exercised by MTP, while the acceptance paths come from a
draft model identical to the target (always right) and from n-gram lookup on
the loops greedy decoding falls into; the hybrid drafter switches between the
two on those loops."""

from __future__ import annotations

import importlib

import pytest
from test_engine_greedy import check_no_cache_drift

import edgemtp

BACKENDS = {"mlx": "edgemtp.mlx_backend.backend", "onnx": "edgemtp.onnx_backend.loading"}
ARCHS = ["deepseek_v3", "glm4_moe", "qwen2", "qwen3"]  # MLA and GQA attention, MoE and dense MTP blocks
# 2,000-token runs, one per kind of cache: MLA's latent cache and GQA's keys and values (qwen2
# and qwen3 keep the same GQA cache as glm4_moe, whose partial RoPE and MoE add to it).
DRIFT_ARCHS = ["deepseek_v3", "glm4_moe"]
PROMPTS = ["hello world", "The quick brown fox", "a", "1 2 3 4 5 6 7 8"]


def available(backend: str) -> bool:
    try:
        importlib.import_module(BACKENDS[backend])
    except ImportError:
        return False
    return True


@pytest.fixture(params=[pytest.param(b, marks=pytest.mark.skipif(not available(b), reason=f"{b} backend missing"))
                        for b in BACKENDS])
def load(request, tiny_checkpoint):
    options = {"bits": None} if request.param == "onnx" else {}

    def load_model(arch: str, **make_options):
        return edgemtp.load(tiny_checkpoint(arch, **make_options), backend=request.param, **options)

    return load_model


@pytest.mark.parametrize("arch", ARCHS)
def test_speculative_greedy_equals_plain_greedy(load, arch):
    model = load(arch, mtp_layers=2)
    same_model = load(arch, mtp_layers=2)
    other_model = load(arch, mtp_layers=1, seed=1)
    for prompt in PROMPTS:
        reference = model.generate(prompt, max_tokens=64, spec="none")
        for options in (dict(spec="mtp", num_draft=1), dict(spec="mtp", num_draft=3), dict(spec="ngram", num_draft=4),
                        dict(spec="hybrid", num_draft=3), dict(spec="hybrid", num_draft="auto"),
                        dict(spec="draft", num_draft=3, draft_model=same_model),
                        dict(spec="draft", num_draft=2, draft_model=other_model)):
            out = model.generate(prompt, max_tokens=64, **options)
            assert out.tokens == reference.tokens, (prompt, options)
            assert out.text == reference.text
            if options.get("draft_model") is same_model:
                assert out.stats.accepted == out.stats.drafted > 0


@pytest.mark.parametrize("arch", DRIFT_ARCHS)
def test_long_generation_has_no_cache_drift(load, arch):
    model = load(arch, mtp_layers=2)
    check_no_cache_drift(model, model.tokenizer.encode("once upon a time"), 2000, atol=2e-4,
                         chat=False, spec="mtp", num_draft=3)
