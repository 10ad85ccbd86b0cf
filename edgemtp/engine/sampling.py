"""Turning logits into probabilities and probabilities into tokens.

The same ``Sampler`` warps the target's logits (p) and the drafter's logits
(q), which is what makes rejection sampling lossless: it reproduces exactly
the distribution the target would sample from on its own.

Temperature 0 is greedy: the "distribution" is one-hot at the argmax, so the
same verification code accepts a draft iff it equals the target's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgemtp.errors import UserError


@dataclass
class Sampler:
    temperature: float = 0.0
    top_k: int = 0  # 0 = keep every token
    top_p: float = 1.0  # 1.0 = keep every token
    seed: int | None = None
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}; use 0 for greedy decoding")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}; use 0 to disable top-k")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}; use 1 to disable top-p")
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Warped probabilities (float64) for logits of shape ``(V,)`` or ``(n, V)``."""
        logits = np.atleast_2d(logits)
        if self.greedy:  # argmax on the logits as they are: no float64 copy of a (n, V) array
            out = np.zeros(logits.shape)
            out[np.arange(len(logits)), logits.argmax(axis=-1)] = 1.0
            return out
        logits = logits.astype(np.float64)
        scaled = logits / self.temperature
        if self.top_k and self.top_k < scaled.shape[-1]:
            kth = np.partition(scaled, -self.top_k, axis=-1)[:, -self.top_k, None]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        out = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        out /= out.sum(axis=-1, keepdims=True)
        if self.top_p < 1.0:
            out = _top_p(out, self.top_p)
        return out

    def sample(self, probs: np.ndarray) -> int:
        """Draw one token from a probability vector (need not be normalised)."""
        if self.greedy:  # every greedy vector is one-hot (or a residual of one): its hot index
            return int(np.argmax(probs))
        cdf = np.cumsum(probs)
        # side="right" never lands on a zero-probability token, so a one-hot
        # vector always gives its hot index, whatever the random draw.
        index = np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")
        return int(min(index, len(cdf) - 1))


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``."""
    order = np.argsort(-probs, axis=-1)
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    out = np.where(keep, probs, 0.0)
    return out / out.sum(axis=-1, keepdims=True)
