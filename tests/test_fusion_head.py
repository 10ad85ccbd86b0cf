"""Fusion heads (EAGLE-3-style, ``mtp_fusion_layers``): MTP layer 0's ``fuse_proj`` reads two inner
trunk layers beside the final hidden state. The reference is written here from the formula with
transformers' own trunk (its ``hidden_states``) and the MTP reference of test_mtp_parity:

    feature = fuse_proj(concat[rms(hidden_states[low + 1]), rms(hidden_states[mid + 1]), h])
    depth 1 = the plain MTP formula with ``feature`` in place of ``h``; depths > 1 unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgemtp
from edgemtp.converters.convert import convert
from edgemtp.converters.onnx_export.model import build_trunk
from edgemtp.factory import make_tiny
from test_mtp_parity import SEQ_LEN, Reference

FUSION = [0, 2]


class FusionReference(Reference):
    def mtp_logits(self, ids: list[int], depth: int) -> np.ndarray:
        with torch.no_grad():
            out = self.trunk.model(torch.tensor([ids]), output_hidden_states=True)
        eps, final = self.config["rms_norm_eps"], out.last_hidden_state[0]
        inner = [out.hidden_states[j + 1][0] for j in FUSION]
        inner = [h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) for h in inner]
        fuse = torch.from_numpy(self.ckpt.read(f"model.layers.{self.config['num_hidden_layers']}.fuse_proj.weight"))
        hidden = torch.cat([*inner, final], dim=-1) @ fuse.T
        for d in range(1, depth + 1):
            index = min(d, self.ckpt.num_mtp_layers) - 1
            logits, hidden = self.layer_step(index, hidden[:-1], ids[d:])
        return logits


@pytest.fixture(scope="module")
def fusion_checkpoint(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("fusion") / "ckpt", "llama", mtp_layers=2, num_hidden_layers=4,
                     mtp_fusion_layers=FUSION)


@pytest.fixture(scope="module")
def models(fusion_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    loaded = {"mlx direct": edgemtp.load(fusion_checkpoint, backend="mlx", max_kv_size=128)}
    for to in ("mlx", "onnx"):
        path = convert(fusion_checkpoint, out / to, to=to, bits=16, show_progress=False)
        loaded[f"{to} --bits 16"] = edgemtp.load(path, backend=to, max_kv_size=128)
    return loaded


def test_fusion_head_mtp_logits_match_reference(fusion_checkpoint, models, tmp_path):
    ids = np.random.default_rng(3).integers(0, 384, SEQ_LEN).tolist()
    reference = FusionReference(fusion_checkpoint, tmp_path)
    for depth in (1, 2, 3):
        expected = reference.mtp_logits(ids, depth)
        for where, model in models.items():
            logits = model.mtp_logits(ids, depth=depth)
            assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max(), (where, depth)
    # fuse_proj matters: the plain formula gives other depth-1 logits.
    plain = Reference.mtp_logits(reference, ids, 1)
    assert np.abs(plain - reference.mtp_logits(ids, 1)).max() > 1e-2 * np.abs(plain).max()


@pytest.mark.parametrize("where", ["mlx direct", "onnx --bits 16"])
def test_fusion_head_greedy_speculation_equals_plain(models, where):
    model = models[where]
    prompt = np.random.default_rng(4).integers(0, 384, 12).tolist()
    plain = model.generate(prompt, max_tokens=24, spec="none", temperature=0.0, chat=False).tokens
    for k in (1, 3):
        out = model.generate(prompt, max_tokens=24, spec="mtp", num_draft=k, temperature=0.0, chat=False)
        assert out.tokens == plain


def test_plain_head_trunk_graph_is_unchanged(fusion_checkpoint):
    """Without ``mtp_fusion_layers`` the trunk graph has no fusion nodes; with it, the fusion
    nodes are all it adds (and no MTP layers means no fusion either)."""
    from edgemtp.checkpoint import Checkpoint

    ckpt = Checkpoint.open(fusion_checkpoint)
    plain_config = {k: v for k, v in ckpt.config.items() if k != "mtp_fusion_layers"}
    ops = {}
    for name, config in (("plain", plain_config), ("fused", ckpt.config),
                         ("no mtp", {**ckpt.config, "num_nextn_predict_layers": 0})):
        graph = build_trunk(config, ckpt.read, 64).graph
        ops[name] = [(node.op_type, node.name) for node in graph.node]
    assert ops["no mtp"] == ops["plain"]
    assert [op for op in ops["fused"] if not op[1].startswith("fusion.")] == ops["plain"]
    assert {op[1] for op in ops["fused"]} - {op[1] for op in ops["plain"]} == {
        "fusion.norm0", "fusion.norm1", "fusion.concat", "fusion.fuse_proj"}
