"""Qwen3.5 (``qwen3_5``, and ``qwen3_5_moe`` where the same code serves): the released layout,
its MTP layer against transformers' own layer classes, and rollback of the Gated DeltaNet states on
MLX (on ONNX: ``test_qwen3_5_onnx.py``; the sampling distribution test here runs on both backends).

The trunk's parity with transformers runs with every factory variant in ``test_mlx_parity.py``.
Random tiny models draft badly, so speculative runs here reject most drafts and every rollback
path runs: back to the start of the verify step and again over the accepted tokens.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5DecoderLayer,
    Qwen3_5RMSNorm,
    Qwen3_5TextRotaryEmbedding,
)
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
    Qwen3_5MoeDecoderLayer,
    Qwen3_5MoeRMSNorm,
    Qwen3_5MoeTextRotaryEmbedding,
)

import edgemtp
from edgemtp.api import Model
from edgemtp.checkpoint import Checkpoint
from edgemtp.mlx_backend.backend import MLXBackend
from edgemtp.mlx_backend.cache import RecurrentStateCache

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()  # mtp.* is "unexpected" to transformers
SEQ_LEN = 40


def token_ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 384, n).tolist()


def test_factory_writes_the_released_layout(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_5")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    text = config["text_config"]
    assert text["model_type"] == "qwen3_5_text" and text["mtp_num_hidden_layers"] == 1
    assert text["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]

    ckpt = Checkpoint.open(path)
    assert ckpt.num_mtp_layers == 1 and ckpt.config["hidden_size"] == 64  # text keys read through
    assert sorted(name for name in ckpt.mtp_names(0) if not name.startswith("mtp.layers.")) == [
        "mtp.fc.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"]
    assert "mtp.layers.0.self_attn.q_proj.weight" in ckpt.mtp_names(0)
    assert all(name.startswith("model.language_model.") for name in ckpt.trunk_names())

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3_5ForCausalLM"
    # transformers ignores mtp.* by name (_keys_to_ignore_on_load_unexpected); nothing else is left over.
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    # Zero-centred norms are stored as w (transformers scales by 1 + w).
    np.testing.assert_array_equal(model.model.norm.weight.detach().numpy(),
                                  ckpt.read("model.language_model.norm.weight"))
    assert abs(ckpt.read("model.language_model.norm.weight").mean()) < 0.1


class MTPReference:
    """Qwen3.5's MTP module from transformers' own classes: ``Qwen3_5RMSNorm`` for
    ``pre_fc_norm_embedding``, ``pre_fc_norm_hidden`` and ``norm``, a ``Qwen3_5DecoderLayer`` of
    the full-attention kind for ``layers.0`` (the ``Qwen3_5Moe`` classes for ``qwen3_5_moe``), the
    trunk's ``lm_head``:

        x = fc(concat[pre_fc_norm_embedding(embed(t[i+1])), pre_fc_norm_hidden(h[i])])
        logits = lm_head(norm(layers.0(x)))   # causal, RoPE positions 0..n-1

    (vLLM's ``Qwen3_5MultiTokenPredictor`` in the same order), with ``h`` the trunk's hidden
    states after its final norm, from transformers."""

    def __init__(self, path):
        ckpt = Checkpoint.open(path)
        self.trunk = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        released = json.loads((path / "config.json").read_text())
        moe = released["model_type"] == "qwen3_5_moe"
        config_class, norm_class, layer_class, rotary_class = (
            (Qwen3_5MoeTextConfig, Qwen3_5MoeRMSNorm, Qwen3_5MoeDecoderLayer, Qwen3_5MoeTextRotaryEmbedding) if moe
            else (Qwen3_5TextConfig, Qwen3_5RMSNorm, Qwen3_5DecoderLayer, Qwen3_5TextRotaryEmbedding))
        config = config_class(**released["text_config"])
        config._attn_implementation = "eager"
        hidden, eps = config.hidden_size, config.rms_norm_eps
        tensors = {name.removeprefix("mtp."): torch.from_numpy(ckpt.read(name)) for name in ckpt.mtp_names(0)}
        self.norms = {}
        for part in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            self.norms[part] = norm_class(hidden, eps)
            self.norms[part].load_state_dict({"weight": tensors[f"{part}.weight"]})
        self.fc = tensors["fc.weight"]
        self.layer = layer_class(config, layer_idx=config.layer_types.index("full_attention")).eval()
        self.layer.load_state_dict({name.removeprefix("layers.0."): tensor for name, tensor in tensors.items()
                                    if name.startswith("layers.0.")})
        self.rotary = rotary_class(config)

    @torch.no_grad()
    def layer_step(self, hidden: torch.Tensor, tokens: list[int]) -> tuple[np.ndarray, torch.Tensor]:
        embedded = self.norms["pre_fc_norm_embedding"](self.trunk.model.embed_tokens(torch.tensor(tokens)))
        x = torch.cat([embedded, self.norms["pre_fc_norm_hidden"](hidden)], dim=-1) @ self.fc.T
        n = len(tokens)
        positions = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        h1 = self.layer(x[None], position_embeddings=self.rotary(x[None], positions), attention_mask=mask)[0]
        return self.trunk.lm_head(self.norms["norm"](h1)).numpy(), h1

    @torch.no_grad()
    def mtp_logits(self, ids: list[int], depth: int) -> np.ndarray:
        hidden = self.trunk.model(torch.tensor([ids])).last_hidden_state[0]
        for d in range(1, depth + 1):  # depths past the one layer reuse it
            logits, hidden = self.layer_step(hidden[:-1], ids[d:])
        return logits


@pytest.mark.parametrize(("variant", "depth"), [("qwen3_5", 1), ("qwen3_5_untied", 2), ("qwen3_5_moe", 1)])
def test_mtp_logits_match_transformers_layers(tiny_checkpoint, variant, depth):
    path = tiny_checkpoint(variant)
    model = Model({}, None, MLXBackend.from_checkpoint(path, max_kv_size=128))
    ids = token_ids(SEQ_LEN, seed=5)

    logits = model.mtp_logits(ids, depth=depth)
    expected = MTPReference(path).mtp_logits(ids, depth)

    assert logits.shape == (SEQ_LEN - depth, 384)
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def assert_trunk_and_mtp_match_transformers(backend: MLXBackend, path, ids: list[int]) -> None:
    """fp32 trunk logits against transformers' ``Qwen3_5ForCausalLM`` on the HF checkpoint at ``path``,
    and MTP depth-1 logits against ``MTPReference``, within 1e-4 of the largest logit."""
    logits, _ = backend.trunk_step(ids)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()
    backend.reset()
    mtp = Model({}, None, backend).mtp_logits(ids, depth=1)
    reference = MTPReference(path).mtp_logits(ids, 1)
    assert np.abs(mtp - reference).max() <= 1e-4 * np.abs(reference).max()


def recurrent_states(backend: MLXBackend) -> list[np.ndarray]:
    return [np.array(array) for cache in backend._trunk_caches if isinstance(cache, RecurrentStateCache)
            for array in cache.arrays()]


def assert_same_trunk(backend: MLXBackend, fresh: MLXBackend, next_token: int) -> None:
    """Same length, same Gated DeltaNet states, same logits for the next token."""
    assert backend.trunk_len() == fresh.trunk_len()
    for state, expected in zip(recurrent_states(backend), recurrent_states(fresh), strict=True):
        assert np.abs(state - expected).max() <= 1e-5 * max(np.abs(expected).max(), 1.0)
    logits, _ = backend.trunk_step([next_token])
    expected, _ = fresh.trunk_step([next_token])
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_rollback_leaves_the_state_of_a_run_that_never_saw_the_dropped_tokens(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_5")
    ids = token_ids(30, seed=7)
    backend = MLXBackend.from_checkpoint(path, max_kv_size=64)
    backend.trunk_step(ids[:20])
    backend.trunk_step(ids[20:26])
    backend.trunk_rollback(4)  # inside the last step: back to its start, then 2 tokens again
    fresh = MLXBackend.from_checkpoint(path, max_kv_size=64)
    fresh.trunk_step(ids[:22])
    assert_same_trunk(backend, fresh, ids[22])

    backend.trunk_rollback(8)  # past the last step's start: from empty, 15 tokens again
    fresh.reset()
    fresh.trunk_step(ids[:15])
    assert_same_trunk(backend, fresh, ids[15])

    backend.trunk_rollback(backend.trunk_len())
    assert backend.trunk_len() == 0 and not recurrent_states(backend)


def test_pipelined_greedy_decoding_rolls_back_its_queued_step(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_5")
    prompt = token_ids(12, seed=8)
    backend = MLXBackend.from_checkpoint(path, max_kv_size=64)
    logits, _ = backend.trunk_step(prompt)
    tokens = list(backend.greedy_tokens(int(logits[-1].argmax()), 10))
    fresh = MLXBackend.from_checkpoint(path, max_kv_size=64)
    fresh.trunk_step(prompt + [int(logits[-1].argmax())] + tokens[:-1])
    assert_same_trunk(backend, fresh, tokens[-1])


@pytest.mark.parametrize("variant", ["qwen3_5", "qwen3_5_untied", "qwen3_5_moe"])
def test_speculative_greedy_equals_plain_greedy_mlx(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    model = edgemtp.load(path, backend="mlx")
    other_model = edgemtp.load(tiny_checkpoint(variant, seed=1), backend="mlx")
    rejections = 0
    for prompt in ("hello world", "The quick brown fox", "1 2 3 4 5 6 7 8"):
        reference = model.generate(prompt, max_tokens=48, spec="none")
        for options in (dict(spec="mtp", num_draft=1), dict(spec="mtp", num_draft=3), dict(spec="ngram", num_draft=4),
                        dict(spec="draft", num_draft=2, draft_model=other_model)):
            out = model.generate(prompt, max_tokens=48, **options)
            assert out.tokens == reference.tokens, (prompt, options)
            rejections += out.stats.provenance.count("correction")
    assert rejections > 20, "the drafts must be rejected often"

    # After all those rollbacks the trunk holds what a fresh run over the same tokens holds.
    fresh = MLXBackend.from_checkpoint(path)
    tokens = model._session.tokens
    fresh.trunk_step(tokens)
    backend = model.backend
    for state, expected in zip(recurrent_states(backend), recurrent_states(fresh), strict=True):
        assert np.abs(state - expected).max() <= 1e-5 * max(np.abs(expected).max(), 1.0)
    assert backend.trunk_len() == len(tokens)
    mx.eval()  # nothing left pending


@pytest.mark.parametrize("variant", ["qwen3_5_untied", "qwen3_5_moe"])
def test_mlx_conversion_matches_transformers_and_loads_in_mlx_lm(tiny_checkpoint, tmp_path, variant):
    import mlx_lm

    from edgemtp.converters.convert import convert

    path = tiny_checkpoint(variant)
    ids = token_ids(SEQ_LEN, seed=9)
    full = convert(path, tmp_path / "f32", to="mlx", bits=16, dtype="float32", show_progress=False)
    assert_trunk_and_mtp_match_transformers(MLXBackend.load(full), path, ids)

    # 4 bits: mlx-lm's own qwen3_5 model and edgemtp's backend read the same directory alike.
    quantized = convert(path, tmp_path / "q4", to="mlx", bits=4, group_size=32, show_progress=False)
    model, _ = mlx_lm.load(str(quantized))
    theirs = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    ours, _ = MLXBackend.load(quantized).trunk_step(ids)
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


def test_memory_counts_keys_and_values_of_full_attention_layers_only(tiny_checkpoint):
    from edgemtp.planner import estimate
    from edgemtp.summary import kv_cache_bytes

    config = Checkpoint.open(tiny_checkpoint("qwen3_5")).config
    per_token = 2 * 2 * 32 * 2  # keys and values, 2 KV heads of 32, 16-bit
    # 3 Gated DeltaNet layers: a 4x16x16 float32 state and 3 convolution inputs of 2*32+64 channels.
    states = 3 * 4 * (4 * 16 * 16 + 3 * 128)
    assert kv_cache_bytes(config, 100) == 100 * (1 + 1) * per_token + states  # 1 full-attention layer + MTP
    assert estimate(config, weights=0, context=100, dtype="float16").kv_cache == 100 * per_token + states


def test_moe_onnx_export_refuses_in_one_line(tiny_checkpoint, tmp_path):
    from edgemtp.converters.onnx_export.export import export_onnx
    from edgemtp.errors import UserError

    with pytest.raises(UserError, match="qwen3_5_moe has no ONNX export yet; convert it --to mlx"):
        export_onnx(tiny_checkpoint("qwen3_5_moe"), tmp_path / "onnx")
    assert not any(tmp_path.iterdir())


def test_moe_factory_writes_the_released_layout_transformers_loads(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_5_moe")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and config["text_config"]["model_type"] == "qwen3_5_moe_text"
    ckpt = Checkpoint.open(path)
    assert ckpt.num_mtp_layers == 1
    # Every layer's MLP routes, the MTP layer's included: experts stacked as transformers stores them.
    assert ckpt.shape("model.language_model.layers.0.mlp.experts.gate_up_proj") == (8, 64, 64)
    assert ckpt.shape("mtp.layers.0.mlp.experts.down_proj") == (8, 64, 32)
    assert "mtp.layers.0.mlp.shared_expert_gate.weight" in ckpt.mtp_names(0)

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM"
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]


def test_long_speculative_run_leaves_no_drift_mlx(tiny_checkpoint):
    """After hundreds of rejected drafts, the trunk's next logits and every MTP depth's draft
    logits equal a fresh teacher-forced run over the same tokens."""
    from test_engine_greedy import check_no_cache_drift

    model = edgemtp.load(tiny_checkpoint("qwen3_5"), backend="mlx")
    out = check_no_cache_drift(model, model.tokenizer.encode("once upon a time"), 300, atol=2e-4,
                               chat=False, spec="mtp", num_draft=3)
    assert out.stats.provenance.count("correction") > 50


def test_the_vision_tower_is_skipped_and_not_planned_for(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.numpy import save_file

    from edgemtp.config import load_config
    from edgemtp.planner import weight_files

    path = tmp_path / "with_vision"
    shutil.copytree(tiny_checkpoint("qwen3_5"), path)
    before = weight_files(path, load_config(path))
    save_file({"model.visual.blocks.0.attn.qkv.weight": np.ones((64, 64), np.float32)}, path / "visual.safetensors")
    after = weight_files(path, load_config(path))
    # Only the new file's header (file sizes are summed) is left of its 16 KiB.
    assert 0 < after.total - before.total < 1024 and after.mtp == before.mtp > 0
    assert after.trunk_stream - before.trunk_stream == after.total - before.total

    ids = token_ids(16, seed=3)
    logits, _ = MLXBackend.load(path).trunk_step(ids)
    expected, _ = MLXBackend.load(tiny_checkpoint("qwen3_5")).trunk_step(ids)
    np.testing.assert_array_equal(logits, expected)


@pytest.mark.parametrize(("backend", "options"), [("mlx", {}), ("onnx", {"bits": None})])
def test_speculative_sampling_keeps_the_target_distribution(tiny_checkpoint, backend, options):
    """Temperature 1, top-k 4: the first two tokens (the second from a verify step drafting one
    token with the MTP layer, then rolled back) follow the trunk's exact joint distribution."""
    from scipy.stats import chisquare

    from edgemtp.engine.sampling import Sampler

    model = edgemtp.load(tiny_checkpoint("qwen3_5"), backend=backend, **options)
    prompt, samples, warp = token_ids(6, seed=11), 800, dict(temperature=1.0, top_k=4)
    sampler = Sampler(**warp)
    first = sampler.probs(model.logits(prompt)[-1])[0]
    expected = {}
    for t1 in np.flatnonzero(first):
        second = sampler.probs(model.logits(prompt + [int(t1)])[-1])[0]
        expected.update({(int(t1), int(t2)): first[t1] * second[t2] for t2 in np.flatnonzero(second)})

    counts: dict[tuple, int] = {}
    accepted = rejected = 0
    for seed in range(samples):
        out = model.generate(prompt, max_tokens=3, seed=seed, spec="mtp", num_draft=1, chat=False, **warp)
        key = tuple(out.tokens[:2])
        counts[key] = counts.get(key, 0) + 1
        accepted += out.stats.accepted
        rejected += out.stats.provenance.count("correction")
    assert accepted > 0 and rejected > 0, "the drafts must be both accepted and rejected"
    assert set(counts) <= set(expected), "sampled a pair the target excludes"
    # Chi-square over the pairs expected at least 5 times, the rarer ones pooled into one cell.
    common = [key for key in expected if expected[key] * samples >= 5]
    rare = [key for key in expected if expected[key] * samples < 5]
    cells = [[key] for key in common] + ([rare] if rare else [])
    observed = np.array([sum(counts.get(key, 0) for key in cell) for cell in cells])
    wanted = np.array([sum(expected[key] for key in cell) for cell in cells]) * samples
    assert len(common) >= 8
    assert chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue > 0.001


def test_moe_experts_stored_one_tensor_per_expert_read_as_stacked(tiny_checkpoint, tmp_path):
    """A qwen3_5_moe checkpoint whose routed experts are stored per expert (here the MTP layer's and trunk
    layer 1's) reads, converts and runs exactly like the stacked one, and transformers' own conversion of
    those names loads the same model."""
    import shutil

    from safetensors.numpy import load_file, save_file

    source = tiny_checkpoint("qwen3_5_moe")
    path = tmp_path / "per_expert"
    shutil.copytree(source, path)
    for file in path.glob("*.safetensors"):
        tensors = load_file(file)
        for prefix in ("mtp.layers.0.mlp.experts.", "model.language_model.layers.1.mlp.experts."):
            if prefix + "gate_up_proj" not in tensors:
                continue
            gate_up, down = tensors.pop(prefix + "gate_up_proj"), tensors.pop(prefix + "down_proj")
            half = gate_up.shape[1] // 2
            for expert in range(gate_up.shape[0]):
                tensors[f"{prefix}{expert}.gate_proj.weight"] = np.ascontiguousarray(gate_up[expert, :half])
                tensors[f"{prefix}{expert}.up_proj.weight"] = np.ascontiguousarray(gate_up[expert, half:])
                tensors[f"{prefix}{expert}.down_proj.weight"] = np.ascontiguousarray(down[expert])
        save_file(tensors, file)

    stacked, per_expert = Checkpoint.open(source), Checkpoint.open(path)
    assert "mtp.layers.0.mlp.experts.3.up_proj.weight" not in per_expert.names()
    assert sorted(per_expert.names()) == sorted(stacked.names())
    for name in ("mtp.layers.0.mlp.experts.gate_up_proj", "model.language_model.layers.1.mlp.experts.down_proj"):
        assert per_expert.shape(name) == stacked.shape(name)
        np.testing.assert_array_equal(per_expert.read(name), stacked.read(name))

    ids = token_ids(SEQ_LEN, seed=13)
    ours, theirs = (Model({}, None, MLXBackend.from_checkpoint(p, max_kv_size=64)) for p in (path, source))
    np.testing.assert_array_equal(ours.logits(ids), theirs.logits(ids))
    np.testing.assert_array_equal(ours.mtp_logits(ids, 1), theirs.mtp_logits(ids, 1))

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(torch.tensor([ids])).logits
        np.testing.assert_array_equal(model(torch.tensor([ids])).logits.numpy(), expected.numpy())
