"""Plain against MTP decoding over a local two-process pipeline (or tensor parallel), behind the
README's "Several machines" figures.

    python scripts/pipeline_speed.py MODEL [--ranks 2] [--max-tokens 32] [--num-draft 2] [--parallel tensor]

Runs ``edgemtp generate --json`` once in one process and once under
``mlx.launch -n RANKS --backend ring`` (with ``--parallel``, default pipeline) for ``--spec none``
and ``--spec mtp``, and prints per run:
tokens/s, time per trunk pass, the part of it that is communication (a pass's wall time on rank 0
minus every rank's compute time, which each rank reports with its reply), the communication of one
MTP step (rank 0 to the last rank and back; tensor parallel drafts on rank 0 without messages, and
its layers' all_sums count in the compute, so its communication is the exchange around a pass), and
whether the output equals the single process's.
The ranks share this machine's cores, so the figures say what the exchanges cost over loopback
TCP, not what several machines gain.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

PROMPT = "Tell me a short story about a cat."


def generate(model: str, spec: str, num_draft: int, max_tokens: int, ranks: int, parallel: str) -> dict:
    command = [sys.executable, "-m", "edgemtp.cli", "generate", "--model", model, "--backend", "mlx", "--json",
               "-p", PROMPT, "-m", str(max_tokens), "--spec", spec, "--num-draft", str(num_draft)]
    if ranks > 1:
        command = [shutil.which("mlx.launch"), "-n", str(ranks), "--backend", "ring", "--", *command,
                   "--parallel", parallel]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-draft", type=int, default=2)
    parser.add_argument("--parallel", choices=("pipeline", "tensor"), default="pipeline")
    args = parser.parse_args()
    print(f"{'run':<29} {'tokens/s':>9} {'ms/pass':>8} {'comm ms/pass':>13} {'comm ms/MTP step':>17} "
          f"{'tokens/pass':>12}  same output")
    for spec in ("none", "mtp"):
        single = generate(args.model, spec, args.num_draft, args.max_tokens, 1, args.parallel)
        piped = generate(args.model, spec, args.num_draft, args.max_tokens, args.ranks, args.parallel)
        for name, run in ((f"{spec}, 1 process", single), (f"{spec}, {args.ranks} ranks {args.parallel}", piped)):
            stats, pipeline = run["stats"], run["stats"]["pipeline"]
            per_pass = f"{1e3 * pipeline['seconds_per_pass']:8.1f}" if pipeline else f"{'':>8}"
            comm = f"{1e3 * pipeline['communication_seconds_per_pass']:13.1f}" if pipeline else f"{'':>13}"
            mtp = (f"{1e3 * pipeline['communication_seconds_per_mtp_step']:17.1f}" if pipeline and pipeline["mtp_steps"]
                   else f"{'':>17}")
            print(f"{name:<29} {stats['tokens_per_s']:9.2f} {per_pass} {comm} {mtp} "
                  f"{stats['mean_accepted_length']:12.2f}  {run['tokens'] == single['tokens']}")


if __name__ == "__main__":
    main()
