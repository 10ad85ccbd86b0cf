"""onnxruntime-genai as a peer: its own builder's model of the same HF directory at the same
bits, decoded greedily by its C++ generator loop.

The builder reads the RoPE base from a top-level ``rope_theta`` only; a transformers-5
``config.json`` keeps it inside ``rope_parameters``, and the builder then silently uses
10000 (SmolLM2 needs 100000 and answers garbage). It is therefore given a staged copy of the
directory whose config carries both forms (``edgemtp.config.with_both_rope_forms``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from edgemtp.config import load_config, with_both_rope_forms
from edgemtp.errors import UserError

MODULE = "onnxruntime_genai"
# edgemtp's weight bits -> the builder's precision.
PRECISION = {4: "int4", 8: "int8", 16: "fp32"}


def stage_source(hf_dir: Path, staged: Path) -> Path:
    """``staged``: links to every file of ``hf_dir`` but config.json, written with both RoPE forms."""
    staged.mkdir(parents=True)
    for item in hf_dir.iterdir():
        if item.name != "config.json":
            (staged / item.name).symlink_to(item.resolve())
    config = with_both_rope_forms(load_config(hf_dir))
    (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return staged


def source_key(hf_dir: Path, bits: int) -> str:
    """Changes when the source directory's files, the bits or onnxruntime-genai's version do."""
    import onnxruntime_genai

    digest = hashlib.sha256(f"{bits} {onnxruntime_genai.__version__}".encode())
    for item in sorted(hf_dir.iterdir()):
        stat = item.stat()
        digest.update(f"{item.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def build_model(hf_dir: Path, bits: int, cache: Path, progress=print) -> Path:
    """The builder's model of ``hf_dir`` at ``bits`` under ``cache``, built once per source."""
    if bits not in PRECISION:
        raise UserError(f"onnxruntime-genai's builder has no {bits}-bit form; use --bits 4, 8 or 16")
    out = cache / f"ortgenai-{PRECISION[bits]}-{source_key(hf_dir, bits)}"
    if (out / "genai_config.json").is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    staged = stage_source(hf_dir, partial / "source")
    progress(f"building the onnxruntime-genai {PRECISION[bits]} model of {hf_dir.name} with its builder")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(staged), "-o", str(partial / "model"),
               "-p", PRECISION[bits], "-e", "cpu", "-c", str(partial / "builder-cache")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"onnxruntime-genai's builder failed on {hf_dir} ({last}); its model is left out")
    os.replace(partial / "model", out)  # one rename: a half-built model is never found
    shutil.rmtree(partial)
    return out


class Engine:
    """``spec``: ``model`` (the builder's output directory), ``threads``."""

    def __init__(self, spec: dict):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(spec["model"])
        options = {"intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def greedy(self, ids: list[int], max_tokens: int) -> Iterator[list[int]]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_tokens)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)  # the prompt's forward pass
        while not generator.is_done():
            generator.generate_next_token()
            yield [int(generator.get_next_tokens()[0])]
