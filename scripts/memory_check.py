"""Does the memory planner's estimate match what an ONNX model really takes? (README: Memory)

    python scripts/memory_check.py [ONNX_DIR ...] [--context N]

For each model (default: the embedded default model, ONNX 8-bit), in a fresh process: load it
as ``edgemtp.load`` does with ``max_kv_size=N`` (default: the context the planner picks when
loading), give it a prompt that fills the context but for the decoded tokens (it runs in the
engine's bounded prefill steps, ``PREFILL_CHUNK`` rows each), decode 32 tokens with MTP drafting
(its draft caches catch up on the whole prompt), and read the process's peak RSS (VmHWM). Prints
the planner's estimate at N against that peak, and the issue's limit: weights + onnxruntime's
repacked copy (counted as the weight files once more) + KV caches + 300 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DECODE = 32
LIMIT_SLACK = 300 * 2**20  # the 300 MB above weights + repacked copy + KV caches


def vm_hwm() -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) * 1024


def child(model_dir: str, context: int) -> None:
    """Fill and decode in this (fresh) process; print the peak RSS as JSON."""
    import edgemtp

    model = edgemtp.load(model_dir, backend="onnx", max_kv_size=context)
    vocab = model.backend.vocab_size
    ids = [(7 * i + 13) % vocab for i in range(context - DECODE - 8)]
    model.generate(ids, max_tokens=DECODE, spec="mtp", num_draft=4)
    print(json.dumps({"peak_rss_bytes": vm_hwm(), "filled": len(ids) + DECODE}))


def check(model_dir: Path, context: int | None) -> None:
    from edgemtp.api import DEFAULT_CONTEXT_CAP
    from edgemtp.planner import plan_for

    if context is None:  # what edgemtp.load picks
        context = min(plan_for(model_dir, backend="onnx").max_kv_size, DEFAULT_CONTEXT_CAP)
    estimate = plan_for(model_dir, context=context, backend="onnx").estimate
    done = subprocess.run([sys.executable, __file__, "--child", str(model_dir), str(context)],
                          capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    peak = measured["peak_rss_bytes"]
    # The limit counts onnxruntime's repacked copy as the weight files once more.
    limit = 2 * estimate.weights + estimate.kv_cache + estimate.mtp_caches + LIMIT_SLACK
    gib = 2**30
    print(f"{model_dir}")
    print(f"  context {context} ({measured['filled']} tokens written)")
    print(f"  planner estimate {estimate.total / gib:.3f} GiB: weights {estimate.weights / gib:.3f}, onnxruntime's own "
          f"{estimate.repacked / gib:.3f}, KV {estimate.kv_cache / gib:.3f}, MTP caches {estimate.mtp_caches / gib:.3f}, "
          f"activations {estimate.activations / gib:.3f}")
    print(f"  measured peak RSS {peak / gib:.3f} GiB; estimate / measured {estimate.total / peak:.3f} "
          f"({'within' if abs(estimate.total / peak - 1) <= 0.10 else 'NOT within'} 10%)")
    print(f"  limit (weights twice + KV + 300 MB) {limit / gib:.3f} GiB: peak is "
          f"{'within' if peak <= limit else 'ABOVE'} it")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--child"]:
        child(args[1], int(args[2]))
        return
    context = None
    if "--context" in args:
        at = args.index("--context")
        context = int(args[at + 1])
        del args[at:at + 2]
    if not args:
        from edgemtp.default_model import default_model_path

        args = [str(default_model_path("onnx"))]
    for model_dir in args:
        check(Path(model_dir), context)


if __name__ == "__main__":
    main()
