"""Pipeline parallel decoding over several ranks (edgemtp/mlx_backend/pipeline.py).

The ranks are real processes on this machine talking over mx.distributed's ``ring`` backend,
started the way ``mlx.launch -n N --backend ring`` starts them (``MLX_RANK`` and a hostfile of
local addresses)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemtp.checkpoint import Checkpoint
from edgemtp.errors import UserError
from edgemtp.mlx_backend.pipeline import load_stage
from edgemtp.pipeline_plan import plan_pipeline, split_layers
from edgemtp.planner import MemoryBudget

sys.path.insert(0, str(Path(__file__).parent))
from launch_ranks import WORKER, assert_a_dead_rank_ends_the_run, finish, start_ranks  # noqa: E402
from pipeline_worker import PROMPT, run_cases  # noqa: E402

MAX_TOKENS = 10
ROOMY = MemoryBudget(8 << 30, "test budget")


@pytest.mark.parametrize("arch,layers,ranks,fusion", [("llama", 3, 2, None), ("llama", 3, 3, None),
                                                      ("deepseek_v3", 3, 2, None), ("deepseek_v3", 3, 3, None),
                                                      ("llama", 4, 2, [0, 2]), ("llama", 4, 3, [0, 2])])
def test_pipeline_output_equals_single_process(tiny_checkpoint, tmp_path, arch, layers, ranks, fusion):
    """Plain and MTP decoding, greedy and seeded at temperature 0.8: token for token the output of
    one process. A fusion head's inner layers (``fusion``) lie on the first rank and on a later
    one, so rank 0's tapped output travels on through every rank."""
    import edgemtp

    extra = {"mtp_fusion_layers": fusion} if fusion else {}
    path = tiny_checkpoint(arch, mtp_layers=2, num_hidden_layers=layers, **extra)
    model = edgemtp.load(path, backend="mlx", max_kv_size=128)
    single = run_cases(model, MAX_TOKENS)
    results = finish(start_ranks(tmp_path, ranks, [sys.executable, str(WORKER), str(path), str(MAX_TOKENS)]))
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err}"
        assert out.strip() == "" or rank == 0
    run = json.loads(results[0][1])
    assert run["tokens"] == single
    single_mtp = model.mtp_logits(PROMPT, depth=1)  # a fusion head's reads what every rank tapped
    assert np.abs(np.array(run["mtp_logits"], dtype=np.float32) - single_mtp).max() <= 1e-5 * np.abs(single_mtp).max()
    assert run["report"]["parallel"] == "pipeline"  # what --parallel auto picks over ring (TCP)
    assert all(len(tokens) == MAX_TOKENS for tokens in single)


def test_each_rank_reads_only_its_own_tensors(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("deepseek_v3", mtp_layers=1, num_hidden_layers=3)
    plans = plan_pipeline(path, [ROOMY] * 3, context=64)
    assert [(p.first_layer, p.end_layer) for p in plans] == [(0, 1), (1, 2), (2, 3)]
    read: list[str] = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: read.append(name) or original(self, name))
    by_rank = []
    for plan in plans:
        read.clear()
        load_stage(path, plan, 3, max_kv_size=64)
        by_rank.append(set(read))
    layer_of = {name: int(name.split(".")[2]) for names in by_rank for name in names if name.startswith("model.layers.")}
    for rank, names in enumerate(by_rank):
        assert {layer_of[n] for n in names if n in layer_of} == ({rank} if rank < 2 else {2, 3})  # 3: the MTP layer
    assert not any("embed_tokens" in n or n.startswith(("model.norm", "lm_head")) for n in by_rank[1])
    assert any(n.startswith("lm_head") for n in by_rank[2]) and not any(n.startswith("lm_head") for n in by_rank[0])
    everything = set(Checkpoint.open(path).names())
    assert set().union(*by_rank) <= everything and len(set().union(*by_rank)) >= len(everything) - 1


def test_split_follows_budgets_and_refusal_names_the_short_rank(tiny_checkpoint):
    assert split_layers([10] * 6, [0, 0], [60, 60]) == [3, 3]
    assert split_layers([10] * 6, [0, 0], [100, 25]) == [5, 1]  # 50% and 40% full; [4, 2] would fill rank 1 to 80%
    assert split_layers([10] * 6, [0, 20], [60, 60]) == [4, 2]  # the last rank also holds the head
    path = tiny_checkpoint("llama", mtp_layers=1, num_hidden_layers=3)
    small = MemoryBudget(600_000, "test budget")
    with pytest.raises(UserError, match=r"rank \d .* short; add a machine"):
        plan_pipeline(path, [small, small], context=64)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_rank_ends_the_run_with_one_line(tiny_checkpoint, tmp_path, how):
    """A rank killed (its sockets close) or stopped (they stay open, nothing answers) in the
    middle of a generation: rank 0 ends within the timeout with one line naming a rank."""
    assert_a_dead_rank_ends_the_run(tiny_checkpoint("llama", mtp_layers=1, num_hidden_layers=3), tmp_path, 3, how,
                                    "pipeline")


def test_onnx_under_mlx_launch_is_one_line_error(tiny_checkpoint, monkeypatch, tmp_path):
    import edgemtp

    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "hosts.json"))
    with pytest.raises(UserError, match="MLX backend only, not onnx; pass --backend mlx"):
        edgemtp.load(tiny_checkpoint("llama"), backend="onnx")


def test_inspect_ranks_prints_each_rank(tiny_checkpoint):
    from typer.testing import CliRunner

    from edgemtp.cli import app

    path = tiny_checkpoint("llama", mtp_layers=1, num_hidden_layers=3)
    result = CliRunner().invoke(app, ["inspect", str(path), "--ranks", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "pipeline over 2 machines like this one" in result.output
    assert "rank 0 │ embedding, layers 0-" in result.output
    assert "final norm, head, MTP layers" in result.output
    result = CliRunner().invoke(app, ["inspect", str(path), "--ranks", "4"], env={"COLUMNS": "200"})
    assert "4 ranks for 3 layers; launch at most 3 ranks" in result.output


def test_tui_memory_panel_shows_each_rank():
    from rich.console import Console

    from edgemtp.engine.stats import Stats
    from edgemtp.tui.streaming import StreamUpdate
    from edgemtp.tui.widgets import StatsPanel

    stats = Stats(pipeline={"ranks": [{"rank": 0, "host": "10.0.0.1", "layers": [0, 2], "weight_bytes": 2_000_000,
                                       "cache_bytes": 1_000_000, "peak_memory_bytes": 5_000_000},
                                      {"rank": 1, "host": "10.0.0.2", "layers": [2, 4], "weight_bytes": 4_000_000,
                                       "cache_bytes": 0, "peak_memory_bytes": 7_000_000}],
                            "trunk_passes": 3, "seconds_per_pass": 0.0125, "communication_seconds_per_pass": 0.0025,
                            "mtp_steps": 0, "communication_seconds_per_mtp_step": 0.0})
    update = StreamUpdate(stats=stats, weight_bytes=6_000_000, cache_bytes=1_000_000)
    console = Console(width=80, record=True)
    console.print(StatsPanel._memory(update, budget_bytes=10**9))
    lines = [" ".join(line.split()) for line in console.export_text().splitlines()]
    assert "rank 0 3.0 MB (5.0 MB peak)" in lines and "rank 1 4.0 MB (7.0 MB peak)" in lines
    assert "comm/pass 2.5 of 12.5 ms" in lines
