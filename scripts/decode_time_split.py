"""Where a decode step's time goes: the trunk session, the MTP sessions, and everything else.

    python scripts/decode_time_split.py [--rounds 2]

Decodes the 16 bench prompts (48 tokens each) greedily with the default 8-bit ONNX model, plain
and with MTP at k = 1, 2 and 3, in interleaved rounds. Each onnxruntime session call is timed
(``run_with_iobinding``, so the split holds binding work in Python on the sessions' side); the
rest of the decode time is the engine's own Python work: drafting and verification logic,
rollback, detokenizing, statistics. Reports per trunk step: milliseconds in the trunk session,
in the MTP sessions (and per MTP call), and in the rest. It also prints an MTP step timed back
to back against one timed right after a trunk step, the way decoding runs it
(``edgemtp.engine.drafters.mtp_step_seconds``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np

import edgemtp
from edgemtp.bench.decoding import measure_decoding
from edgemtp.bench.prompts import load_prompts
from edgemtp.engine.drafters import median_seconds, mtp_step_seconds

VARIANTS = {"plain": ("none", None), "k=1": ("mtp", 1), "k=2": ("mtp", 2), "k=3": ("mtp", 3)}


def time_sessions(backend) -> dict[str, list[float]]:
    """Wrap every session's run so that its seconds are added up by session kind."""
    spent: dict[str, list[float]] = {"trunk": [], "mtp": []}
    for kind, graphs in (("trunk", [backend._trunk]), ("mtp", backend._mtp)):
        for graph in graphs:
            run = graph.session.run_with_iobinding

            def timed(binding, *args, _run=run, _kind=kind):
                start = time.perf_counter()
                _run(binding, *args)
                spent[_kind].append(time.perf_counter() - start)

            graph.session.run_with_iobinding = timed
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant")
    args = parser.parse_args()
    model = edgemtp.load(backend="onnx")
    prompts = load_prompts()
    spent = time_sessions(model.backend)
    rows: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for round_ in range(args.rounds):
        for name in (VARIANTS if round_ % 2 == 0 else reversed(VARIANTS)):
            spec, num_draft = VARIANTS[name]
            for times in spent.values():
                times.clear()
            start = time.perf_counter()
            figures, _ = measure_decoding(model, prompts, max_tokens=48, repeats=1, spec=spec, num_draft=num_draft)
            wall = time.perf_counter() - start
            steps = len(spent["trunk"])  # one trunk call per step (the warm-up and prefills included)
            trunk, mtp = sum(spent["trunk"]), sum(spent["mtp"])
            per_call = mtp / len(spent["mtp"]) if spent["mtp"] else 0.0
            rows[name].append((figures.tokens_per_s, trunk / steps, mtp / steps, (wall - trunk - mtp) / steps, per_call))
    print("variant  tok/s  | ms per trunk step: trunk session, MTP sessions, the rest | ms per MTP call")
    for name, values in rows.items():
        tps, trunk, mtp, rest, per_call = (statistics.median(column) for column in zip(*values))
        print(f"{name:7} {tps:6.1f}  | {trunk * 1e3:6.2f} {mtp * 1e3:6.2f} {rest * 1e3:6.2f} | {per_call * 1e3:.3f}")

    backend = model.backend
    hidden = np.zeros((1, backend.hidden_size), dtype=np.float32)

    def draft_step():
        backend.mtp_step(1, hidden, [0])
        backend.mtp_rollback(1, 1)

    back_to_back = median_seconds(draft_step, repeats=21)
    after_trunk = mtp_step_seconds(backend, repeats=21)
    print(f"one MTP step: {back_to_back * 1e3:.3f} ms back to back, {after_trunk * 1e3:.3f} ms right after a trunk step")


if __name__ == "__main__":
    main()
