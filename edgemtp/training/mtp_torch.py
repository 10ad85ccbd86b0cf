"""DeepSeek-style MTP layers in torch, for training (never used at inference).

The convention is the one every backend implements (contracts: "MTP convention"):

* depth-1 entry ``i`` takes the trunk's final hidden state ``h[i]`` (after the final
  norm) and the token ``t[i+1]`` and predicts ``t[i+2]``;
* depth-``d`` entry ``i`` takes the previous depth's output ``h^{d-1}[i]`` and
  ``t[i+d]`` and predicts ``t[i+d+1]``; depth ``d`` runs MTP layer
  ``min(d, num_layers) - 1``, so one layer chained on itself serves every depth.

One layer computes ``x = eh_proj(concat[enorm(embed(t)), hnorm(h)])`` and runs
``x`` through a causal decoder block of the trunk's own type (RoPE positions
``0..n-1`` over the depth's sequence). Its output ``h1`` (before
``shared_head.norm``) feeds the next depth; its logits are
``lm_head(shared_head.norm(h1))`` with the trunk's (frozen) output head.

Fusion heads (an edgemtp extension, EAGLE-3 style): MTP layer 0 may carry ``fuse_proj``
(3H→H) and the trunk layers it reads (``fusion_layers``, two 0-based decoder layer indices).
Depth 1 then takes ``fuse_proj(concat[rms(h_low), rms(h_mid), h[i]])`` in place of ``h[i]``,
where ``h_low``/``h_mid`` are the residual stream after those trunk layers and ``rms`` is an
RMS norm without weight (a weight would only scale columns of ``fuse_proj``). The feature is
the same for every drafted depth, so the backends' trunks compute it and hand it over as their
``hidden``; ``fuse_proj = [0, 0, I]`` is exactly the plain head.
"""

from __future__ import annotations

import copy
import importlib

import torch
import torch.nn.functional as F
from torch import nn

from edgemtp.errors import UserError

# The prefix of transformers' class names for each model_type we train MTP layers for; the classes
# live in ``transformers.models.{model_type}.modeling_{model_type}``.
# MoE trunks (DeepSeek-V3, GLM-4.5) are left out: they ship their own MTP layers, and transformers 5
# stores their experts fused, which the trunk loader (trunk_torch.py) does not build.
_CLASS_PREFIXES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
TRAINABLE_MODEL_TYPES = tuple(_CLASS_PREFIXES)


def _decoder_classes(config):
    """The trunk's decoder block, RMSNorm and RoPE classes, picked by ``model_type``."""
    prefix = _CLASS_PREFIXES[config.model_type]
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return (getattr(module, prefix + "DecoderLayer"), getattr(module, prefix + "RMSNorm"),
            getattr(module, prefix + "RotaryEmbedding"))


def _with_mtp_layer_types(config, num_layers: int):
    """``config`` with ``layer_types`` covering the MTP layers too, when it has that list (Qwen):
    their attention looks its type up by layer index, and MTP blocks attend to the full context."""
    if getattr(config, "layer_types", None) is None:
        return config
    config = copy.deepcopy(config)
    config.layer_types = [*config.layer_types[: config.num_hidden_layers], *["full_attention"] * num_layers]
    return config


class SharedHead(nn.Module):
    """The norm before the output head (the head itself is the trunk's tied ``lm_head``)."""

    def __init__(self, hidden_size: int, norm_cls, eps: float) -> None:
        super().__init__()
        self.norm = norm_cls(hidden_size, eps=eps)


class MTPLayer(nn.Module):
    """One MTP layer: input projection + one decoder block of the trunk's type (``fuse_proj``
    only on layer 0 of a fusion head, see ``MTPHeads.trunk_feature``)."""

    def __init__(self, config, layer_idx: int, fused: bool = False) -> None:
        super().__init__()
        decoder_cls, norm_cls, _ = _decoder_classes(config)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = norm_cls(hidden, eps=eps)
        self.hnorm = norm_cls(hidden, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        # The block's weights are saved at the layer's top level (HF layout), see ``hf_state_dict``.
        self.block = decoder_cls(config, layer_idx)
        self.shared_head = SharedHead(hidden, norm_cls, eps)
        if fused:
            self.fuse_proj = nn.Linear(3 * hidden, hidden, bias=False)
            with torch.no_grad():  # [0, 0, I]: the plain head's feature, so a warm start loses nothing
                self.fuse_proj.weight.zero_()
                self.fuse_proj.weight[:, 2 * hidden :].copy_(torch.eye(hidden))

    def forward(self, token_embeds: torch.Tensor, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(hidden)], dim=-1))
        # attention_mask=None makes SDPA causal; sequences are right-padded, so
        # padding never leaks into real positions.
        return self.block(x, attention_mask=None, position_embeddings=position_embeddings)


class MTPHeads(nn.Module):
    """All MTP layers of a model plus the teacher-forced multi-depth forward pass."""

    def __init__(self, config, num_layers: int, fusion_layers: tuple[int, int] | None = None) -> None:
        super().__init__()
        _, _, rope_cls = _decoder_classes(config)
        config = _with_mtp_layer_types(config, num_layers)
        self.num_hidden_layers = config.num_hidden_layers
        self.eps = config.rms_norm_eps
        if fusion_layers is not None and not all(0 <= i < config.num_hidden_layers - 1 for i in fusion_layers):
            raise UserError(f"--fusion-layers {list(fusion_layers)}: each must be a trunk layer index below "
                            f"{config.num_hidden_layers - 1} (the last layer's output is already the final feature)")
        self.fusion_layers = tuple(fusion_layers) if fusion_layers is not None else None
        # layer_idx past the trunk's layers, as in the checkpoint layout.
        self.layers = nn.ModuleList(MTPLayer(config, config.num_hidden_layers + i, fused=i == 0 and fusion_layers is not None)
                                    for i in range(num_layers))
        self.rotary = rope_cls(config)

    def trunk_feature(self, trunk_out) -> torch.Tensor:
        """What depth 1 reads from a trunk forward run with ``output_hidden_states=True``: the final
        normed hidden state, or for a fusion head the fused feature (module docstring).
        ``hidden_states[j + 1]`` is the output of decoder layer ``j``."""
        final = trunk_out.last_hidden_state
        if self.fusion_layers is None:
            return final
        low, mid = (F.rms_norm(trunk_out.hidden_states[j + 1], (final.shape[-1],), eps=self.eps) for j in self.fusion_layers)
        return self.layers[0].fuse_proj(torch.cat([low, mid, final], dim=-1))

    def init_from_trunk(self, trunk) -> None:
        """Warm start: every block copies the trunk's last decoder layer and the head norm its final norm.

        The last trunk layer already maps hidden states to next-token features,
        which is close to what an MTP block has to learn; eh_proj stays random.
        """
        last = trunk.model.layers[-1].state_dict()
        for layer in self.layers:
            layer.block.load_state_dict(last)
            layer.shared_head.norm.load_state_dict(trunk.model.norm.state_dict())

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> int:
        """Warm start from weights named as ``hf_state_dict`` writes them (e.g. an earlier run's
        ``mtp.safetensors``). Layers missing from ``weights`` copy its last layer, so one trained
        layer can seed two. Returns the number of layers found."""
        found = sorted({int(name.split(".")[2]) for name in weights})
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{found[min(i, len(found) - 1)]}."
            state = {}
            for name, tensor in weights.items():
                if name.startswith(prefix):
                    short = name[len(prefix):]
                    top_level = short.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head", "fuse_proj")
                    state[short if top_level else "block." + short] = tensor
            if hasattr(layer, "fuse_proj") and "fuse_proj.weight" not in state:
                state["fuse_proj.weight"] = layer.fuse_proj.weight  # a plain head: keep [0, 0, I]
            elif not hasattr(layer, "fuse_proj"):
                state.pop("fuse_proj.weight", None)  # only depth 1's layer fuses
            layer.load_state_dict(state)
        return len(found)

    def layer_for_depth(self, depth: int) -> MTPLayer:
        return self.layers[min(depth, len(self.layers)) - 1]

    def forward(self, trunk_hidden: torch.Tensor, input_ids: torch.Tensor, embed: nn.Module, depths: int) -> list[torch.Tensor]:
        """Teacher-forced outputs ``h^d`` for ``d = 1..depths``; ``h^d`` has ``T - d`` positions.

        ``trunk_hidden`` is the trunk's final hidden state (after its final norm), (B, T, H).
        """
        outputs = []
        hidden = trunk_hidden
        for depth in range(1, depths + 1):
            tokens = input_ids[:, depth:]
            hidden = hidden[:, :-1]
            positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
            rope = self.rotary(hidden, positions)
            hidden = self.layer_for_depth(depth)(embed(tokens), hidden, rope)
            outputs.append(hidden)
        return outputs

    def logits(self, depth: int, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        return lm_head(self.layer_for_depth(depth).shared_head.norm(hidden))

    def hf_state_dict(self, dtype=torch.float16) -> dict[str, torch.Tensor]:
        """Weights under HF checkpoint names ``model.layers.{N+i}.*`` (no ``shared_head.head``: tied)."""
        out = {}
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{self.num_hidden_layers + i}."
            for name, tensor in layer.state_dict().items():
                name = name.removeprefix("block.")
                out[prefix + name] = tensor.detach().to("cpu", dtype).contiguous()
        return out
