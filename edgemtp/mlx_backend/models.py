"""The forward passes: trunk (with its final hidden states) and DeepSeek-style MTP.

The trunk is mlx-lm's own model object, so a checkpoint converted for mlx-lm
loads into it unchanged. We walk its layers ourselves rather than calling it,
because speculative decoding needs the hidden state after the final norm as
well as the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from edgemtp.mlx_backend import deepseek_v3, glm4_moe, llama, qwen2, qwen3, qwen3_5
from edgemtp.mlx_backend.cache import PreallocatedKVCache, RecurrentStateCache

ARCHITECTURES: dict[str, ModuleType] = {"llama": llama, "deepseek_v3": deepseek_v3, "glm4_moe": glm4_moe, "qwen2": qwen2,
                                        "qwen3": qwen3, "qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5}


def output_head(trunk: nn.Module) -> Callable[[mx.array], mx.array]:
    """The trunk's hidden -> logits projection (``lm_head`` or the tied embedding)."""
    if "lm_head" in trunk:
        return trunk.lm_head
    return trunk.model.embed_tokens.as_linear


def head_rows(head: nn.Module, rows: mx.array) -> nn.Module:
    """A linear layer computing only the output rows ``rows`` of ``head``.

    ``head`` is a vocabulary head: a ``Linear`` or an ``Embedding`` used as one (tied), plain
    or quantized. Both store one row per token (quantized: packed ``weight``, ``scales`` and
    ``biases`` rows), so taking rows gives a layer of the same precision over fewer tokens.
    """
    if isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        hidden = head.weight.shape[1] * 32 // head.bits
        layer = nn.QuantizedLinear(hidden, len(rows), bias=False, group_size=head.group_size, bits=head.bits,
                                   mode=head.mode)
        layer.weight, layer.scales = head.weight[rows], head.scales[rows]
        layer.biases = head.biases[rows] if head.get("biases") is not None else None
    else:
        layer = nn.Linear(head.weight.shape[1], len(rows), bias=False)
        layer.weight = head.weight[rows]
    mx.eval(layer.parameters())  # a copy of the rows; the full head can then be freed
    return layer


def is_recurrent(layer: nn.Module) -> bool:
    """Whether a trunk layer keeps a recurrent state rather than keys and values (qwen3_5's Gated
    DeltaNet layers, which mlx-lm marks ``is_linear``)."""
    return getattr(layer, "is_linear", False)


def run_trunk(
    trunk: nn.Module, tokens: mx.array, caches: list[PreallocatedKVCache | RecurrentStateCache], mask_as_array: bool,
    mask: mx.array | None = None, fusion: tuple[tuple[int, int], MTPLayer] | None = None,
) -> tuple[mx.array, mx.array]:
    """``tokens`` ``(1, n)`` -> ``(logits (1, n, V), hidden (1, n, H))``, hidden after the final norm.

    ``mask``: the attention mask over cache and rows, if not causal (a tree step). With ``fusion``
    (a fusion head's trunk layers and its MTP layer 0) ``hidden`` is the fused feature MTP depth 1
    reads instead (``MTPLayer.fuse``).
    """
    inner = trunk.model
    taps = fusion[0] if fusion else ()
    h, inner_states = run_layers(inner.layers, inner.embed_tokens(tokens), caches, mask_as_array, mask, taps)
    hidden = inner.norm(h)
    logits = output_head(trunk)(hidden)
    return logits, fusion[1].fuse(inner_states, hidden) if fusion else hidden


def run_layers(layers: list[nn.Module], h: mx.array, caches: list[PreallocatedKVCache | RecurrentStateCache],
               mask_as_array: bool, mask: mx.array | None = None,
               taps: tuple[int, ...] = ()) -> tuple[mx.array, list[mx.array]]:
    """``h`` ``(1, n, H)`` through ``layers`` (the trunk's, or a pipeline stage's slice of them).

    ``mask``: the attention mask over cache and rows when it is not causal (a tree step). Returns
    the output and the outputs of the layers at the indices ``taps`` (a fusion head's inputs).
    """
    if mask is None:
        attention_cache = next((cache for cache in caches if isinstance(cache, PreallocatedKVCache)), None)
        mask = create_attention_mask(h, attention_cache, return_array=mask_as_array)
    tapped = []
    for i, (layer, cache) in enumerate(zip(layers, caches)):
        # A recurrent layer sees every position of the step; its mask would mark padding.
        h = layer(h, None if is_recurrent(layer) else mask, cache=cache)
        if i in taps:
            tapped.append(h)
    return h, tapped


class SharedHead(nn.Module):
    """An MTP layer's output norm and, when the checkpoint has one, its own vocabulary head."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float, has_head: bool):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        if has_head:
            self.head = nn.Linear(hidden_size, vocab_size, bias=False)


class MTPLayer(nn.Module):
    """One DeepSeek-V3 multi-token-prediction module.

    ``h1 = block(eh_proj(concat[enorm(embed(t)), hnorm(h)]))`` with the
    embedding first; ``block`` is a decoder layer of the trunk's own type. The
    embedding table and the output head are the layer's own only when it has
    its own (not a copy of the trunk's, see ``edgemtp.mtp_copies``); otherwise
    the trunk's are passed in.
    """

    def __init__(self, block: nn.Module, hidden_size: int, vocab_size: int, eps: float, has_head: bool,
                 has_embedding: bool, fused: bool = False):
        super().__init__()
        if fused:  # layer 0 of a fusion head (ARCHITECTURE.md, "The MTP convention")
            self.fuse_proj = nn.Linear(3 * hidden_size, hidden_size, bias=False)
            self.eps = eps
        if has_embedding:
            self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.enorm = nn.RMSNorm(hidden_size, eps=eps)
        self.hnorm = nn.RMSNorm(hidden_size, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.block = block
        self.shared_head = SharedHead(hidden_size, vocab_size, eps, has_head)

    def __call__(
        self, embeddings: mx.array, hidden: mx.array, cache: PreallocatedKVCache, mask_as_array: bool
    ) -> mx.array:
        """``(1, n, H)`` token embeddings and previous hidden states -> ``h1`` ``(1, n, H)``."""
        x = self.eh_proj(mx.concatenate([self.enorm(embeddings), self.hnorm(hidden)], axis=-1))
        mask = create_attention_mask(x, cache, return_array=mask_as_array)
        return self.block(x, mask, cache=cache)

    def fuse(self, inner: list[mx.array], hidden: mx.array) -> mx.array:
        """``fuse_proj(concat[rms(h_low), rms(h_mid), hidden])``, RMS norms without weight."""
        normed = [mx.fast.rms_norm(h, None, self.eps) for h in inner]
        return self.fuse_proj(mx.concatenate([*normed, hidden], axis=-1))

    def embed(self, tokens: mx.array, trunk_embedding: nn.Embedding) -> mx.array:
        return (self.embed_tokens if "embed_tokens" in self else trunk_embedding)(tokens)

    def logits(self, h1: mx.array, trunk_head: Callable[[mx.array], mx.array]) -> mx.array:
        head = self.shared_head.head if "head" in self.shared_head else trunk_head
        return head(self.shared_head.norm(h1))


class MTPStack(nn.Module):
    """The checkpoint's MTP layers, in order (parameter names ``layers.{i}.…``)."""

    def __init__(self, layers: list[MTPLayer]):
        super().__init__()
        self.layers = layers
