"""What acceptance a speedup target needs, given a machine's measured cost curve.

Speculative decoding emits ``1 + a + a^2 + ... + a^k`` tokens per trunk step (acceptance ``a``
at every draft position) for a cost of ``T(k+1) + k * draft`` in units of a one-token step.
Past a point the cost curve, not the drafter, caps the speedup: on a CPU where every extra row
costs a sizeable share of ``T(1)``, even drafts that are always right gain little at small k.

Pass the cost curve and the draft step's cost as ``edgemtp bench`` prints them::

    python scripts/speedup_ceiling.py --curve 1.00 1.21 1.31 1.52 1.65 1.77 1.92 2.05 --draft-cost 0.13

It prints the best speedup over plain decoding at each acceptance, the acceptance each target
needs (``--targets``, in units of plain decoding), and the same for tokens per trunk step.
"""

from __future__ import annotations

import argparse

from edgemtp.bench.figures import expected_tokens_per_step, ideal_speedup


def best_speedup(acceptance: float, curve: list[float], draft_cost: float) -> tuple[float, int]:
    """The highest ideal speedup at a uniform acceptance over the draft lengths the curve covers
    (a step verifies k + 1 tokens; nothing is extrapolated past the measurement), and its k."""
    return max((ideal_speedup(expected_tokens_per_step([acceptance] * k, k), {k: 1}, curve, draft_cost), k)
               for k in range(1, len(curve)))


def needed_acceptance(target: float, score) -> float | None:
    """The lowest acceptance (to 0.001) whose ``score`` reaches ``target``; None if even 1.0 does not."""
    if score(1.0) < target:
        return None
    low, high = 0.0, 1.0
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (low, mid) if score(mid) >= target else (mid, high)
    return high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curve", type=float, nargs="+", required=True, help="T(n)/T(1) for n = 1, 2, ...")
    parser.add_argument("--draft-cost", type=float, required=True, help="one draft step / one trunk step")
    parser.add_argument("--targets", type=float, nargs="+", default=[1.6, 2.0, 2.75],
                        help="speedups over plain decoding to solve for")
    parser.add_argument("--tokens-per-step", type=float, nargs="+", default=[2.5],
                        help="tokens per trunk step to solve for, at k = 3")
    args = parser.parse_args()
    curve, draft = args.curve, args.draft_cost

    print("acceptance  best speedup  at k  tokens/step there")
    for acceptance in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0):
        speedup, k = best_speedup(acceptance, curve, draft)
        print(f"{acceptance:10.2f}  {speedup:12.2f}  {k:4d}  {expected_tokens_per_step([acceptance] * k, k):17.2f}")
    speedup, k = best_speedup(1.0, curve, 0.0)
    print(f"free drafts (cost 0) always right: {speedup:.2f}x at k = {k}")
    for target in args.targets:
        needed = needed_acceptance(target, lambda a: best_speedup(a, curve, draft)[0])
        print(f"{target:.2f}x plain needs acceptance " + (f"{needed:.3f}" if needed is not None else "> 1: out of reach"))
    for target in args.tokens_per_step:
        at_3 = needed_acceptance(target, lambda a: expected_tokens_per_step([a] * 3, 3))
        print(f"{target:.2f} tokens per step at k = 3 needs acceptance "
              + (f"{at_3:.3f}" if at_3 is not None else "> 1: out of reach"))


if __name__ == "__main__":
    main()
