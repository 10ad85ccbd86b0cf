"""The bench's prompt sets: the bundled ``prompts.json`` (chat, story and code requests),
``heldout_prompts.json`` (``--prompts heldout``: 8 chat, 8 story and 8 code requests, none of them
in the MTP head's training data, the model card's held-out prompts or ``prompts.json``), or a user's file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from edgemtp.errors import UserError


def load_prompts(path: str | Path | None = None) -> list[str]:
    """The prompt set: a JSON list of strings (default: the bundled ``prompts.json``; ``"heldout"``:
    the bundled held-out set)."""
    if path is None or path == "heldout":
        where = "prompts.json" if path is None else "heldout_prompts.json"
        text = resources.files("edgemtp.bench").joinpath(where).read_text(encoding="utf-8")
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


