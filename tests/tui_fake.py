"""A deterministic stand-in for ``edgemtp.Model`` used by the chat UI tests.

It speaks the public streaming API (``stream`` yields ``(text, token_ids,
stats)`` chunks, one per speculative step, with the engine's real ``Stats``)
but produces a fixed answer with a fixed acceptance pattern and fixed speeds,
so screenshots are identical on every run. It has no cache: every word of
the prompt counts as a prompt token.
"""

from __future__ import annotations

import re
import threading
from edgemtp.engine.generate import Chunk
from edgemtp.engine.stats import Stats

ANSWER = (
    "Speculative decoding drafts **several tokens** at once.\n\n"
    "- the MTP head proposes `k` tokens\n"
    "- the model verifies them in one pass\n\n"
    "Accepted drafts are free tokens."
)
PIECES = re.findall(r"\s*\S+", ANSWER)  # one "token" per word, with its leading whitespace
ACCEPTED_PER_STEP = [3, 1, 2, 0, 3, 2]  # cycled; every step drafts K tokens
K = 3
TOKENS_PER_S = 42.0
PROMPT_TOKENS_PER_S = 900.0
PLAIN_TOKENS_PER_S = 20.0
WEIGHT_BYTES = 12_500_000
CACHE_BYTES_PER_TOKEN = 4096


class FakeDetokenizer:
    def add(self, token_id: int) -> str:
        return PIECES[token_id]


class FakeTokenizer:
    def detokenizer(self) -> FakeDetokenizer:
        return FakeDetokenizer()


class FakeBackend:
    def __init__(self) -> None:
        self.cached_tokens = 0

    def weight_bytes(self) -> int:
        return WEIGHT_BYTES

    def cache_bytes(self) -> int:
        return self.cached_tokens * CACHE_BYTES_PER_TOKEN


def _words(messages: list[dict]) -> list[str]:
    return [word for m in messages for word in (m["role"] + ": " + m["content"]).split()]


class FakeModel:
    def __init__(self, *, pause_after: int | None = None) -> None:
        """With ``pause_after``, ``stream`` blocks after that many tokens until ``resume`` is set."""
        self.tokenizer = FakeTokenizer()
        self.backend = FakeBackend()
        self.calls: list[dict] = []  # arguments of every speculative stream() call (the answers)
        self.plain_calls: list[dict] = []  # arguments of every plain-decoding stream() call (the plain-speed run)
        self.pause_after = pause_after
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.closed_early = False

    def stream(self, prompt, *, max_tokens=256, temperature=0.0, top_p=1.0, spec="mtp", num_draft="auto", chat=True):
        plain = spec == "none"
        (self.plain_calls if plain else self.calls).append(dict(prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                                                top_p=top_p, spec=spec, num_draft=num_draft, chat=chat))
        return self._start(prompt, max_tokens, spec, chat, None if plain else self.pause_after)

    def _start(self, prompt, max_tokens: int, spec: str, chat: bool, pause_after: int | None = None):
        if isinstance(prompt, str) and chat:
            prompt = [{"role": "user", "content": prompt}]  # as the chat template does with a bare string
        words = _words(prompt) if chat else prompt.split()
        stats = Stats(prompt_tokens=len(words), prompt_tokens_per_s=PROMPT_TOKENS_PER_S)
        return self._steps(stats, spec, min(max_tokens, len(PIECES)), pause_after)

    def _steps(self, stats: Stats, spec: str, n_tokens: int, pause_after: int | None):
        emitted = 0
        step = 0
        try:
            while emitted < n_tokens:
                if spec == "none":
                    ids, kinds = [emitted], ["bonus"]
                    stats.add_tokens(kinds)
                    stats.steps += 1
                else:
                    accepted = ACCEPTED_PER_STEP[step % len(ACCEPTED_PER_STEP)]
                    count = min(accepted + 1, n_tokens - emitted)
                    ids = list(range(emitted, emitted + count))
                    kinds = (["draft"] * accepted + ["bonus" if accepted == K else "correction"])[:count]
                    stats.record_step(K, accepted, kinds)
                stats.tokens_per_s = PLAIN_TOKENS_PER_S if spec == "none" else TOKENS_PER_S
                step += 1
                for token_id in ids:
                    if emitted == pause_after:
                        self.paused.set()
                        self.resume.wait(timeout=30)
                    emitted += 1
                    self.backend.cached_tokens += 1
                    yield Chunk(PIECES[token_id], [token_id], stats)
        except GeneratorExit:
            self.closed_early = True
            raise
