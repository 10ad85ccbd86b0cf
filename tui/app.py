"""``ChatApp``: the terminal chat UI of ``edgemtp chat``.

Threads: the model is loaded and run in worker threads (``@work(thread=True)``)
so the UI never blocks. The generation worker batches chunks and posts an update
at most every ``REDRAW_SECONDS``, and further apart when the UI takes more than
``UI_SHARE`` of the time to apply and draw them (one at the end), as messages;
everything that touches widgets runs on the UI thread in the message handlers.
Rendering the growing Markdown answer competes with decoding for the same
cores, so it happens per update, never per chunk.

Multi-turn: each answer is generated from the whole conversation as a message
list. The engine keeps the token list it has cached and only prefills the new
suffix, so turn N costs the new prompt, not the whole chat again.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Footer, Header, Label, Static
from textual.worker import Worker, get_current_worker

from edgemtp.errors import UserError
from edgemtp.tui.baseline import BaselineCache
from edgemtp.tui.history import Chat, ChatStore
from edgemtp.tui.picker import ChatPickerScreen
from edgemtp.tui.provenance import legend
from edgemtp.tui.settings import GenerationSettings, SettingsScreen
from edgemtp.tui.streaming import StreamUpdate, UpdateCollector, collect_updates
from edgemtp.tui.widgets import AssistantMessage, MessageView, PromptInput, StatsPanel, UserMessage

class AnswerProgress(Message):
    """Posted by the generation worker, at most every ``update_interval`` seconds."""

    def __init__(self, answer: AssistantMessage, update: StreamUpdate) -> None:
        super().__init__()
        self.answer = answer
        self.update = update


class AnswerDone(Message):
    """Posted once when an answer ends: finished, stopped with Esc, or failed."""

    def __init__(self, answer: AssistantMessage, chat: Chat, update: StreamUpdate, stopped: bool, error: str | None) -> None:
        super().__init__()
        self.answer = answer
        self.chat = chat
        self.update = update
        self.stopped = stopped
        self.error = error


def _describe_failure(exc: BaseException) -> str:
    """One line for a notification; the chat must survive any model failure."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory; use a smaller model, a shorter chat (Ctrl+N) or fewer draft tokens (F4)"
    return f"{type(exc).__name__}: {exc}"


class ChatApp(App):
    """Chat with a local model, watching speculative decoding work as it answers."""

    CSS_PATH = "chat.tcss"
    TITLE = "edgemtp chat"

    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "open_chat", "Open chat"),
        Binding("f2", "toggle_provenance", "Provenance"),
        Binding("f3", "toggle_plain", "Plain style"),
        Binding("f4", "settings", "Settings"),
        Binding("ctrl+s", "settings", "Settings", show=False),
    ]

    def __init__(
        self,
        load_model: Callable[[], object],
        *,
        model_key: str,
        settings: GenerationSettings = GenerationSettings(),
        store: ChatStore | None = None,
        baseline: BaselineCache | None = None,
        budget_bytes: int | None = None,
        chat: Chat | None = None,
    ) -> None:
        """``load_model`` builds the model (run in a worker); ``model_key`` names model+backend
        for the plain-speed cache; ``budget_bytes`` defaults to the planner's memory budget."""
        super().__init__()
        self.load_model = load_model
        self.model_key = model_key
        self.settings = settings
        self.store = store or ChatStore()
        self.baseline = baseline or BaselineCache()
        self.budget_bytes = budget_bytes
        self.chat = chat or self.store.new_chat()
        self.model = None
        self.plain_tokens_per_s: float | None = None
        self.plain_provenance = False
        self.last_stats = None  # Stats of the latest answer, for the stats panel and tests
        self._generation: Worker | None = None
        # True from sending a prompt until the worker's AnswerDone arrives. Not the worker's
        # state: a cancelled thread worker reports CANCELLED while its thread still runs the model.
        self.answering = False
        self.update_seconds = 0.0  # what the last streamed update took the UI, redraw included

    # --- layout -----------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield MessageView(id="messages")
                yield Static(legend(False), id="legend")
                yield PromptInput(id="prompt")
            yield StatsPanel(id="stats")
        yield Footer()

    async def on_mount(self) -> None:
        self.sub_title = "loading model…"
        self.query_one(MessageView).loading = True
        await self._show_chat()
        self.query_one(PromptInput).focus()
        self.load()

    # --- model loading ----------------------------------------------------

    @work(thread=True, exclusive=True, group="load")
    def load(self) -> None:
        try:
            model = self.load_model()
            plain = self.baseline.plain_tokens_per_s(model, self.model_key)
            budget = self.budget_bytes
            if budget is None:
                from edgemtp.planner import detect_memory_budget

                budget = detect_memory_budget().bytes
        except Exception as exc:  # noqa: BLE001 - shown as a notification, never a traceback
            self.call_from_thread(self._load_failed, _describe_failure(exc))
            return
        self.call_from_thread(self._model_ready, model, plain, budget)

    def _model_ready(self, model, plain_tokens_per_s: float, budget_bytes: int) -> None:
        self.model = model
        self.plain_tokens_per_s = plain_tokens_per_s
        self.budget_bytes = budget_bytes
        self.query_one(MessageView).loading = False
        self.sub_title = self.model_key

    def _load_failed(self, message: str) -> None:
        self.query_one(MessageView).loading = False
        self.sub_title = "no model"
        self.notify(f"Could not load the model: {message}", severity="error", timeout=30)

    # --- sending and streaming -------------------------------------------

    @on(PromptInput.Submitted)
    async def send(self, event: PromptInput.Submitted) -> None:
        prompt = event.text.strip()
        if not prompt:
            return
        if self.model is None:
            self.notify("The model is not loaded yet.", severity="warning")
            return
        if self.answering:
            self.notify("Still answering; press Esc to stop.", severity="warning")
            return
        prompt_input = self.query_one(PromptInput)
        prompt_input.remember(prompt)
        prompt_input.clear()
        self.chat.append("user", prompt)
        answer = AssistantMessage(plain=self.plain_provenance)
        await self.query_one(MessageView).mount_all([UserMessage(prompt), answer])
        answer.query_one(".answer-status", Label).update("answering…")
        self.answering = True
        self._generation = self.generate(self.chat, list(self.chat.messages), self.settings, answer)

    @work(thread=True, group="generate")
    def generate(self, chat: Chat, messages: list[dict], settings: GenerationSettings, answer: AssistantMessage) -> None:
        worker = get_current_worker()
        collector = UpdateCollector(self.model)
        error = None
        stream = None
        try:
            stream = self.model.stream(
                messages,
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                spec=settings.spec,
                num_draft=settings.num_draft,
                chat=True,
            )
            # Esc stops between chunks: the answer keeps exactly what was produced before it.
            collect_updates(stream, collector, lambda update: self.post_message(AnswerProgress(answer, update)),
                            stop=lambda: worker.is_cancelled, ui_seconds=lambda: self.update_seconds)
        except Exception as exc:  # noqa: BLE001 - shown as a notification, never a traceback
            error = _describe_failure(exc)
        finally:
            if stream is not None:
                stream.close()  # lets the engine leave its caches consistent for the next turn
        self.post_message(AnswerDone(answer, chat, collector.take(), worker.is_cancelled, error))

    async def on_answer_progress(self, message: AnswerProgress) -> None:
        if message.answer.is_attached:
            began = perf_counter()
            await message.answer.append(message.update)
            self._show_stats(message.update)
            # Timed until the screen has been redrawn with it: the redraw is most of the cost.
            self.call_after_refresh(self._time_update, began)

    def _time_update(self, began: float) -> None:
        self.update_seconds = perf_counter() - began

    async def on_answer_done(self, message: AnswerDone) -> None:
        self.answering = False
        answer = message.answer
        if answer.is_attached:
            await answer.append(message.update)
            self._show_stats(message.update)
        if answer.text:
            # A stopped answer is kept: it is on screen, so it is part of the conversation.
            message.chat.append("assistant", answer.text)
        if answer.is_attached:
            stats = message.update.stats
            if message.error:
                status = "failed"
            elif message.stopped:
                status = "stopped"
            elif stats is not None:
                status = f"{stats.generated_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s"
            else:
                status = ""
            await answer.finish(status)
        if message.error:
            self.notify(message.error, title="Generation failed", severity="error", timeout=30)

    def _show_stats(self, update: StreamUpdate) -> None:
        if update.stats is None:
            return
        self.last_stats = update.stats
        self.query_one(StatsPanel).show(
            update, plain_tokens_per_s=self.plain_tokens_per_s, budget_bytes=self.budget_bytes
        )

    # --- actions ----------------------------------------------------------

    def action_stop(self) -> None:
        if self.answering:
            self._generation.cancel()

    async def action_new_chat(self) -> None:
        self.action_stop()
        self.chat = self.store.new_chat()
        await self._show_chat()
        self.query_one(StatsPanel).clear_history()

    def action_open_chat(self) -> None:
        chats = self.store.chats()
        if not chats:
            self.notify(f"No saved chats yet in {self.store.root}.")
            return
        self.push_screen(ChatPickerScreen(chats), self._open_picked)

    async def _open_picked(self, chat: Chat | None) -> None:
        if chat is None:
            return
        self.action_stop()
        self.chat = chat
        await self._show_chat()

    async def _show_chat(self) -> None:
        """Replace the message view's content with ``self.chat``."""
        view = self.query_one(MessageView)
        await view.remove_children()
        widgets = [
            UserMessage(m["content"]) if m["role"] == "user" else AssistantMessage(m["content"], plain=self.plain_provenance)
            for m in self.chat.messages
        ]
        await view.mount_all(widgets)
        self.query_one(PromptInput).past_prompts = [m["content"] for m in self.chat.messages if m["role"] == "user"]

    def action_toggle_provenance(self) -> None:
        self.screen.toggle_class("show-provenance")
        if self.screen.has_class("show-provenance"):  # answers skip rendering it while it is hidden
            for answer in self.query(AssistantMessage):
                answer.show_provenance()

    def action_toggle_plain(self) -> None:
        self.plain_provenance = not self.plain_provenance
        self.query_one("#legend", Static).update(legend(self.plain_provenance))
        for answer in self.query(AssistantMessage):
            answer.set_plain(self.plain_provenance)

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.settings), self._apply_settings)

    def _apply_settings(self, settings: GenerationSettings | None) -> None:
        if settings is not None:
            self.settings = settings
            self.notify("Settings apply from the next answer.")
