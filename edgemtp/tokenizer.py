"""Tokenizer of a model directory: ``tokenizer.json`` via ``tokenizers``, chat template via jinja2.

No transformers at runtime: ``tokenizer.json`` holds the whole pipeline (normalizer,
pre-tokenizer, BPE, decoder) and ``tokenizer_config.json`` the chat template and special
tokens. The template is rendered in a sandbox, as transformers does, because it comes with
downloaded files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgemtp.errors import UserError

# Every file that says how a model tokenizes, formats chats or stops, in the layouts transformers
# writes (transformers 5 keeps the chat template in chat_template.jinja). Conversions carry them all.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "additional_chat_templates/*.jinja")


def copy_tokenizer_files(source: Path, out_dir: Path) -> None:
    """Copy the tokenizer files (``TOKENIZER_FILES``) that ``source`` has into ``out_dir``."""
    for pattern in TOKENIZER_FILES:
        for file in Path(source).glob(pattern):
            target = out_dir / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)


class Tokenizer:
    """Text <-> token ids, chat formatting and end-of-sequence ids for one model."""

    def __init__(self, tokenizer, tokenizer_config: dict, eos_token_ids: set[int]):
        self._tokenizer = tokenizer  # tokenizers.Tokenizer
        self._config = tokenizer_config
        self.eos_token_ids = eos_token_ids
        self.chat_template: str | None = tokenizer_config.get("chat_template")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise _no_tokenizer(path)
        try:
            tokenizer = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise UserError(f"{tokenizer_file} cannot be read ({exc}); re-download it") from None
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        # Some models keep the chat template in its own file.
        template_file = path / "chat_template.jinja"
        if "chat_template" not in tokenizer_config and template_file.is_file():
            tokenizer_config["chat_template"] = template_file.read_text(encoding="utf-8")
        eos_text = _token_text(tokenizer_config.get("eos_token"))
        eos_ids = _config_eos_ids(path)
        if eos_text is not None and tokenizer.token_to_id(eos_text) is not None:
            eos_ids.add(tokenizer.token_to_id(eos_text))
        return cls(tokenizer, tokenizer_config, eos_ids)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` formatted with the model's chat template."""
        text = self.render_chat_template(messages, add_generation_prompt)
        # The template already writes any BOS token, so the post-processor must not add another.
        return self.encode(text, add_special_tokens=False)

    def render_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise UserError("this model's tokenizer_config.json has no chat_template; pass chat=False "
                            "(or --no-chat) to use the prompt as raw text")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=_token_text(self._config.get("bos_token")) or "",
                eos_token=_token_text(self._config.get("eos_token")) or "",
            )
        except TemplateError as exc:
            raise UserError(f"the chat template rejected the messages ({exc}); check the roles and order") from None

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)


class IdsOnlyTokenizer:
    """The tokenizer of a model directory without ``tokenizer.json``: the model still runs on token
    ids (``logits``, ``mtp_logits``, ``generate``/``stream`` on ids, whose chunks carry the ids and
    no text) and stops at the end-of-sequence ids of config.json and generation_config.json. Text
    or chat input gets the one-line error naming the missing file."""

    chat_template = None

    def __init__(self, path: Path):
        self.path = path
        self.eos_token_ids = _config_eos_ids(path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise _no_tokenizer(self.path)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        raise _no_tokenizer(self.path)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return ""  # no vocabulary to spell the ids with


def load_tokenizer(path: str | Path) -> Tokenizer | IdsOnlyTokenizer:
    """The model directory's tokenizer, or ``IdsOnlyTokenizer`` when it has no ``tokenizer.json``."""
    path = Path(path)
    return Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else IdsOnlyTokenizer(path)


def _no_tokenizer(path: Path) -> UserError:
    return UserError(f"{path} has no tokenizer.json; copy the model's tokenizer.json into it, or pass token ids")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces without ever emitting broken UTF-8.

    A byte-level token can end in the middle of a multi-byte character; decoding then
    yields U+FFFD. We hold such text back until a later token completes it. Decoding a
    short window (from the last emitted boundary) rather than the whole sequence keeps
    each step O(window) and lets tokenizers apply context such as leading-space rules.
    """

    def __init__(self, tokenizer: Tokenizer | IdsOnlyTokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # ids before this are already emitted

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self._ids.append(int(token_id))
        window = self._ids[self._prefix_offset:]
        emitted = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(window)
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return text[len(emitted):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (may contain U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(emitted):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    return data if isinstance(data, dict) else {}


def _token_text(token) -> str | None:
    """Special tokens appear as plain strings or as ``{"content": ...}`` objects."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _config_eos_ids(path: Path) -> set[int]:
    """The end-of-sequence ids named by generation_config.json and config.json. Chat models often
    name different ones there and in tokenizer_config.json; the tokenizer adds the union of all."""
    ids: set[int] = set()
    for source in (_read_json(path / "generation_config.json"), _read_json(path / "config.json")):
        value = source.get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return ids
