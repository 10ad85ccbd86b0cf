"""The speculative decoding loop. It sees only the ``Backend`` interface.

Each step: the drafter proposes ``k`` tokens; ONE trunk pass over the pending
token and the drafts gives the target's distribution p at ``k + 1``
positions; drafts are accepted left to right with probability
``min(1, p(x) / q(x))``; the first rejected position is resampled from
``max(0, p - q)`` normalised, and if all drafts pass a bonus token is drawn
from the last position. This is lossless: the output has exactly the target's
distribution (at temperature 0 it is exactly greedy decoding). The trunk and
the drafter then roll back to the accepted prefix.

With a tree of drafts (edgemtp/engine/tree.py) the same pass verifies every
candidate, the recursive rule picks a path, and the trunk keeps that path's
entries only; the drafter catches up on the path as it would on a chain.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from edgemtp.engine.backend import Backend, trunk_steps
from edgemtp.engine.drafters import NoDrafter, common_prefix, stack_draft_probs
from edgemtp.engine.sampling import Sampler
from edgemtp.engine.stats import Stats
from edgemtp.engine.tree import NODE_BUDGET, DraftTree, TreeShaper, trunk_rows, verify_tree
from edgemtp.engine.tuning import StepTiming


def verify(p: np.ndarray, drafts: list[int], q: np.ndarray | None, sampler: Sampler) -> tuple[int, int]:
    """Rejection sampling. ``p``: target probabilities ``(k+1, V)``; ``q``: draft
    probabilities ``(k, V)`` or ``None`` for a deterministic (one-hot) drafter.
    Returns (number of drafts accepted, the target's next token)."""
    for i, token in enumerate(drafts):
        q_token = 1.0 if q is None else q[i, token]
        if sampler.rng.random() * q_token < p[i, token]:
            continue
        if q is None:
            residual = p[i].copy()
            residual[token] = 0.0
        else:
            residual = np.maximum(p[i] - q[i], 0.0)
        if residual.sum() <= 0.0:  # only through rounding: p and q agree, resample from p
            residual = p[i]
        return i, sampler.sample(residual)
    return len(drafts), sampler.sample(p[len(drafts)])


def speculative_step(backend: Backend, sampler: Sampler, seq: list[int], drafts: list[int], q):
    """Verify ``drafts`` after the pending token ``seq[-1]`` in one trunk pass and
    roll the trunk back to the accepted prefix. Returns (accepted, next token,
    trunk hidden rows of the positions that stay, the target's logits)."""
    logits, hidden = backend.trunk_step([seq[-1], *drafts])
    if sampler.greedy:  # p and q are one-hot: a draft is accepted iff it is the target's argmax
        targets = logits.argmax(axis=-1).tolist()
        accepted = common_prefix(drafts, targets)
        token = targets[accepted]
    else:
        accepted, token = verify(sampler.probs(logits), drafts, q, sampler)
    backend.trunk_rollback(len(drafts) - accepted)
    return accepted, token, hidden[: accepted + 1], logits


def tree_step(backend: Backend, sampler: Sampler, seq: list[int], tree: DraftTree):
    """Verify a draft tree after the pending token ``seq[-1]`` in one trunk pass and keep only
    the accepted path in the trunk cache. Returns (accepted nodes, next token, trunk hidden
    rows of the positions that stay, the target's logits)."""
    tokens, parents = trunk_rows(tree, seq[-1])
    logits, hidden = backend.trunk_step_tree(tokens, parents)
    path, token = verify_tree(logits, tree, sampler)
    rows = [0, *(node + 1 for node in path)]
    backend.trunk_keep(len(tokens), rows)
    return path, token, hidden[rows], logits


def tree_provenance(tree: DraftTree, path: list[int]) -> tuple[list[str], int]:
    """Labels of a tree step's tokens ("branch": an accepted guess that was not the head's
    first) and how many of the chain's first guesses held."""
    labels = ["draft" if tree.first[node] else "branch" for node in path]
    end = "bonus" if not tree.children(path[-1] if path else -1) else "correction"
    chain_accepted = next((i for i, label in enumerate(labels) if label != "draft"), len(labels))
    return [*labels, end], chain_accepted


def decode(backend: Backend, drafter, policy, sampler: Sampler, seq: list[int], start: int,
           max_tokens: int, stop_ids: set[int], stats: Stats,
           shaper: TreeShaper | None = None) -> Iterator[tuple[list[int], list[str]]]:
    """Generate up to ``max_tokens`` tokens after the prompt ``seq``.

    The trunk already holds ``seq[:start]``. ``seq`` is extended in place with
    every confirmed token (the caller reads it to know what the caches hold).
    Yields, per trunk step, the new tokens and their provenance. With a ``shaper`` the drafter
    drafts trees (``draft_tree``); a tree without siblings runs as a chain.
    """
    if max_tokens <= 0:
        return
    began = time.perf_counter()
    logits, hidden = trunk_steps(backend, seq[start:])
    stats.prompt_tokens = len(seq) - start
    seq.append(sampler.sample(sampler.probs(logits[-1])[0]))
    drafter.observe(seq, start, hidden)
    decode_began = time.perf_counter()
    stats.prompt_tokens_per_s = stats.prompt_tokens / (decode_began - began)
    if hasattr(backend, "ranks_report"):  # several machines: time per pass counts decoding passes only
        backend.reset_pass_times()
    stats.add_tokens(["bonus"])
    stats.record_memory()
    yield seq[-1:], ["bonus"]

    if seq[-1] in stop_ids:
        return
    if isinstance(drafter, NoDrafter) and sampler.greedy and hasattr(backend, "greedy_tokens"):
        yield from _plain_greedy(backend, seq, max_tokens, stop_ids, stats, decode_began)
        return
    while stats.generated_tokens < max_tokens:
        room = min(max_tokens - stats.generated_tokens, backend.max_context - backend.trunk_len()) - 1
        if room < 0:
            break  # the context is full
        step_began = time.perf_counter()
        k = min(policy.choose(seq), room)
        probe = drafter.peek(seq, sampler) if k == 0 and policy.wants_probe() else None
        start = backend.trunk_len()
        # A tree needs room for all its nodes in the cache, though only its path stays.
        fits = backend.max_context - start > NODE_BUDGET
        tree = drafter.draft_tree(seq, k, sampler, policy.min_prob, shaper) if shaper and k and fits else None
        if tree is not None and len(tree.tokens) > tree.depth():
            drafted_at = time.perf_counter()
            path, token, hidden, logits = tree_step(backend, sampler, seq, tree)
            verified_at = time.perf_counter()
            new = [*(tree.tokens[node] for node in path), token]
            provenance, chain_accepted = tree_provenance(tree, path)
            drafted, accepted, nodes = tree.depth(), len(path), len(tree.tokens)
        else:
            if tree is not None:  # a chain: the chain's own path
                drafts, q = tree.tokens, stack_draft_probs(tree.q)
            else:
                drafts, q = drafter.draft(seq, k, sampler, policy.min_prob) if k else ([], None)
            drafted_at = time.perf_counter()
            accepted, token, hidden, logits = speculative_step(backend, sampler, seq, drafts, q)
            verified_at = time.perf_counter()
            new = [*drafts[:accepted], token]
            provenance = ["draft"] * accepted + ["correction" if accepted < len(drafts) else "bonus"]
            drafted = nodes = len(drafts)
            chain_accepted = accepted
        if probe is not None:  # P(a free first guess would have been accepted) = sum min(p, q)
            policy.update_probe(float(np.minimum(probe, sampler.probs(logits[0])[0]).sum()))
        seq.extend(new)
        drafter.observe(seq, start, hidden)
        policy.update(drafted, chain_accepted)
        if shaper is not None:
            shaper.record(drafted, chain_accepted)
        stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
        if stop is not None:  # the caches may run past the stop token; the output does not
            new, provenance = new[: stop + 1], provenance[: stop + 1]
        stats.copied += drafted if drafter.copying() else 0
        _record_step(backend, stats, drafted, accepted, provenance, decode_began, nodes)
        yield new, provenance
        if stop is not None:
            return
        # Timed after the consumer took the tokens: what it does per step is part of a step's cost.
        policy.record_timing(StepTiming(drafted=drafted, draft=drafted_at - step_began, verified=nodes + 1,
                                        trunk=verified_at - drafted_at, total=time.perf_counter() - step_began,
                                        caught_up=drafter.caught_up()))


def _plain_greedy(backend, seq: list[int], max_tokens: int, stop_ids: set[int], stats: Stats,
                  decode_began: float) -> Iterator[tuple[list[int], list[str]]]:
    """Plain greedy decoding through the backend's own (pipelined) loop: the same tokens and
    stats as the loop in ``decode`` with no drafts."""
    count = min(max_tokens - stats.generated_tokens, backend.max_context - backend.trunk_len())
    tokens = backend.greedy_tokens(seq[-1], count)
    try:
        for token in tokens:
            seq.append(token)
            _record_step(backend, stats, 0, 0, ["bonus"], decode_began)
            yield [token], ["bonus"]
            if token in stop_ids:
                return
    finally:
        tokens.close()  # rolls back a step queued ahead


def _record_step(backend: Backend, stats: Stats, drafted: int, accepted: int, provenance: list[str],
                 decode_began: float, nodes: int | None = None) -> None:
    """Count a trunk step's tokens, then refresh the decode speed (every token after the first,
    which came with the prompt pass, over the time since), the peak memory and, over several
    machines, each rank's memory and the time per pass."""
    stats.record_step(drafted, accepted, provenance, nodes)
    stats.tokens_per_s = (stats.generated_tokens - 1) / (time.perf_counter() - decode_began)
    stats.record_memory()
    if hasattr(backend, "ranks_report"):
        stats.pipeline = backend.ranks_report()
