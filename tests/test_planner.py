"""The memory planner: limit detection, estimates against hand-computed numbers, refusal."""

from __future__ import annotations

import sys

import pytest
from safetensors.numpy import load_file

from edgemtp.engine.backend import PREFILL_CHUNK
from edgemtp import planner, summary
from edgemtp.errors import UserError
from edgemtp.factory import make_tiny, tiny_config
from edgemtp.planner import MemoryBudget


# --- limit detection -----------------------------------------------------------


def test_cgroup_v2_limit(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert planner.read_cgroup_limit(tmp_path) == 1 << 30


def test_cgroup_v2_unlimited(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    assert planner.read_cgroup_limit(tmp_path) is None


def test_cgroup_v1_limit_and_unlimited(tmp_path):
    (tmp_path / "memory").mkdir()
    limit = tmp_path / "memory" / "memory.limit_in_bytes"
    limit.write_text("536870912\n")
    assert planner.read_cgroup_limit(tmp_path) == 512 << 20
    limit.write_text("9223372036854771712\n")  # v1's "no limit"
    assert planner.read_cgroup_limit(tmp_path) is None


def test_no_cgroup_files(tmp_path):
    assert planner.read_cgroup_limit(tmp_path) is None


def test_mem_available(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683656 kB\nMemFree:  100 kB\nMemAvailable:   2000 kB\n")
    assert planner.read_mem_available(meminfo) == 2000 * 1024


def test_budget_is_the_smallest_limit(tmp_path):
    (tmp_path / "memory.max").write_text(str(3 << 20))
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:   8192 kB\n")  # 8 MiB
    assert planner.detect_memory_budget(tmp_path, meminfo) == MemoryBudget(3 << 20, "cgroup memory limit")
    meminfo.write_text("MemAvailable:   1024 kB\n")  # 1 MiB
    assert planner.detect_memory_budget(tmp_path, meminfo) == MemoryBudget(1 << 20, "MemAvailable")


# --- estimates ---------------------------------------------------------------------


def test_kv_bytes_deepseek_mla_and_llama_gqa():
    deepseek = tiny_config("deepseek_v3")  # kv_lora_rank 64 + qk_rope_head_dim 8
    assert planner.kv_bytes_per_token_per_layer(deepseek, 2) == (64 + 8) * 2
    llama = tiny_config("llama")  # 2 KV heads x head_dim 64/4 = 16, keys and values
    assert planner.kv_bytes_per_token_per_layer(llama, 2) == 2 * 2 * 16 * 2
    assert planner.kv_bytes_per_token_per_layer(tiny_config("llama", head_dim=32), 4) == 2 * 2 * 32 * 4
    assert planner.kv_bytes_per_token_per_layer(tiny_config("qwen3"), 4) == 2 * 2 * 32 * 4  # explicit head_dim 32
    glm = tiny_config("glm4_moe")  # GQA: 2 KV heads x its explicit head_dim 32 (not 64/4)
    assert planner.kv_bytes_per_token_per_layer(glm, 2) == 2 * 2 * 32 * 2
    assert summary.kv_cache_elements_per_token(glm) == 2 * 2 * 32


def test_estimate_deepseek_by_hand():
    config = tiny_config("deepseek_v3", mtp_layers=1)
    est = planner.estimate(config, weights=12345, context=1000, dtype="bfloat16")
    per_token_layer = (64 + 8) * 2  # bf16 latent + rope key
    assert est.weights == 12345
    assert est.kv_cache == per_token_layer * 2 * 1000  # 2 trunk layers
    assert est.mtp_caches == per_token_layer * planner.MAX_DRAFT * 1000  # one cache per draft depth
    # Per row: hidden 64 + widest MLP max(128 dense, (2 routed + 1 shared) x 64) = 192 + scores
    # 4 heads x 1000, float32. A verify pass: 5 rows, logits (vocab 384) and row buffers in 4
    # copies each; a prompt step: PREFILL_CHUNK rows, logits in 2 copies, row buffers in 3.
    per_row = (64 + 192 + 4 * 1000) * 4
    verify = 5 * (4 * 384 * 4 + 4 * per_row)
    prompt = PREFILL_CHUNK * (2 * 384 * 4 + 3 * per_row)
    assert est.activations == max(verify, prompt) == prompt
    assert est.total == est.weights + est.kv_cache + est.mtp_caches + est.activations


def test_float32_caches_and_no_mtp_caches_without_mtp_layers():
    config = tiny_config("llama", mtp_layers=0)
    est = planner.estimate(config, weights=0, context=10)  # float32 by default
    assert est.kv_cache == 2 * 2 * 16 * 4 * 2 * 10
    assert est.mtp_caches == 0


def test_weight_files_split_trunk_mtp_embedding(tmp_path):
    model = make_tiny(tmp_path / "m", arch="deepseek_v3", mtp_layers=1)
    tensors = load_file(model / "model.safetensors")
    mtp = sum(t.nbytes for name, t in tensors.items() if name.startswith("model.layers.2."))
    embedding = tensors["model.embed_tokens.weight"].nbytes
    # Layer 1 is the only trunk MoE layer (first_k_dense_replace = 1): 8 routed experts,
    # of which a token uses 2, so 6/8 of the routed-expert bytes stay idle.
    routed = sum(t.nbytes for name, t in tensors.items() if name.startswith("model.layers.1.mlp.experts."))
    assert routed > 0
    files = planner.weight_files(model, tiny_config("deepseek_v3", mtp_layers=1))
    # The MTP layer's copy of the embedding (released layout) is loaded once: counted nowhere.
    copy = tensors["model.layers.2.embed_tokens.weight"].nbytes
    assert files.total == (model / "model.safetensors").stat().st_size - copy
    assert (files.mtp, files.embedding, files.idle_experts) == (mtp - copy, embedding, routed * 6 // 8)
    assert files.trunk_stream == files.total - (mtp - copy) - embedding - routed * 6 // 8


def test_tied_embedding_counts_as_streamed(tmp_path):
    model = make_tiny(tmp_path / "m", arch="llama", mtp_layers=0)
    files = planner.weight_files(model, tiny_config("llama", mtp_layers=0))
    assert files.embedding == 0 and files.trunk_stream == files.total


# --- the plan -------------------------------------------------------------------------


@pytest.fixture
def deepseek_dir(tmp_path):
    return make_tiny(tmp_path / "ds", arch="deepseek_v3", mtp_layers=1)


def test_max_kv_size_is_the_largest_context_that_fits(deepseek_dir):
    config = planner.load_config(deepseek_dir)
    weights = planner.weight_files(deepseek_dir, config).total
    want = 700
    usable = planner.estimate(config, weights, want, "float32").total
    budget = MemoryBudget(int(usable / planner.BUDGET_FRACTION) + 2, "test")
    plan = planner.plan_for(deepseek_dir, backend="mlx", budget=budget)
    assert plan.max_kv_size == want
    assert plan.estimate.total <= budget.bytes * planner.BUDGET_FRACTION
    assert planner.estimate(config, weights, want + 1, "float32").total > budget.bytes * planner.BUDGET_FRACTION
    labels = [label for label, _ in plan.as_rows()]
    assert "max context (max_kv_size)" in labels and "memory budget" in labels


def test_max_kv_size_capped_at_max_position_embeddings(deepseek_dir):
    plan = planner.plan_for(deepseek_dir, backend="mlx", budget=MemoryBudget(1 << 40, "test"))
    assert plan.max_kv_size == plan.max_position_embeddings == 2048


def test_refuses_a_model_that_does_not_fit(deepseek_dir):
    with pytest.raises(UserError, match="--bits 4"):
        planner.plan_for(deepseek_dir, backend="mlx", budget=MemoryBudget(100_000, "test"))


def test_refuses_a_context_that_does_not_fit(deepseek_dir):
    config = planner.load_config(deepseek_dir)
    weights = planner.weight_files(deepseek_dir, config).total
    usable = planner.estimate(config, weights, 500, "float32").total
    budget = MemoryBudget(int(usable / planner.BUDGET_FRACTION) + 2, "test")
    assert planner.plan_for(deepseek_dir, context=400, budget=budget).max_kv_size == 400
    with pytest.raises(UserError, match="--max-kv-size 500 or less"):
        planner.plan_for(deepseek_dir, context=600, budget=budget)


def test_cli_refusal_exits_2_before_loading(deepseek_dir, monkeypatch, capsys):
    from edgemtp import cli

    monkeypatch.setattr(planner, "detect_memory_budget", lambda: MemoryBudget(100_000, "test"))
    monkeypatch.setattr(sys, "argv", ["edgemtp", "bench", "--model", str(deepseek_dir), "--backend", "mlx"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--bits 4" in err and "Traceback" not in err


def test_onnx_export_layout_counts_mtp_folders(tmp_path):
    # the layout of converters/onnx_export: one folder per graph, weights in model.onnx.data
    for folder, size in (("trunk", 3000), ("mtp0", 700)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.onnx").write_bytes(b"g" * 100)
        (tmp_path / folder / "model.onnx.data").write_bytes(b"w" * size)
    files = planner.weight_files(tmp_path, tiny_config("llama"))
    assert (files.total, files.mtp, files.trunk_stream) == (3900, 800, 3100)


def test_onnx_plans_count_onnxruntimes_own_memory(deepseek_dir):
    budget = MemoryBudget(1 << 40, "test")
    mlx = planner.plan_for(deepseek_dir, context=300, backend="mlx", budget=budget)
    onnx = planner.plan_for(deepseek_dir, context=300, backend="onnx", budget=budget)
    own = int(0.4 * mlx.weights.total) + 120 * 2**20  # repacked weights beyond the files, the runtime
    assert (mlx.estimate.repacked, onnx.estimate.repacked) == (0, own)
    # ONNX's routed experts also copy each row's experts' weights, float32: k x (gate, up, down)
    config = planner.load_config(deepseek_dir)
    gathered = 4 * 3 * config["num_experts_per_tok"] * config["hidden_size"] * config["moe_intermediate_size"]
    assert onnx.estimate.activations == mlx.estimate.activations + PREFILL_CHUNK * planner.GATHER_COPIES * gathered
    assert onnx.estimate.total == mlx.estimate.total + own + PREFILL_CHUNK * planner.GATHER_COPIES * gathered
    assert ("onnxruntime's repacked weights and runtime" in dict(onnx.as_rows())
            and "onnxruntime's repacked weights and runtime" not in dict(mlx.as_rows()))
    # a budget that fits the mapped weights but not onnxruntime's own: refused before loading, on ONNX only
    tight = MemoryBudget(int((mlx.estimate.total + own // 2) / planner.BUDGET_FRACTION), "test")
    assert planner.plan_for(deepseek_dir, context=300, backend="mlx", budget=tight).max_kv_size == 300
    with pytest.raises(UserError, match="needs about"):
        planner.plan_for(deepseek_dir, context=300, backend="onnx", budget=tight)


def test_mlx_export_layout_counts_mtp_file(tmp_path):
    # the layout of converters/mlx_export: mlx-lm's model.safetensors plus mtp.safetensors
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"model.embed_tokens.weight": np.zeros((8, 4), np.float32),
               "model.layers.0.mlp.up_proj.weight": np.zeros((4, 4), np.uint32)}, tmp_path / "model.safetensors")
    save_file({"layers.0.block.mlp.up_proj.weight": np.zeros((4, 4), np.uint32)}, tmp_path / "mtp.safetensors")
    files = planner.weight_files(tmp_path, tiny_config("llama_untied"))
    mtp_size = (tmp_path / "mtp.safetensors").stat().st_size
    assert files.total == (tmp_path / "model.safetensors").stat().st_size + mtp_size
    assert (files.mtp, files.embedding) == (mtp_size, 8 * 4 * 4)
    assert files.trunk_stream == files.total - mtp_size - 8 * 4 * 4


# --- edgemtp.load plans first ------------------------------------------------------


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_load_sizes_the_cache_to_what_fits(deepseek_dir, monkeypatch, backend):
    import edgemtp

    config = planner.load_config(deepseek_dir)
    weights = planner.weight_files(deepseek_dir, config).total
    usable = planner.estimate(config, weights, 300, "float32", planner.repacked_bytes(backend, weights),
                              backend).total
    monkeypatch.setattr(planner, "detect_memory_budget", lambda: MemoryBudget(int(usable / planner.BUDGET_FRACTION) + 2, "test"))
    model = edgemtp.load(deepseek_dir, backend=backend, **({"bits": None} if backend == "onnx" else {}))
    assert model.backend.max_context == 300
    assert edgemtp.load(deepseek_dir, backend=backend, max_kv_size=100).backend.max_context == 100


def test_cli_generate_refuses_a_context_that_does_not_fit(deepseek_dir, monkeypatch, capsys):
    from edgemtp import cli

    monkeypatch.setattr(planner, "detect_memory_budget", lambda: MemoryBudget(1 << 40, "test"))
    monkeypatch.setattr(sys, "argv", ["edgemtp", "generate", "--model", str(deepseek_dir), "--backend", "mlx",
                                      "-p", "hi", "--max-kv-size", "5000"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--max-kv-size 2048" in err and "Traceback" not in err
