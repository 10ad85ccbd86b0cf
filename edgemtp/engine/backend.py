"""The interface every inference backend implements; the engine sees only this.

A backend owns one trunk (the target model) and its MTP layers, each with its
own key/value cache. Caches are append-only and roll back in O(1), which is
what speculative decoding needs: drafts are written, verified, and the
rejected tail is dropped by moving a position counter.

MTP convention (teacher forced): depth-1 entry ``i`` combines ``(h[i], t[i+1])``
and predicts ``t[i+2]``; depth-``d`` entry ``i`` combines ``(h^{d-1}[i], t[i+d])``
and predicts ``t[i+d+1]``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


# Long inputs (a prompt, a drafter catching up) run in steps of at most this many rows. A step's
# transient buffers grow with its rows, above all its (rows, vocab) float32 logits: one step over
# a 1,950-token prompt took 0.54 GB more resident memory than decoding on the default model
# (49,152-token vocabulary), where steps of 256 rows cost what decoding does, at the same speed
# per row. mlx-lm's prefill and llama.cpp's batches are bounded the same way.
PREFILL_CHUNK = 256
# Where a step also copies weights per row (ONNX's routed experts gather each row's chosen experts,
# converters/onnx_export/moe.py), its steps over long inputs are cut so that those copies stay
# within this: 256 rows of the bandwidth-bound bench model's MTP layer gathered 1.6 GB and took its
# peak resident memory from 1.7 to 4.7 GiB. The gather costs the same per row in any step, so
# shorter steps lose little speed.
GATHER_BUDGET = 256 * 2**20


def prompt_step_rows(gathered_bytes_per_row: int = 0) -> int:
    """Rows per step over a long input for a backend whose steps copy ``gathered_bytes_per_row``
    bytes of weights per row: ``PREFILL_CHUNK``, or fewer to keep those copies within ``GATHER_BUDGET``."""
    if not gathered_bytes_per_row:
        return PREFILL_CHUNK
    return max(1, min(PREFILL_CHUNK, GATHER_BUDGET // gathered_bytes_per_row))


class Backend(Protocol):
    config: dict
    vocab_size: int
    hidden_size: int
    num_mtp_layers: int
    max_context: int
    # The token ids the MTP heads score (edgemtp/draft_vocab.py), or None for the full
    # vocabulary; mtp_step's logits have one column per scored token (draft_vocab.scatter_logits
    # widens them to the full vocabulary).
    draft_ids: np.ndarray | None

    def reset(self) -> None:
        """Empty every cache (trunk and all MTP depths)."""

    def trunk_step(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Append ``len(tokens)`` positions to the trunk cache.

        Returns ``(logits, hidden)``: logits ``(n, V)`` float32 and the final
        hidden states ``(n, H)`` float32 taken AFTER the final norm.
        """

    def trunk_len(self) -> int:
        """Number of positions in the trunk cache."""

    def trunk_rollback(self, n: int) -> None:
        """Drop the last ``n`` trunk positions, in O(1)."""

    def mtp_step(self, depth: int, hidden: np.ndarray, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Run MTP depth ``depth`` (1-based) over ``len(tokens)`` rows.

        Uses MTP layer ``min(depth, num_mtp_layers) - 1``; each depth has its
        own cache. Row ``j`` computes
        ``x = eh_proj(concat[enorm(embed(tokens[j])), hnorm(hidden[j])])`` and
        ``h1 = block(x)`` (causal, RoPE position ``mtp_len(depth) + j``).
        Returns ``(logits, h1)``: logits ``(n, V)`` float32 =
        ``shared_head.head(shared_head.norm(h1))`` (``(n, len(draft_ids))`` over a draft
        vocabulary) and ``h1`` ``(n, H)``
        float32 taken BEFORE ``shared_head.norm``.
        """

    def mtp_len(self, depth: int) -> int:
        """Number of positions in the cache of MTP depth ``depth``."""

    def mtp_rollback(self, depth: int, n: int) -> None:
        """Drop the last ``n`` positions of MTP depth ``depth``, in O(1)."""

    def weight_bytes(self) -> int:
        """Bytes held by the weights."""

    def cache_bytes(self) -> int:
        """Bytes held by all caches (trunk and MTP)."""

    # Optional: ``prompt_step_rows``, the rows per step over a long input when not
    # ``PREFILL_CHUNK`` (the ONNX backend's, for routed experts; see ``prompt_step_rows``).
    # Optional, tree verification (edgemtp/engine/tree.py; the MLX backend has it):
    # ``trunk_step_tree(tokens, parents)`` appends ``len(tokens)`` rows as ``trunk_step`` does, but
    # row ``j`` sits at position ``trunk_len + depth(j)`` and attends to the cache, its ancestors
    # (``parents[j]``, -1 for none) and itself; ``trunk_keep(count, rows)`` then keeps only
    # ``rows`` (ascending) of those last ``count`` positions, moved into place, so the cache equals
    # that of a step that ran only those rows.
    # Optional: ``trunk_prompt_step(tokens)``, a ``trunk_step`` whose logits are the last row's
    # only, ``(1, V)`` (the ONNX backend's: its output head then skips the other rows).
    # Optional (the engine checks with hasattr): ``greedy_tokens(token, count)`` yields up to
    # ``count`` plain greedy tokens after the pending ``token``, leaving the trunk as the same
    # ``trunk_step`` calls would; a backend whose steps are asynchronous (MLX) pipelines them.


def trunk_steps(backend: Backend, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``trunk_step`` over any number of tokens, in steps of at most ``PREFILL_CHUNK`` rows (or the
    backend's ``prompt_step_rows``, see ``prompt_step_rows``). Returns the logits of the last row
    (which predicts the next token) as ``(1, V)`` or more rows, and the hidden states of every row."""
    hidden, step = [], getattr(backend, "prompt_step_rows", PREFILL_CHUNK)
    run = getattr(backend, "trunk_prompt_step", backend.trunk_step)
    for start in range(0, len(tokens), step):
        logits, rows = run(tokens[start : start + step])
        hidden.append(rows)
    return logits, hidden[0] if len(hidden) == 1 else np.concatenate(hidden)


def mtp_steps(backend: Backend, depth: int, hidden: np.ndarray, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``mtp_step`` over any number of rows, in steps of at most ``PREFILL_CHUNK``; returns as
    ``trunk_steps`` does."""
    out, step = [], getattr(backend, "prompt_step_rows", PREFILL_CHUNK)
    for start in range(0, len(tokens), step):
        end = start + step
        logits, rows = backend.mtp_step(depth, hidden[start:end], tokens[start:end])
        out.append(rows)
    return logits, out[0] if len(out) == 1 else np.concatenate(out)
