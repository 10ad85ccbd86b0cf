"""onnxruntime-genai's own C++ loop on a directory ``edgemtp convert --to onnx --genai`` wrote.

The bench's second anchor: the same graphs as edgemtp's ONNX export, driven by onnxruntime-genai
instead of edgemtp's Python loop, so a gap between the two is loop overhead, not graph speed.
Needs ``pip install onnxruntime-genai``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from edgemtp.converters.onnx_export.genai import FLOAT16_LOGITS, MTP_DIR
from edgemtp.errors import UserError

# The caches are allocated at max_length and each step writes one row past itself, MtpGenerator's
# verify step more (onnx_export/genai.py); this margin keeps every step inside the buffer.
MAX_LENGTH_MARGIN = 8


@dataclass
class GenaiRun:
    tokens: list[int]  # the generated tokens, prompt excluded
    token_times: list[float]  # seconds from the start of the prompt step to each token's arrival
    stats: dict | None  # MtpGenerator's counters (drafts proposed and accepted, ...); None for plain decoding


def load_genai(model_dir: str | Path, threads: int | None = None, mtp: bool = False):
    """``(model, head)``: the og.Model of ``model_dir`` and, with ``mtp``, of its MTP head (None
    otherwise). Pass them to ``genai_greedy``: the model loaded with ``mtp`` is for MtpGenerator only."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UserError("onnxruntime-genai is not installed; run `pip install onnxruntime-genai`") from None
    model_dir = Path(model_dir)
    if mtp and not (model_dir / MTP_DIR).is_dir():
        raise UserError(f"{model_dir} has no MTP head ({MTP_DIR}/); convert a model with MTP layers, "
                        "or decode without MTP")

    def load(path: Path, decoder: dict):
        config = og.Config(str(path))
        if threads:
            decoder = {**decoder, "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}
        if decoder:
            config.overlay(json.dumps({"model": {"decoder": decoder}}))
        return og.Model(config)

    if not mtp:
        return load(model_dir, {}), None
    # MtpGenerator needs the main model's float16 logits on the CPU (onnx_export/genai.py).
    return load(model_dir, {"outputs": {"logits": FLOAT16_LOGITS}}), load(model_dir / MTP_DIR, {})


def genai_greedy(model, head, prompt_ids: list[int], max_tokens: int, max_draft_tokens: int | None = None) -> GenaiRun:
    """Greedy decoding of up to ``max_tokens`` after ``prompt_ids`` (stopping at end of sequence):
    plain ``og.Generator`` when ``head`` is None, else ``og.MtpGenerator`` with that head, drafting
    ``max_draft_tokens`` a step (default: the export's ``speculative.max_draft_tokens``)."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_tokens + MAX_LENGTH_MARGIN, do_sample=False)
    if max_draft_tokens is not None:
        params.set_speculative_options(max_draft_tokens=max_draft_tokens)
    generator = og.Generator(model, params) if head is None else og.MtpGenerator(model, head, params)
    tokens: list[int] = []
    times: list[float] = []
    start = time.perf_counter()
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    while not generator.is_done() and len(times) < max_tokens:
        generator.generate_next_token()
        times.append(time.perf_counter() - start)
        if head is None:  # the plain generator leaves a final end-of-sequence token out of its sequence
            tokens.append(int(generator.get_next_tokens()[0]))
    if head is not None:  # MtpGenerator emits one token a call into its sequence
        tokens = [int(token) for token in generator.get_sequence()[len(prompt_ids):]][:max_tokens]
    return GenaiRun(tokens, times[:len(tokens)], generator.get_stats() if head is not None else None)
