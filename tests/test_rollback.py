"""Rolling caches back (rejected drafts) leaves no trace: the next steps equal a fresh run."""

from __future__ import annotations

import numpy as np
import pytest

from edgemtp.mlx_backend.backend import MLXBackend

PROMPT, DRAFT, ROLLBACK = 20, 5, 3


def sequences(vocab_size: int) -> tuple[list[int], list[int], list[int]]:
    """A prompt, a draft to be partly rejected, and the tokens that replace the rejected part."""
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, vocab_size, PROMPT).tolist()
    draft = rng.integers(0, vocab_size, DRAFT).tolist()
    replacement = [(t + 1) % vocab_size for t in draft[DRAFT - ROLLBACK :]]  # differs at every position
    return prompt, draft, replacement


@pytest.mark.parametrize("variant", ["llama", "deepseek_v3", "qwen3"])
def test_trunk_rollback_equals_fresh_run(tiny_checkpoint, variant):
    backend = MLXBackend.from_checkpoint(tiny_checkpoint(variant), max_kv_size=64)
    prompt, draft, replacement = sequences(backend.vocab_size)
    kept = draft[: DRAFT - ROLLBACK]
    cache_bytes = backend.cache_bytes()

    backend.trunk_step(prompt)
    backend.trunk_step(draft)
    backend.trunk_rollback(ROLLBACK)
    assert backend.trunk_len() == PROMPT + DRAFT - ROLLBACK
    logits, hidden = backend.trunk_step(replacement)

    backend.reset()
    assert backend.trunk_len() == 0
    backend.trunk_step(prompt)
    backend.trunk_step(kept)
    fresh_logits, fresh_hidden = backend.trunk_step(replacement)

    # Same chunking, same cache contents: bit-identical.
    np.testing.assert_array_equal(logits, fresh_logits)
    np.testing.assert_array_equal(hidden, fresh_hidden)
    # And the same as one pass over the final sequence (up to float rounding).
    backend.reset()
    full, _ = backend.trunk_step(prompt + kept + replacement)
    assert np.abs(logits - full[-len(replacement) :]).max() <= 1e-4 * np.abs(full).max()
    # The caches were allocated once, up front.
    assert backend.cache_bytes() == cache_bytes


@pytest.mark.parametrize("variant", ["llama", "deepseek_v3", "qwen3"])
def test_mtp_rollback_equals_fresh_run(tiny_checkpoint, variant):
    """Depth-1 and depth-2 caches, each rolled back on its own, as after a rejected draft."""
    backend = MLXBackend.from_checkpoint(tiny_checkpoint(variant, mtp_layers=2), max_kv_size=64)
    prompt, draft, replacement = sequences(backend.vocab_size)
    hidden_prompt = backend.trunk_step(prompt)[1]
    rng = np.random.default_rng(8)
    draft_hidden = rng.standard_normal((DRAFT, backend.hidden_size)).astype(np.float32)
    kept = DRAFT - ROLLBACK
    replacement_hidden = draft_hidden[kept:] + 1.0

    def run(with_rejected_draft: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        outputs = []
        for depth in (1, 2):
            backend.mtp_step(depth, hidden_prompt[:-1], prompt[1:])
            if with_rejected_draft:
                backend.mtp_step(depth, draft_hidden, draft)
                backend.mtp_rollback(depth, ROLLBACK)
            else:
                backend.mtp_step(depth, draft_hidden[:kept], draft[:kept])
            assert backend.mtp_len(depth) == PROMPT - 1 + kept
            outputs.append(backend.mtp_step(depth, replacement_hidden, replacement))
        return outputs

    backend.reset()
    rolled_back = run(with_rejected_draft=True)
    backend.reset()
    assert backend.mtp_len(1) == backend.mtp_len(2) == 0
    fresh = run(with_rejected_draft=False)

    for (logits, h1), (fresh_logits, fresh_h1) in zip(rolled_back, fresh):
        np.testing.assert_array_equal(logits, fresh_logits)
        np.testing.assert_array_equal(h1, fresh_h1)


def test_rollback_past_start_empties_the_cache(tiny_checkpoint):
    backend = MLXBackend.from_checkpoint(tiny_checkpoint("llama"), max_kv_size=64)
    backend.trunk_step([1, 2, 3])
    backend.trunk_rollback(10)
    assert backend.trunk_len() == 0
    fresh = MLXBackend.from_checkpoint(tiny_checkpoint("llama"), max_kv_size=64)
    np.testing.assert_array_equal(backend.trunk_step([4, 5])[0], fresh.trunk_step([4, 5])[0])


def test_mla_caches_only_the_latent(tiny_checkpoint):
    """DeepSeek-V3 caches kv_lora_rank + qk_rope_head_dim numbers per token and layer,
    not per-head keys and values."""
    backend = MLXBackend.from_checkpoint(tiny_checkpoint("deepseek_v3"), max_kv_size=64)
    config = backend.config
    per_token = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    layers = config["num_hidden_layers"] + backend.num_mtp_layers
    assert backend.cache_bytes() == layers * 64 * per_token * 4  # float32
