"""Counters describing one generation, in the units llama.cpp / mlx-lm users know."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


# Linux reports the process's peak RSS for RUSAGE_THREAD too, and computes it without summing
# the CPU times of every thread: with onnxruntime's pools busy-waiting on other cores,
# RUSAGE_SELF took up to 0.6 ms, once per decode step.
_RUSAGE_WHO = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(_RUSAGE_WHO).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> None:
    """Start the peak RSS afresh from the current RSS, so that converting a model first (which
    needs more memory than running it) does not count as inference memory. Linux only
    (``/proc/self/clear_refs`` "5" resets the high-water mark ru_maxrss reads); elsewhere the
    peak stays the whole process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@dataclass
class Stats:
    steps: int = 0  # trunk verification passes after the prompt
    drafted: int = 0  # draft positions sent to verification
    # Draft tokens sent to verification: ``drafted`` for chains, every candidate of a tree
    nodes_verified: int = 0
    accepted: int = 0  # draft tokens the target accepted
    copied: int = 0  # draft tokens copied from the context by n-gram lookup (no model call)
    acceptance_by_position: list[float] = field(default_factory=list)  # P(accept | reached), per draft position
    mean_accepted_length: float = 0.0  # tokens emitted per trunk step
    tokens_per_s: float = 0.0
    prompt_tokens_per_s: float = 0.0
    prompt_tokens: int = 0  # tokens actually run through the trunk for the prompt (reused prefix excluded)
    generated_tokens: int = 0
    draft_lengths: dict[int, int] = field(default_factory=dict)  # draft length -> number of steps
    peak_memory_bytes: int = 0
    # One entry per generated token: "draft" (accepted draft), "branch" (an accepted
    # draft of a tree that was not the head's first guess), "correction"
    # (the target's token after a rejection) or "bonus" (the target's token
    # after every draft was accepted, or a plain step).
    provenance: list[str] = field(default_factory=list)
    # Counts behind acceptance_by_position: how often position i was verified / accepted
    # (what pooling over several generations needs).
    verified_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    # Several machines (edgemtp/mlx_backend/pipeline.py, tensor_parallel.py): per-rank memory and
    # time per pass, RankedBackend.ranks_report(); empty on one machine.
    pipeline: dict = field(default_factory=dict)

    def record_step(self, drafted: int, accepted: int, provenance: list[str], nodes: int | None = None) -> None:
        """``drafted`` positions (a tree's depth), ``accepted`` of them held (the length of the
        accepted path), ``nodes`` draft tokens verified (``drafted`` unless a tree)."""
        self.steps += 1
        self.drafted += drafted
        self.nodes_verified += drafted if nodes is None else nodes
        self.accepted += accepted
        self.draft_lengths[drafted] = self.draft_lengths.get(drafted, 0) + 1
        # Positions 1..accepted+1 were looked at (the first rejection ends the step).
        for i in range(min(drafted, accepted + 1)):
            if i == len(self.verified_by_position):
                self.verified_by_position.append(0)
                self.accepted_by_position.append(0)
            self.verified_by_position[i] += 1
            self.accepted_by_position[i] += i < accepted
        self.acceptance_by_position = [h / r for h, r in zip(self.accepted_by_position, self.verified_by_position)]
        self.mean_accepted_length = 1 + self.accepted / self.steps  # each step adds the target's own token
        self.add_tokens(provenance)

    def add_tokens(self, provenance: list[str]) -> None:
        self.provenance.extend(provenance)
        self.generated_tokens = len(self.provenance)

    def record_memory(self) -> None:
        self.peak_memory_bytes = peak_rss_bytes()

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("provenance")
        out["draft_lengths"] = {str(k): v for k, v in sorted(self.draft_lengths.items())}
        return out


def format_summary(stats: Stats, spec: str) -> str:
    """The end-of-run report, in the spirit of llama.cpp / mlx-lm."""
    lines = [
        f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tokens_per_s:.2f} tokens-per-sec",
        f"Generation: {stats.generated_tokens} tokens, {stats.tokens_per_s:.2f} tokens-per-sec",
    ]
    if stats.drafted:
        by_position = " ".join(f"{a:.2f}" for a in stats.acceptance_by_position)
        lengths = " ".join(f"{k}:{n}" for k, n in sorted(stats.draft_lengths.items()))
        lines += [
            f"Speculative ({spec}): {stats.accepted}/{stats.drafted} drafts accepted, "
            f"{stats.mean_accepted_length:.2f} tokens per step over {stats.steps} steps",
            f"Acceptance by position: {by_position}",
            f"Draft lengths (length:steps): {lengths}",
        ]
    if stats.nodes_verified > stats.drafted:
        lines.append(f"Tree: {stats.nodes_verified / stats.steps:.2f} draft tokens verified per trunk pass, "
                     f"{stats.provenance.count('branch')} tokens from a branch other than the head's first guess")
    lines.append(f"Peak memory: {stats.peak_memory_bytes / 1e9:.3f} GB")
    if stats.pipeline:
        lines.extend(format_pipeline(stats.pipeline))
    return "\n".join(lines)


def format_pipeline(report: dict) -> list[str]:
    """Per-rank lines of a run over several ranks (``RankedBackend.ranks_report``: a pipeline,
    or tensor parallel, where every rank holds a shard of every layer and rank 0 drafts alone)."""
    tensor = report.get("parallel") == "tensor"
    lines = [f"Rank {r['rank']} ({r['host']}): layers {r['layers'][0]}-{r['layers'][1] - 1}"
             f"{', 1/' + str(r['shards']) + ' of each' if tensor else ''}, weights "
             f"{r['weight_bytes'] / 1e9:.3f} GB, caches {r['cache_bytes'] / 1e9:.3f} GB, peak memory "
             f"{r['peak_memory_bytes'] / 1e9:.3f} GB" for r in report["ranks"]]
    # Tensor parallel's layers exchange inside the compute (their all_sums); what it reports as
    # communication is the exchange around a pass (header, rows, status).
    lines.append(f"{'Tensor parallel' if tensor else 'Pipeline'}: {report['trunk_passes']} passes, "
                 f"{1e3 * report['seconds_per_pass']:.2f} ms per pass, "
                 f"{1e3 * report['communication_seconds_per_pass']:.2f} ms of it "
                 f"{'exchanging inputs and status' if tensor else 'communication'}")
    if report["mtp_steps"] and tensor:
        lines.append(f"Drafting: {report['mtp_steps']} MTP steps on rank 0, without messages")
    elif report["mtp_steps"]:
        lines.append(f"Drafting: {report['mtp_steps']} MTP steps on the last rank, "
                     f"{1e3 * report['communication_seconds_per_mtp_step']:.2f} ms communication each")
    return lines
