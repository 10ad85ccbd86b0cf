"""Plain-decoding speed, the yardstick for the "speedup" figure.

Speedup only means something against the same model on the same backend
decoding without speculation, measured the way the live figure is: a
``spec="none"`` answer streamed through the same worker-side path as every chat
answer (``collect_updates``: the collector's per-chunk work and an update taken
every ``REDRAW_SECONDS``). It is measured once and cached as JSON in the user
cache directory, keyed by model and backend, so later sessions start without
the extra run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgemtp.paths import cache_root
from edgemtp.tui.streaming import UpdateCollector, collect_updates

BASELINE_PROMPT = "Write one sentence about the sea."
BASELINE_TOKENS = 32


def default_cache_file() -> Path:
    return cache_root() / "plain_tokens_per_s.json"


class BaselineCache:
    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_file()

    def _read(self) -> dict[str, float]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # no cache yet, or a damaged one: measure again

    def get(self, key: str) -> float | None:
        return self._read().get(key)

    def put(self, key: str, tokens_per_s: float) -> None:
        data = self._read()
        data[key] = tokens_per_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)

    def plain_tokens_per_s(self, model, key: str) -> float:
        """Cached plain-decoding tokens/s for ``key``, measuring it on ``model`` if absent."""
        cached = self.get(key)
        if cached is not None:
            return cached
        collector = UpdateCollector(model)
        stream = model.stream(BASELINE_PROMPT, max_tokens=BASELINE_TOKENS, temperature=0.0, spec="none", chat=True)
        collect_updates(stream, collector, post=lambda update: None)  # no answer on screen to update
        tokens_per_s = collector.take().stats.tokens_per_s
        self.put(key, tokens_per_s)
        return tokens_per_s
