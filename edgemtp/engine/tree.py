"""Draft trees: several candidates per draft position, verified in one trunk pass.

A chain drafts one guess per position; when the target rejects it the step ends. A tree also
offers the draft head's next guesses at a position as siblings (EAGLE-2 / SpecInfer), so a
rejected first guess can still be rescued by the second or third, at the price of more rows in
the trunk pass. On a device whose trunk step barely costs more for a few more rows (the cost
curve ``T(n)``), that trade pays.

The trunk runs the pending token and every node at once: node ``j`` sits at position
``trunk_len + depth(j)`` and attends to the cache plus its own ancestors
(``Backend.trunk_step_tree``); the accepted path's cache entries are then moved into place
(``Backend.trunk_keep``), so the caches equal those of a run that saw only the accepted tokens.

The drafter's side of the interface is ``DraftTree``: tokens, parent indices (-1: the pending
token) and per node the distribution q it was drawn from, given its parent and its earlier
siblings (None: one-hot, a deterministic guess or temperature 0). Any drafter can fill one, and
sibling groups may mix drafters (an n-gram guess beside MTP guesses), as long as each node's
draw depends only on its ancestors and earlier siblings, never on the target.

Verification is the recursive rejection rule of SpecInfer / EAGLE: at a node, try its children
in order; accept child ``c`` with probability ``min(1, p(c) / q_c(c))``; on rejection
``p := norm(max(p - q_c, 0))`` and try the next sibling; when every child is rejected, sample
from what is left of p. The output has exactly the target's distribution (at temperature 0 it
is greedy decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgemtp.engine.sampling import Sampler
from edgemtp.engine.tuning import AdaptiveDraftLength, Costs

# Draft nodes one trunk pass may verify: the tree's rows, the pending token's aside. The cost
# curve is measured up to this many rows plus one.
NODE_BUDGET = 8
# Candidates per draft position (the chain's guess and its siblings).
MAX_WIDTH = 4


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # index of the parent node, -1 for the pending token
    q: list[np.ndarray | None] = field(default_factory=list)  # the distribution each node was drawn from
    # Whether each node is its parent's first child: the head's first guess (what a chain drafts).
    first: list[bool] = field(default_factory=list)

    def add(self, token: int, parent: int, q: np.ndarray | None) -> int:
        """Append a node (children after their parent) and return its index."""
        self.first.append(parent not in self.parents)
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.q.append(q)
        return len(self.tokens) - 1

    def children(self, node: int) -> list[int]:
        """The children of ``node`` (-1: the pending token) in the order they were drawn."""
        return [j for j, parent in enumerate(self.parents) if parent == node]

    def depth(self) -> int:
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 + (depths[parent] if parent >= 0 else 0))
        return max(depths, default=0)


def trunk_rows(tree: DraftTree, pending: int) -> tuple[list[int], list[int]]:
    """The tokens and parents a trunk pass runs: the pending token (row 0, the root) and then
    every node (row ``j + 1``)."""
    return [pending, *tree.tokens], [-1, *(parent + 1 for parent in tree.parents)]


def node_depths(parents: list[int]) -> list[int]:
    """Depth of each row of ``trunk_rows``: 0 for the root, parents before children."""
    depths: list[int] = []
    for parent in parents:
        depths.append(depths[parent] + 1 if parent >= 0 else 0)
    return depths


def ancestor_mask(parents: list[int]) -> np.ndarray:
    """``(n, n)`` bool: ``mask[i, j]`` is whether row ``j`` is row ``i`` or one of its ancestors."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask


def verify_tree(logits: np.ndarray, tree: DraftTree, sampler: Sampler) -> tuple[list[int], int]:
    """The recursive rejection rule (module docstring). ``logits``: the target's ``(n + 1, V)``
    rows from ``trunk_rows``. Returns (accepted nodes, root to leaf, the target's next token)."""
    path: list[int] = []
    node = -1
    if sampler.greedy:  # p one-hot: a child is accepted iff it is the target's argmax
        targets = logits.argmax(axis=-1)
        while True:
            target = int(targets[node + 1])
            match = [c for c in tree.children(node) if tree.tokens[c] == target]
            if not match:
                return path, target
            node = match[0]
            path.append(node)
    probs = sampler.probs(logits)
    while True:
        p = probs[node + 1]
        for child in tree.children(node):
            token, q = tree.tokens[child], tree.q[child]
            q_token = 1.0 if q is None else q[token]
            if sampler.rng.random() * q_token < p[token]:
                path.append(child)
                node = child
                break
            if q is None:
                residual = p.copy()
                residual[token] = 0.0
            else:
                residual = np.maximum(p - q, 0.0)
            # A zero residual only through rounding (p and q agree): keep p.
            p = residual / residual.sum() if residual.sum() > 0.0 else p
        else:
            return path, sampler.sample(p)


def sorted_masses(q: np.ndarray, width: int) -> list[float]:
    """The ``width`` largest probabilities of ``q``, largest first."""
    width = min(width, len(q))
    top = np.partition(q, len(q) - width)[len(q) - width:]
    return sorted(top.tolist(), reverse=True)


class TreeShaper:
    """Chooses how many candidates each draft position gets, from the measured cost curve, the
    chain's acceptance per position and the draft head's confidence.

    With a chain of ``k`` guesses, position ``d`` is reached with probability
    ``R_d = a_1 ... a_{d-1}`` (``a``: the chain's acceptance per position). Offering ``w``
    candidates there hits with probability ``H_d(w) = a_d + (1 - a_d) * s_d(w)``, where
    ``s_d(w)``, the chance that the target's token is among the ``w - 1`` siblings once the
    first guess is wrong, is estimated from the head's own probabilities ``m_0 >= m_1 >= ...`` at
    that position: ``(m_1 + ... + m_{w-1}) / (1 - m_0)``. A step then emits
    ``E = 1 + sum_d R_d H_d(w_d)`` tokens (a rescued position ends the path: siblings are
    leaves) for ``T(1 + sum_d w_d)``. Candidates are added one at a time where they raise
    ``E / T`` most, within ``NODE_BUDGET`` nodes, so positions where the first guess is
    uncertain get the most siblings.

    The widths depend only on the head's distributions along the chain, never on the siblings
    drawn, which is what keeps sampled siblings lossless.
    """

    def __init__(self, costs: Costs, max_k: int):
        self.costs = costs
        # The chain's acceptance per position, estimated as the adaptive draft length does.
        self.chain = AdaptiveDraftLength(costs, max_k)
        self.budget = min(NODE_BUDGET, len(costs.trunk) - 1)

    def record(self, drafted: int, accepted: int) -> None:
        """The chain's outcome of a step: ``accepted`` of its ``drafted`` first guesses held."""
        self.chain.update(drafted, accepted)

    def widths(self, masses: list[list[float]]) -> list[int]:
        """Candidates per position; ``masses[d]``: the head's largest probabilities there."""
        acceptance = self.chain.acceptance
        k = len(masses)
        widths = [1] * k

        def expected_rate(widths: list[int]) -> float:
            reach, tokens = 1.0, 1.0
            for d, (w, m) in enumerate(zip(widths, masses)):
                a = acceptance[d] if d < len(acceptance) else acceptance[-1]
                rescue = sum(m[1:w]) / (1.0 - m[0]) if m[0] < 1.0 else 0.0
                tokens += reach * (a + (1.0 - a) * min(1.0, rescue))
                reach *= a
            return tokens / self.costs.trunk[sum(widths)]

        best = expected_rate(widths)
        while sum(widths) < self.budget:
            options = [widths[:d] + [widths[d] + 1] + widths[d + 1:] for d in range(k) if widths[d] < len(masses[d])]
            if not options:
                break
            rate, choice = max((expected_rate(option), option) for option in options)
            if rate <= best:
                break
            best, widths = rate, choice
        return widths
