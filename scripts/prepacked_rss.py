"""Where the bandwidth-bound bench model's resident memory comes from (the README's RSS note).

    python scripts/prepacked_rss.py ONNX_DIR

Creates the trunk session of an ONNX export three ways, each in a fresh process, and prints the
process's resident memory right after, split into anonymous pages (the process's own copies) and
file-backed pages (mapped from disk, which the kernel can drop and re-read):

- ``default``: as edgemtp loads it; onnxruntime repacks every MatMulNBits weight into its own
  layout in anonymous memory.
- ``save-prepacked``: the same, also writing an optimized copy whose external data holds the
  repacked weights (``session.save_external_prepacked_constant_initializers``).
- ``load-prepacked``: loading that copy, whose repacked weights are mapped from the file.

The copy goes to a temporary directory that is removed at the end.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from edgemtp.onnx_backend.backend import session_options


def resident() -> str:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return f"RSS {fields['VmRSS']:.2f} GiB (anonymous {fields['RssAnon']:.2f}, file-backed {fields['RssFile']:.2f})"


def create(mode: str, trunk: Path, copy: Path) -> None:
    options = session_options(threads=None)  # the trunk session's options, as edgemtp sets them
    path = trunk
    if mode == "save-prepacked":
        options.optimized_model_filepath = str(copy)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", copy.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    elif mode == "load-prepacked":
        path = copy
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimized
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    print(f"{mode:15} {resident()}", flush=True)  # while the session is alive
    del session


def main() -> None:
    if len(sys.argv) == 4:  # a child process: one mode
        create(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
        return
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "trunk/model.onnx").is_file():
        sys.exit("usage: python scripts/prepacked_rss.py ONNX_DIR (an edgemtp ONNX export, with trunk/model.onnx)")
    trunk = Path(sys.argv[1]) / "trunk/model.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "model.onnx"
        for mode in ("default", "save-prepacked", "load-prepacked"):
            subprocess.run([sys.executable, __file__, mode, str(trunk), str(copy)], check=True)
        sizes = {p.name: p.stat().st_size / 2**30 for p in Path(tmp).iterdir()}
    original = sum(p.stat().st_size for p in trunk.parent.iterdir()) / 2**30
    print(f"trunk files {original:.2f} GiB; optimized copy with repacked weights {sum(sizes.values()):.2f} GiB")


if __name__ == "__main__":
    main()
