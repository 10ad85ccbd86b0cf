"""``edgemtp chat`` on rank 0 of an ``mlx.launch`` group: one prompt per line, answers streamed.

Why not the Textual app: ``mlx.launch`` (mlx 0.32, ``mlx/_distributed_utils/launch.py``) starts
every rank with pipes for stdin, stdout and stderr; a rank on another host runs under
``ssh -tt``, whose pseudo-terminal is fed by those same pipes. The launcher reads its own
terminal, left in line mode, and copies what it reads to every rank's stdin. So rank 0 gets
whole lines and no keys. Opening ``/dev/tty`` instead does not help: the launcher keeps reading
that terminal too (of ten keys typed into a raw ``/dev/tty`` under ``mlx.launch -n 2``, rank 0
got eight). The launcher never passes on end-of-file, so a ``/quit`` line ends the chat. Each
answer's statistics go to stdout after it, as the app's stats panel would show them: the
launcher copies a rank's stdout and stderr through separate queues, which would reorder them.
"""

from __future__ import annotations

from typing import TextIO

from edgemtp.engine.stats import format_summary

QUIT_LINES = ("/quit", "/exit")


def run_line_chat(model, settings, lines: TextIO, out: TextIO) -> None:
    """Read prompts from ``lines`` until ``/quit``, ``/exit`` or end of input; write each answer,
    streamed, and its statistics (per rank under mlx.launch) to ``out``. ``settings`` is the
    chat's ``GenerationSettings``; the conversation is kept, so each turn reuses the cache."""
    out.write(f"one prompt per line; {' or '.join(QUIT_LINES)} ends the chat\n")
    messages: list[dict] = []
    while True:
        out.write("> ")
        out.flush()
        line = lines.readline()
        prompt = line.strip()
        if not line or prompt in QUIT_LINES:
            return
        if not prompt:
            continue
        messages.append({"role": "user", "content": prompt})
        answer, stats = [], None
        for text, _ids, stats in model.stream(messages, max_tokens=settings.max_tokens,
                                              temperature=settings.temperature, top_p=settings.top_p,
                                              spec=settings.spec, num_draft=settings.num_draft):
            answer.append(text)
            out.write(text)
            out.flush()
        messages.append({"role": "assistant", "content": "".join(answer)})
        out.write(f"\n{format_summary(stats, settings.spec)}\n")
