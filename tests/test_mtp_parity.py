"""MTP layers on MLX match a torch reference of DeepSeek's MTP formula.

The reference is written here from the formula, independently of the MLX code:

    x  = eh_proj(concat[enorm(embed(t)), hnorm(h)])      # embedding first
    h1 = block(x)                                         # causal, positions 0..n-1
    logits = shared_head.head(shared_head.norm(h1))

with the trunk's hidden states ``h`` taken from transformers, and ``block``
run by transformers too: a one-layer transformers model whose only decoder
layer is the MTP block, whose final norm is ``shared_head.norm`` and whose
``lm_head`` is ``shared_head.head``, fed ``x`` as ``inputs_embeds``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM

import edgemtp
from edgemtp.api import Model
from edgemtp.checkpoint import Checkpoint
from edgemtp.mlx_backend.backend import MLXBackend

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()  # the MTP weights are "unexpected" to transformers
SEQ_LEN = 48


def block_as_model(ckpt: Checkpoint, index: int, out: Path) -> AutoModelForCausalLM:
    """MTP layer ``index`` as a one-layer transformers model (see module docstring)."""
    prefix = f"model.layers.{ckpt.config['num_hidden_layers'] + index}."
    weights = {"model.embed_tokens.weight": ckpt.read("model.embed_tokens.weight")}
    for name in ckpt.mtp_names(index):
        part = name.removeprefix(prefix)
        if part == "shared_head.norm.weight":
            weights["model.norm.weight"] = ckpt.read(name)
        elif part == "shared_head.head.weight":
            weights["lm_head.weight"] = ckpt.read(name)
        elif not part.startswith(("embed_tokens.", "enorm.", "hnorm.", "eh_proj.")):
            weights["model.layers.0." + part] = ckpt.read(name)
    config = {key: value for key, value in ckpt.config.items() if key != "quantization_config"}
    # One layer, MoE like DeepSeek's and GLM-4.5's MTP blocks, own (untied) head.
    config.update(num_hidden_layers=1, num_nextn_predict_layers=0, first_k_dense_replace=0, tie_word_embeddings=False)
    out.mkdir()
    save_file(weights, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def rms_norm(x: torch.Tensor, weight: np.ndarray, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * torch.from_numpy(weight)


class Reference:
    """Teacher-forced MTP logits from the formula, in torch float32."""

    def __init__(self, path: Path, tmp_path: Path):
        self.ckpt = Checkpoint.open(path)
        self.config = self.ckpt.config
        self.trunk = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.blocks = [block_as_model(self.ckpt, i, tmp_path / f"mtp{i}") for i in range(self.ckpt.num_mtp_layers)]

    def layer_step(self, index: int, hidden: torch.Tensor, tokens: list[int]) -> tuple[np.ndarray, torch.Tensor]:
        prefix = f"model.layers.{self.config['num_hidden_layers'] + index}."
        eps = self.config["rms_norm_eps"]
        # The layer's own embedding when it stores one (released layouts), else the trunk's.
        table = prefix + "embed_tokens.weight" if prefix + "embed_tokens.weight" in self.ckpt else "model.embed_tokens.weight"
        embedded = rms_norm(torch.from_numpy(self.ckpt.read(table))[tokens], self.ckpt.read(prefix + "enorm.weight"), eps)
        normed_hidden = rms_norm(hidden, self.ckpt.read(prefix + "hnorm.weight"), eps)
        x = torch.cat([embedded, normed_hidden], dim=-1) @ torch.from_numpy(self.ckpt.read(prefix + "eh_proj.weight")).T
        block = self.blocks[index]
        captured = []  # h1 = the decoder layer's output, before shared_head.norm
        hook = block.model.layers[0].register_forward_hook(
            lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output)
        )
        with torch.no_grad():
            logits = block(inputs_embeds=x[None]).logits[0]
        hook.remove()
        return logits.numpy(), captured[0].reshape(len(tokens), -1)

    def mtp_logits(self, ids: list[int], depth: int) -> np.ndarray:
        with torch.no_grad():
            hidden = self.trunk.model(torch.tensor([ids])).last_hidden_state[0]
        for d in range(1, depth + 1):
            index = min(d, self.ckpt.num_mtp_layers) - 1
            logits, hidden = self.layer_step(index, hidden[:-1], ids[d:])
        return logits


@pytest.mark.parametrize(
    ("variant", "mtp_layers", "depth"),
    [
        ("llama", 1, 1),
        ("llama_untied", 2, 2),
        ("deepseek_v3", 1, 1),
        ("deepseek_v3", 1, 2),  # depth 2 reuses the single MTP layer with its own cache
        ("deepseek_v3", 2, 2),  # depth 2 runs the second MTP layer
        ("deepseek_v3_no_qlora", 2, 1),
        ("qwen2", 1, 1),
        ("qwen2", 2, 2),
        ("qwen3", 1, 1),
        ("qwen3", 1, 2),
        ("glm4_moe", 1, 1),
        ("glm4_moe", 2, 2),
        ("glm4_moe_no_qk_norm", 1, 2),
    ],
)
def test_mtp_logits_match_reference(tiny_checkpoint, tmp_path, variant, mtp_layers, depth):
    path = tiny_checkpoint(variant, mtp_layers=mtp_layers)
    model = Model({}, None, MLXBackend.from_checkpoint(path, max_kv_size=128))
    ids = np.random.default_rng(5).integers(0, model.backend.vocab_size, SEQ_LEN).tolist()

    logits = model.mtp_logits(ids, depth=depth)
    expected = Reference(path, tmp_path).mtp_logits(ids, depth)

    assert logits.shape == (SEQ_LEN - depth, model.backend.vocab_size)
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_missing_mtp_head_falls_back_to_trunk_head(tiny_checkpoint, tmp_path):
    """Checkpoints that share the trunk's lm_head ship no ``shared_head.head``."""
    path = tiny_checkpoint("deepseek_v3")
    stripped = tmp_path / "no_mtp_head"
    stripped.mkdir()
    ckpt = Checkpoint.open(path)
    head_name = "model.layers.2.shared_head.head.weight"
    names = [name for name in ckpt.trunk_names() + ckpt.mtp_names(0) if name != head_name]
    save_file({name: ckpt.read(name) for name in names}, stripped / "model.safetensors")
    (stripped / "config.json").write_text(json.dumps(ckpt.config))

    ids = np.random.default_rng(6).integers(0, 384, SEQ_LEN).tolist()
    # Our checkpoint validation expects shared_head.head; the backend does not need it.
    backend = MLXBackend.from_checkpoint(Checkpoint.open(stripped, validate=False), max_kv_size=128)
    _, hidden = backend.trunk_step(ids)
    logits, h1 = backend.mtp_step(1, hidden[:-1], ids[1:])

    lm_head = ckpt.read("lm_head.weight")
    norm = rms_norm(torch.from_numpy(h1), ckpt.read("model.layers.2.shared_head.norm.weight"), 1e-6).numpy()
    expected = norm @ lm_head.T
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("variant", ["llama", "deepseek_v3", "glm4_moe", "qwen3"])
def test_mtp_steps_continue_at_their_cache_position(tiny_checkpoint, variant):
    """Running depth 1 in pieces (RoPE position = cache position) equals one pass."""
    backend = MLXBackend.from_checkpoint(tiny_checkpoint(variant), max_kv_size=128)
    ids = np.random.default_rng(9).integers(0, backend.vocab_size, SEQ_LEN).tolist()
    _, hidden = backend.trunk_step(ids)
    hidden, tokens = hidden[:-1], ids[1:]
    one_pass, _ = backend.mtp_step(1, hidden, tokens)

    backend.mtp_rollback(1, len(tokens))
    pieces = [backend.mtp_step(1, hidden[:30], tokens[:30])[0]]
    pieces += [backend.mtp_step(1, hidden[i : i + 1], tokens[i : i + 1])[0] for i in range(30, len(tokens))]

    assert backend.mtp_len(1) == len(tokens)
    assert np.abs(np.concatenate(pieces) - one_pass).max() <= 1e-4 * np.abs(one_pass).max()


def with_own_mtp_embedding(path: Path, out: Path) -> Path:
    """A copy of ``path`` whose MTP layers' ``embed_tokens`` differ from the trunk's (a fine-tune that
    changed them): they are then the layers' own and must be used, not replaced by the trunk's."""
    ckpt = Checkpoint.open(path)
    tensors = {name: ckpt.read(name) for name in ckpt.names()}
    for index in range(ckpt.num_mtp_layers):
        name = f"model.layers.{ckpt.config['num_hidden_layers'] + index}.embed_tokens.weight"
        tensors[name] = tensors[name] + np.random.default_rng(index).normal(0, 0.5, tensors[name].shape).astype(np.float32)
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    for file in path.iterdir():
        if file.suffix != ".safetensors":
            (out / file.name).write_bytes(file.read_bytes())
    return out


@pytest.mark.parametrize("variant", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("layout", ["copies", "own_embedding", "own_head"])
def test_released_layout_mtp_logits_on_every_path(tiny_checkpoint, tmp_path, variant, layout):
    """DeepSeek-V3's released layout (an embedding copy and a ``shared_head.head`` in every MTP
    layer): MLX direct load, ``convert --bits 16`` to MLX and to ONNX all give the reference's
    depth-1 logits within 1e-4, whether the copies equal the trunk's tensors or are the layer's own."""
    from edgemtp.converters.convert import convert

    path = tiny_checkpoint(variant, mtp_layers=2, mtp_head="own" if layout == "own_head" else "copy")
    if layout == "own_embedding":
        path = with_own_mtp_embedding(path, tmp_path / "own_embedding")
    ids = np.random.default_rng(7).integers(0, 384, SEQ_LEN).tolist()
    expected = Reference(path, tmp_path).mtp_logits(ids, 1)

    models = {"mlx direct": Model({}, None, MLXBackend.from_checkpoint(path, max_kv_size=128))}
    for to in ("mlx", "onnx"):
        out = convert(path, tmp_path / to, to=to, bits=16, show_progress=False)  # --mtp-bits left to its default
        models[f"{to} --bits 16"] = edgemtp.load(out, backend=to, max_kv_size=128)
    # The layer's own embedding stays in its graph; the trunk's is shared from embedding.safetensors.
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert [bool(entry["shared_inputs"]) for entry in manifest["mtp"]] == [layout != "own_embedding"] * 2
    for where, model in models.items():
        logits = model.mtp_logits(ids, depth=1)
        assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max(), where
