"""ONNX graphs vs transformers (float32): trunk logits, MTP logits, and quantized top-1 agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from edgemtp.checkpoint import Checkpoint
from edgemtp.converters.onnx_export import export_onnx
from edgemtp.layout import mtp_prefix
from edgemtp.onnx_backend.backend import OnnxBackend

TRUNK_CASES = [("llama", False), ("llama_untied", False), ("deepseek_v3", False), ("deepseek_v3", True),
               ("deepseek_v3_no_qlora", False), ("deepseek_v3_no_qlora", True), ("glm4_moe", False), ("glm4_moe", True),
               ("glm4_moe_no_qk_norm", False), ("qwen2", False), ("qwen3", False)]


def _token_ids(count: int, vocab: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, count)]


def _hf_model(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


def _dequantized_copy(checkpoint, out_dir):
    """transformers needs accelerate to load FP8 checkpoints; give it the float32 values instead
    (Checkpoint.read's block dequantization is tested with the checkpoint reader)."""
    ckpt = Checkpoint.open(checkpoint)
    out_dir.mkdir()
    save_file({name: ckpt.read(name) for name in ckpt.names()}, str(out_dir / "model.safetensors"))
    config = dict(ckpt.config)
    config.pop("quantization_config")
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


@pytest.mark.parametrize(("variant", "fp8"), TRUNK_CASES)
def test_trunk_logits_match_transformers(tiny_checkpoint, tmp_path, variant, fp8):
    checkpoint = tiny_checkpoint(variant, fp8=fp8)
    backend = OnnxBackend(export_onnx(checkpoint, tmp_path / "onnx", bits=None), threads=1)
    ids = _token_ids(24, backend.vocab_size)
    reference = _dequantized_copy(checkpoint, tmp_path / "reference") if fp8 else checkpoint
    with torch.no_grad():
        expected = _hf_model(reference)(torch.tensor([ids])).logits[0].numpy()

    logits, hidden = backend.trunk_step(ids)
    _assert_close(logits, expected)
    assert hidden.shape == (len(ids), backend.hidden_size)
    # The same tokens fed in pieces through the cache give the same logits.
    backend.reset()
    pieces = [backend.trunk_step(ids[a:b])[0] for a, b in [(0, 7), (7, 8), (8, 11), (11, 24)]]
    _assert_close(np.concatenate(pieces), expected)


def _mtp_block_model(checkpoint, index: int, out_dir) -> transformers.PreTrainedModel:
    """A one-layer transformers model holding MTP layer ``index``'s block, whose final norm is
    ``shared_head.norm`` and whose head is ``shared_head.head``: logits = head(norm(block(x)))."""
    ckpt = Checkpoint.open(checkpoint)
    config = dict(ckpt.config, num_hidden_layers=1, num_nextn_predict_layers=0, tie_word_embeddings=False)
    config.pop("quantization_config", None)
    if "first_k_dense_replace" in config:  # DeepSeek-V3, GLM-4.5: MTP blocks past the dense layers are MoE
        layer = ckpt.config["num_hidden_layers"] + index
        config["first_k_dense_replace"] = 1 if layer < ckpt.config.get("first_k_dense_replace", 0) else 0
    prefix = mtp_prefix(ckpt.config, index)
    weights = {"model.embed_tokens.weight": ckpt.read("model.embed_tokens.weight"),
               "model.norm.weight": ckpt.read(prefix + "shared_head.norm.weight"),
               "lm_head.weight": ckpt.read(prefix + "shared_head.head.weight")}
    mtp_only = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")
    for name in ckpt.mtp_names(index):
        rest = name[len(prefix):]
        if not rest.startswith(mtp_only):
            weights["model.layers.0." + rest] = ckpt.read(name)
    out_dir.mkdir()
    save_file(weights, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config))
    return _hf_model(out_dir)


def _rms_norm(x: torch.Tensor, weight: np.ndarray, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * torch.from_numpy(weight)


@pytest.mark.parametrize("variant", ["llama", "deepseek_v3", "glm4_moe", "glm4_moe_no_qk_norm", "qwen2", "qwen3"])
def test_mtp_logits_match_reference(tiny_checkpoint, tmp_path, variant):
    """Depth 1 and 2 (the second reusing the only MTP layer) against the contract's formula."""
    checkpoint = tiny_checkpoint(variant)
    backend = OnnxBackend(export_onnx(checkpoint, tmp_path / "onnx", bits=None), threads=1)
    ids = _token_ids(20, backend.vocab_size, seed=1)
    ckpt = Checkpoint.open(checkpoint)
    prefix, eps = mtp_prefix(ckpt.config, 0), ckpt.config["rms_norm_eps"]
    block = _mtp_block_model(checkpoint, 0, tmp_path / "block")
    captured = {}
    block.model.norm.register_forward_hook(lambda _m, args, _out: captured.update(h1=args[0]))
    embed = torch.from_numpy(ckpt.read("model.embed_tokens.weight"))
    eh_proj = torch.from_numpy(ckpt.read(prefix + "eh_proj.weight"))

    with torch.no_grad():
        hidden = _hf_model(checkpoint).model(torch.tensor([ids])).last_hidden_state[0]  # after the final norm
        backend.reset()
        _, onnx_hidden = backend.trunk_step(ids)
        for depth in (1, 2):
            tokens = ids[depth:]
            x = torch.cat([_rms_norm(embed[tokens], ckpt.read(prefix + "enorm.weight"), eps),
                           _rms_norm(hidden[:-1], ckpt.read(prefix + "hnorm.weight"), eps)], dim=-1) @ eh_proj.T
            expected = block(inputs_embeds=x[None]).logits[0].numpy()
            hidden = captured["h1"][0]
            logits, onnx_hidden = backend.mtp_step(depth, onnx_hidden[:-1], tokens)
            _assert_close(logits, expected)
            _assert_close(onnx_hidden, hidden.numpy())
            assert backend.mtp_len(depth) == len(tokens)


def _confident_checkpoint(tiny_checkpoint, tmp_path):
    """A tiny llama whose next-token predictions have real margins.

    Random weights predict near-uniformly (median top-1 margin ~0.2 logits), where any weight
    noise flips the argmax and agreement measures nothing. Shrinking the residual branches
    (o_proj, down_proj) by 4x keeps every layer active but lets the token signal dominate, like
    the confident positions of a trained model.
    """
    source = tiny_checkpoint("llama")
    target = tmp_path / "confident"
    target.mkdir()
    for file in source.iterdir():
        if file.name != "model.safetensors":
            (target / file.name).write_bytes(file.read_bytes())
    weights = load_file(str(source / "model.safetensors"))
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = weights[name] * weights[name].dtype.type(0.25)
    save_file(weights, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize(("bits", "minimum"), [(8, 0.99)])
def test_quantized_top1_agreement(tiny_checkpoint, tmp_path, bits, minimum):
    checkpoint = _confident_checkpoint(tiny_checkpoint, tmp_path)
    reference = OnnxBackend(export_onnx(checkpoint, tmp_path / "fp32", bits=None), threads=1)
    quantized = OnnxBackend(export_onnx(checkpoint, tmp_path / f"int{bits}", bits=bits), threads=1)
    ids = _token_ids(512, reference.vocab_size, seed=2)
    expected = reference.trunk_step(ids)[0].argmax(-1)
    assert (quantized.trunk_step(ids)[0].argmax(-1) == expected).mean() >= minimum


def test_conversion_options_on_an_onnx_export_are_refused(tiny_checkpoint, tmp_path):
    """``bits`` and ``group_size`` convert an HF checkpoint on load; on an ONNX export they would
    be silently ignored, so they get a one-line error naming the fix."""
    import edgemtp
    from edgemtp.errors import UserError

    export = export_onnx(tiny_checkpoint("llama"), tmp_path / "export", bits=None)
    with pytest.raises(UserError, match=r"ONNX export, quantized when it was converted; bits and group_size .* drop them"):
        edgemtp.load(export, backend="onnx", bits=4, group_size=64)
    assert edgemtp.load(export, backend="onnx", max_kv_size=32).backend.max_context == 32
