"""Presenting ``edgemtp bench`` results: a rich table, JSON, README markdown and a plot.

Every writer works from a :class:`edgemtp.bench.figures.BenchResult` alone, so results saved as
JSON and the live run render the same way. Files are written to a temporary name and
renamed when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from edgemtp.bench.figures import BenchResult, DecodeFigures, PeerComparison, TargetFigures

# Short headers so the table fits an 80-column terminal.
DECODE_COLUMNS = ("mode", "k", "tok/s", "TTFT ms", "tok/step", "accept by pos", "ideal ×", "real ×", "= plain")
# MTP drafting side by side across targets, for the draft vocabulary's comparison.
DRAFT_VOCAB_COLUMNS = ("model", "MTP head scores", "draft / trunk step", "accept by pos (longest k)",
                       "tok/s by k", "auto tok/s")

# bench --peers: one row per engine.
PEER_COLUMNS = ("engine", "tok/s", "TTFT ms", "peak RSS MiB", "× edgemtp plain", "× edgemtp spec", "check")


def _decode_row(figures: DecodeFigures) -> list[str]:
    def optional(value, fmt):
        return "–" if value is None else format(value, fmt)

    identical = {None: "–", True: "yes", False: "NO"}[figures.identical_to_plain]
    acceptance = " ".join(f"{rate:.2f}" for rate in figures.acceptance_by_position) or "–"
    drafter = "plain" if figures.spec == "none" else figures.spec
    if figures.nodes_per_step is not None:
        drafter += f" ({figures.nodes_per_step:.1f} nodes/pass)"
    return [
        drafter,
        "–" if figures.num_draft is None else str(figures.num_draft),
        f"{figures.tokens_per_s:.1f}",
        f"{figures.ttft_s * 1000:.0f}",
        f"{figures.tokens_per_step:.2f}",
        acceptance,
        optional(figures.ideal_speedup, ".2f"),
        optional(figures.measured_speedup, ".2f"),
        identical,
    ]


def summary_rows(result: BenchResult, target: TargetFigures) -> list[tuple[str, str]]:
    """(label, value) lines describing one target beyond the decoding table."""
    rows = [
        ("backend / model", f"{target.backend} / {target.model}"),
        ("memory read bandwidth", f"{result.bandwidth_gb_s:.1f} GB/s ({result.machine['bandwidth_threads']} threads)"),
        ("weights read per token", f"{target.weight_bytes_per_token / 1e6:.1f} MB"),
        ("plain decoding bandwidth use", f"{target.bandwidth_fraction:.0%} of measured"),
        ("trunk step T(1)", f"{target.trunk_step_s * 1000:.2f} ms"),
        ("cost curve T(n)/T(1), n=1..", " ".join(f"{c:.2f}" for c in target.cost_curve)),
        ("draft step / trunk step", ", ".join(f"{name} {cost:.2f}" for name, cost in target.draft_cost.items())),
        ("peak RSS", f"{target.peak_rss_bytes / 2**30:.2f} GiB"),
    ]
    if target.mlx_lm_tokens_per_s:
        rows.append(("mlx-lm stream_generate", f"{target.mlx_lm_tokens_per_s:.1f} tok/s "
                                               f"(edgemtp plain is {target.mlx_lm_ratio:.2f}×)"))
    elif target.mlx_lm_note:
        rows.append(("mlx-lm stream_generate", target.mlx_lm_note))
    return rows


def draft_vocab_rows(result: BenchResult) -> list[list[str]]:
    """One row per target that drafted with MTP, when some target's MTP head scores a draft
    vocabulary (edgemtp/draft_vocab.py); else none. Acceptance is the longest fixed k's."""
    if not any(target.draft_vocab_size for target in result.targets):
        return []
    rows = []
    for target in result.targets:
        fixed = [f for f in target.speculative if f.spec == "mtp" and isinstance(f.num_draft, int)]
        auto = [f for f in target.speculative if f.spec == "mtp" and f.num_draft == "auto"]
        if not fixed:
            continue
        longest = max(fixed, key=lambda f: f.num_draft)
        scored = f"{target.draft_vocab_size:,} tokens" if target.draft_vocab_size else "full vocabulary"
        rows.append([
            target.model,
            scored,
            f"{target.draft_cost['mtp']:.3f}",
            " ".join(f"{rate:.2f}" for rate in longest.acceptance_by_position) or "–",
            " ".join(f"{f.tokens_per_s:.1f}" for f in fixed),
            f"{auto[0].tokens_per_s:.1f}" if auto else "–",
        ])
    return rows


def peer_title(peers: PeerComparison) -> str:
    settings = peers.settings
    return (f"{peers.model} vs peers: {settings['prompts']} prompts × {settings['max_tokens']} tokens, "
            f"{settings['threads']} threads, greedy, median of {settings['rounds']} interleaved rounds")


def peer_rows(peers: PeerComparison) -> list[list[str]]:
    return [[engine.engine, f"{engine.tokens_per_s:.1f}", f"{engine.ttft_s * 1000:.0f}",
             f"{engine.peak_rss_bytes / 2**20:.0f}", f"{engine.vs_plain:.2f}",
             "–" if engine.vs_speculative is None else f"{engine.vs_speculative:.2f}", engine.check]
            for engine in peers.engines]


def print_report(result: BenchResult, console=None) -> None:
    """Print every target as a summary grid plus a decoding table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for target in result.targets:
        summary = Table.grid(padding=(0, 2))
        for label, value in summary_rows(result, target):
            summary.add_row(f"[bold]{label}[/]", value)
        console.print(summary)
        table = Table(*DECODE_COLUMNS, title=f"{target.backend}: decoding ({result.settings['prompts']} prompts, "
                                            f"{result.settings['max_tokens']} tokens, median of "
                                            f"{result.settings['repeats']})")
        for figures in [target.plain, *target.speculative]:
            table.add_row(*_decode_row(figures))
        console.print(table)
    vocab_rows = draft_vocab_rows(result)
    if vocab_rows:
        table = Table(*DRAFT_VOCAB_COLUMNS, title="MTP drafting: draft vocabulary vs full vocabulary")
        for row in vocab_rows:
            table.add_row(*row)
        console.print(table)
    if result.peers is not None:
        table = Table(*PEER_COLUMNS, title=peer_title(result.peers))
        for row in peer_rows(result.peers):
            table.add_row(*row)
        console.print(table)
        for note in result.peers.notes:
            console.print(note, markup=False)


def to_markdown(result: BenchResult) -> str:
    """The README's benchmark section body: summary lists and one pipe table per target."""
    lines = []
    for target in result.targets:
        lines.append(f"**{target.backend}** · {result.machine['processor']} · "
                     f"{result.settings['prompts']} prompts × {result.settings['max_tokens']} tokens, "
                     f"median of {result.settings['repeats']}")
        lines.append("")
        lines.extend(f"- {label}: {value}" for label, value in summary_rows(result, target))
        lines.append("")
        lines.append("| " + " | ".join(DECODE_COLUMNS) + " |")
        lines.append("|" + "---|" * len(DECODE_COLUMNS))
        for figures in [target.plain, *target.speculative]:
            lines.append("| " + " | ".join(_decode_row(figures)) + " |")
        lines.append("")
    vocab_rows = draft_vocab_rows(result)
    if vocab_rows:
        lines.append("**MTP drafting: draft vocabulary vs full vocabulary**")
        lines.append("")
        lines.append("| " + " | ".join(DRAFT_VOCAB_COLUMNS) + " |")
        lines.append("|" + "---|" * len(DRAFT_VOCAB_COLUMNS))
        lines.extend("| " + " | ".join(row) + " |" for row in vocab_rows)
        lines.append("")
    if result.peers is not None:
        lines.append(f"**{peer_title(result.peers)}**")
        lines.append("")
        lines.append("| " + " | ".join(PEER_COLUMNS) + " |")
        lines.append("|" + "---|" * len(PEER_COLUMNS))
        lines.extend("| " + " | ".join(row) + " |" for row in peer_rows(result.peers))
        lines.append("")
        lines.extend(f"- {note}" for note in result.peers.notes)
        lines.append("")
    return "\n".join(lines)


def to_json(result: BenchResult) -> dict:
    """Every figure as plain JSON data."""
    data = asdict(result)
    for target, out in zip(result.targets, data["targets"]):
        out["mlx_lm_ratio"] = target.mlx_lm_ratio
    return data


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".partial")
    write(temporary)
    os.replace(temporary, path)


def write_json(result: BenchResult, path: str | Path) -> None:
    _write_atomically(Path(path), lambda p: p.write_text(json.dumps(to_json(result), indent=2) + "\n"))


def write_markdown(result: BenchResult, path: str | Path) -> None:
    _write_atomically(Path(path), lambda p: p.write_text(to_markdown(result) + "\n"))


def write_plot(result: BenchResult, path: str | Path) -> None:
    """PNG: tokens/s against draft length per drafter (left) and the cost curve (right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, (speed, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in result.targets:
        # Several targets on one backend (e.g. the default model with and without its draft
        # vocabulary) need their model names to be told apart.
        name = target.model if len(result.targets) > 1 else target.backend
        drafters = dict.fromkeys(f.spec for f in target.speculative)
        for drafter in drafters:
            fixed = [f for f in target.speculative if f.spec == drafter and isinstance(f.num_draft, int)]
            line, = speed.plot([f.num_draft for f in fixed], [f.tokens_per_s for f in fixed], marker="o",
                               label=f"{name}: {drafter}")
            for auto in (f for f in target.speculative if f.spec == drafter and f.num_draft == "auto"):
                speed.axhline(auto.tokens_per_s, color=line.get_color(), linestyle=":", linewidth=1)
        speed.axhline(target.plain.tokens_per_s, color="grey", linestyle="--", label=f"{name}: plain")
        n = range(1, len(target.cost_curve) + 1)
        cost.plot(n, target.cost_curve, marker="o", label=name)
    speed.set(xlabel="draft length k (dotted: auto)", ylabel="tokens/s", title="Decoding speed")
    speed.set_xticks([1, 2, 3, 4])
    speed.legend(fontsize="small")
    cost.set(xlabel="tokens in one trunk step (n)", ylabel="T(n) / T(1)", title="Trunk step cost curve")
    cost.legend(fontsize="small")
    figure.tight_layout()
    _write_atomically(Path(path), lambda p: figure.savefig(p, format="png", dpi=120))
    plt.close(figure)
