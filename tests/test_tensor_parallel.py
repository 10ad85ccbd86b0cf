"""Tensor parallel decoding over several ranks (edgemtp/mlx_backend/tensor_parallel.py,
edgemtp/tensor_plan.py).

The ranks are real processes on this machine talking over mx.distributed's ``ring`` backend,
started the way ``mlx.launch -n 2 --backend ring`` starts them (tests/launch_ranks.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten

from edgemtp.config import load_config
from edgemtp.engine.stats import format_pipeline
from edgemtp.errors import UserError
from edgemtp.mlx_backend.backend import MLXBackend
from edgemtp.mlx_backend.rank_weights import load_part
from edgemtp.pipeline_plan import weight_split
from edgemtp.planner import MemoryBudget
from edgemtp.tensor_plan import choose_parallel, plan_tensor, tensor_refusal

sys.path.insert(0, str(Path(__file__).parent))
from launch_ranks import WORKER, assert_a_dead_rank_ends_the_run, finish, start_ranks  # noqa: E402
from pipeline_worker import PROMPT, run_cases  # noqa: E402

MAX_TOKENS = 10
ROOMY = MemoryBudget(8 << 30, "test budget")


@pytest.mark.parametrize("arch,fusion", [("llama", None), ("deepseek_v3", None), ("llama", [0, 2])])
def test_tensor_parallel_equals_single_process(tiny_checkpoint, tmp_path, arch, fusion):
    """Two ranks, every layer split in two: the trunk's logits within the parity bound of one
    process's (the halves' partial sums add up in another order); plain and MTP decoding, greedy
    and seeded at temperature 0.8, token for token one process's output (so greedy MTP under
    tensor parallel equals plain greedy under tensor parallel too). The seeded runs hold on these
    checkpoints and seed: a sampled token could differ only where the summation order moves a
    probability across the random draw, which the logits bound makes rare but not impossible."""
    import edgemtp

    extra = {"mtp_fusion_layers": fusion} if fusion else {}  # a fusion head reads inner layers' outputs
    layers = 4 if fusion else 3
    path = tiny_checkpoint(arch, mtp_layers=2, num_hidden_layers=layers, **extra)
    model = edgemtp.load(path, backend="mlx", max_kv_size=128)
    single = run_cases(model, MAX_TOKENS)
    single_logits = model.logits(PROMPT)
    results = finish(start_ranks(tmp_path, 2, [sys.executable, str(WORKER), str(path), str(MAX_TOKENS), "tensor"]))
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err}"
        assert out.strip() == "" or rank == 0
    run = json.loads(results[0][1])
    assert run["report"]["parallel"] == "tensor"
    assert [r["shards"] for r in run["report"]["ranks"]] == [2, 2]
    summary = format_pipeline(run["report"])
    assert summary[0].startswith(f"Rank 0 (127.0.0.1): layers 0-{layers - 1}, 1/2 of each, weights ")
    assert summary[2].startswith("Tensor parallel: ") and summary[3].endswith("MTP steps on rank 0, without messages")
    logits = np.array(run["logits"], dtype=np.float32)
    assert logits.shape == single_logits.shape
    assert np.abs(logits - single_logits).max() <= 1e-4 * np.abs(single_logits).max()
    single_mtp = model.mtp_logits(PROMPT, depth=1)  # MTP layers whole on rank 0, fed what it tapped
    assert np.abs(np.array(run["mtp_logits"], dtype=np.float32) - single_mtp).max() <= 1e-4 * np.abs(single_mtp).max()
    assert run["tokens"] == single
    assert run["tokens"][1] == run["tokens"][0]  # greedy MTP under tensor parallel = plain greedy
    assert all(len(tokens) == MAX_TOKENS for tokens in single)


class _Rank:
    """The two things loading asks of a group (its size and this rank), without a launch."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _weights(backend: MLXBackend) -> dict[str, np.ndarray]:
    return {name: np.array(array) for name, array in tree_flatten(backend.trunk.parameters())}


@pytest.mark.parametrize("arch,mlx_4bit", [("llama", False), ("deepseek_v3", False), ("qwen3", False), ("llama", True)])
def test_each_rank_holds_its_shard(tiny_checkpoint, tmp_path, arch, mlx_4bit):
    """Each rank holds the layers' unsplit tensors and half of the split ones (rank 0 also the
    embedding, the head and the MTP layers), and the two halves of a split tensor are the whole;
    from an HF checkpoint and from a 4-bit MLX directory (packed weights, scales and biases)."""
    from edgemtp.converters.convert import convert

    path = tiny_checkpoint(arch, mtp_layers=1, num_hidden_layers=3)
    if mlx_4bit:
        path = convert(path, tmp_path / "mlx", to="mlx", bits=4, group_size=32, show_progress=False)
    config = load_config(path)
    layers = int(config["num_hidden_layers"])
    whole = MLXBackend.load(path, max_kv_size=64)
    parts = [load_part(path, 0, layers, embeds=rank == 0, finishes=rank == 0, max_kv_size=64, group=_Rank(rank, 2))
             for rank in range(2)]
    if not mlx_4bit:  # the checkpoint's bytes are float32, as loaded here
        split = weight_split(path, config)
        shared = sum(split.layers) - sum(split.sharded)
        assert parts[1].weight_bytes() == shared + sum(split.sharded) // 2
        assert parts[0].weight_bytes() == parts[1].weight_bytes() + split.embedding + split.head + (
            whole.weight_bytes() - sum(split.layers) - split.embedding - split.head)  # + the MTP layers
        plans = plan_tensor(path, [ROOMY, ROOMY], context=64)
        assert [plan.weights for plan in plans] == [part.weight_bytes() for part in parts]
    full, halves = _weights(whole), [_weights(part) for part in parts]
    assert set(halves[1]) < set(full) and not any("embed_tokens" in n or "lm_head" in n for n in halves[1])
    joined = 0
    for name, tensor in halves[1].items():
        if tensor.shape == full[name].shape:
            assert np.array_equal(tensor, full[name]) and np.array_equal(halves[0][name], full[name]), name
            continue
        axis = next(a for a, (f, h) in enumerate(zip(full[name].shape, tensor.shape)) if f != h)
        assert np.array_equal(np.concatenate([halves[0][name], tensor], axis=axis), full[name]), name
        joined += 1
    assert joined >= 7 * layers  # attention and MLP projections of every layer
    assert parts[1].weight_bytes() < whole.weight_bytes() / 2


def test_choice_and_refusals(tiny_checkpoint, monkeypatch):
    llama = tiny_checkpoint("llama", mtp_layers=1, num_hidden_layers=3)
    config = load_config(llama)
    assert tensor_refusal(config, 2) is None
    assert "num_attention_heads 4" in tensor_refusal(config, 3) and "num_key_value_heads 2" in tensor_refusal(config, 4)
    monkeypatch.delenv("MLX_IBV_DEVICES", raising=False)
    monkeypatch.delenv("MLX_JACCL_COORDINATOR", raising=False)
    assert choose_parallel("auto", config, 2, llama) == "pipeline"  # ring (TCP): two round trips per layer cost more
    assert choose_parallel("tensor", config, 2, llama) == "tensor"
    monkeypatch.setenv("MLX_JACCL_COORDINATOR", "10.0.0.1:5000")
    assert choose_parallel("auto", config, 2, llama) == "tensor"
    assert choose_parallel("auto", config, 3, llama) == "pipeline"  # 4 heads do not split 3 ways
    with pytest.raises(UserError, match="cannot run tensor parallel over 3 ranks: num_attention_heads 4.*"
                                        "pass --parallel pipeline"):
        choose_parallel("tensor", config, 3, llama)
    qwen3_5 = load_config(tiny_checkpoint("qwen3_5"))
    assert "qwen3_5 layers cannot be split" in tensor_refusal(qwen3_5, 2)
    small = MemoryBudget(300_000, "test budget")
    with pytest.raises(UserError, match=r"at a 64-token context: rank 0 \(tensor parallel, 1/2 of every layer\) "
                                        r"needs .* short"):
        plan_tensor(llama, [small, small], context=64)


def test_inspect_plans_tensor_parallel(tiny_checkpoint):
    from typer.testing import CliRunner

    from edgemtp.cli import app

    path = tiny_checkpoint("deepseek_v3", mtp_layers=1, num_hidden_layers=3)
    result = CliRunner().invoke(app, ["inspect", str(path), "--ranks", "2", "--parallel", "tensor"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "tensor parallel over 2 machines like this one" in result.output
    assert "rank 0 │ embedding, 1/2 of layers 0-2, final norm, head, MTP layers: weights" in result.output
    assert "rank 1 │ 1/2 of layers 0-2: weights" in result.output
    result = CliRunner().invoke(app, ["inspect", str(path), "--ranks", "3", "--parallel", "tensor"])
    assert isinstance(result.exception, UserError)  # the CLI's main prints it as one line, exit code 2
    assert "cannot run tensor parallel over 3 ranks: num_attention_heads 4" in str(result.exception)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_rank_ends_a_tensor_parallel_run_with_one_line(tiny_checkpoint, tmp_path, how):
    assert_a_dead_rank_ends_the_run(tiny_checkpoint("llama", mtp_layers=1, num_hidden_layers=3), tmp_path, 2, how,
                                    "tensor")
