"""A screen listing saved chats, newest first; picking one reopens it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from edgemtp.tui.history import Chat


class ChatPickerScreen(ModalScreen["Chat | None"]):
    BINDINGS = [("escape", "cancel", "Cancel")]

    def __init__(self, chats: list[Chat]) -> None:
        super().__init__()
        self.chats = chats

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-dialog"):
            yield Label("Open a saved chat (Enter opens, Esc cancels)", id="picker-title")
            yield OptionList(
                *(Option(f"{chat.path.stem[:15]}  {chat.title}", id=str(i)) for i, chat in enumerate(self.chats))
            )

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.chats[int(event.option.id)])

    def action_cancel(self) -> None:
        self.dismiss(None)
