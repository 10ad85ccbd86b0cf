"""The ``edgemtp`` command line.

Each command is a thin wrapper: parse flags, call the library, print. Heavy
imports (mlx, onnxruntime, torch) happen inside the commands so that
``edgemtp --help`` stays instant.
"""

from __future__ import annotations

import os
import sys

import typer

from edgemtp.engine.specs import DEFAULT_SPEC
from edgemtp.errors import UserError

app = typer.Typer(
    name="edgemtp",
    help="On-device LLM inference with multi-token-prediction (MTP) speculative decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"edgemtp {version('edgemtp')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """On-device LLM inference with multi-token-prediction (MTP) speculative decoding."""


def _require(modules: tuple[str, ...], extra: str, what: str) -> None:
    """Optional dependencies: a missing one is a one-line error naming the install command."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}; install it with: pip install 'edgemtp[{extra}]'")


# --- commands -------------------------------------------------------------
# Each command below is a thin wrapper around a library function.


# Several machines (mlx.launch): how the model is split over the ranks (edgemtp/tensor_plan.py).
PARALLEL_HELP = ("Under mlx.launch: pipeline (layers split over the ranks), tensor (every layer split; llama, qwen2, "
                 "qwen3, deepseek_v3) or auto (tensor over RDMA/jaccl where the model splits evenly, else pipeline).")


@app.command("inspect")
def inspect_command(
    path: str = typer.Argument(..., help="Model directory: Hugging Face or mlx-lm (config.json + *.safetensors) or an edgemtp ONNX export; or a llama.cpp .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON instead of a table."),
    ranks: int = typer.Option(1, "--ranks", help="Also plan a split over this many machines like this one (mlx.launch): what each rank holds and its memory."),
    parallel: str = typer.Option("auto", "--parallel", help=PARALLEL_HELP),
) -> None:
    """Show a model's architecture, parameter counts, storage format and memory needs."""
    import dataclasses
    import json

    from edgemtp.mtp_copies import MTP_TRUNK_PARTS
    from edgemtp.summary import summarize

    if ranks < 1:
        raise UserError(f"--ranks must be at least 1, got {ranks}")
    summary = summarize(path)
    # Memory plans are made for what edgemtp loads: a converted directory, not a GGUF file.
    plans_memory = not path.lower().endswith(".gguf")
    if ranks > 1 and not plans_memory:
        raise UserError(f"--ranks plans a converted model; run `edgemtp convert {path} OUT` and inspect OUT")
    if as_json:
        out = dataclasses.asdict(summary)
        if ranks > 1:
            kind, plans = _rank_plan(path, ranks, parallel)
            out["parallel"] = kind
            out["pipeline"] = [dataclasses.asdict(plan) | {"total": plan.total, "usable": plan.usable}
                               for plan in plans]
        typer.echo(json.dumps(out, indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    def gib(nbytes: int) -> str:
        return f"{nbytes / 2**30:.3f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.2f} MiB"

    table = Table(title=summary.path, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("architecture", summary.architecture)
    table.add_row("layers", str(summary.num_layers))
    table.add_row("MTP layers", str(summary.num_mtp_layers))
    table.add_row("hidden size", str(summary.hidden_size))
    table.add_row("vocabulary", str(summary.vocab_size))
    table.add_row("parameters (trunk)", f"{summary.trunk_parameters:,}")
    table.add_row("parameters (MTP)", f"{summary.mtp_parameters:,}")
    table.add_row("storage", summary.storage)
    table.add_row("weights", gib(summary.weight_bytes))
    for index, parts in enumerate(summary.mtp_from_trunk):
        # Which MTP tensors are the layer's own and which it shares with the trunk (edgemtp/mtp_copies.py).
        own = [part for part in MTP_TRUNK_PARTS if part not in parts]
        table.add_row(f"MTP layer {index}", f"own: decoder block, eh_proj, norms{''.join(', ' + p for p in own)}; "
                                            f"from the trunk: {', '.join(parts) or 'nothing'}")
    if summary.trunk_copy_bytes:
        table.add_row("MTP copies of trunk tensors", f"{gib(summary.trunk_copy_bytes)} stored, loaded once")
    table.add_row(f"KV cache ({summary.kv_cache_tokens} tokens, 16-bit)", gib(summary.kv_cache_bytes))
    Console().print(table)
    if not plans_memory:
        return

    # The memory planner's view of this machine (edgemtp/planner.py): budget, needs, context.
    from edgemtp.api import default_backend
    from edgemtp.planner import plan_for

    backend = default_backend()
    plan_table = Table(title=f"memory plan on this machine ({backend} backend)", show_header=False)
    plan_table.add_column("field", style="bold")
    plan_table.add_column("value")
    try:
        for label, value in plan_for(path, backend=backend).as_rows():
            plan_table.add_row(label, value)
    except UserError as exc:  # a model too big for this machine can still be inspected
        plan_table.add_row("does not fit", str(exc))
    Console().print(plan_table)
    if ranks > 1:
        from edgemtp.pipeline_plan import plan_rows

        kind = _parallel_kind(path, ranks, parallel)
        title = "pipeline" if kind == "pipeline" else "tensor parallel"
        ranks_table = Table(title=f"{title} over {ranks} machines like this one (mlx.launch)", show_header=False)
        ranks_table.add_column("rank", style="bold")
        ranks_table.add_column("holds")
        try:
            for label, value in plan_rows(_rank_plan(path, ranks, kind)[1]):
                ranks_table.add_row(label, value)
        except UserError as exc:
            ranks_table.add_row("does not fit", str(exc))
        Console().print(ranks_table)


def _parallel_kind(path: str, ranks: int, parallel: str) -> str:
    """What ``--parallel`` picks for this model over ``ranks`` ranks (a one-line error if it cannot)."""
    from pathlib import Path

    from edgemtp.config import load_config
    from edgemtp.tensor_plan import check_parallel, choose_parallel

    check_parallel(parallel)
    return choose_parallel(parallel, load_config(Path(path)), ranks, Path(path))


def _rank_plan(path: str, ranks: int, parallel: str):
    """``(kind, per-rank plans)`` over ``ranks`` machines with this machine's memory budget, at the
    context a launched run would pick."""
    from pathlib import Path

    from edgemtp.api import DEFAULT_CONTEXT_CAP
    from edgemtp.pipeline_plan import plan_largest_context, plan_pipeline
    from edgemtp.planner import detect_memory_budget
    from edgemtp.tensor_plan import plan_tensor

    kind = _parallel_kind(path, ranks, parallel)
    plans, _ = plan_largest_context(Path(path), [detect_memory_budget()] * ranks, None, "float32", DEFAULT_CONTEXT_CAP,
                                    plan=plan_tensor if kind == "tensor" else plan_pipeline)
    return kind, plans


@app.command("make-tiny")
def make_tiny_command(
    out: str = typer.Argument(..., help="Directory to create."),
    arch: str = typer.Option("llama", "--arch", help="Variant: llama, llama_untied, deepseek_v3, deepseek_v3_no_qlora, glm4_moe, glm4_moe_no_qk_norm, qwen2 (Qwen2.5: q/k/v biases), qwen3 (QK norm, explicit head_dim) or qwen3_5, qwen3_5_untied, qwen3_5_moe (Qwen3.5: Gated DeltaNet + gated attention, one MTP layer in Qwen's released layout; the MoE variant with routed and shared experts)."),
    mtp_layers: int = typer.Option(1, "--mtp-layers", help="Number of MTP layers to add after the trunk."),
    mtp_head: str = typer.Option("own", "--mtp-head", help="Each MTP layer's shared_head.head: own (its own random head) or copy (a copy of the trunk's output head). MTP layers always store a copy of the embedding too, as DeepSeek-V3 and GLM-4.5 release them."),
    fp8: bool = typer.Option(False, "--fp8", help="Store projections as block-scaled float8 e4m3 like DeepSeek-V3."),
    fp8_block: int = typer.Option(48, "--fp8-block", help="FP8 scale block size (rows and columns)."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage dtype of the other weights: float32, bfloat16 or float16."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the weights."),
    hidden_size: int | None = typer.Option(None, "--hidden-size", help="Override hidden_size."),
    layers: int | None = typer.Option(None, "--layers", help="Override num_hidden_layers (trunk layers)."),
    vocab_size: int | None = typer.Option(None, "--vocab-size", help="Override vocab_size (>= 259)."),
    intermediate_size: int | None = typer.Option(None, "--intermediate-size", help="Override the dense MLP width."),
    experts: int | None = typer.Option(None, "--experts", help="Override n_routed_experts (MoE variants: deepseek_v3*, glm4_moe*)."),
    dense_layers: int | None = typer.Option(None, "--dense-layers", help="Override first_k_dense_replace: how many leading layers use the dense MLP instead of MoE (MoE variants: deepseek_v3*, glm4_moe*). Set it to --layers for a bandwidth-bound bench model."),
    shard_mb: float | None = typer.Option(None, "--shard-mb", help="Split the weights into shards of about this many MB."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it already exists."),
) -> None:
    """Write a small random checkpoint in Hugging Face layout (for tests and benchmarks)."""
    from edgemtp.factory import VARIANTS, make_tiny

    overrides = {key: value for key, value in {
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "vocab_size": vocab_size,
        "intermediate_size": intermediate_size,
        "n_routed_experts": experts,
        "first_k_dense_replace": dense_layers,
    }.items() if value is not None}
    moe_variants = [name for name, config in VARIANTS.items() if "n_routed_experts" in config]
    if (dense_layers is not None or experts is not None) and arch in VARIANTS and arch not in moe_variants:
        raise UserError(f"--experts and --dense-layers apply to the MoE variants only ({', '.join(moe_variants)}), "
                        f"not {arch!r}; leave them out")
    shard_bytes = int(shard_mb * 1e6) if shard_mb else None
    path = make_tiny(out, arch, mtp_layers=mtp_layers, fp8=fp8, seed=seed, dtype=dtype, fp8_block=fp8_block,
                     shard_bytes=shard_bytes, mtp_head=mtp_head, force=force, **overrides)
    typer.echo(f"wrote {path}")


@app.command("train-mtp")
def train_mtp_command(
    trunk: str = typer.Argument(..., help="The frozen trunk: a llama GGUF file or a Hugging Face checkpoint directory (llama, qwen2 or qwen3)."),
    out: str = typer.Argument(..., help="Output directory for mtp.safetensors, training_log.json and heldout_prompts.jsonl."),
    data: str = typer.Option(..., "--data", help="Corpus directory (tinystories_valid_head.txt, topical_chat.jsonl, gutenberg/*.txt)."),
    steps: int = typer.Option(2000, "--steps", help="Optimizer steps."),
    layers: int = typer.Option(1, "--layers", help="MTP layers to train (1 or 2); deeper drafts reuse the last layer."),
    depths: int = typer.Option(3, "--depths", help="Draft depths trained together (k=3 drafting needs 3)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per training sequence."),
    batch_size: int = typer.Option(32, "--batch-size", help="Sequences per optimizer step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (linear warm-up, cosine decay to 10%)."),
    warmup_steps: int = typer.Option(100, "--warmup-steps", help="Steps of linear learning-rate warm-up (a short one suits a warm start that continues a run)."),
    chat_requests: int = typer.Option(6000, "--chat-requests", help="User requests the trunk answers greedily to make chat data."),
    sampled_requests: int = typer.Option(2000, "--sampled-requests", help="Of those, how many are answered again with sampling."),
    self_instruct: int = typer.Option(4000, "--self-instruct", help="User requests the trunk writes itself (code, explanations, general questions the corpus lacks), then answers greedily."),
    chats_file: str | None = typer.Option(None, "--chats-file", help="Cache of the trunk-written chats: reused when it was written for the same trunk and data settings, else written."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest trunk-written reply."),
    gen_batch_size: int = typer.Option(512, "--gen-batch-size", help="Prompts per generation batch."),
    chat_fraction: float = typer.Option(0.75, "--chat-fraction", help="Share of each step taken by trunk-written chats, as the token budget of that many rows (chats of similar length are batched together up to it); the rest is rows of plain corpus text."),
    hard_label_weight: float = typer.Option(0.0, "--hard-label-weight", help="Add a cross-entropy on the trunk's top token, with this weight, to the KL from its distribution: greedy acceptance counts only the top token."),
    fp32: bool = typer.Option(False, "--fp32", help="On CUDA, train and evaluate in float32 (TF32 matmuls) like the runtimes' activations, instead of bfloat16; the chats are still written in bfloat16."),
    fusion_layers: str | None = typer.Option(None, "--fusion-layers", help="Train a fusion head: two trunk layer indices, e.g. 2,15, whose outputs depth 1 reads besides the final hidden state (EAGLE-3 style; ARCHITECTURE.md). A warm start from a plain head begins exactly where it was."),
    init_from: str | None = typer.Option(None, "--init-from", help="Warm start from an earlier run's mtp.safetensors (one layer can seed two)."),
    time_limit: float | None = typer.Option(None, "--time-limit", help="Minutes after which training stops early; the weights are still saved."),
    seed: int = typer.Option(0, "--seed", help="Seed for data selection, held-out split and initialisation."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Train MTP layers for a frozen trunk by self-distillation (needs torch and transformers)."""
    _require(("torch", "transformers"), "train", "train-mtp")
    from edgemtp.training.recipe import RecipeConfig, train_mtp

    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if not 0 <= chat_fraction <= 1:
        raise UserError(f"--chat-fraction must be between 0 and 1, got {chat_fraction}")
    if warmup_steps < 1:
        raise UserError(f"--warmup-steps must be at least 1, got {warmup_steps}")
    if hard_label_weight < 0:
        raise UserError(f"--hard-label-weight must be 0 or more, got {hard_label_weight}")
    try:
        fusion = tuple(int(i) for i in fusion_layers.split(",")) if fusion_layers is not None else None
    except ValueError:
        fusion = ()
    if fusion is not None and len(fusion) != 2:
        raise UserError(f"--fusion-layers takes two trunk layer indices such as 2,15, got {fusion_layers!r}")
    config = RecipeConfig(
        fusion_layers=fusion, steps=steps, layers=layers, depths=depths, seq_len=seq_len, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        chat_requests=chat_requests, sampled_requests=sampled_requests, max_new_tokens=max_new_tokens,
        gen_batch_size=gen_batch_size, seed=seed, device=device, chat_fraction=chat_fraction,
        init_from=init_from, time_limit_minutes=time_limit, self_instruct_requests=self_instruct, chats_file=chats_file,
        hard_label_weight=hard_label_weight, fp32=fp32,
    )
    log = train_mtp(trunk, out, data, config, progress=typer.echo)
    typer.echo(f"wrote {out}/mtp.safetensors; held-out greedy acceptance {log['heldout_greedy_acceptance']}")


@app.command("bench")
def bench_command(
    models: list[str] = typer.Option([], "--model", help="Model directory to benchmark; repeat to compare several. Default: the embedded default model (at each --bits)."),
    backend: str | None = typer.Option(None, "--backend", help="mlx, onnx or all (default: mlx on Apple Silicon, onnx elsewhere)."),
    bits: list[int] = typer.Option([], "--bits", help="Convert each --model (a Hugging Face directory) to these weight bits (4, 8 or 16; repeatable) for each backend, into a temporary directory, and benchmark every conversion. Without it --model is benchmarked as is."),
    prompts: str | None = typer.Option(None, "--prompts", help="JSON file with a list of prompt strings, or heldout (the bundled held-out chat/story/code set); default: the bundled chat/story/code set."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Tokens generated per prompt."),
    repeats: int = typer.Option(3, "--repeats", help="Timed repeats per measurement; the median is reported."),
    draft_model: str | None = typer.Option(None, "--draft-model", help="Smaller model directory to also benchmark as a draft model."),
    bandwidth_mb: int = typer.Option(1024, "--bandwidth-mb", help="Buffer size for the memory-bandwidth measurement; keep it far above the last-level cache."),
    json_out: str | None = typer.Option(None, "--json", help="Write every figure to this JSON file."),
    plot_out: str | None = typer.Option(None, "--plot", help="Write a PNG plot (tokens/s against draft length, and the cost curve)."),
    markdown_out: str | None = typer.Option(None, "--markdown", help="Write the results as README-ready markdown."),
    peers: bool = typer.Option(False, "--peers", help="Instead, time the same checkpoint in the engines a user would pick instead (onnxruntime-genai, llama.cpp, mlx-lm on Apple Silicon; pip install 'edgemtp\\[peers]') against edgemtp plain and speculative, in interleaved rounds (--repeats of them). The default model, or one --model HF directory with one --bits."),
    threads: int = typer.Option(os.cpu_count() or 1, "--threads", help="Threads every engine uses with --peers."),
    head_bits: int | None = typer.Option(None, "--head-bits", help="With --model and --bits 4 on onnx: the conversions' output heads at 4 bits too (see convert --head-bits). Default: 8."),
) -> None:
    """Measure decoding speed, speculative speedups, step costs and bandwidth use."""
    if plot_out:  # checked before the long measurements, not after
        _require(("matplotlib",), "plot", "bench --plot")
    import tempfile
    from pathlib import Path

    from edgemtp.api import default_backend
    from edgemtp.bench import report
    from edgemtp.bench.figures import Target
    from edgemtp.bench.prompts import load_prompts
    from edgemtp.bench.runner import convert_targets, default_model_targets, run_bench

    choices = {"mlx": ["mlx"], "onnx": ["onnx"], "all": ["mlx", "onnx"]}
    backend = backend or default_backend()
    if backend not in choices:
        raise UserError(f"unknown backend {backend!r}; use mlx, onnx or all")
    prompt_list = load_prompts(prompts)
    if head_bits is not None and not (models and bits):
        raise UserError("--head-bits applies to the conversions of --model at --bits; add both, or leave it out")

    def say(line: str) -> None:  # progress goes to stderr, the report to stdout
        typer.echo(line, err=True)

    with tempfile.TemporaryDirectory(prefix="edgemtp-bench-") as work_dir:
        if peers:
            result = _bench_peers(models, choices[backend], bits, prompt_list, max_tokens, repeats, threads,
                                  bool(plot_out), Path(work_dir), say, head_bits)
        elif not models:  # the embedded default model, converted once per backend and bits
            targets = default_model_targets(choices[backend], bits)
        elif bits:
            targets = [target for model in models
                       for target in convert_targets(Path(model), choices[backend], bits,
                                                     Path(work_dir) / Path(model).name, say, head_bits)]
        else:
            targets = [Target(Path(model), name, f"{Path(model).name} ({name})") for model in models for name in choices[backend]]
        if not peers:
            result = run_bench(targets, prompt_list, max_tokens=max_tokens, repeats=repeats,
                               draft_dir=Path(draft_model) if draft_model else None,
                               bandwidth_bytes=bandwidth_mb * 2**20, progress=say)
    report.print_report(result)
    if json_out:
        report.write_json(result, json_out)
    if plot_out:
        report.write_plot(result, plot_out)
    if markdown_out:
        report.write_markdown(result, markdown_out)


def _bench_peers(models: list[str], backends: list[str], bits: list[int], prompts: list[str], max_tokens: int,
                 repeats: int, threads: int, plot: bool, work_dir, say, head_bits: int | None = None):
    """``bench --peers``: the checkpoint's engines side by side (edgemtp.bench.peers.compare)."""
    from pathlib import Path

    from edgemtp.bench.figures import BenchResult
    from edgemtp.bench.peers.compare import PeerSource, compare_engines, default_model_source
    from edgemtp.bench.runner import convert_targets

    if plot:
        raise UserError("--plot draws the speculative bench; leave it out with --peers")
    if len(backends) != 1 or len(models) > 1 or (models and len(bits) != 1) or (not models and bits):
        raise UserError("--peers compares one checkpoint on one backend: the default model, or one --model "
                        "HF directory with one --bits; drop the extra --model/--bits/--backend all")
    if max_tokens < 2 or repeats < 1 or threads < 1:
        raise UserError("--peers needs --max-tokens of at least 2 (decode speed counts the tokens after the "
                        "first), and --repeats and --threads of at least 1")
    if models:
        hf_dir = Path(models[0])
        target, = convert_targets(hf_dir, backends, bits, work_dir / hf_dir.name, say, head_bits)
        source = PeerSource(target.label, target.model_dir, backends[0], bits[0], hf_dir)
    else:
        source = default_model_source(backends[0])
    comparison = compare_engines(source, prompts, max_tokens=max_tokens, rounds=repeats, threads=threads, progress=say)
    settings = {"max_tokens": max_tokens, "repeats": repeats, "prompts": len(prompts)}
    return BenchResult(machine={}, bandwidth_gb_s=None, targets=[], settings=settings, peers=comparison)


@app.command("convert")
def convert_command(
    src: str = typer.Argument(..., help="Source: a Hugging Face model directory, a .gguf file, or a Hugging Face repo id (owner/name)."),
    out: str = typer.Argument(..., help="Output directory to create (written as OUT.partial, renamed when complete)."),
    to: str = typer.Option("mlx", "--to", help="Target backend: mlx or onnx."),
    bits: int | None = typer.Option(None, "--bits", help="Trunk weight bits: 4, 8 or 16 (16 = unquantized); at 4 the token embedding and output head stay at 8 bits, as in llama.cpp's Q4 files. Default: 4 for mlx, 8 for onnx."),
    group_size: int | None = typer.Option(None, "--group-size", help="Quantization group size: 32, 64 or 128. Default: 64 for mlx, 32 for onnx."),
    mtp_bits: int | None = typer.Option(None, "--mtp-bits", help="MTP layer weight bits: 4, 8 or 16 (at 4 their output heads stay at 8). Default: 16 with --bits 16 (full precision everywhere), else 8."),
    dtype: str | None = typer.Option(None, "--dtype", help="Dtype of unquantized weights: float16, bfloat16 or float32. Default: float32 for onnx; for mlx float16, or with --bits 16 the source's own dtype (bfloat16 for FP8 sources)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it already exists."),
    draft_vocab: str | None = typer.Option(None, "--draft-vocab", help="FILE from `edgemtp draft-vocab`: the MTP draft head scores only its tokens (verification stays over the full vocabulary), or none. Default: draft_vocab.safetensors of the source directory, if any."),
    mtp_file: str | None = typer.Option(None, "--mtp-file", help="MTP layers kept outside SRC: the mtp.safetensors `edgemtp train-mtp` writes for a trunk that ships none."),
    genai: bool = typer.Option(False, "--genai", help="With --to onnx: write onnxruntime-genai's layout (genai_config.json, model.onnx, the first MTP layer as mtp/ for og.MtpGenerator) instead of edgemtp's; llama, qwen2 and qwen3 trunks."),
    head_bits: int | None = typer.Option(None, "--head-bits", help="With --to onnx --bits 4: 4 puts the output heads at 4 bits too, onnxruntime-genai's int4 recipe (on SmolLM2-135M 2-8% faster on a 2-core CPU, for 9% more perplexity). Default: 8."),
) -> None:
    """Convert a model (HF directory, GGUF or Hub repo) into an MLX or ONNX model directory."""
    from pathlib import Path

    from edgemtp.converters.convert import convert

    if mtp_file is not None and not Path(mtp_file).is_file():
        raise UserError(f"--mtp-file {mtp_file} does not exist; pass the mtp.safetensors that `edgemtp train-mtp` wrote")
    path = convert(src, out, to=to, bits=bits, group_size=group_size, mtp_bits=mtp_bits, dtype=dtype, force=force,
                   draft_vocab=draft_vocab, mtp_file=Path(mtp_file) if mtp_file else None, genai=genai,
                   head_bits=head_bits)
    typer.echo(f"wrote {path}")


@app.command("draft-vocab")
def draft_vocab_command(
    model: str = typer.Argument(..., help="Model directory or .gguf file whose tokenizer counts the corpus."),
    out_file: str = typer.Argument(..., help="File to write (draft_vocab.safetensors); pass it to `edgemtp convert --draft-vocab`."),
    data: str | None = typer.Option(None, "--data", help="Corpus directory (topical_chat.jsonl, tinystories_valid_head.txt, gutenberg/*.txt) to count."),
    chats: str | None = typer.Option(None, "--chats", help="Trunk-written chats to count (a `train-mtp --chats-file` file): what the model writes, hence what its head drafts. The better source; with --data, both are counted."),
    coverage: float | None = typer.Option(None, "--coverage", help="Keep the fewest most frequent tokens that cover this share of the counted tokens. Default: 0.95."),
    size: int | None = typer.Option(None, "--size", help="Keep this many most frequent tokens instead."),
) -> None:
    """Choose the tokens the MTP draft head scores, from token counts on trunk-written chats and/or a corpus."""
    from edgemtp.draft_vocab import COVERAGE_STEPS, make_draft_vocab

    ids, counts = make_draft_vocab(model, out_file, data, chats, coverage=coverage, size=size)
    typer.echo(f"wrote {out_file}: {len(ids):,} of {len(counts.counts):,} tokens, covering "
               f"{counts.coverage(ids):.2%} of the {counts.total:,} tokens counted (special tokens included)")
    typer.echo("tokens needed per coverage: " + ", ".join(f"{c:.1%} {counts.size_for(c):,}" for c in COVERAGE_STEPS))


@app.command("models")
def models_command(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON instead of text."),
) -> None:
    """List the known models (the embedded default and recommended Hub models) and how to convert them."""
    import json

    from rich.console import Console
    from rich.table import Table

    from edgemtp.default_model import registry

    if as_json:
        typer.echo(json.dumps(registry(), indent=1))
        return
    console = Console()
    # One block per model rather than one wide table: six columns fold every cell into
    # slivers on an 80-column terminal, and the convert commands are meant to be copied.
    for model in registry():
        default = " (default)" if model.get("default") else ""
        console.print(f"[bold]{model['name']}[/bold]{default} · {model['architecture']}", highlight=False)
        block = Table.grid(padding=(0, 2))
        block.add_column(style="dim", no_wrap=True)
        block.add_column()
        for label, key in (("source", "source"), ("MTP", "mtp"), ("use", "convert"), ("notes", "notes")):
            block.add_row(label, model[key])
        if "size_gb" in model:
            block.add_row("size", f"about {model['size_gb']['4']:,} GB at 4 bits, {model['size_gb']['8']:,} GB at 8 bits")
        console.print(block, highlight=False)
        console.print()


@app.command("chat")
def chat_command(
    model: str | None = typer.Option(None, "--model", help="Model directory; default: the embedded default model."),
    backend: str | None = typer.Option(None, "--backend", help="mlx or onnx; default: mlx on Apple Silicon, onnx elsewhere."),
    spec: str = typer.Option(DEFAULT_SPEC, "--spec", help="Speculation: hybrid (n-gram where the text repeats, MTP elsewhere), mtp, mtp-tree (MTP with side branches, mlx backend), draft, ngram or none (plain decoding)."),
    num_draft: str = typer.Option("auto", "--num-draft", help="Draft tokens per step: auto (tuned live) or a number."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest token set with this much probability."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most tokens per answer."),
    resume: bool = typer.Option(False, "--resume", help="Reopen the most recent saved chat (Ctrl+O picks any)."),
    max_kv_size: int = typer.Option(None, "--max-kv-size", help="Tokens of context to preallocate; default: the longest that fits in memory (up to the model's window, at most 32768)."),
    parallel: str = typer.Option("auto", "--parallel", help=PARALLEL_HELP),
) -> None:
    """Chat with a model in the terminal, with live speculative-decoding statistics (under mlx.launch: one prompt per line on rank 0, /quit ends)."""
    from importlib.metadata import version
    from pathlib import Path

    import edgemtp
    from edgemtp.api import default_backend
    from edgemtp.distributed import launched
    from edgemtp.tui.app import ChatApp
    from edgemtp.tui.history import ChatStore
    from edgemtp.tui.settings import GenerationSettings, parse_num_draft, parse_spec, parse_temperature, parse_top_p

    settings = GenerationSettings(
        temperature=parse_temperature(str(temp)),
        top_p=parse_top_p(str(top_p)),
        spec=parse_spec(spec),
        num_draft=parse_num_draft(num_draft),
        max_tokens=max_tokens,
    )
    backend = backend or default_backend()
    if launched():  # several ranks: the others serve inside load and never return
        from edgemtp.line_chat import run_line_chat

        # mlx.launch relays lines, not keys, so rank 0 cannot run the full-screen app (line_chat.py).
        target = edgemtp.load(model, backend=backend, max_kv_size=max_kv_size, parallel=parallel)
        run_line_chat(target, settings, sys.stdin, sys.stdout)
        return
    store = ChatStore()
    # The plain-speed cache is per model, backend and edgemtp version (a release can change how
    # fast plain decoding runs: 0.3.0 made it 1.15-1.4x faster on ONNX).
    model_key = f"{Path(model).resolve() if model else 'default'}|{backend}|v{version('edgemtp')}"
    ChatApp(
        lambda: edgemtp.load(model, backend=backend, max_kv_size=max_kv_size, parallel=parallel),
        model_key=model_key,
        settings=settings,
        store=store,
        chat=store.latest() if resume else None,
    ).run()


@app.command("generate")
def generate_command(
    model: str = typer.Option(None, "--model", help="Model directory; omitted: the default model."),
    prompt: str = typer.Option(None, "-p", "--prompt", help="Prompt text, or '-' to read it from stdin."),
    max_tokens: int = typer.Option(256, "-m", "--max-tokens", help="Most tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy decoding."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the most likely tokens up to this mass (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Keep only the K most likely tokens (0 = off)."),
    seed: int = typer.Option(None, "--seed", help="Random seed, for reproducible sampling."),
    spec: str = typer.Option(DEFAULT_SPEC, "--spec", help="Drafter: hybrid (n-gram continuation where the text repeats, the MTP layers elsewhere), mtp (the model's MTP layers), mtp-tree (the same with the head's next guesses as side branches, verified as a tree; mlx backend), draft (--draft-model), ngram (prompt lookup) or none."),
    draft_model: str = typer.Option(None, "--draft-model", help="Draft model directory for --spec draft (same tokenizer as the model)."),
    num_draft: str = typer.Option("auto", "--num-draft", help="Draft tokens per step: auto (adapts to acceptance and device speed) or a number."),
    backend: str = typer.Option(None, "--backend", help="mlx or onnx; omitted: mlx on Apple Silicon, onnx elsewhere."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the model's chat template."),
    as_json: bool = typer.Option(False, "--json", help='Print one JSON object {"text","tokens","stats"} at the end instead of streaming.'),
    max_kv_size: int = typer.Option(None, "--max-kv-size", help="Tokens of context to preallocate; default: the longest that fits in memory (up to the model's window, at most 32768)."),
    parallel: str = typer.Option("auto", "--parallel", help=PARALLEL_HELP),
) -> None:
    """Generate text with speculative decoding; a speed and acceptance summary goes to stderr."""
    import json

    from edgemtp.api import default_backend, load
    from edgemtp.engine.generate import parse_num_draft
    from edgemtp.engine.specs import SPECS
    from edgemtp.engine.stats import format_summary, reset_peak_rss

    if prompt is None:
        raise UserError("no prompt given; pass -p TEXT, or -p - to read the prompt from stdin")
    if prompt == "-":
        prompt = sys.stdin.read()
    if spec not in SPECS:
        raise UserError(f"unknown --spec {spec!r}; use one of {', '.join(SPECS)}")
    if spec == "draft" and draft_model is None:
        raise UserError("--spec draft needs --draft-model PATH (a smaller model with the same tokenizer)")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    num_draft_value = "auto" if num_draft == "auto" else parse_num_draft(num_draft)

    if max_kv_size is not None and max_kv_size < 1:
        raise UserError(f"--max-kv-size must be at least 1 token, got {max_kv_size}")
    backend = backend or default_backend()
    if model is None:  # converted on first use; that conversion's memory is not the summary's peak
        from edgemtp.default_model import default_model_path

        model = str(default_model_path(backend))
    reset_peak_rss()
    target = load(model, backend=backend, max_kv_size=max_kv_size, parallel=parallel)
    drafter_model = load(draft_model, backend=backend, max_kv_size=max_kv_size) if draft_model else None
    stream = target.stream(prompt, max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, seed=seed,
                           spec=spec, num_draft=num_draft_value, draft_model=drafter_model, chat=chat)
    texts, tokens, stats = [], [], None
    for text, ids, stats in stream:
        texts.append(text)
        tokens.extend(ids)
        if not as_json:
            sys.stdout.write(text)
            sys.stdout.flush()
    if as_json:
        typer.echo(json.dumps({"text": "".join(texts), "tokens": tokens, "stats": stats.to_dict()}))
    else:
        typer.echo("")
        typer.echo(format_summary(stats, spec), err=True)


def main() -> None:
    """Console-script entry point: user errors become one line and exit code 2."""
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
