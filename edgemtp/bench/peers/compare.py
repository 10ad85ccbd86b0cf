"""``bench --peers``: edgemtp and the peer engines on one checkpoint, side by side.

Every engine runs in its own process (``worker``), decodes the same prompt token ids (the chat
template rendered once, by edgemtp's tokenizer) greedily with the same thread count, and is
timed the same way (``timing``). Before any timing, each engine answers a known prompt. An
answer that leaves edgemtp's plain one early is scored by edgemtp, teacher forced: each of its
tokens must be within ``CHECK_MARGIN`` of edgemtp's top logit at that point (two correct engines
part at near-ties: llama.cpp's Q4_1 answer to the check prompt leaves edgemtp's at token 8,
0.07 below its top logit, and agrees on every other token), or the answer must hold the right
one. Anything else is refused: a wrongly built peer, such as onnxruntime-genai's builder reading
the wrong RoPE base, answers fluent nonsense fast. Timed rounds are interleaved across engines,
so that a slow moment of a shared machine falls on all of them.
"""

from __future__ import annotations

import importlib.util
import statistics
from dataclasses import dataclass
from pathlib import Path

from edgemtp.bench.decoding import WARMUP_TOKENS
from edgemtp.bench.figures import EngineFigures, PeerComparison
from edgemtp.bench.peers import llamacpp, mlx_lm, ortgenai
from edgemtp.bench.peers.timing import PromptTiming, decode_tokens_per_s
from edgemtp.bench.peers.worker import Worker, WorkerFailed
from edgemtp.engine.specs import DEFAULT_SPEC
from edgemtp.errors import UserError

CHECK_PROMPT = "What is the capital of France?"
CHECK_ANSWER = "Paris"
CHECK_TOKENS = 8  # leading tokens that must equal edgemtp plain's, else the answer must hold CHECK_ANSWER
CHECK_LENGTH = 24  # tokens decoded for the check
# Largest gap (in logits) between edgemtp's top choice and a peer's token that still counts as a
# near-tie: a peer answering "The capital of France, the capital of France, ..." has tokens 3 below.
CHECK_MARGIN = 1.0
INSTALL = "pip install 'edgemtp[peers]'"
PLAIN, SPECULATIVE = "edgemtp plain", f"edgemtp speculative ({DEFAULT_SPEC}, auto k)"


@dataclass(frozen=True)
class PeerSource:
    """One checkpoint in every engine's form: edgemtp's conversion, the float HF directory the
    onnxruntime-genai builder reads, and a GGUF for llama.cpp when there is one."""

    label: str
    edgemtp_dir: Path
    backend: str
    bits: int
    hf_dir: Path
    gguf: Path | None = None


@dataclass(frozen=True)
class EngineRun:
    """One engine to start: its name in the report, the worker engine and its spec."""

    name: str
    engine: str
    spec: dict


def default_model_source(backend: str) -> PeerSource:
    """The embedded default model: edgemtp's conversion, its Q4_1 GGUF for llama.cpp, and that
    GGUF unpacked to a float32 HF directory (once, in the user cache) for onnxruntime-genai."""
    import shutil

    from edgemtp.converters.convert import write_hf_dir
    from edgemtp.converters.sources import open_source
    from edgemtp.default_model import DEFAULT_BITS, GGUF_SHA256, default_model_path, verified_gguf_path
    from edgemtp.paths import cache_root

    gguf = verified_gguf_path()
    hf_dir = cache_root() / "peers" / f"hf-{GGUF_SHA256[:12]}"
    if not (hf_dir / "config.json").is_file():
        partial = hf_dir.with_name(hf_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write_hf_dir(open_source(gguf), partial)
        partial.rename(hf_dir)
    bits = DEFAULT_BITS[backend]
    return PeerSource(f"default model {bits}-bit ({backend})", default_model_path(backend), backend, bits, hf_dir, gguf)


def logit_gaps(source: PeerSource, prompt: list[int], answer: list[int]) -> list[float]:
    """edgemtp's top logit minus the logit of each ``answer`` token, teacher forced after
    ``prompt`` (its own load of the model, in this process)."""
    import numpy as np

    import edgemtp

    logits = edgemtp.load(source.edgemtp_dir, backend=source.backend).logits(prompt + answer[:-1])[len(prompt) - 1:]
    return (logits.max(axis=1) - logits[np.arange(len(answer)), answer]).tolist()


def missing_peer_line(name: str) -> str:
    return f"{name}: not installed; {INSTALL} adds it"


def check_answer(reference: list[int], answer: list[int], text: str, gaps=None) -> tuple[bool, str]:
    """(passed, how) for an engine's greedy answer to the check prompt against edgemtp plain's.
    ``gaps(answer)``, called only when the answers part early, gives per answer token edgemtp's
    top logit minus that token's logit, teacher forced on the answer."""
    same = next((i for i, (a, b) in enumerate(zip(reference, answer)) if a != b), min(len(reference), len(answer)))
    if same >= CHECK_TOKENS:
        return True, f"first {same} tokens = edgemtp plain"
    if gaps is not None and answer:
        widest = max(gaps(answer))
        if widest <= CHECK_MARGIN:
            return True, (f"first {same} tokens = edgemtp plain, then near-ties: every token within {widest:.2f} "
                          "of edgemtp's top logit")
    if CHECK_ANSWER in text:
        return True, f"says {CHECK_ANSWER}; differs from edgemtp plain at token {same + 1}"
    return False, f"differs from edgemtp plain at token {same + 1} and does not say {CHECK_ANSWER}: {text[:60]!r}"


def engine_rows(measured: dict[str, dict]) -> list[EngineFigures]:
    """Figures per engine from its rounds (``rates``, ``ttfts``, ``peak_rss_bytes``, ``check``),
    with ratios to edgemtp plain and, when measured, edgemtp speculative."""
    rates = {name: statistics.median(m["rates"]) for name, m in measured.items()}
    plain, speculative = rates[PLAIN], rates.get(SPECULATIVE)
    return [EngineFigures(engine=name, tokens_per_s=rates[name], ttft_s=statistics.median(m["ttfts"]),
                          peak_rss_bytes=m["peak_rss_bytes"], check=m["check"],
                          vs_plain=rates[name] / plain if plain else 0.0,
                          vs_speculative=rates[name] / speculative if speculative else None)
            for name, m in measured.items()]


def engine_runs(source: PeerSource, threads: int, context: int, eos: list[int], has_mtp: bool,
                progress=print) -> tuple[list[EngineRun], list[str]]:
    """The engines to time, and one line for each peer left out."""
    edgemtp_spec = {"model": str(source.edgemtp_dir), "backend": source.backend, "threads": threads}
    runs = [EngineRun(PLAIN, "edgemtp", {**edgemtp_spec, "mode": "plain"})]
    if has_mtp:
        runs.append(EngineRun(SPECULATIVE, "edgemtp", {**edgemtp_spec, "mode": "speculative"}))
    notes = []

    def installed(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    name = f"onnxruntime-genai {ortgenai.PRECISION.get(source.bits, f'{source.bits}-bit')}"
    if not installed(ortgenai.MODULE):
        notes.append(missing_peer_line("onnxruntime-genai"))
    elif not (installed("torch") and installed("transformers")):
        notes.append(f"onnxruntime-genai: its builder needs torch and transformers; {INSTALL} adds them")
    else:
        from edgemtp.paths import cache_root

        try:
            model = ortgenai.build_model(source.hf_dir, source.bits, cache_root() / "peers", progress)
            runs.append(EngineRun(name, "ortgenai", {"model": str(model), "threads": threads}))
        except UserError as exc:  # a peer that cannot be built is left out, not the whole bench
            notes.append(str(exc))

    if not installed(llamacpp.MODULE):
        notes.append(missing_peer_line("llama.cpp (llama-cpp-python)"))
    elif source.gguf is None:
        notes.append(llamacpp.NO_GGUF)
    else:
        runs.append(EngineRun(f"llama.cpp {source.gguf.name}", "llamacpp",
                              {"model": str(source.gguf), "threads": threads, "eos": eos, "context": context}))

    if not mlx_lm.on_apple_silicon():
        notes.append(mlx_lm.NOT_APPLE_SILICON)
    elif source.backend != "mlx":
        notes.append("mlx-lm: left out, it runs edgemtp's MLX conversion; compare it with --backend mlx")
    else:
        runs.append(EngineRun("mlx-lm", "mlx_lm", {"model": str(source.edgemtp_dir)}))
    return runs, notes


def compare_engines(source: PeerSource, prompts: list[str], *, max_tokens: int, rounds: int, threads: int,
                    progress=print) -> PeerComparison:
    """Check, warm up and time every engine on ``source``; see the module docstring."""
    from edgemtp.config import load_config, num_mtp_layers
    from edgemtp.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source.edgemtp_dir)

    def render(text: str) -> list[int]:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}])

    prompt_ids = [render(p) for p in prompts]
    check_ids = render(CHECK_PROMPT)
    context = max(len(ids) for ids in [*prompt_ids, check_ids]) + max(max_tokens, CHECK_LENGTH) + 8
    has_mtp = num_mtp_layers(load_config(source.edgemtp_dir)) > 0
    runs, notes = engine_runs(source, threads, context, sorted(tokenizer.eos_token_ids), has_mtp, progress)

    workers: dict[str, Worker] = {}
    checks: dict[str, str] = {}
    reference: list[int] = []
    try:
        for run in runs:  # edgemtp plain first: its answer is the reference
            progress(f"[peers] loading and checking {run.name}")
            worker = Worker(run.engine, run.spec)
            try:
                answer = worker.decode([check_ids], CHECK_LENGTH)[0].tokens
            except WorkerFailed as exc:
                worker.close()
                if run.engine == "edgemtp":
                    raise
                notes.append(f"{run.name}: left out, {exc}")
                continue
            reference = reference or answer
            passed, how = check_answer(reference, answer, tokenizer.decode(answer, skip_special_tokens=True),
                                       lambda tokens: logit_gaps(source, check_ids, tokens))
            if not passed:
                worker.close()
                notes.append(f"{run.name}: refused, not timed; its answer to {CHECK_PROMPT!r} {how}")
                continue
            workers[run.name], checks[run.name] = worker, how
            worker.decode(prompt_ids[-1:], WARMUP_TOKENS)

        measured = {name: {"rates": [], "ttfts": [], "check": checks[name]} for name in workers}
        for round_number in range(1, rounds + 1):
            for name, worker in workers.items():
                progress(f"[peers] round {round_number}/{rounds}: {name}")
                timings: list[PromptTiming] = worker.decode(prompt_ids, max_tokens)
                measured[name]["rates"].append(decode_tokens_per_s(timings))
                measured[name]["ttfts"].extend(t.ttft_s for t in timings)
        for name, worker in workers.items():
            measured[name]["peak_rss_bytes"] = worker.peak_rss_bytes
    finally:
        for worker in workers.values():
            worker.close()
    settings = {"threads": threads, "bits": source.bits, "max_tokens": max_tokens, "rounds": rounds,
                "prompts": len(prompts), "backend": source.backend}
    return PeerComparison(model=source.label, engines=engine_rows(measured), notes=notes, settings=settings)
