"""The chat screen's widgets: prompt input, messages, and the live statistics panel."""

from __future__ import annotations

from collections import deque

from rich.bar import Bar
from rich.filesize import decimal as format_bytes
from rich.table import Table
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Label, Markdown, Sparkline, Static, TextArea

from edgemtp.tui.provenance import render_tokens
from edgemtp.tui.streaming import StepRecord, StreamUpdate

SPARKLINE_STEPS = 60  # the sparkline shows acceptance over this many most recent steps
BAR_WIDTH = 14


class PromptInput(TextArea):
    """Multi-line prompt: Enter sends, Shift+Enter breaks the line, Up/Down recall earlier prompts."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, **kwargs)
        self.past_prompts: list[str] = []
        self._recall_index: int | None = None  # position in past_prompts while browsing them

    def remember(self, prompt: str) -> None:
        self.past_prompts.append(prompt)
        self._recall_index = None

    async def _on_key(self, event: events.Key) -> None:
        # TextArea inserts "\n" on Enter; here Enter sends and Shift+Enter is the newline.
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key == "shift+enter":
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)

    def action_cursor_up(self, select: bool = False) -> None:
        # Up on the first line walks back through earlier prompts, like a shell.
        if select or self.cursor_location[0] > 0 or not self.past_prompts:
            super().action_cursor_up(select)
            return
        index = len(self.past_prompts) if self._recall_index is None else self._recall_index
        self._recall_index = max(index - 1, 0)
        self._show_recalled(self.past_prompts[self._recall_index])

    def action_cursor_down(self, select: bool = False) -> None:
        last_row = self.document.line_count - 1
        if select or self._recall_index is None or self.cursor_location[0] < last_row:
            super().action_cursor_down(select)
            return
        self._recall_index += 1
        if self._recall_index >= len(self.past_prompts):
            self._recall_index = None
            self._show_recalled("")
        else:
            self._show_recalled(self.past_prompts[self._recall_index])

    def _show_recalled(self, prompt: str) -> None:
        self.text = prompt
        self.move_cursor(self.document.end)


class UserMessage(Static):
    def __init__(self, prompt: str) -> None:
        super().__init__(Text(prompt), classes="message")


class AssistantMessage(Vertical):
    """One answer: Markdown while reading, provenance-coloured tokens when that view is on (F2)."""

    def __init__(self, text: str = "", *, plain: bool = False) -> None:
        super().__init__(classes="message")
        self.text = text
        # (token text, kind) per generated token; empty for answers reopened from a saved chat.
        self.pieces: list[tuple[str, str]] = []
        self.plain = plain
        self._stream = None

    def compose(self) -> ComposeResult:
        yield Markdown(self.text)
        yield Static(self._provenance_text(), classes="provenance")
        with Horizontal(classes="answer-footer"):
            yield Label("", classes="answer-status")
            yield Button("Copy", compact=True, classes="copy")

    async def append(self, update: StreamUpdate) -> None:
        if update.text:
            if self._stream is None:
                self._stream = Markdown.get_stream(self.query_one(Markdown))
            self.text += update.text
            await self._stream.write(update.text)
        if update.pieces:
            self.pieces.extend(update.pieces)
            # Rendered only while the provenance view is shown (F2): the whole answer, every update.
            if self.screen.has_class("show-provenance"):
                self.show_provenance()

    async def finish(self, status: str) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.query_one(".answer-status", Label).update(status)

    def set_plain(self, plain: bool) -> None:
        self.plain = plain
        self.show_provenance()

    def show_provenance(self) -> None:
        self.query_one(".provenance", Static).update(self._provenance_text())

    def _provenance_text(self) -> Text:
        if not self.pieces:
            return Text(self.text)
        return render_tokens(self.pieces, self.plain)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.app.copy_to_clipboard(self.text)
        self.app.notify("Answer copied to the clipboard.")


class MessageView(VerticalScroll):
    def on_mount(self) -> None:
        self.anchor()  # follow the streaming answer until the user scrolls up


def _bar(fraction: float) -> Bar:
    return Bar(1.0, 0.0, max(0.0, min(fraction, 1.0)), width=BAR_WIDTH, color="#4ec9b0", bgcolor="#333333")


def _rows(*rows: tuple) -> Table:
    table = Table.grid(padding=(0, 1))
    for row in rows:
        table.add_row(*row)
    return table


class StatsPanel(Vertical):
    """Live figures for the current answer, refreshed with every batched stream update."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.recent_acceptance: deque[float] = deque(maxlen=SPARKLINE_STEPS)
        self.current_k = 0

    def compose(self) -> ComposeResult:
        yield Label("Speed", classes="stats-title")
        yield Static(id="speed")
        yield Label("Speculation", classes="stats-title")
        yield Static(id="speculation")
        yield Label("Acceptance by draft position", classes="stats-title")
        yield Static(id="positions")
        yield Label("k histogram", classes="stats-title")
        yield Static(id="k-histogram")
        yield Label(f"Acceptance, last {SPARKLINE_STEPS} steps", classes="stats-title")
        yield Sparkline([], id="acceptance-sparkline")
        yield Label("Memory", classes="stats-title")
        yield Static(id="memory")

    def clear_history(self) -> None:
        self.recent_acceptance.clear()
        self.query_one(Sparkline).data = []

    def show(self, update: StreamUpdate, *, plain_tokens_per_s: float | None, budget_bytes: int) -> None:
        stats = update.stats
        if stats is None:
            return
        self._add_steps(update.steps)
        self.query_one("#speed", Static).update(self._speed(stats, plain_tokens_per_s))
        self.query_one("#speculation", Static).update(
            _rows(
                ("drafted", f"{stats.drafted}"),
                ("accepted", f"{stats.accepted}"),
                ("mean accepted length", f"{stats.mean_accepted_length:.2f}"),
                ("current k", f"{self.current_k}"),
            )
        )
        self.query_one("#positions", Static).update(
            _rows(*((f"{i}", _bar(rate), f"{rate:4.0%}") for i, rate in enumerate(stats.acceptance_by_position, 1)))
        )
        self.query_one("#k-histogram", Static).update(self._k_histogram(stats.draft_lengths))
        self.query_one(Sparkline).data = list(self.recent_acceptance)
        self.query_one("#memory", Static).update(self._memory(update, budget_bytes))

    def _add_steps(self, steps: list[StepRecord]) -> None:
        for step in steps:
            self.recent_acceptance.append(step.accepted / step.drafted)
            self.current_k = step.drafted

    @staticmethod
    def _speed(stats, plain_tokens_per_s: float | None) -> Table:
        if plain_tokens_per_s:
            speedup = f"{stats.tokens_per_s / plain_tokens_per_s:.2f}x vs {plain_tokens_per_s:.1f} plain"
        else:
            speedup = "plain speed not measured"
        return _rows(
            ("tokens/s", f"{stats.tokens_per_s:.1f}"),
            ("speedup", speedup),
            ("generated", f"{stats.generated_tokens} tokens"),
            ("prompt", f"{stats.prompt_tokens} tokens at {stats.prompt_tokens_per_s:.0f}/s"),
        )

    @staticmethod
    def _k_histogram(draft_lengths: dict[int, int]) -> Table:
        most = max(draft_lengths.values(), default=0)
        return _rows(
            *((f"k={k}", _bar(count / most), f"{count}") for k, count in sorted(draft_lengths.items()))
        )

    @staticmethod
    def _memory(update: StreamUpdate, budget_bytes: int) -> Table:
        total = update.weight_bytes + update.cache_bytes
        # Several machines (mlx.launch): each rank's share and the time a pass spends in transit.
        pipeline = update.stats.pipeline if update.stats is not None else {}
        ranks = [(f"rank {r['rank']}", f"{format_bytes(r['weight_bytes'] + r['cache_bytes'])} "
                  f"({format_bytes(r['peak_memory_bytes'])} peak)") for r in pipeline.get("ranks", [])]
        if pipeline:
            ranks.append(("comm/pass", f"{1e3 * pipeline['communication_seconds_per_pass']:.1f} of "
                                       f"{1e3 * pipeline['seconds_per_pass']:.1f} ms"))
        return _rows(
            ("weights", format_bytes(update.weight_bytes)),
            ("KV cache", format_bytes(update.cache_bytes)),
            ("total", f"{format_bytes(total)} of {format_bytes(budget_bytes)}"),
            ("", _bar(total / budget_bytes)),
            *ranks,
        )
