"""Draft vocabulary: the tokens the MTP draft head computes logits for.

Most of an MTP draft step on a small model is its output head (vocabulary x hidden). The
draft head therefore scores only the N most frequent tokens of a corpus; verification stays
over the full vocabulary, so the output is unchanged (a draft outside the N tokens is never
proposed, which costs acceptance only when the trunk wanted such a token).

The counts come from a text corpus, from chats the trunk wrote itself (the ``--chats-file`` of
``edgemtp train-mtp``), or both. The trunk's own chats are the better source: the head drafts
what the trunk writes, and a corpus of stories and dialogue misses most of a chat model's code
and explanations (on the default model, the corpus's 95% vocabulary covers 76% of the trunk's
replies to the bench prompts; about as many tokens counted on its chats cover 94%).

The vocabulary is stored with the model as ``draft_vocab.safetensors``: one int32 tensor
``token_ids`` (sorted, unique), and metadata saying how it was chosen (size, coverage, files
counted). N is the smallest count whose most frequent tokens cover a target share of the
counted tokens; the tokenizer's special tokens and the chat template's tokens are always kept,
since the model writes them whatever the counts say.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemtp.errors import UserError

FILE_NAME = "draft_vocab.safetensors"
TENSOR = "token_ids"
# Share of the corpus's tokens the kept tokens cover by default. On SmolLM2's tokenizer and the
# shared corpus 0.95 keeps 7,976 of 49,152 tokens.
DEFAULT_COVERAGE = 0.95
COVERAGE_STEPS = (0.9, 0.95, 0.98, 0.99, 0.999)  # what `edgemtp draft-vocab` reports, to help choose
# The corpus layout of edgemtp/training/data.py.
CHAT_FILE = "topical_chat.jsonl"
STORIES_FILE = "tinystories_valid_head.txt"
BOOKS_DIR = "gutenberg"
CHAT_TOKENS = "tokens"  # the token tensor of a `train-mtp --chats-file` file
# A conversation that exercises the chat template: its tokens are always kept.
SAMPLE_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Hi"}]
RECREATE = "re-create it with `edgemtp draft-vocab`"


@dataclass
class TokenCounts:
    counts: np.ndarray  # int64 (vocab_size,): occurrences of each token id in the corpus
    files: list[str]  # corpus files counted, relative to the corpus directory

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def by_frequency(self) -> np.ndarray:
        """Token ids, most frequent first (ties: lower id first)."""
        return np.argsort(-self.counts, kind="stable")

    def coverage(self, ids: np.ndarray) -> float:
        """Share of the corpus's tokens that are among ``ids``."""
        return float(self.counts[ids].sum() / max(self.total, 1))

    def size_for(self, coverage: float) -> int:
        """The smallest N whose N most frequent tokens cover ``coverage`` of the corpus."""
        covered = np.cumsum(self.counts[self.by_frequency()]) / max(self.total, 1)
        # A small tolerance so that coverage 1.0 stops at the last token seen, despite rounding.
        return int(min(np.searchsorted(covered, coverage - 1e-12) + 1, len(self.counts)))


# --- counting ----------------------------------------------------------------------------------


def corpus_files(corpus_dir: Path) -> list[Path]:
    """The corpus files present, in the layout of edgemtp/training/data.py."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise UserError(f"{corpus_dir}: corpus directory not found; pass --data DIR (the shared training corpus)")
    files = [corpus_dir / name for name in (CHAT_FILE, STORIES_FILE) if (corpus_dir / name).is_file()]
    files += sorted((corpus_dir / BOOKS_DIR).glob("*.txt"))
    if not files:
        raise UserError(f"{corpus_dir}: no {CHAT_FILE}, {STORIES_FILE} or {BOOKS_DIR}/*.txt found; "
                        "pass the shared training corpus with --data")
    return files


def _documents(path: Path) -> Iterator[str]:
    """A corpus file's text in pieces: conversations (their turns joined as training does), or
    paragraphs of plain text (splitting at blank lines never cuts a word)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        yield from (paragraph for paragraph in text.split("\n\n") if paragraph.strip())
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield "\n".join(turn["text"] for turn in json.loads(line)["turns"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number} is not a conversation {{\"turns\": [{{\"text\"}}]}}; "
                            "fix the line or remove the file from the corpus") from None


def _token_ids(path: Path, name: str, fix: str) -> np.ndarray | None:
    """Tensor ``name`` of a safetensors file, or None when the file has none; ``fix`` ends the
    one-line error for an unreadable file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor(name) if name in f.keys() else None
    except Exception as exc:  # safetensors raises its own error types on bad files
        raise UserError(f"{path} is not a readable safetensors file ({exc}); {fix}") from None


def count_chat_tokens(chats_file: Path, vocab_size: int) -> TokenCounts:
    """Count the tokens of trunk-written chats: the ``tokens`` tensor (every chat's token ids,
    concatenated) of a file written by ``edgemtp train-mtp --chats-file``."""
    chats_file = Path(chats_file)
    ids = _token_ids(chats_file, CHAT_TOKENS, "pass a `train-mtp --chats-file` file")
    if ids is None or ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise UserError(f"{chats_file} has no 1-D integer {CHAT_TOKENS!r} tensor; pass a `train-mtp --chats-file` file")
    if ids.size and ids.max() >= vocab_size:
        raise UserError(f"{chats_file} holds token id {ids.max()}, past the model's vocabulary of {vocab_size}; "
                        "pass the chats of this model's trunk")
    return TokenCounts(np.bincount(ids.astype(np.int64), minlength=vocab_size), [chats_file.name])


def count_tokens(tokenizer, vocab_size: int, corpus_dir: Path,
                 progress: Callable[[int], None] = lambda n: None) -> TokenCounts:
    """Count every token id of the corpus, encoded as plain text (no special tokens added).

    ``progress(n)`` is called with the bytes of each file once it is counted.
    """
    counts = np.zeros(vocab_size, np.int64)
    files = corpus_files(corpus_dir)
    for path in files:
        ids = np.fromiter((token for document in _documents(path)
                           for token in tokenizer.encode(document, add_special_tokens=False)), np.int64)
        if ids.size and ids.max() >= vocab_size:
            raise UserError(f"the tokenizer produced token id {ids.max()}, past the model's vocabulary of {vocab_size}; "
                            "pass the model the tokenizer belongs to")
        counts += np.bincount(ids, minlength=vocab_size)
        progress(path.stat().st_size)
    return TokenCounts(counts, [str(path.relative_to(corpus_dir)) for path in files])


def always_kept(tokenizer, tokenizer_dir: Path) -> set[int]:
    """Ids the draft vocabulary keeps whatever the corpus says: the tokenizer's special tokens,
    the end-of-sequence ids and every token the chat template writes."""
    kept = set(tokenizer.eos_token_ids)
    added = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    kept |= {token["id"] for token in added if token.get("special")}
    if tokenizer.chat_template:
        kept |= set(tokenizer.apply_chat_template(SAMPLE_CHAT))
    return kept


def choose(counts: TokenCounts, keep: set[int], coverage: float | None = None,
           size: int | None = None) -> np.ndarray:
    """The sorted draft vocabulary: the ``size`` most frequent tokens (or as many as cover
    ``coverage`` of the corpus) plus ``keep``."""
    if size is None:
        size = counts.size_for(DEFAULT_COVERAGE if coverage is None else coverage)
    frequent = counts.by_frequency()[:size]
    return np.union1d(frequent, np.fromiter(keep, np.int64, len(keep))).astype(np.int32)


@contextmanager
def model_tokenizer(model: str | Path) -> Iterator[tuple[Path, int]]:
    """``(directory holding tokenizer.json, vocabulary size)`` of a model directory (Hugging Face,
    MLX or ONNX export) or a GGUF file (whose tokenizer is written to a temporary directory)."""
    from edgemtp.config import load_config

    path = Path(model)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from edgemtp.converters.gguf_source import GGUFCheckpoint

        ckpt = GGUFCheckpoint.open(path)
        with tempfile.TemporaryDirectory(prefix="edgemtp-tokenizer-") as tmp:
            ckpt.write_tokenizer(tmp)
            yield Path(tmp), int(ckpt.config["vocab_size"])
        return
    if not path.is_dir():
        raise UserError(f"{model} is neither a model directory nor a .gguf file; pass the model whose tokenizer to use")
    yield path, int(load_config(path)["vocab_size"])


def make_draft_vocab(model: str | Path, out_file: str | Path, corpus_dir: str | Path | None = None,
                     chats_file: str | Path | None = None, coverage: float | None = None,
                     size: int | None = None, show_progress: bool = True) -> tuple[np.ndarray, TokenCounts]:
    """Count a corpus with ``model``'s tokenizer and/or the tokens of trunk-written chats,
    choose the draft vocabulary (by ``coverage``, default ``DEFAULT_COVERAGE``, or by ``size``)
    and write it to ``out_file``."""
    from edgemtp.converters.convert import byte_progress
    from edgemtp.tokenizer import Tokenizer

    if coverage is not None and size is not None:
        raise UserError("pass either --coverage or --size, not both")
    if coverage is not None and not 0 < coverage <= 1:
        raise UserError(f"--coverage must be in (0, 1], got {coverage}")
    if corpus_dir is None and chats_file is None:
        raise UserError("nothing to count; pass --data CORPUS_DIR, --chats FILE or both")
    files = corpus_files(Path(corpus_dir)) if corpus_dir is not None else []
    with model_tokenizer(model) as (tokenizer_dir, vocab_size):
        if size is not None and not 1 <= size <= vocab_size:
            raise UserError(f"--size must be between 1 and the vocabulary size {vocab_size}, got {size}")
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
        counts = TokenCounts(np.zeros(vocab_size, np.int64), [])
        if chats_file is not None:
            counts = count_chat_tokens(Path(chats_file), vocab_size)
        if files:
            with byte_progress(sum(f.stat().st_size for f in files), "counting tokens", show_progress) as advance:
                corpus = count_tokens(tokenizer, vocab_size, Path(corpus_dir), advance)
            counts = TokenCounts(counts.counts + corpus.counts, counts.files + corpus.files)
        ids = choose(counts, always_kept(tokenizer, tokenizer_dir), coverage, size)
    save_draft_vocab(Path(out_file), ids, counts)
    return ids, counts


# --- the file --------------------------------------------------------------------------------------


def save_draft_vocab(path: Path, ids: np.ndarray, counts: TokenCounts) -> Path:
    """Write ``ids`` with how they were chosen; written to a temporary name, then renamed.

    edgemtp's own writer keeps the metadata in this order (safetensors' shuffles it), so the
    same corpus and tokenizer always give the same bytes, hence the same cache keys.
    """
    from edgemtp.safetensors_stream import TensorSpec, write_safetensors

    path = Path(path)
    ids = np.ascontiguousarray(ids, np.int32)
    metadata = {"size": str(len(ids)), "coverage": f"{counts.coverage(ids):.6f}",
                "corpus_tokens": str(counts.total), "corpus_files": json.dumps(counts.files)}
    partial = path.with_name(path.name + ".partial")
    write_safetensors(partial, [TensorSpec(TENSOR, ids.dtype, ids.shape, lambda: iter([ids]))], metadata)
    os.replace(partial, path)
    return path


def read_draft_vocab(path: Path, vocab_size: int) -> np.ndarray:
    """The token ids of a draft vocabulary file, checked against a vocabulary of ``vocab_size``."""
    path = Path(path)
    ids = _token_ids(path, TENSOR, RECREATE)
    if ids is None:
        raise UserError(f"{path} has no {TENSOR!r} tensor; {RECREATE}")
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise UserError(f"{path}: {TENSOR} must be a non-empty 1-D integer tensor; {RECREATE}")
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.size:
        raise UserError(f"{path}: token id {int(outside[0])} is outside the model's vocabulary (0..{vocab_size - 1}); "
                        f"{RECREATE} for this model")
    if np.any(np.diff(ids) <= 0):
        raise UserError(f"{path}: {TENSOR} must be sorted and unique; {RECREATE}")
    return ids.astype(np.int64)


def load_draft_vocab(model_dir: Path, vocab_size: int) -> np.ndarray | None:
    """The draft vocabulary stored in ``model_dir``, or None when it has none."""
    path = Path(model_dir) / FILE_NAME
    return read_draft_vocab(path, vocab_size) if path.is_file() else None


def scatter_logits(logits: np.ndarray, ids: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """Draft-vocabulary logits ``(n, N)`` as full-vocabulary logits ``(n, V)``: -inf elsewhere,
    so the draft distribution is 0 outside the draft vocabulary and rejection sampling stays exact.
    ``ids`` None (a full-vocabulary head): ``logits`` as they are."""
    if ids is None:
        return logits
    full = np.full((logits.shape[0], vocab_size), -np.inf, np.float32)
    full[:, ids] = logits
    return full
