"""mlx-lm as a peer: its own ``stream_generate`` on the same MLX directory and prompt tokens,
for the bench's side-by-side column on MLX and, on Apple Silicon, ``bench --peers``."""

from __future__ import annotations

import platform
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

from edgemtp.bench.decoding import WARMUP_TOKENS


def mlx_lm_decode(last) -> tuple[int, float]:
    """(tokens decoded after the first, seconds they took) from ``stream_generate``'s last response.

    mlx-lm's ``generation_tps`` is ``generation_tokens`` over the time since the first token came
    out, so it counts the first token but not its time: n intervals, n + 1 tokens (+4% at 24
    tokens). edgemtp's rate is the tokens after the first over that same time; so is this one.
    """
    if last is None or last.generation_tps <= 0:
        return 0, 0.0
    return last.generation_tokens - 1, last.generation_tokens / last.generation_tps


def mlx_lm_tokens_per_s(model_dir: Path, prompt_ids: list[list[int]], max_tokens: int, repeats: int):
    """mlx-lm's ``stream_generate`` tokens/s on the same directory and prompt tokens.

    Returns ``(tokens_per_s, note)``; tokens/s is None (with the reason in the note)
    when mlx-lm cannot load the directory.
    """
    import mlx_lm

    try:
        model, tokenizer = mlx_lm.load(str(model_dir))
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        return None, f"mlx-lm cannot load {model_dir.name}: {str(exc).splitlines()[0]}"

    def one_pass(ids_list, tokens):
        generated = seconds = 0.0
        for ids in ids_list:
            last = None
            for last in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=tokens):
                pass
            decoded, took = mlx_lm_decode(last)
            generated += decoded
            seconds += took
        return generated / seconds if seconds else 0.0

    one_pass(prompt_ids[-1:], WARMUP_TOKENS)
    return statistics.median(one_pass(prompt_ids, max_tokens) for _ in range(repeats)), "mlx-lm stream_generate"




MODULE = "mlx_lm"
NOT_APPLE_SILICON = "mlx-lm: left out, it is a peer on Apple Silicon only (here MLX runs on the CPU)"


def on_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


class Engine:
    """``spec``: ``model`` (an MLX directory mlx-lm loads)."""

    def __init__(self, spec: dict):
        import mlx_lm

        self.mlx_lm = mlx_lm
        self.model, self.tokenizer = mlx_lm.load(spec["model"])

    def greedy(self, ids: list[int], max_tokens: int) -> Iterator[list[int]]:
        # stream_generate samples greedily without a sampler and stops at the tokenizer's EOS.
        for response in self.mlx_lm.stream_generate(self.model, self.tokenizer, ids, max_tokens=max_tokens):
            yield [int(response.token)]
