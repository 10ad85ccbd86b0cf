"""Chat persistence: one JSONL file per chat, one message per line.

Files live under the user's data directory (``platformdirs``), e.g.
``~/.local/share/edgemtp/chats/20250101-120000-1a2b3c.jsonl``. Each line is
``{"role": "user" | "assistant", "content": "..."}`` - exactly the message
list the model's chat template takes, so a reopened chat continues where it
stopped.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from edgemtp.errors import UserError


def default_chat_dir() -> Path:
    return Path(platformdirs.user_data_dir("edgemtp")) / "chats"


@dataclass
class Chat:
    path: Path
    messages: list[dict] = field(default_factory=list)

    @property
    def title(self) -> str:
        """The first user prompt, on one line."""
        for message in self.messages:
            if message["role"] == "user":
                return " ".join(message["content"].split())[:80]
        return "(empty chat)"

    def append(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})
        self.save()

    def save(self) -> None:
        """Rewrite the whole file via a temporary file, so a crash never leaves half a line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for message in self.messages:
                f.write(json.dumps(message, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)


class ChatStore:
    """The folder of saved chats."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_chat_dir()

    def new_chat(self) -> Chat:
        # Nothing is written until the first message, so empty chats leave no file.
        name = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        return Chat(self.root / f"{name}.jsonl")

    def chats(self) -> list[Chat]:
        """Saved chats, newest first (names start with a timestamp)."""
        if not self.root.is_dir():
            return []
        return [self.open(path) for path in sorted(self.root.glob("*.jsonl"), reverse=True)]

    def latest(self) -> Chat:
        chats = self.chats()
        if not chats:
            raise UserError(f"no saved chats in {self.root}; start one with `edgemtp chat` (without --resume)")
        return chats[0]

    @staticmethod
    def open(path: Path) -> Chat:
        messages = []
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
            for line in lines:
                if line.strip():
                    message = json.loads(line)
                    messages.append({"role": message["role"], "content": message["content"]})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"chat file {path} is unreadable ({exc}); delete or fix it") from None
        return Chat(Path(path), messages)
