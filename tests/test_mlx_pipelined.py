"""MLX plain greedy decoding runs pipelined (``MLXBackend.greedy_tokens``): it must give the
tokens, and leave the trunk cache, exactly as step-by-step decoding does, also when its consumer
stops early."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from edgemtp.errors import UserError  # noqa: E402
from edgemtp.mlx_backend.backend import MLXBackend  # noqa: E402

PROMPT = [3, 14, 15, 9, 2, 6]


def stepwise(backend: MLXBackend, token: int, count: int) -> list[int]:
    out = []
    for _ in range(count):
        logits, _ = backend.trunk_step([token])
        token = int(np.argmax(logits[-1]))
        out.append(token)
    return out


def test_pipelined_greedy_matches_stepwise_decoding(tiny_checkpoint):
    backend = MLXBackend.load(tiny_checkpoint("llama"), max_kv_size=128)
    logits, _ = backend.trunk_step(PROMPT)
    first = int(np.argmax(logits[-1]))
    expected = stepwise(backend, first, 20)
    held = backend.trunk_len()  # the prompt, `first` and all generated tokens but the pending last

    backend.trunk_rollback(held - len(PROMPT))
    assert list(backend.greedy_tokens(first, 20)) == expected
    assert backend.trunk_len() == held

    # Stopping after 5 tokens rolls back the step already queued for the 5th ...
    backend.trunk_rollback(held - len(PROMPT))
    tokens = backend.greedy_tokens(first, 20)
    got = [next(tokens) for _ in range(5)]
    tokens.close()
    assert got == expected[:5] and backend.trunk_len() == len(PROMPT) + 5
    # ... so decoding goes on from there exactly as if it had never stopped.
    assert stepwise(backend, got[-1], 3) == expected[5:8]


def test_pipelined_greedy_refuses_to_overrun_the_cache(tiny_checkpoint):
    backend = MLXBackend.load(tiny_checkpoint("llama"), max_kv_size=16)
    backend.trunk_step(PROMPT)
    with pytest.raises(UserError, match="exceed the context"):
        next(backend.greedy_tokens(1, 11))
