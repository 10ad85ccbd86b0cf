"""Perplexity of a loaded model on a token sequence: the standard measure of how much a
conversion (quantization, dtype) costs in language-modelling quality.

The text is cut into consecutive windows of ``window`` tokens; each window is one fresh
prefill (``Model.logits``), and every token after a window's first is scored given the tokens
before it in that window. Windows are independent, so memory stays at one window of logits
and the number is comparable between backends and bit widths evaluated the same way.
"""

from __future__ import annotations

import math

import numpy as np

from edgemtp.errors import UserError


def negative_log_likelihoods(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``-log softmax(logits[i])[targets[i]]`` per row, computed stably in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_normalizer = np.log(np.exp(shifted).sum(axis=-1))
    return log_normalizer - shifted[np.arange(len(targets)), targets]


def perplexity(model, token_ids: list[int], window: int = 512) -> float:
    """``exp`` of the mean negative log-likelihood of ``token_ids`` under ``model`` (an
    ``edgemtp.Model``), scored in consecutive independent windows of ``window`` tokens."""
    if window < 2:
        raise UserError(f"perplexity window must be at least 2 tokens, got {window}")
    if len(token_ids) < 2:
        raise UserError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
    total, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        ids = list(token_ids[start : start + window])
        if len(ids) < 2:  # a lone trailing token has nothing before it in its window
            break
        logits = model.logits(ids[:-1])
        total += float(negative_log_likelihoods(logits, np.asarray(ids[1:])).sum())
        count += len(ids) - 1
    return math.exp(total / count)
