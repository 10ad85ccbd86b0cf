"""Pilot tests of the chat UI (``edgemtp.tui``) against a deterministic fake model."""

from __future__ import annotations

import json
import os
import threading
import re

import pytest
from rich.console import Console
from textual.widgets import Markdown, Static

from edgemtp.errors import UserError
from edgemtp.tui.app import ChatApp
from edgemtp.tui.baseline import BaselineCache
from edgemtp.tui.history import ChatStore
from edgemtp.tui.provenance import render_tokens
from edgemtp.tui.settings import GenerationSettings
from edgemtp.tui.widgets import AssistantMessage, PromptInput, StatsPanel

from tui_fake import ANSWER, PIECES, PLAIN_TOKENS_PER_S, TOKENS_PER_S, FakeModel

SIZE = (120, 40)

# Async tests run through anyio's pytest plugin (installed with httpx/anyio), on asyncio as Textual needs.
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make_app(tmp_path, model, **options) -> ChatApp:
    return ChatApp(
        lambda: model,
        model_key="fake|test",
        store=ChatStore(tmp_path / "chats"),
        baseline=BaselineCache(tmp_path / "plain.json"),
        budget_bytes=16_000_000_000,
        **options,
    )


async def wait_until(pilot, condition, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await pilot.pause(0.01)
    notes = [n.message for n in pilot.app._notifications]
    raise AssertionError(f"timed out waiting for {what}; notifications: {notes}")


async def ready(pilot) -> None:
    await wait_until(pilot, lambda: pilot.app.model is not None, "the model to load")


async def send(pilot, text: str) -> AssistantMessage:
    pilot.app.query_one(PromptInput).text = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: not pilot.app.answering, "the answer to finish")
    return pilot.app.query(AssistantMessage).last()


def as_text(renderable) -> str:
    console = Console(width=60, color_system=None)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get()


async def test_prompt_streams_markdown_answer_and_fills_stats(tmp_path):
    model = FakeModel()
    app = make_app(tmp_path, model)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        answer = await send(pilot, "What is speculative decoding?")

        assert model.calls[0]["prompt"] == [{"role": "user", "content": "What is speculative decoding?"}]
        assert model.calls[0]["chat"] is True
        assert answer.text == ANSWER
        assert answer.query_one(Markdown).source == ANSWER
        assert app.query_one(PromptInput).text == ""

        stats = app.last_stats
        assert stats.generated_tokens == len(PIECES)
        assert stats.drafted > 0 and stats.accepted > 0
        panel = app.query_one(StatsPanel)
        speed = as_text(panel.query_one("#speed", Static).content)
        assert f"{TOKENS_PER_S:.1f}" in speed
        assert f"{TOKENS_PER_S / PLAIN_TOKENS_PER_S:.2f}x" in speed
        speculation = as_text(panel.query_one("#speculation", Static).content)
        assert re.search(rf"^drafted +{stats.drafted} *$", speculation, re.M)
        assert re.search(rf"^accepted +{stats.accepted} *$", speculation, re.M)
        assert re.search(rf"^mean accepted length +{stats.mean_accepted_length:.2f} *$", speculation, re.M)
        assert re.search(r"^current k +3 *$", speculation, re.M)
        positions = as_text(panel.query_one("#positions", Static).content)
        assert [f"{rate:4.0%}" in positions for rate in stats.acceptance_by_position] == [True] * 3
        assert len(panel.recent_acceptance) == stats.steps
        assert "12.5 MB" in as_text(panel.query_one("#memory", Static).content)

    saved = [json.loads(line) for line in app.chat.path.read_text().splitlines()]
    assert saved == [
        {"role": "user", "content": "What is speculative decoding?"},
        {"role": "assistant", "content": ANSWER},
    ]
    # The plain-decoding speed was measured once and cached for this model+backend.
    assert json.loads((tmp_path / "plain.json").read_text()) == {"fake|test": PLAIN_TOKENS_PER_S}


async def test_escape_stops_mid_stream_and_keeps_partial_answer(tmp_path):
    model = FakeModel(pause_after=5)
    app = make_app(tmp_path, model)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.query_one(PromptInput).text = "Tell me a story"
        await pilot.press("enter")
        await wait_until(pilot, model.paused.is_set, "the model to reach the pause")

        # The model is busy in its thread, yet the UI still reacts to keys.
        await pilot.press("escape", "f2")
        assert app.screen.has_class("show-provenance")
        model.resume.set()
        await wait_until(pilot, lambda: not app.answering, "the stopped answer")

        answer = app.query(AssistantMessage).last()
        assert answer.text == "".join(PIECES[:5])
        assert str(answer.query_one(".answer-status", Static).content) == "stopped"
        assert model.closed_early
        assert app.chat.messages[-1] == {"role": "assistant", "content": "".join(PIECES[:5])}

        # The next prompt works and carries the partial answer as context.
        model.pause_after = None
        answer = await send(pilot, "Go on")
        assert answer.text == ANSWER
        assert model.calls[1]["prompt"][1] == {"role": "assistant", "content": "".join(PIECES[:5])}


async def test_second_turn_sends_the_whole_chat(tmp_path):
    model = FakeModel()
    app = make_app(tmp_path, model)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "first question")
        await send(pilot, "second question")

    assert model.calls[1]["prompt"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "second question"},
    ]


async def test_provenance_toggle_colours_tokens_and_plain_mode(tmp_path):
    app = make_app(tmp_path, FakeModel())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        answer = await send(pilot, "hi")
        markdown = answer.query_one(Markdown)
        provenance = answer.query_one(".provenance", Static)
        assert markdown.display and not provenance.display
        # Step pattern 3,1,2,0,... accepted of k=3: drafts then the target's own token.
        kinds = [kind for _, kind in answer.pieces]
        assert kinds[:10] == ["draft"] * 3 + ["bonus"] + ["draft", "correction"] + ["draft"] * 2 + ["correction"] * 2
        assert "".join(piece for piece, _ in answer.pieces) == ANSWER

        await pilot.press("f2")
        assert not markdown.display and provenance.display
        assert app.query_one("#legend").display
        assert provenance.content == render_tokens(answer.pieces, plain=False)
        colour_styles = {str(span.style) for span in provenance.content.spans}
        assert len(colour_styles) == 3 and all("#" in style for style in colour_styles)

        await pilot.press("f3")
        assert provenance.content == render_tokens(answer.pieces, plain=True)
        assert {str(span.style) for span in provenance.content.spans} == {"italic", "underline", "bold"}

        await pilot.press("f2")
        assert markdown.display and not provenance.display


async def test_settings_apply_to_next_answer(tmp_path):
    model = FakeModel()
    app = make_app(tmp_path, model)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f4")
        screen = app.screen
        screen.query_one("#temperature").value = "0.7"
        screen.query_one("#top-p").value = "0.9"
        screen.query_one("#spec").value = "ngram"
        screen.query_one("#num-draft").value = "4"
        await pilot.click("#save")
        assert app.settings == GenerationSettings(temperature=0.7, top_p=0.9, spec="ngram", num_draft=4)
        await send(pilot, "hi")

    call = model.calls[-1]
    assert (call["temperature"], call["top_p"], call["spec"], call["num_draft"]) == (0.7, 0.9, "ngram", 4)


async def test_invalid_setting_is_refused_with_a_notification(tmp_path):
    app = make_app(tmp_path, FakeModel())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f4")
        app.screen.query_one("#top-p").value = "1.5"
        await pilot.click("#save")
        assert app.settings == GenerationSettings()
        await wait_until(pilot, lambda: len(app._notifications) == 1, "the refusal")
        assert "top-p 1.5 is out of range" in list(app._notifications)[-1].message


async def test_enter_sends_shift_enter_breaks_line_up_recalls(tmp_path):
    model = FakeModel()
    app = make_app(tmp_path, model)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        await pilot.press("a", "shift+enter", "b")
        assert prompt.text == "a\nb"
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.answering, "the answer")
        assert model.calls[0]["prompt"] == [{"role": "user", "content": "a\nb"}]
        await send(pilot, "second")

        await pilot.press("up")
        assert prompt.text == "second"
        await pilot.press("up")
        assert prompt.text == "a\nb"
        await pilot.press("down")
        assert prompt.text == "second"
        await pilot.press("down")
        assert prompt.text == ""


async def test_copy_button_copies_the_answer(tmp_path):
    app = make_app(tmp_path, FakeModel())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        answer = await send(pilot, "hi")
        await pilot.click(answer.query_one(".copy"))
        assert app.clipboard == ANSWER


async def test_new_chat_and_reopen_saved_chat(tmp_path):
    model = FakeModel()
    app = make_app(tmp_path, model)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "remember this")
        first_chat = app.chat.path
        await pilot.press("ctrl+n")
        assert len(app.query(AssistantMessage)) == 0 and app.chat.messages == []

        await pilot.press("ctrl+o")
        await pilot.press("enter")  # the picker highlights the newest chat
        await pilot.pause()
        assert app.chat.path == first_chat
        assert [m.text for m in app.query(AssistantMessage)] == [ANSWER]
        await send(pilot, "and continue")

    assert model.calls[-1]["prompt"][:2] == [
        {"role": "user", "content": "remember this"},
        {"role": "assistant", "content": ANSWER},
    ]
    assert len(ChatStore(tmp_path / "chats").open(first_chat).messages) == 4


async def test_resumed_chat_is_shown_and_continued(tmp_path):
    store = ChatStore(tmp_path / "chats")
    chat = store.new_chat()
    chat.append("user", "old question")
    chat.append("assistant", "old answer")
    model = FakeModel()
    app = make_app(tmp_path, model, chat=store.latest())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert [m.text for m in app.query(AssistantMessage)] == ["old answer"]
        await pilot.press("up")
        assert app.query_one(PromptInput).text == "old question"
        await send(pilot, "new question")
    assert model.calls[-1]["prompt"][0] == {"role": "user", "content": "old question"}


def _fail_loading():
    raise UserError("model directory /nowhere does not exist; pass a model directory")


async def test_load_failure_is_a_notification_not_a_crash(tmp_path):
    app = make_app(tmp_path, None)
    app.load_model = _fail_loading
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: len(app._notifications) == 1, "the load failure")
        assert "/nowhere does not exist" in list(app._notifications)[-1].message
        assert app.sub_title == "no model"
        app.query_one(PromptInput).text = "hi"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(app._notifications) == 2, "the warning")
        assert "not loaded" in list(app._notifications)[-1].message
    assert app.return_code in (0, None)


class OutOfMemoryModel(FakeModel):
    """Its answers run out of memory; its plain-speed run (at load) does not."""

    def stream(self, prompt, **options):
        if options.get("spec") == "none":
            return super().stream(prompt, **options)
        raise MemoryError


async def test_generation_failure_is_a_notification_and_app_stays_usable(tmp_path):
    app = make_app(tmp_path, OutOfMemoryModel())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        answer = await send(pilot, "hi")
        assert str(answer.query_one(".answer-status", Static).content) == "failed"
        await wait_until(pilot, lambda: len(app._notifications) == 1, "the failure")
        assert list(app._notifications)[-1].message.startswith("out of memory")
        assert not app.answering


@pytest.mark.parametrize("bad", ["-1", "x"])
def test_settings_parsers_reject_bad_values(bad):
    from edgemtp.tui.settings import parse_num_draft, parse_temperature

    with pytest.raises(UserError):
        parse_temperature(bad)
    with pytest.raises(UserError):
        parse_num_draft(bad)


# --- the same flows on a real factory checkpoint (MLX backend) -----------------------------------

REAL_SETTINGS = GenerationSettings(max_tokens=24, num_draft=2)


def real_app(tmp_path, checkpoint) -> ChatApp:
    from edgemtp.api import load

    app = make_app(tmp_path, None, settings=REAL_SETTINGS)
    app.load_model = lambda: load(checkpoint, backend="mlx")
    # A known plain speed keeps the measuring run out of the model's cache, so turn 1 starts cold.
    app.baseline.put("fake|test", 100.0)
    return app


def greedy_answer(checkpoint, messages) -> str:
    """What plain greedy decoding says; lossless speculative decoding must say the same."""
    from edgemtp.api import load

    return load(checkpoint, backend="mlx").generate(messages, max_tokens=REAL_SETTINGS.max_tokens, spec="none").text


async def test_real_checkpoint_answer_stats_and_prefix_reuse(tmp_path, tiny_checkpoint):
    checkpoint = tiny_checkpoint("deepseek_v3", mtp_layers=1)
    app = real_app(tmp_path, checkpoint)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        answer = await send(pilot, "hello there")
        first = app.last_stats
        assert first.generated_tokens > 0 and first.drafted > 0 and first.tokens_per_s > 0
        assert re.search(rf"^drafted +{first.drafted} *$",
                         as_text(app.query_one("#speculation", Static).content), re.M)
        tokenizer = app.model.tokenizer
        turn1_ids = tokenizer.apply_chat_template(app.chat.messages[:1])
        assert first.prompt_tokens == len(turn1_ids)

        await pilot.press("f2")
        assert answer.query_one(".provenance", Static).content == render_tokens(answer.pieces, plain=False)
        # One piece per generated token, plus one for text the detokenizer held back to the end.
        assert [kind for _, kind in answer.pieces][: first.generated_tokens] == first.provenance
        assert "".join(piece for piece, _ in answer.pieces) == answer.text

        await send(pilot, "and again")
        turn2_ids = tokenizer.apply_chat_template(app.chat.messages[:3])
        # Turn 2 prefills only what follows the cached conversation, never turn 1's prompt again.
        # (The last tokens of turn 1's prompt may merge differently once the answer follows them,
        # and the MTP drafter re-runs its last k shared positions to rebuild its caches.)
        shared = len(os.path.commonprefix([turn1_ids, turn2_ids]))
        assert shared > len(turn1_ids) // 2
        assert 0 < app.last_stats.prompt_tokens <= len(turn2_ids) - shared + REAL_SETTINGS.num_draft
        conversation = app.chat.messages

    assert conversation[1]["content"] == greedy_answer(checkpoint, conversation[:1])
    assert conversation[3]["content"] == greedy_answer(checkpoint, conversation[:3])


class PausingModel:
    """Wraps a real model; its stream blocks after ``pause_after`` chunks until ``resume`` is set."""

    def __init__(self, model, pause_after: int) -> None:
        self.model, self.tokenizer, self.backend = model, model.tokenizer, model.backend
        self.pause_after = pause_after
        self.paused, self.resume = threading.Event(), threading.Event()

    def generate(self, *args, **options):
        return self.model.generate(*args, **options)

    def stream(self, *args, **options):
        for i, chunk in enumerate(self.model.stream(*args, **options)):
            if i == self.pause_after:
                self.paused.set()
                self.resume.wait(timeout=30)
            yield chunk


async def test_real_checkpoint_escape_stops_mid_stream(tmp_path, tiny_checkpoint):
    from edgemtp.api import load

    checkpoint = tiny_checkpoint("deepseek_v3", mtp_layers=1)
    model = PausingModel(load(checkpoint, backend="mlx"), pause_after=10)
    app = real_app(tmp_path, checkpoint)
    app.load_model = lambda: model
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.query_one(PromptInput).text = "hello there"
        await pilot.press("enter")
        await wait_until(pilot, model.paused.is_set, "the pause")
        await pilot.press("escape")
        model.resume.set()
        await wait_until(pilot, lambda: not app.answering, "the stopped answer")
        stopped = app.chat.messages[1]["content"]
        assert app.last_stats.generated_tokens < REAL_SETTINGS.max_tokens
        # The partial answer is the start of the full one, and the chat goes on from it.
        assert greedy_answer(checkpoint, app.chat.messages[:1]).startswith(stopped)
        model.pause_after = None
        await send(pilot, "go on")
        conversation = app.chat.messages
    assert conversation[3]["content"] == greedy_answer(checkpoint, conversation[:3])


async def test_markdown_renders_per_batched_update_not_per_chunk(tmp_path, monkeypatch):
    """The answer's Markdown is re-rendered once per update of the worker (every REDRAW_SECONDS),
    not once per chunk, and the streamed answer still ends complete. A fake clock advancing 30 ms
    per reading makes the batching deterministic: about one update per four chunks."""
    readings = iter(range(10_000))
    monkeypatch.setattr("edgemtp.tui.streaming.monotonic", lambda: 0.03 * next(readings))
    monkeypatch.setattr("edgemtp.tui.app.perf_counter", lambda: 0.0)  # updates cost the UI no time
    renders = []
    append = Markdown.append

    def counting_append(self, markdown):
        renders.append(markdown)
        return append(self, markdown)

    monkeypatch.setattr(Markdown, "append", counting_append)
    app = make_app(tmp_path, FakeModel(), settings=GenerationSettings(spec="none"))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        answer = await send(pilot, "hi")
        assert answer.text == ANSWER and answer.query_one(Markdown).source == ANSWER
    assert "".join(renders) == ANSWER
    assert 2 <= len(renders) <= len(PIECES) // 3  # one chunk per token: per chunk would be len(PIECES)


def test_updates_slow_down_when_drawing_them_takes_more_than_the_ui_share():
    from edgemtp.tui.streaming import REDRAW_SECONDS, UI_SHARE, update_interval

    assert update_interval(0.0) == REDRAW_SECONDS
    assert update_interval(0.05) == pytest.approx(0.05 / UI_SHARE)  # a 50 ms redraw: at most 10% of the time
