"""The bench's prompt set: the bundled ``prompts.json`` (chat, story and code requests) or a user's file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from edgemtp.errors import UserError


def load_prompts(path: str | Path | None = None) -> list[str]:
    """The prompt set: a JSON list of strings (default: the bundled ``prompts.json``)."""
    if path is None:
        text = resources.files("edgemtp.bench").joinpath("prompts.json").read_text(encoding="utf-8")
        where = "prompts.json"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read prompts file {path} ({exc.strerror}); pass a JSON list of strings") from None
        where = str(path)
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON ({exc}); it must hold a list of prompt strings") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise UserError(f"{where} must hold a non-empty JSON list of non-empty strings")
    return prompts


