"""Screenshot tests of the chat UI (pytest-textual-snapshot).

The fake model has fixed tokens, acceptance pattern, speeds and memory, and
the terminal size is fixed, so the screens are identical on every run.
Update the stored SVGs after an intended change with ``--snapshot-update``.
"""

from __future__ import annotations

from edgemtp.tui.widgets import PromptInput

from test_tui import make_app, ready, send
from tui_fake import FakeModel

SIZE = (120, 42)


async def answer_one_prompt(pilot) -> None:
    # A blinking cursor would be on or off depending on when the screenshot is taken.
    pilot.app.query_one(PromptInput).cursor_blink = False
    await ready(pilot)
    await send(pilot, "What is speculative decoding?")
    await pilot.pause()


def test_main_screen_with_stats(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeModel())
    assert snap_compare(app, terminal_size=SIZE, run_before=answer_one_prompt)


def test_provenance_view(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeModel())
    assert snap_compare(app, terminal_size=SIZE, run_before=answer_one_prompt, press=["f2"])


def test_provenance_view_plain_style(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeModel())
    assert snap_compare(app, terminal_size=SIZE, run_before=answer_one_prompt, press=["f2", "f3"])
