"""Drafters: cheap guesses of the next few tokens, verified by the target.

Every drafter answers three questions for the decoding loop:

- ``reusable_prefix(tokens)``: how many leading tokens of a new prompt its
  state still matches, so the trunk need not re-run them;
- ``observe(seq, start, hidden)``: the confirmed sequence grew (``seq[-1]``
  is the pending token, not yet in the trunk; ``hidden`` are the trunk's
  hidden rows for positions ``start..len(seq)-2``); roll speculative state
  back to what is still true and catch up;
- ``draft(seq, k, sampler, min_prob)``: up to ``k`` tokens following ``seq``
  and their draft probabilities ``q`` (``(n, V)``), or ``None`` for ``q`` when
  q is one-hot (a deterministic drafter, or any drafter at temperature 0).

``peek(seq, sampler)`` returns q for the first draft token when that costs
nothing, so the adaptive draft length can keep measuring acceptance while it
does not draft; otherwise ``None``.
"""

from __future__ import annotations

import time

import numpy as np

from edgemtp.draft_vocab import scatter_logits
from edgemtp.engine.backend import Backend, mtp_steps, trunk_steps
from edgemtp.engine.sampling import Sampler
from edgemtp.engine.tree import MAX_WIDTH, DraftTree, TreeShaper, sorted_masses
from edgemtp.errors import UserError


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def confidence(logits: np.ndarray, q: np.ndarray | None) -> float:
    """Top probability of a draft: q's, or at temperature 0 (q one-hot, None) the plain softmax's."""
    if q is not None:
        return float(q.max())
    logits = np.asarray(logits, dtype=np.float32)
    return float(1.0 / np.exp(logits - logits.max()).sum(dtype=np.float64))


def draw(logits: np.ndarray, sampler: Sampler, min_prob: float,
         columns: np.ndarray | None = None, vocab_size: int = 0) -> tuple[int, np.ndarray | None] | None:
    """One draft token and its distribution q, or None when the draft's top probability is below
    ``min_prob``. ``logits``: ``(V,)``, or ``(N,)`` over the token ids ``columns`` (sorted, so
    the argmax breaks ties as over the full vocabulary) of a draft vocabulary.

    At temperature 0 q is None: it would be one-hot at the argmax. A draft step then builds no
    full-vocabulary array, which was the largest Python cost of an MTP draft step in the decode loop.
    """
    if not sampler.greedy:
        logits, columns = scatter_logits(logits[None], columns, vocab_size)[0], None
    q = None if sampler.greedy else sampler.probs(logits)[0]
    if min_prob > 0 and confidence(logits, q) < min_prob:
        return None
    if q is not None:
        return sampler.sample(q), q
    best = int(np.argmax(logits))
    return (best if columns is None else int(columns[best])), None


def stack_draft_probs(qs: list[np.ndarray | None]) -> np.ndarray | None:
    """The ``(n, V)`` q of a draft's tokens, or None when there are none or they are one-hot."""
    return np.stack(qs) if qs and qs[0] is not None else None


def median_seconds(action, repeats: int = 5, before=None) -> float:
    """Median seconds of ``action`` over ``repeats`` calls, after one untimed warm-up call (the
    first call allocates). ``before``, untimed, runs ahead of every call."""
    times = []
    for round_ in range(repeats + 1):
        if before is not None:
            before()
        start = time.perf_counter()
        action()
        if round_:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def mtp_step_seconds(backend: Backend, repeats: int = 5) -> float:
    """Seconds of one single-token MTP step (depth 1) as decoding pays it: right after a trunk step.

    A trunk step streams every trunk weight through the CPU caches and evicts the MTP layer's.
    Timed back to back instead, the MTP step of the default model took about a third of what it
    takes after a trunk step on this project's 2-core test machine (0.2 against 0.6 ms), and both
    the draft-length policy and bench's ideal speedup took drafts for that much cheaper.
    Every step is rolled back: the caches end as they were.
    """
    hidden = np.zeros((1, backend.hidden_size), dtype=np.float32)

    def trunk_step():
        backend.trunk_step([0])
        backend.trunk_rollback(1)

    def draft_step():
        backend.mtp_step(1, hidden, [0])
        backend.mtp_rollback(1, 1)

    return median_seconds(draft_step, repeats, before=trunk_step)


# A draft call that runs a model over more rows than this is catching up (a steady step feeds at
# most the longest draft plus one).
CATCH_UP_ROWS = 8


class NoDrafter:
    """Plain decoding: one token per trunk step."""

    def reusable_prefix(self, tokens: list[int]) -> int:
        return len(tokens)

    def observe(self, seq: list[int], start: int, hidden: np.ndarray) -> None:
        pass

    def draft(self, seq, k, sampler, min_prob):
        return [], None

    def peek(self, seq, sampler):
        return None

    def copying(self) -> bool:
        """Whether this step's drafts were copied from the context (no model call)."""
        return False

    def caught_up(self) -> bool:
        """Whether this step's drafting also caught up on positions it had skipped (the prompt,
        steps that did not draft): its time then says little about what a draft costs."""
        return False

    def measure_step_cost(self) -> float:
        return 0.0


class NgramDrafter(NoDrafter):
    """Prompt lookup: find the longest suffix (up to ``max_ngram`` tokens) that
    occurred earlier in the context and propose what followed it there.
    Pays off on code edits, summaries and repeated text; costs no model call."""

    max_ngram = 4  # longest suffix looked up

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def match(self, seq: list[int], k: int) -> tuple[int, list[int]]:
        """The length of the longest suffix of ``seq`` (up to ``max_ngram``) that occurred earlier,
        and up to ``k`` tokens that followed its most recent occurrence; ``(0, [])`` if none.

        Only positions holding the last token can end a match: they are found in one pass, so a
        step that finds nothing (the hybrid drafter looks every step) stays cheap on long contexts.
        """
        if k <= 0 or len(seq) < 2:
            return 0, []
        last = seq[-1]
        ends = [i for i, token in enumerate(seq[:-1]) if token == last]
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            suffix = seq[-n:]
            # Most recent earlier occurrence first: it is the likeliest to repeat.
            for end in reversed(ends):
                if end >= n - 1 and seq[end - n + 1 : end + 1] == suffix:
                    return n, seq[end + 1 : end + 1 + k]
        return 0, []

    def draft(self, seq, k, sampler, min_prob):
        return self.match(seq, k)[1], None

    def copying(self) -> bool:
        return True

    def peek(self, seq, sampler):
        guess = self.match(seq, 1)[1]
        if not guess:
            return None
        q = np.zeros(self.vocab_size)
        q[guess[0]] = 1.0
        return q


class MTPDrafter:
    """Drafts with the model's own MTP layers, chained: depth ``d`` predicts the
    token ``d`` steps past the pending one (the last MTP layer is reused for
    depths beyond the number of layers).

    Depth ``d``'s cache holds teacher-forced entries (see ``backend.py``):
    entry ``i`` combines ``h^{d-1}[i]`` with ``t[i+d]``. With ``L`` tokens in
    the trunk and ``t[L]`` pending, entries ``0..L-d`` use confirmed tokens
    only and entries ``L-d+1..L-1`` read drafts; the draft of depth ``d``
    comes from entry ``L-1``. After verification the entries whose tokens
    turned out right are kept and the rest rolled back.

    Every depth catches up lazily, in the call that drafts (or probes) with
    it: a step that does not draft costs no MTP work, and a lagging depth
    catches up on all the positions it missed in one batched call. The hidden
    rows a lagging depth will need are kept until it catches up.
    """

    def __init__(self, backend: Backend, max_depth: int):
        if backend.num_mtp_layers == 0:
            raise UserError("this model has no MTP layers; use --spec ngram, --spec draft or --spec none")
        self.backend = backend
        self.max_depth = max_depth
        self.seq: list[int] = []  # tokens the MTP caches were computed with (drafts included)
        # depth -> (first index, hidden rows): recent outputs of each depth (0 = trunk),
        # kept from the index the next depth will need.
        self.rows: dict[int, tuple[int, np.ndarray]] = {}
        # depth -> logits of its newest entry, over backend.draft_ids's tokens when it has them
        self.last_logits: dict[int, np.ndarray] = {}
        self.rows_run = 0  # the most rows one depth ran in the last draft (caught_up)

    def reusable_prefix(self, tokens: list[int]) -> int:
        # Depth d's entries near the end read tokens up to d positions ahead, so
        # re-running the last max_depth common positions rebuilds them all.
        return max(0, common_prefix(self.seq, tokens) - self.max_depth)

    def observe(self, seq: list[int], start: int, hidden: np.ndarray) -> None:
        common = common_prefix(self.seq, seq)
        self._trim(0, start)
        self._append(0, start, hidden)
        keep = start
        for d in range(1, self.max_depth + 1):
            # Keep entries whose tokens are confirmed and whose input rows are not recomputed.
            keep = min(self.backend.mtp_len(d), max(0, common - d), keep)
            self.backend.mtp_rollback(d, self.backend.mtp_len(d) - keep)
            self._trim(d, keep)
        self.seq = list(seq)
        for d in range(self.max_depth):  # drop rows no deeper depth will read again
            if d not in self.rows:  # short sequences: deep depths have no entries yet
                break
            first, rows = self.rows[d]
            drop = max(0, self.backend.mtp_len(d + 1) - first)
            self.rows[d] = (first + drop, rows[drop:])

    def draft(self, seq, k, sampler, min_prob):
        last = len(seq) - 2  # index of the entry whose output predicts the next draft
        drafts, qs = [], []
        self.rows_run = 0
        for d in range(1, min(k, self.max_depth) + 1):
            self._run_depth(d, last, self.seq)
            drawn = draw(self.last_logits[d], sampler, min_prob, self.backend.draft_ids, self.backend.vocab_size)
            if drawn is None:
                break
            token, q = drawn
            drafts.append(token)
            qs.append(q)
            self.seq.append(token)
        return drafts, stack_draft_probs(qs)

    def draft_tree(self, seq, k, sampler, min_prob, shaper: TreeShaper) -> DraftTree:
        """The chain ``draft`` makes, plus siblings at each position: the head's next guesses
        there (the next most likely at temperature 0, else drawn from q without replacement),
        as many as ``shaper`` decides. A sibling is a leaf: the MTP caches follow the chain."""
        chain, qs = self.draft(seq, k, sampler, min_prob)
        heads = []  # per position: the head's distribution (q, or at temperature 0 its softmax)
        for d in range(1, len(chain) + 1):
            if qs is not None:
                heads.append(qs[d - 1])
            else:
                logits = self.last_logits[d].astype(np.float64)
                probs = np.exp(logits - logits.max())
                heads.append(probs / probs.sum())
        widths = shaper.widths([sorted_masses(head, MAX_WIDTH) for head in heads])
        tree = DraftTree()
        for d, token in enumerate(chain):
            tree.add(token, d - 1, None if qs is None else qs[d])
        for d, (width, head) in enumerate(zip(widths, heads)):
            for token, q in self._siblings(chain[d], head, width - 1, sampler):
                tree.add(token, d - 1, q)
        return tree

    def _siblings(self, first: int, head: np.ndarray, count: int, sampler: Sampler):
        """Up to ``count`` more guesses after ``first`` from the head's distribution ``head``
        (over the draft vocabulary at temperature 0), each with the q it was drawn from."""
        if sampler.greedy:
            columns = np.argsort(-head, kind="stable")[: count + 1]
            ids = columns if self.backend.draft_ids is None else self.backend.draft_ids[columns]
            return [(int(token), None) for token in ids if token != first][:count]
        out, q = [], head.copy()
        q[first] = 0.0
        while len(out) < count and q.sum() > 0.0:
            q = q / q.sum()
            token = sampler.sample(q)
            out.append((token, q))
            q = q.copy()
            q[token] = 0.0
        return out

    def peek(self, seq, sampler):
        self._run_depth(1, len(seq) - 2, seq)
        return sampler.probs(scatter_logits(self.last_logits[1][None], self.backend.draft_ids, self.backend.vocab_size))[0]

    def copying(self) -> bool:
        return False

    def caught_up(self) -> bool:
        return self.rows_run > CATCH_UP_ROWS

    def measure_step_cost(self) -> float:
        return mtp_step_seconds(self.backend)

    def _run_depth(self, d: int, upto: int, seq: list[int]) -> None:
        """Compute depth ``d``'s entries from its cache length up to index ``upto``."""
        first = self.backend.mtp_len(d)
        if upto < first:
            return
        rows_first, rows = self.rows[d - 1]
        assert rows_first <= first, "MTP catch-up lost the hidden rows it needs"
        hidden = rows[first - rows_first : upto + 1 - rows_first]
        self.rows_run = max(self.rows_run, len(hidden))
        logits, out = mtp_steps(self.backend, d, hidden, seq[first + d : upto + d + 1])
        self._append(d, first, out)
        self.last_logits[d] = logits[-1]

    def _trim(self, d: int, end: int) -> None:
        if d in self.rows:
            first, rows = self.rows[d]
            self.rows[d] = (first, rows[: max(0, end - first)])

    def _append(self, d: int, first: int, new_rows: np.ndarray) -> None:
        old = self.rows.get(d)
        if old is not None and old[0] + len(old[1]) == first and len(old[1]):
            self.rows[d] = (old[0], np.concatenate([old[1], new_rows]))
        else:
            self.rows[d] = (first, new_rows)


class DraftModelDrafter:
    """Drafts with a smaller model sharing the target's tokenizer. It keeps its
    own cache, synchronised lazily: before drafting it rolls back to the
    longest prefix it shares with the confirmed sequence and feeds the rest."""

    def __init__(self, draft_backend: Backend, target_vocab_size: int):
        self.backend = draft_backend
        self.vocab_size = target_vocab_size
        self.backend.reset()
        self.tokens: list[int] = []  # what the draft model's cache holds
        self.fed = 0  # tokens fed before drafting in the last draft (caught_up)

    def reusable_prefix(self, tokens: list[int]) -> int:
        return len(tokens)

    def observe(self, seq, start, hidden):
        pass

    def _logits(self, new_tokens: list[int]) -> np.ndarray:
        logits, _ = trunk_steps(self.backend, new_tokens)
        self.tokens.extend(new_tokens)
        out = np.full(self.vocab_size, -np.inf, dtype=np.float64)
        n = min(self.vocab_size, logits.shape[-1])  # vocabularies may differ in padding only
        out[:n] = logits[-1, :n]
        return out

    def draft(self, seq, k, sampler, min_prob):
        k = min(k, self.backend.max_context - len(seq))
        if k <= 0:
            return [], None
        keep = min(common_prefix(self.tokens, seq), len(seq) - 1)
        self.backend.trunk_rollback(self.backend.trunk_len() - keep)
        del self.tokens[keep:]
        self.fed = len(seq) - keep
        logits = self._logits(seq[keep:])
        drafts, qs = [], []
        while True:
            drawn = draw(logits, sampler, min_prob)
            if drawn is None:
                break
            drafts.append(drawn[0])
            qs.append(drawn[1])
            if len(drafts) == k:
                break
            logits = self._logits(drafts[-1:])
        return drafts, stack_draft_probs(qs)

    def peek(self, seq, sampler):
        return None

    def copying(self) -> bool:
        return False

    def caught_up(self) -> bool:
        return self.fed > CATCH_UP_ROWS

    def measure_step_cost(self) -> float:
        """Seconds for one single-token step of the draft model."""

        def one_step():
            self.backend.trunk_step([0])
            self.backend.trunk_rollback(1)

        cost = median_seconds(one_step)
        self.backend.reset()
        self.tokens = []
        return cost


class HybridDrafter:
    """N-gram continuation where the context repeats, the MTP chain elsewhere.

    Which of the two drafts a step is the policy's choice (``HybridPolicy``, or
    ``FixedHybridLength`` at a fixed length): it sets ``continuation`` to the tokens to copy, or
    to None for MTP. The MTP caches follow every step either way (they catch up lazily, in the
    next MTP draft), and a step that does not draft probes MTP, as MTP alone does.
    """

    def __init__(self, mtp: MTPDrafter, ngram: NgramDrafter):
        self.mtp = mtp
        self.ngram = ngram
        self.continuation: list[int] | None = None

    def reusable_prefix(self, tokens: list[int]) -> int:
        return self.mtp.reusable_prefix(tokens)

    def observe(self, seq: list[int], start: int, hidden: np.ndarray) -> None:
        self.mtp.observe(seq, start, hidden)

    def draft(self, seq, k, sampler, min_prob):
        if self.continuation is not None:
            return self.continuation[:k], None
        return self.mtp.draft(seq, k, sampler, min_prob)

    def peek(self, seq, sampler):
        return self.mtp.peek(seq, sampler)

    def copying(self) -> bool:
        return self.continuation is not None

    def caught_up(self) -> bool:
        return self.continuation is None and self.mtp.caught_up()

    def measure_step_cost(self) -> float:
        return self.mtp.measure_step_cost()
