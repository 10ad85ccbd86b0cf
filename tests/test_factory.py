"""The tiny-checkpoint factory writes real Hugging Face checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FACTORY_VARIANTS

from edgemtp.checkpoint import Checkpoint
from edgemtp.errors import UserError
from edgemtp.factory import make_tiny
from edgemtp.layout import expected_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


# Qwen3.5's released layout (nested config, model.language_model.*, mtp.*): tests/test_qwen3_5.py.
@pytest.mark.parametrize("variant", [variant for variant in FACTORY_VARIANTS if not variant.startswith("qwen3_5")])
def test_variant_loads_in_transformers_with_every_trunk_weight(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    checkpoint = Checkpoint.open(path)
    model_class = getattr(transformers, checkpoint.config["architectures"][0])
    model, info = model_class.from_pretrained(path, output_loading_info=True, dtype=torch.float32)

    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    # Only the MTP layer is unknown to transformers (it has no MTP module for these classes).
    mtp_prefix = f"model.layers.{checkpoint.config['num_hidden_layers']}."
    assert info["unexpected_keys"] and all(key.startswith(mtp_prefix) for key in info["unexpected_keys"])

    # transformers sees exactly the values our reader returns.
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight", "model.norm.weight"):
        np.testing.assert_array_equal(state[name].numpy(), checkpoint.read(name))

    with torch.no_grad():
        logits = model(torch.tensor([[3, 70, 200, 5, 300, 42]])).logits[0].numpy()
    assert np.isfinite(logits).all()
    assert logits.std() > 0.3  # varied, not a flat distribution
    assert len(set(logits.argmax(-1).tolist())) > 1  # different positions predict different tokens


def test_deepseek_variant_features(tiny_checkpoint):
    config = Checkpoint.open(tiny_checkpoint("deepseek_v3")).config
    assert config["q_lora_rank"] and config["n_group"] > 1 and config["topk_group"] < config["n_group"]
    assert config["first_k_dense_replace"] == 1 and config["n_shared_experts"] == 1
    assert config["rope_scaling"]["type"] == "yarn" and config["rope_parameters"]["rope_type"] == "yarn"
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"]
    assert Checkpoint.open(tiny_checkpoint("deepseek_v3_no_qlora")).config["q_lora_rank"] is None


def test_deepseek_mtp_block_is_moe_with_random_routing_bias(tiny_checkpoint):
    checkpoint = Checkpoint.open(tiny_checkpoint("deepseek_v3", mtp_layers=2))
    names = checkpoint.mtp_names(1)
    prefix = "model.layers.3."
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "mlp.experts.7.down_proj.weight", "mlp.shared_experts.up_proj.weight"):
        assert prefix + part in names
    assert checkpoint.shape(prefix + "eh_proj.weight") == (64, 128)
    bias = checkpoint.read(prefix + "mlp.gate.e_score_correction_bias")
    assert bias.dtype == np.float32 and bias.std() > 0.05
    assert checkpoint.dtype(prefix + "mlp.gate.e_score_correction_bias") == "F32"


def test_qwen_variant_features(tiny_checkpoint):
    qwen2 = Checkpoint.open(tiny_checkpoint("qwen2"))
    attn = "model.layers.2.self_attn."  # the MTP block has the trunk's attention
    assert {attn + f"{p}_proj.bias" for p in "qkv"} <= set(qwen2.names())
    assert attn + "o_proj.bias" not in qwen2.names() and "lm_head.weight" not in qwen2.names()

    qwen3 = Checkpoint.open(tiny_checkpoint("qwen3"))
    config = qwen3.config
    assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
    assert qwen3.shape(attn + "q_norm.weight") == qwen3.shape(attn + "k_norm.weight") == (config["head_dim"],)
    assert not any(name.endswith(".bias") for name in qwen3.names())
    # q_norm/k_norm count as norms (~1), biases as biases (small).
    assert abs(qwen3.read(attn + "q_norm.weight").mean() - 1) < 0.1
    assert np.abs(qwen2.read(attn + "k_proj.bias")).max() < 0.2


def test_glm4_moe_variant_features(tiny_checkpoint):
    checkpoint = Checkpoint.open(tiny_checkpoint("glm4_moe"))
    config = checkpoint.config
    assert config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]
    assert config["partial_rotary_factor"] == config["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert config["use_qk_norm"] and config["attention_bias"] and not config["tie_word_embeddings"]
    assert config["n_group"] > config["topk_group"] and config["first_k_dense_replace"] == 1
    names = checkpoint.mtp_names(0)
    prefix = "model.layers.2."
    for part in ("self_attn.q_norm.weight", "self_attn.k_proj.bias", "mlp.experts.7.down_proj.weight",
                 "mlp.shared_experts.up_proj.weight", "mlp.gate.e_score_correction_bias", "eh_proj.weight"):
        assert prefix + part in names
    assert prefix + "self_attn.o_proj.bias" not in names
    assert "model.layers.0.mlp.gate_proj.weight" in checkpoint.names()  # the dense leading layer
    assert checkpoint.read(prefix + "self_attn.q_norm.weight").mean() > 0.9  # a norm, not a bias
    assert np.abs(checkpoint.read(prefix + "self_attn.q_proj.bias")).max() < 0.2  # a bias
    assert checkpoint.dtype(prefix + "mlp.gate.e_score_correction_bias") == "F32"
    assert "q_norm" not in str(Checkpoint.open(tiny_checkpoint("glm4_moe_no_qk_norm")).names())


def test_llama_tied_embeddings_have_no_lm_head(tiny_checkpoint):
    assert "lm_head.weight" not in Checkpoint.open(tiny_checkpoint("llama")).names()
    assert "lm_head.weight" in Checkpoint.open(tiny_checkpoint("llama_untied")).names()


def test_sharded_checkpoint_holds_the_same_values(tiny_checkpoint):
    single = Checkpoint.open(tiny_checkpoint("deepseek_v3"))
    sharded_path = tiny_checkpoint("deepseek_v3", shard_bytes=200_000)
    index = json.loads((sharded_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert not (sharded_path / "model.safetensors").exists()
    sharded = Checkpoint.open(sharded_path)
    assert sharded.names() == single.names()
    for name in single.names():
        np.testing.assert_array_equal(sharded.read(name), single.read(name))


def test_seed_changes_values_and_is_deterministic(tmp_path):
    a = Checkpoint.open(make_tiny(tmp_path / "a", "llama", seed=1))
    b = Checkpoint.open(make_tiny(tmp_path / "b", "llama", seed=1))
    c = Checkpoint.open(make_tiny(tmp_path / "c", "llama", seed=2))
    name = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(a.read(name), b.read(name))
    assert not np.array_equal(a.read(name), c.read(name))


def test_size_overrides_and_mtp_count(tmp_path):
    path = make_tiny(tmp_path / "big", "deepseek_v3", mtp_layers=0, hidden_size=128, num_hidden_layers=3,
                     n_routed_experts=4, vocab_size=500)
    checkpoint = Checkpoint.open(path)
    assert checkpoint.num_mtp_layers == 0 and checkpoint.mtp_names(0) == []
    assert checkpoint.shape("model.embed_tokens.weight") == (500, 128)
    assert checkpoint.shape("model.layers.2.mlp.gate.weight") == (4, 128)
    assert set(checkpoint.names()) == set(expected_weights(checkpoint.config))


def test_tokenizer_fits_in_the_vocabulary(tiny_checkpoint):
    from tokenizers import Tokenizer

    path = tiny_checkpoint("llama")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    config = json.loads((path / "config.json").read_text())
    assert 259 < tokenizer.get_vocab_size() <= config["vocab_size"]
    assert config["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")


def test_refuses_non_empty_output_and_leaves_no_partial_dir(tmp_path):
    out = tmp_path / "model"
    make_tiny(out, "llama")
    with pytest.raises(UserError, match="--force"):
        make_tiny(out, "llama")
    make_tiny(out, "llama", force=True, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_rejects_bad_options(tmp_path):
    with pytest.raises(UserError, match="unknown tiny-model variant"):
        make_tiny(tmp_path / "x", "gpt2")
    with pytest.raises(UserError, match="n_routed_experts"):
        make_tiny(tmp_path / "x", "llama", n_routed_experts=4)
    with pytest.raises(UserError, match="vocab_size"):
        make_tiny(tmp_path / "x", "llama", vocab_size=100)
    assert not (tmp_path / "x").exists()
