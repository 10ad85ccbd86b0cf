"""Peak memory and throughput of `edgemtp convert` on a multi-gigabyte, multi-shard checkpoint.

Builds a factory deepseek_v3 checkpoint of >= 2 GB (float32, several shards), converts it to
MLX 4-bit in a child process, and prints the child's peak RSS and MB/s. The converter streams
one tensor at a time, so the peak must stay under 2 x the largest tensor + 600 MB.

    python scripts/bench_convert_memory.py [WORKDIR]
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgemtp.checkpoint import Checkpoint
from edgemtp.factory import make_tiny

# ~2.1 GB of float32: 5 MoE layers of 64 experts (1024 x 512) plus one dense layer and an MTP layer.
SIZE = {"hidden_size": 1024, "moe_intermediate_size": 512, "intermediate_size": 2048, "n_routed_experts": 64,
        "num_hidden_layers": 5, "q_lora_rank": 256, "kv_lora_rank": 256, "num_attention_heads": 8,
        "num_key_value_heads": 8, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
        "vocab_size": 4096}


def main(workdir: Path) -> int:
    src = workdir / "src"
    if not src.exists():
        make_tiny(src, "deepseek_v3", mtp_layers=1, shard_bytes=500_000_000, **SIZE)
    ckpt = Checkpoint.open(src)
    total = ckpt.total_bytes
    # The largest array the converter holds: one stacked expert projection (float32).
    experts = [n for n in ckpt.names() if ".experts.0." in n]
    largest = max([ckpt.nbytes(n) * SIZE["n_routed_experts"] for n in experts] +
                  [ckpt.nbytes(n) for n in ckpt.names()])
    shards = len(list(src.glob("*.safetensors")))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgemtp.cli", "convert", str(src), str(workdir / "out"),
                    "--to", "mlx", "--bits", "4", "--force"], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    limit = 2 * largest + 600e6
    print(f"checkpoint: {total / 1e9:.2f} GB in {shards} shards; largest tensor {largest / 1e6:.0f} MB")
    print(f"convert: {seconds:.1f} s, {total / 1e6 / seconds:.1f} MB/s")
    print(f"peak RSS: {peak / 1e6:.0f} MB (limit 2 x largest + 600 MB = {limit / 1e6:.0f} MB) "
          f"{'OK' if peak < limit else 'OVER'}")
    return 0 if peak < limit else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(main(Path(tmp)))
