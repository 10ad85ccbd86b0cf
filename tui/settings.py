"""Generation settings and the screen that edits them.

Changes take effect on the next answer: the running answer keeps the
settings it started with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

from edgemtp.engine.specs import DEFAULT_SPEC, SPECS
from edgemtp.errors import UserError


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.0
    top_p: float = 1.0
    spec: str = DEFAULT_SPEC
    num_draft: int | str = "auto"  # "auto" lets the engine tune k
    max_tokens: int = 512


def parse_temperature(value: str) -> float:
    try:
        temperature = float(value)
    except ValueError:
        raise UserError(f"temperature {value!r} is not a number; use e.g. 0 or 0.7") from None
    if temperature < 0:
        raise UserError(f"temperature {temperature} is negative; use 0 (greedy) or more")
    return temperature


def parse_top_p(value: str) -> float:
    try:
        top_p = float(value)
    except ValueError:
        raise UserError(f"top-p {value!r} is not a number; use a value in (0, 1]") from None
    if not 0 < top_p <= 1:
        raise UserError(f"top-p {top_p} is out of range; use a value in (0, 1]")
    return top_p


def parse_spec(value: str) -> str:
    if value not in SPECS:
        raise UserError(f"speculation mode {value!r} is unknown; use one of {', '.join(SPECS)}")
    return value


def parse_num_draft(value: str) -> int | str:
    value = value.strip().lower()
    if value == "auto":
        return "auto"
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"number of draft tokens {value!r} is invalid; use 'auto' or a whole number >= 1")
    return int(value)


class SettingsScreen(ModalScreen["GenerationSettings | None"]):
    """Edit temperature, top-p, speculation mode and k; dismisses with the new settings or None."""

    BINDINGS = [("escape", "cancel", "Cancel")]

    def __init__(self, settings: GenerationSettings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(id="settings-dialog"):
            yield Label("Settings (apply from the next answer)", id="settings-title")
            with Grid(id="settings-grid"):
                yield Label("Temperature")
                yield Input(str(s.temperature), id="temperature")
                yield Label("Top-p")
                yield Input(str(s.top_p), id="top-p")
                yield Label("Speculation")
                yield Select([(mode, mode) for mode in SPECS], value=s.spec, allow_blank=False, id="spec")
                yield Label("Draft tokens k")
                yield Input(str(s.num_draft), placeholder="auto or a number", id="num-draft")
            with Horizontal(id="settings-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def on_input_submitted(self) -> None:
        self.action_save()

    def action_save(self) -> None:
        try:
            settings = replace(
                self.settings,
                temperature=parse_temperature(self.query_one("#temperature", Input).value),
                top_p=parse_top_p(self.query_one("#top-p", Input).value),
                spec=parse_spec(str(self.query_one("#spec", Select).value)),
                num_draft=parse_num_draft(self.query_one("#num-draft", Input).value),
            )
        except UserError as exc:
            self.notify(str(exc), severity="error")
            return
        self.dismiss(settings)

    def action_cancel(self) -> None:
        self.dismiss(None)
