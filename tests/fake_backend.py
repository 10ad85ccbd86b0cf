"""A toy ``Backend`` for engine tests: a numpy "language model" over a tiny
vocabulary whose logits are a deterministic function of the context.

Its caches are real lists of what was fed, so any bookkeeping mistake of the
engine shows up: the trunk's logits depend on the cached tokens, and
``mtp_step`` asserts that every MTP entry sits where the teacher-forced
convention puts it (depth ``d`` entry ``i`` sees exactly ``t[0..i+d]``) and
reads the previous depth's hidden state.

Hidden rows are ``[depth, context id]``: they name the context they stand for.
"""

from __future__ import annotations

import zlib

import numpy as np


class FakeTokenizer:
    """Token ids are their own text; no chat template."""

    def __init__(self, eos_token_ids=()):
        self.eos_token_ids = set(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt=True) -> list[int]:
        return [t for m in messages for t in self.encode(m["content"])]

    def detokenizer(self):
        class Detokenizer:
            def add(self, token_id: int) -> str:
                return f"{token_id} "

            def flush(self) -> str:
                return ""

        return Detokenizer()


class FakeBackend:
    def __init__(self, vocab_size=16, num_mtp_layers=1, mtp_accuracy=1.0, mtp_blur=1.0, order=None,
                 sharpness=3.0, noise=0.0, seed=0, max_context=100_000):
        """``mtp_accuracy``: share of contexts where the MTP head predicts the
        target's distribution (times ``mtp_blur``, which keeps the argmax);
        elsewhere it is unrelated noise. ``order``: the trunk looks at only the
        last ``order`` tokens (repetitive text, good for n-gram drafting).
        ``noise``: how far this model's logits stray from the model with the
        same ``seed`` and no noise (a draft model for it)."""
        self.vocab_size = vocab_size
        self.hidden_size = 2
        self.num_mtp_layers = num_mtp_layers
        self.max_context = max_context
        self.draft_ids = None
        self.config = {"fake": [vocab_size, num_mtp_layers, mtp_accuracy, mtp_blur, order, sharpness, noise, seed]}
        self.mtp_accuracy, self.mtp_blur, self.order = mtp_accuracy, mtp_blur, order
        self.sharpness, self.noise, self.seed = sharpness, noise, seed
        self._context_ids: dict[tuple, int] = {}
        self._contexts: list[tuple] = []
        self._logit_memo: dict[tuple, np.ndarray] = {}
        self.trunk_tokens_run = 0  # tokens fed to the trunk, to check prefix reuse
        self.reset()

    # -- the toy model ------------------------------------------------------
    def _random(self, *key) -> np.random.Generator:
        # crc32 of the repr, not hash(): str hashes change from run to run.
        return np.random.default_rng([self.seed, zlib.crc32(repr(key).encode())])

    def target_logits(self, context: tuple) -> np.ndarray:
        key = context[-self.order :] if self.order else context
        if key not in self._logit_memo:
            logits = self.sharpness * self._random("trunk", key).standard_normal(self.vocab_size)
            if self.noise:
                logits = logits + self.noise * self._random("noise", key).standard_normal(self.vocab_size)
            self._logit_memo[key] = logits.astype(np.float32)
        return self._logit_memo[key]

    def mtp_prediction(self, context: tuple, depth: int) -> np.ndarray:
        key = ("mtp", depth, context)
        if key not in self._logit_memo:
            rng = self._random(*key)
            if rng.random() < self.mtp_accuracy:
                logits = self.target_logits(context) * np.float32(self.mtp_blur)
            else:
                logits = (self.sharpness * rng.standard_normal(self.vocab_size)).astype(np.float32)
            self._logit_memo[key] = logits
        return self._logit_memo[key]

    def _id(self, context: tuple) -> int:
        if context not in self._context_ids:
            self._context_ids[context] = len(self._contexts)
            self._contexts.append(context)
        return self._context_ids[context]

    # -- Backend interface ------------------------------------------------------
    def reset(self) -> None:
        self.trunk: list[int] = []
        self.mtp: dict[int, list[tuple]] = {}

    def trunk_step(self, tokens):
        logits, hidden = [], []
        for t in tokens:
            assert 0 <= t < self.vocab_size
            self.trunk.append(int(t))
            context = tuple(self.trunk)
            logits.append(self.target_logits(context))
            hidden.append([0.0, float(self._id(context))])
        self.trunk_tokens_run += len(tokens)
        return np.array(logits, dtype=np.float32), np.array(hidden, dtype=np.float32)

    def trunk_step_tree(self, tokens, parents):
        """Row ``j`` sees the cache and its ancestors only; the cache holds every row until
        ``trunk_keep`` picks a path."""
        contexts = []
        for t, parent in zip(tokens, parents):
            assert 0 <= t < self.vocab_size and -1 <= parent < len(contexts)
            contexts.append((contexts[parent] if parent >= 0 else tuple(self.trunk)) + (int(t),))
        self.trunk.extend(int(t) for t in tokens)
        self.trunk_tokens_run += len(tokens)
        logits = [self.target_logits(context) for context in contexts]
        hidden = [[0.0, float(self._id(context))] for context in contexts]
        return np.array(logits, dtype=np.float32), np.array(hidden, dtype=np.float32)

    def trunk_keep(self, count, rows):
        assert rows == sorted(rows) and 0 <= count <= len(self.trunk)
        start = len(self.trunk) - count
        self.trunk[start:] = [self.trunk[start + row] for row in rows]

    def trunk_len(self) -> int:
        return len(self.trunk)

    def trunk_rollback(self, n: int) -> None:
        assert 0 <= n <= len(self.trunk), (n, len(self.trunk))
        del self.trunk[len(self.trunk) - n :]

    def mtp_step(self, depth, hidden, tokens):
        assert depth >= 1 and len(hidden) == len(tokens) > 0
        cache = self.mtp.setdefault(depth, [])
        logits, out = [], []
        for (tag, context_id), t in zip(np.asarray(hidden), tokens):
            assert int(tag) == depth - 1, f"depth {depth} fed hidden rows of depth {int(tag)}"
            context = self._contexts[int(context_id)] + (int(t),)
            i = len(cache)
            assert len(context) == i + depth + 1, f"depth {depth} entry {i} sees {len(context)} tokens"
            assert not cache or cache[-1] == context[:-1], f"depth {depth} entry {i} does not extend entry {i - 1}"
            cache.append(context)
            logits.append(self.mtp_prediction(context, depth))
            out.append([float(depth), float(self._id(context))])
        return np.array(logits, dtype=np.float32), np.array(out, dtype=np.float32)

    def mtp_len(self, depth: int) -> int:
        return len(self.mtp.get(depth, []))

    def mtp_rollback(self, depth: int, n: int) -> None:
        cache = self.mtp.setdefault(depth, [])
        assert 0 <= n <= len(cache), (depth, n, len(cache))
        del cache[len(cache) - n :]

    def weight_bytes(self) -> int:
        return 0

    def cache_bytes(self) -> int:
        return 8 * (len(self.trunk) + sum(len(c) for c in self.mtp.values()))
