"""Does the chat UI eat the speedup? ``edgemtp chat`` against ``edgemtp generate`` on one prompt.

    python scripts/chat_vs_generate.py [--rounds 3] [--max-tokens 256] [--prompt TEXT]

Loads the default model once (ONNX) and decodes the same prompt with the same settings (greedy, the
default drafter, automatic draft length) in interleaved rounds: once as ``generate`` does (the
stream consumed in a loop) and once as an answer of the chat app, headless (``App.run_test``),
whose worker batches the chunks and whose UI re-renders the Markdown answer while decoding runs.
Each round starts a new chat, so both decode the same single-turn prompt. Prints the decode
tokens/s of both per round, the median ratio chat / generate, and whether the texts are identical.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import edgemtp
from edgemtp.tui.app import ChatApp
from edgemtp.tui.baseline import BaselineCache
from edgemtp.tui.history import ChatStore
from edgemtp.tui.settings import GenerationSettings
from edgemtp.tui.widgets import PromptInput

PROMPT = "Write a story about a lighthouse keeper who finds a message in a bottle."


async def chat_answer(model, prompt: str, settings: GenerationSettings, work: Path) -> tuple[float, str]:
    """Decode tokens/s and text of one answer in the chat app, run headless."""
    baseline = BaselineCache(work / "plain.json")
    baseline.put("script", 1.0)  # the speed panel's baseline is not what this measures
    app = ChatApp(lambda: model, model_key="script", settings=settings, store=ChatStore(work / "chats"),
                  baseline=baseline, budget_bytes=16 * 2**30)
    async with app.run_test(size=(120, 40)) as pilot:
        # Plain sleeps, not pilot.pause: a pause visits every widget of the screen, and the
        # answer's Markdown blocks grow while it decodes.
        while app.model is None:
            await asyncio.sleep(0.05)
        app.query_one(PromptInput).text = prompt
        await pilot.press("enter")
        while app.answering:
            await asyncio.sleep(0.05)
        return app.last_stats.tokens_per_s, app.chat.messages[-1]["content"]


def generate_answer(model, prompt: str, settings: GenerationSettings) -> tuple[float, str]:
    """Decode tokens/s and text of the same request consumed the way ``edgemtp generate`` does."""
    texts, stats = [], None
    for text, _ids, stats in model.stream(prompt, max_tokens=settings.max_tokens, temperature=settings.temperature,
                                          top_p=settings.top_p, spec=settings.spec, num_draft=settings.num_draft):
        texts.append(text)
    return stats.tokens_per_s, "".join(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args()
    settings = GenerationSettings(max_tokens=args.max_tokens)
    model = edgemtp.load(backend="onnx")
    generate_answer(model, args.prompt, settings)  # warm-up: step costs measured, caches allocated
    rates = {"generate": [], "chat": []}
    same = True
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            order = ["generate", "chat"] if round_ % 2 == 0 else ["chat", "generate"]
            texts = {}
            for name in order:
                if name == "chat":
                    rate, texts[name] = asyncio.run(chat_answer(model, args.prompt, settings, Path(work)))
                else:
                    rate, texts[name] = generate_answer(model, args.prompt, settings)
                rates[name].append(rate)
            if texts["chat"] != texts["generate"]:
                same = False
                at = next((i for i, (a, b) in enumerate(zip(texts["chat"], texts["generate"])) if a != b),
                          min(len(texts["chat"]), len(texts["generate"])))
                print(f"round {round_ + 1}: the texts differ from character {at}: chat {texts['chat'][at:at + 40]!r}, "
                      f"generate {texts['generate'][at:at + 40]!r}")
            print(f"round {round_ + 1}: generate {rates['generate'][-1]:.1f}, chat {rates['chat'][-1]:.1f} tokens/s")
    ratio = statistics.median(c / g for c, g in zip(rates["chat"], rates["generate"]))
    print(f"chat / generate tokens/s, median over rounds: {ratio:.2f}; identical text: {same}")


if __name__ == "__main__":
    main()
