"""The unified-memory planner: will this model fit, and how long a context can it have?

Everything here runs BEFORE a model is loaded, from ``config.json`` and the sizes of the
weight files alone, so that a model that cannot fit is refused with a useful message
instead of being half-loaded into swap.

Three questions, three parts of this module:

1. How much memory may we use? (:func:`detect_memory_budget`) -- on Apple Silicon the
   GPU shares RAM with the CPU and Metal reports a "recommended working set" beyond which
   the system starts paging; on Linux a container's cgroup limit and the kernel's
   ``MemAvailable`` estimate. The budget is the smallest of the figures that apply.
2. How much does a model need at a given context? (:func:`estimate`) -- weights, the
   trunk's key/value cache, one cache per MTP draft depth, and transient activations.
3. What context fits? (:func:`plan_for`) -- the largest context the budget allows, capped
   at the model's ``max_position_embeddings``; a model that does not fit even a short
   context is refused with :class:`~edgemtp.errors.UserError`.
"""

from __future__ import annotations

import contextlib
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgemtp.checkpoint import Checkpoint, refuse_pickles
from edgemtp.config import check_supported, is_qwen3_5, load_config, num_mtp_layers
from edgemtp.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from edgemtp.converters.onnx_export.moe import gathered_bytes_per_row
from edgemtp.engine.backend import prompt_step_rows
from edgemtp.engine.generate import AUTO_MAX_DRAFT
from edgemtp.errors import UserError
from edgemtp.layout import QWEN3_5_MTP, QWEN3_5_TRUNK, QWEN3_5_VISION, attention_layers, recurrent_state_bytes
from edgemtp.mtp_copies import trunk_copy_bytes

# Files whose bytes are model weights, for the formats our two backends load.
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".data")

# The longest draft the engine's adaptive policy makes (the bench sweeps k = 1..4 as
# well): at most this many MTP depth caches exist at once, and a verify step feeds at
# most MAX_DRAFT + 1 tokens through the trunk.
MAX_DRAFT = AUTO_MAX_DRAFT

# A context shorter than this is not useful for chat; below it we refuse to load.
MIN_USEFUL_CONTEXT = 256

# Share of the budget we plan to fill. The rest is headroom for what the estimate does
# not model: the Python interpreter and libraries, the tokenizer, allocator slack and
# fragmentation, and anything else the user is running.
BUDGET_FRACTION = 0.9

# cgroup v1 reports "no limit" as a huge page-aligned number (2**63 rounded down to a
# page); anything at least this big is treated as unlimited.
_CGROUP_UNLIMITED = 2**60

# Bytes per element of each safetensors dtype (the header stores dtype and shape).
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


# --- 1. the memory budget ----------------------------------------------------


@dataclass(frozen=True)
class MemoryBudget:
    """How many bytes a model may use, and which limit decided it."""

    bytes: int
    source: str


def read_cgroup_limit(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup in bytes, or None when unlimited/absent.

    cgroup v2 exposes ``memory.max`` ("max" when unlimited) at the root of the unified
    hierarchy; v1 exposes ``memory/memory.limit_in_bytes``. Inside a container the
    container's own cgroup is mounted at the root, which is the limit that matters.
    """
    for relative in ("memory.max", "memory/memory.limit_in_bytes"):
        path = cgroup_root / relative
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            limit = int(text)
        except ValueError:
            continue
        return None if limit >= _CGROUP_UNLIMITED else limit
    return None


def read_mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's ``MemAvailable`` estimate in bytes (free + reclaimable), or None."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, rest = line.partition(":")
        if key == "MemAvailable":
            value, _, unit = rest.strip().partition(" ")
            return int(value) * (1024 if unit.strip() == "kB" else 1)
    return None


def read_metal_working_set() -> int | None:
    """Metal's recommended working-set size in bytes, or None when not on a Metal GPU.

    On Apple Silicon the GPU can wire at most this much of the unified memory before
    macOS starts paging it out; mlx reports it through ``mx.device_info()``.
    """
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return None
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    return mx.device_info().get("max_recommended_working_set_size")


def detect_memory_budget(
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
) -> MemoryBudget:
    """The smallest applicable memory limit on this machine."""
    candidates = [
        (read_metal_working_set(), "Metal recommended working set"),
        (read_cgroup_limit(cgroup_root), "cgroup memory limit"),
        (read_mem_available(meminfo), "MemAvailable"),
    ]
    known = [(size, source) for size, source in candidates if size is not None]
    if not known:
        # macOS on Intel, or a system without /proc: fall back to physical memory.
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return MemoryBudget(total, "physical memory")
    size, source = min(known)
    return MemoryBudget(size, source)


# --- 2. what a model needs ---------------------------------------------------


@dataclass(frozen=True)
class WeightFiles:
    """Weight bytes on disk, split by what one decode step has to read."""

    total: int  # every weight file, as memory-mapped
    mtp: int  # MTP layers (read by drafting, not by a trunk step)
    embedding: int  # input embedding table (a step reads one row; 0 when tied to the head)
    idle_experts: int  # routed experts a one-token step does not use (on average)
    trunk_stream: int  # bytes a single-token trunk decode step streams from memory


# Name fragments of routed-expert weights: Hugging Face's per-expert modules and
# mlx-lm's stacked ``switch_mlp``. Shared experts are always read and not matched.
_ROUTED_EXPERT_MARKERS = (".mlp.experts.", ".mlp.switch_mlp.")


def weight_files(model_dir: Path, config: dict) -> WeightFiles:
    """Measure the weight files of ``model_dir``.

    Weights are memory-mapped, so they cost their file size -- counted, never loaded.
    For safetensors we also read the headers (names, dtypes, shapes; no data) to work
    out what one decode step reads: not the MTP layers, only one row of an untied
    embedding table, and of each MoE layer's routed experts only the
    ``num_experts_per_tok`` the router picks. Converted directories keep the MTP
    layers apart: ``mtp.safetensors`` next to an mlx-lm style ``model.safetensors``
    (``converters/mlx_export.py``), or one ONNX graph per folder, ``trunk/``,
    ``mtp0/``, ... (``converters/onnx_export/export.py``). Files and folders named
    ``mtp*`` count as MTP; a trunk ONNX graph counts as streamed whole, an upper bound
    (its initializers cannot be told apart without loading it).
    """
    files = sorted(p for p in model_dir.rglob("*")
                   if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and p.name != DRAFT_VOCAB_FILE)
    if not files:
        refuse_pickles(model_dir)
        raise UserError(f"{model_dir} has no weight files (*.safetensors or *.onnx); pass a converted model directory")
    total = sum(p.stat().st_size for p in files)
    mtp_files = [p for p in files if p.relative_to(model_dir).parts[0].startswith("mtp")]
    mtp = sum(p.stat().st_size for p in mtp_files)
    embedding = experts = vision = 0
    hf_mtp_layers = False  # MTP layers under Hugging Face names (converted directories keep them apart)
    trunk_files = [p for p in files if p not in mtp_files]
    safetensors_files = [p for p in trunk_files if p.suffix == ".safetensors"]
    if safetensors_files and len(safetensors_files) == len(trunk_files):
        first_mtp_layer = int(config["num_hidden_layers"])
        released_mtp = QWEN3_5_MTP if is_qwen3_5(config) else None  # Qwen3.5 keeps mtp.*
        tied = bool(config.get("tie_word_embeddings", False))
        for path in safetensors_files:
            for name, (dtype, shape) in safetensors_entries(path).items():
                nbytes = SAFETENSORS_DTYPE_BYTES[dtype] * math.prod(shape)
                if name.startswith(QWEN3_5_VISION):  # never loaded: edgemtp runs the text model
                    vision += nbytes
                    continue
                layer = layer_index(name)
                if (layer is not None and layer >= first_mtp_layer) or (released_mtp and name.startswith(released_mtp)):
                    mtp += nbytes
                    hf_mtp_layers = True
                elif name.startswith(("model.embed_tokens.", QWEN3_5_TRUNK + "embed_tokens.")) and not tied:
                    embedding += nbytes
                elif any(marker in name for marker in _ROUTED_EXPERT_MARKERS):
                    experts += nbytes
    total -= vision
    if hf_mtp_layers:
        # An MTP layer's copies of the trunk's embedding or head are loaded once (edgemtp/mtp_copies.py).
        copies = trunk_copy_bytes(Checkpoint.open(model_dir, validate=False))
        total, mtp = total - copies, mtp - copies
    idle_experts = 0
    if experts:
        used = int(config.get("num_experts_per_tok") or 1) / int(config.get("n_routed_experts") or config["num_experts"])
        idle_experts = round(experts * (1 - used))
    return WeightFiles(total=total, mtp=mtp, embedding=embedding, idle_experts=idle_experts,
                       trunk_stream=total - mtp - embedding - idle_experts)


def safetensors_entries(path: Path) -> dict[str, tuple[str, list[int]]]:
    """``name -> (dtype, shape)`` from a safetensors header; a damaged file is a ``UserError``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as handle:
            return {name: (handle.get_slice(name).get_dtype(), handle.get_slice(name).get_shape())
                    for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is truncated or corrupt ({exc}); re-download or re-convert it") from None


def layer_index(name: str) -> int | None:
    """``7`` for ``model.layers.7.mlp.gate_proj.weight``; None outside the layer stack."""
    prefix = "model.layers."
    if not name.startswith(prefix):
        return None
    index = name[len(prefix):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def kv_bytes_per_token_per_layer(config: dict, dtype_bytes: int) -> int:
    """Bytes one token adds to one attention layer's cache.

    * DeepSeek-V3 (MLA) caches the compressed latent and the shared RoPE key:
      ``kv_lora_rank + qk_rope_head_dim`` values per token, whatever the head count
      (mlx-lm's ``deepseek_v3`` caches exactly these two).
    * Llama caches a key and a value per KV head: ``2 * kv_heads * head_dim``.
    """
    if config["model_type"] == "deepseek_v3":
        values = int(config["kv_lora_rank"]) + int(config["qk_rope_head_dim"])
    else:
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        values = 2 * kv_heads * head_dim
    return values * dtype_bytes


# Copies of the gathered expert weights alive at a step's peak: the gathered slices and the
# arena block onnxruntime keeps for them (fitted on the bench model, docs/bench.md "Memory").
GATHER_COPIES = 2


def activation_bytes(config: dict, context: int, backend: str = "mlx") -> int:
    """The transient buffers of the largest step on ``backend``, the larger of two kinds of step:

    * a verify pass over ``MAX_DRAFT + 1`` tokens, whose logits (``rows x vocab`` float32) are
      alive in about four copies at once: the backend's output, its numpy copy, the engine's
      probabilities and the sampler's working copy;
    * a prompt step of ``PREFILL_CHUNK`` tokens (the engine runs long prompts in such steps;
      ``engine.backend.prompt_step_rows``), whose logits are alive in two copies (the step's
      output and onnxruntime's buffer for it).

    Per row both also hold the hidden state, the widest MLP intermediate (the dense MLP, or the
    routed experts of one token plus the shared experts) and one attention-score row per head
    over the whole context, in a few live copies (float32). The prompt step's copies were fitted
    to the peak resident memory of the default model on ONNX at 512 to 4,096 tokens
    (``scripts/memory_check.py``; the estimate came out 4-6% above each peak).
    """
    float_bytes = 4
    vocab = int(config["vocab_size"])
    hidden = int(config["hidden_size"])
    mlp = int(config.get("intermediate_size") or 4 * hidden)
    if config.get("n_routed_experts"):
        per_token_experts = int(config.get("num_experts_per_tok") or 1) + int(config.get("n_shared_experts") or 0)
        mlp = max(mlp, per_token_experts * int(config["moe_intermediate_size"]))
    per_row = (hidden + mlp + int(config["num_attention_heads"]) * context) * float_bytes
    # ONNX's routed experts also copy each row's chosen experts' weights (mlx-lm's gather_mm does not).
    gathered = gathered_bytes_per_row(config) if backend == "onnx" else 0

    def step(rows: int, logit_copies: int, buffer_copies: int) -> int:
        return rows * (logit_copies * vocab * float_bytes + buffer_copies * per_row + GATHER_COPIES * gathered)

    return max(step(MAX_DRAFT + 1, 4, 4), step(prompt_step_rows(gathered), 2, 3))


# Bytes per cached value for each compute dtype a backend can run in. Both backends
# compute in float32 unless told otherwise (MLX's ``dtype`` load option can pick a
# 16-bit type), and caches are kept in the compute dtype.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_DTYPE = "float32"


@dataclass(frozen=True)
class Estimate:
    """Bytes needed to run a model at one context length."""

    context: int
    weights: int
    kv_cache: int
    mtp_caches: int
    activations: int
    repacked: int = 0  # onnxruntime's memory beyond the weight files (see repacked_bytes)

    @property
    def total(self) -> int:
        return self.weights + self.repacked + self.kv_cache + self.mtp_caches + self.activations


# onnxruntime's memory beyond the weight files (repacked_bytes), fitted on two exports.
ONNX_REPACKED_SHARE = 0.4
ONNX_RUNTIME_BYTES = 120 * 2**20


def repacked_bytes(backend: str, weights: int) -> int:
    """Memory a backend takes on top of its weight files, counted once in ``weights``.

    MLX maps the files and computes on them. An onnxruntime session repacks every constant
    MatMul / MatMulNBits weight into its kernels' layout when it loads, in anonymous memory a
    little larger than the file's blocks, and afterwards only part of the mapped files stays
    resident (scales and what the kernels still read). Measured right after loading
    (``scripts/memory_check.py``'s models; docs/bench.md, "Memory"):

    * the default model at 8 bits: 0.20 GiB of files, 0.31 GiB anonymous and 0.07 GiB file-backed;
    * the bandwidth-bound bench model at 4 bits: 1.04 GiB of files, 1.27 and 0.27 GiB;
    * Python with edgemtp and onnxruntime imported, before any model: 0.12 GiB.

    Both fit 1.4 times the files plus 0.12 GiB within 3%. The weights are counted once already,
    so this adds the rest.
    """
    return int(ONNX_REPACKED_SHARE * weights) + ONNX_RUNTIME_BYTES if backend == "onnx" else 0


def estimate(config: dict, weights: int, context: int, dtype: str = DEFAULT_DTYPE, repacked: int = 0,
             backend: str = "mlx") -> Estimate:
    """Memory needed to serve ``context`` tokens in ``dtype`` on ``backend``: weights (and their
    repacked copy) + caches + activations."""
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    per_layer_token = kv_bytes_per_token_per_layer(config, DTYPE_BYTES[dtype])
    layers = attention_layers(config)
    # One MTP cache per draft depth (each a single layer deep), up to the longest draft.
    mtp_depths = MAX_DRAFT if num_mtp_layers(config) > 0 else 0
    return Estimate(
        context=context,
        weights=weights,
        kv_cache=per_layer_token * layers * context + recurrent_state_bytes(config, backend),
        mtp_caches=per_layer_token * mtp_depths * context,
        activations=activation_bytes(config, context, backend),
        repacked=repacked,
    )


# --- 3. the plan --------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the planner decided for one model on this machine."""

    model_dir: Path
    backend: str
    budget: MemoryBudget
    weights: WeightFiles
    estimate: Estimate  # at the chosen context
    max_kv_size: int
    max_position_embeddings: int

    @property
    def headroom(self) -> int:
        return self.budget.bytes - self.estimate.total

    def as_rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a two-column table."""
        e = self.estimate
        return [
            ("memory budget", f"{gib(self.budget.bytes)} ({self.budget.source})"),
            ("weights (memory-mapped)", gib(e.weights)),
            *([("onnxruntime's repacked weights and runtime", gib(e.repacked))] if e.repacked else []),
            ("weights read per token", gib(self.weights.trunk_stream)),
            (f"KV cache at {e.context} tokens", gib(e.kv_cache)),
            ("MTP draft caches", gib(e.mtp_caches)),
            ("activations (estimate)", gib(e.activations)),
            ("total", gib(e.total)),
            ("max context (max_kv_size)", f"{self.max_kv_size} of {self.max_position_embeddings}"),
        ]


def gib(nbytes: int) -> str:
    """Bytes in GiB, or in MiB below one GiB so tiny models do not read as 0.00."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.2f} MiB"


def largest_fitting_context(config: dict, weights: int, dtype: str, usable: int, limit: int,
                            repacked: int = 0, backend: str = "mlx") -> int:
    """The longest context in ``[0, limit]`` whose estimate fits in ``usable`` bytes.

    Memory grows monotonically with context, so a binary search finds the boundary.
    """
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if estimate(config, weights, middle, dtype, repacked, backend).total <= usable:
            low = middle
        else:
            high = middle - 1
    return low


def plan_for(
    path: str | Path,
    context: int | None = None,
    backend: str = "mlx",
    budget: MemoryBudget | None = None,
    dtype: str = DEFAULT_DTYPE,
) -> Plan:
    """Decide the context for the model at ``path`` on this machine, before loading it.

    ``dtype`` is the compute dtype the backend will run in (it sets the cache size).
    ``context`` None picks the longest context that fits (capped at the model's
    ``max_position_embeddings``). Raises :class:`UserError` when the model cannot fit
    even ``MIN_USEFUL_CONTEXT`` tokens, or when the requested ``context`` does not fit.
    """
    model_dir = Path(path)
    config = load_config(model_dir)
    check_supported(config, model_dir / "config.json")
    weights = weight_files(model_dir, config)
    budget = budget or detect_memory_budget()
    usable = int(budget.bytes * BUDGET_FRACTION)
    max_positions = int(config.get("max_position_embeddings") or 0) or 2**20
    repacked = repacked_bytes(backend, weights.total)

    def needs(context: int) -> Estimate:
        return estimate(config, weights.total, context, dtype, repacked, backend)

    fitting = largest_fitting_context(config, weights.total, dtype, usable, max_positions, repacked, backend)
    smallest = min(MIN_USEFUL_CONTEXT, max_positions)
    if fitting < smallest:
        need = needs(smallest).total
        raise UserError(
            f"{model_dir} needs about {gib(need)} at a {smallest}-token context but only "
            f"{gib(usable)} of memory is usable ({budget.source}); convert it with fewer bits "
            f"(edgemtp convert --bits 4) or use a smaller model"
        )
    if context is not None:
        if context > max_positions:
            raise UserError(
                f"--max-kv-size {context} exceeds the model's max_position_embeddings {max_positions}; "
                f"pass --max-kv-size {max_positions} or less"
            )
        if context > fitting:
            raise UserError(
                f"a {context}-token context needs about {gib(needs(context).total)} "
                f"but only {gib(usable)} is usable ({budget.source}); pass --max-kv-size {fitting} or less, "
                f"or convert with fewer bits (edgemtp convert --bits 4)"
            )
    chosen = fitting if context is None else context
    return Plan(
        model_dir=model_dir,
        backend=backend,
        budget=budget,
        weights=weights,
        estimate=needs(chosen),
        max_kv_size=chosen,
        max_position_embeddings=max_positions,
    )


# --- wired memory (Apple Silicon, MLX backend) ---------------------------------


@contextlib.contextmanager
def wired_limit() -> Iterator[None]:
    """Keep the model's memory wired (resident) while generating on a Metal GPU.

    macOS may page out GPU buffers that are not wired, and a paged-out weight turns a
    memory-bound decode step into a disk read. Like mlx-lm's ``generate.wired_limit``,
    raise mlx's wired limit to Metal's recommended working set for the duration and
    restore the previous limit afterwards, synchronising first because the limit must
    not change under a running evaluation. Elsewhere (mlx on CPU, ONNX Runtime) memory
    is ordinary pageable RAM and there is nothing to wire, so this does nothing.
    """
    working_set = read_metal_working_set()
    if working_set is None:
        yield
        return
    import mlx.core as mx

    previous = mx.set_wired_limit(working_set)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)
