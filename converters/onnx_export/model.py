"""Assemble the trunk graph and the per-layer MTP graphs from a checkpoint."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from edgemtp.converters.onnx_export import deepseek_v3, glm4_moe, llama, qwen3_5
from edgemtp.converters.onnx_export.graph import (GraphBuilder, decoder_stack, drop_last_row, linear,
                                                  repeat_last_row, rms_norm)
from edgemtp.converters.onnx_export.quantize import EMBEDDING_NODE
from edgemtp.config import mtp_fusion_layers, num_mtp_layers
from edgemtp.layout import mtp_prefix
from edgemtp.mtp_copies import trunk_head_name

ARCHS = {"llama": (llama.LlamaLayers, llama.cache_layout),
         "qwen2": (llama.LlamaLayers, llama.cache_layout),
         "qwen3": (llama.LlamaLayers, llama.cache_layout),
         "deepseek_v3": (deepseek_v3.DeepseekV3Layers, deepseek_v3.cache_layout),
         "glm4_moe": (glm4_moe.Glm4MoeLayers, llama.cache_layout),
         "qwen3_5": (qwen3_5.Qwen3_5Layers, qwen3_5.cache_layout)}


def checkpoint_reader(ckpt) -> Callable[[str], np.ndarray]:
    """What the builders read weights with: the checkpoint itself, or for Qwen3.5's released layout
    a reader by the names every other family uses (qwen3_5.py)."""
    return qwen3_5.released_reader(ckpt) if ckpt.config["model_type"] == "qwen3_5" else ckpt.read


def _padded(g: GraphBuilder, layers, x: str, name: str) -> str:
    """``x`` with its last row repeated where the blocks want every step padded (``PADS_ROWS``)."""
    return repeat_last_row(g, x, 1, name) if layers.PADS_ROWS else x


def _unpadded(g: GraphBuilder, layers, x: str, name: str) -> str:
    return drop_last_row(g, x, 1, name) if layers.PADS_ROWS else x


def _embed(g: GraphBuilder, read: Callable[[str], np.ndarray], ids: str, name: str = "model.embed_tokens.weight") -> str:
    table = g.weight("model.embed_tokens.weight", read(name))
    return g.node("Gather", [table, ids], name=EMBEDDING_NODE, axis=0)


def build_trunk(config: dict, read: Callable[[str], np.ndarray], max_positions: int,
                logits_from_input: bool = True) -> onnx.ModelProto:
    """input_ids (1, n) + logits_from (1,) + cache -> logits (1, n - logits_from, V), hidden (1, n, H), cache.

    ``logits_from`` is the first row the output head runs on: 0 for a verify step, which needs
    every row's logits, n - 1 for a prompt step, which needs only the last (the head is a sixth
    of a 256-row prompt step's time on SmolLM2-135M, and its logits 50 MB). onnxruntime-genai's
    layout (``logits_from_input=False``, genai.py) has no such input: every row's logits.

    ``hidden`` is what MTP depth 1 reads: the hidden state after the final norm, or for a fusion
    head (``mtp_fusion_layers``) ``fuse_proj(concat[rms(h_low), rms(h_mid), that])``, computed
    here once per position since every drafted depth would compute the same (ARCHITECTURE.md).
    """
    g = GraphBuilder("edgemtp_trunk")
    ids = g.input("input_ids", np.int64, [1, "n"])
    layers = ARCHS[config["model_type"]][0](g, read, config, max_positions)
    blocks = [layers.block(f"model.layers.{i}.", i, slot=i) for i in range(config["num_hidden_layers"])]
    eps = config.get("rms_norm_eps", 1e-6)
    fusion = mtp_fusion_layers(config) if num_mtp_layers(config) else None
    embedded = _embed(g, read, _padded(g, layers, ids, "input_ids"))
    stack = decoder_stack(g, embedded, blocks, read("model.norm.weight"), eps, "layers", taps=fusion or ())
    normed = head_rows = stack[0]
    if logits_from_input:
        first = g.input("logits_from", np.int64, [1])
        head_rows = g.node("Slice", [normed, first, g.const([2**62]), g.const([1])], name="lm_head.rows")
    logits = linear(g, head_rows, read(trunk_head_name(config)), "lm_head")
    g.output("logits", _unpadded(g, layers, logits, "logits"), np.float32, [1, "m", config["vocab_size"]])
    hidden = normed if fusion is None else _fused_feature(g, read, config, stack[2], normed, eps)
    g.output("hidden", _unpadded(g, layers, hidden, "hidden"), np.float32, [1, "n", config["hidden_size"]])
    return g.to_model()


def _fused_feature(g: GraphBuilder, read: Callable[[str], np.ndarray], config: dict, inner: list[str],
                   normed: str, eps: float) -> str:
    """``fuse_proj(concat[rms(h_low), rms(h_mid), normed])``: RMS norms without weight (ones)."""
    ones = np.ones(config["hidden_size"], dtype=np.float32)
    parts = [rms_norm(g, h, ones, eps, f"fusion.norm{j}") for j, h in enumerate(inner)]
    joined = g.node("Concat", [*parts, normed], name="fusion.concat", axis=-1)
    return linear(g, joined, read(mtp_prefix(config, 0) + "fuse_proj.weight"), "fusion.fuse_proj")


def build_mtp(config: dict, read: Callable[[str], np.ndarray], index: int, max_positions: int,
              own: set[str] = frozenset(), draft_ids: np.ndarray | None = None) -> onnx.ModelProto:
    """hidden (1, n, H) + input_ids (1, n) + cache -> logits, h1 (before shared_head.norm), cache.

    Row j: ``x = eh_proj(concat[enorm(embed(ids[j])), hnorm(hidden[j])])``, ``h1 = block(x)``.
    ``own`` holds the layer's own ``"embed_tokens"`` / ``"shared_head.head"`` (stored and not a
    copy of the trunk's, see ``edgemtp.mtp_copies``); without them the layer uses the trunk's
    embedding and output head.
    With ``draft_ids`` (the draft vocabulary) the logits are ``(1, n, len(draft_ids))``, one
    per kept token in that order: the head keeps only those rows.
    """
    g = GraphBuilder(f"edgemtp_mtp{index}")
    hidden = g.input("hidden", np.float32, [1, "n", config["hidden_size"]])
    ids = g.input("input_ids", np.int64, [1, "n"])
    layers = ARCHS[config["model_type"]][0](g, read, config, max_positions)
    prefix = mtp_prefix(config, index)
    eps = config.get("rms_norm_eps", 1e-6)
    table = prefix + "embed_tokens.weight" if "embed_tokens" in own else "model.embed_tokens.weight"
    ids, hidden = _padded(g, layers, ids, "input_ids"), _padded(g, layers, hidden, "hidden")
    embedded = rms_norm(g, _embed(g, read, ids, table), read(prefix + "enorm.weight"), eps, "mtp.enorm")
    previous = rms_norm(g, hidden, read(prefix + "hnorm.weight"), eps, "mtp.hnorm")
    joined = g.node("Concat", [embedded, previous], name="mtp.concat", axis=-1)
    x = linear(g, joined, read(prefix + "eh_proj.weight"), "mtp.eh_proj")
    block = layers.block(prefix, config["num_hidden_layers"] + index, slot=0)
    normed, h1 = decoder_stack(g, x, [block], read(prefix + "shared_head.norm.weight"), eps, "mtp")
    head = read(prefix + "shared_head.head.weight" if "shared_head.head" in own else trunk_head_name(config))
    if draft_ids is not None:
        # The vocabulary head is most of a draft step on a small model; rows are sliced before
        # ``linear`` so the quantizer still finds (and quantizes) the "mtp.head" MatMul.
        head = head[draft_ids]
    logits = linear(g, normed, head, "mtp.head")
    g.output("logits", _unpadded(g, layers, logits, "logits"), np.float32, [1, "n", len(head)])
    g.output("h1", _unpadded(g, layers, h1, "h1"), np.float32, [1, "n", config["hidden_size"]])
    return g.to_model()
