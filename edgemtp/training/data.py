"""Training data for MTP layers: plain text and chats whose assistant turns the trunk wrote.

The corpus directory has the layout of the team's shared corpus (see its SOURCES.md):

* ``tinystories_valid_head.txt`` — TinyStories, paragraphs separated by blank lines;
* ``topical_chat.jsonl`` — Topical-Chat, one conversation ``{"id", "turns": [{"text"}]}`` a line;
* ``gutenberg/*.txt`` — public-domain books.

Every file is optional except that at least one must be there. User requests for the
chat data come from Topical-Chat turns and from TinyStories openings; a seeded
random set of those conversations and stories is held out entirely (neither its
request nor its text is trained on) and becomes the held-out prompt list.

The corpus has no code, explanations or how-to questions, which is much of what people
ask a chat model. ``self_instruct_requests`` fills that gap without outside data: the
trunk writes user turns itself, sampled from its own chat template.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from edgemtp.errors import UserError

STORY_REQUESTS = (
    'Write a short story that begins with: "{opening}"',
    "Continue this story: {opening}",
    "Tell me a bedtime story that starts like this: {opening}",
)
# Openings of self-written requests. Empty ones leave the trunk its own idea of a user turn;
# the others steer it toward kinds of request the corpus lacks (code, explanations, lists).
SELF_INSTRUCT_OPENINGS = (
    "", "", "", "", "Write a Python function", "Write a function", "Write a program", "Explain", "What is",
    "What are", "How do I", "How can I", "Why", "Can you", "Give me", "Write a short", "Summarize", "List",
    "Write a SQL query", "Write a JavaScript", "Fix this code:", "def ", "Translate", "Compare",
    # Added for the fusion head's stage (models/README.md, stage 10): more code, questions and stories.
    "Write a Python class", "Write a C function", "Write a bash script", "Implement", "import ",
    "How does", "Who was", "Where is", "When did", "Tell me a story", "Write a story about", "Write a poem",
)
REQUEST_MAX_TOKENS = 96  # a self-written request longer than this is cut off, hence dropped
BOOK_PIECE_CHARS = 4000
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass
class Corpus:
    texts: list[str] = field(default_factory=list)  # plain documents for teacher forcing
    requests: list[str] = field(default_factory=list)  # user turns for trunk-written chats
    heldout: list[dict] = field(default_factory=list)  # {"id", "source", "prompt"}; never trained on
    files: list[str] = field(default_factory=list)  # corpus files actually read


def _stories(path: Path) -> list[str]:
    """TinyStories paragraphs regrouped into stories (a story starts with 'Once upon a time')."""
    stories: list[list[str]] = []
    for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if paragraph.startswith("Once upon a time") or not stories:
            stories.append([])
        stories[-1].append(paragraph)
    return ["\n\n".join(s) for s in stories]


def _conversations(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _opening(story: str) -> str:
    return _SENTENCE_END.split(story, maxsplit=1)[0]


def load_corpus(corpus_dir: str | Path, num_heldout: int = 60, seed: int = 0) -> Corpus:
    """Read the corpus and split off ``num_heldout`` prompts (2/3 dialogue, 1/3 stories)."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise UserError(f"{corpus_dir}: corpus directory not found; pass --data DIR (see models/README.md)")
    rng = random.Random(seed)
    corpus = Corpus()
    heldout_chats = num_heldout - num_heldout // 3

    chat_path = corpus_dir / "topical_chat.jsonl"
    if chat_path.is_file():
        corpus.files.append(chat_path.name)
        conversations = _conversations(chat_path)
        rng.shuffle(conversations)
        for conv in conversations[:heldout_chats]:
            corpus.heldout.append({"id": f"topical_chat:{conv['id']}", "source": "topical_chat", "prompt": conv["turns"][0]["text"]})
        for conv in conversations[heldout_chats:]:
            turns = [t["text"].strip() for t in conv["turns"] if t["text"].strip()]
            corpus.texts.append("\n".join(turns))
            # Every turn is something a person said in a chat, so each one is a request the
            # trunk may be given (held-out prompts are opening turns; most turns are remarks).
            corpus.requests += turns

    stories_path = corpus_dir / "tinystories_valid_head.txt"
    if stories_path.is_file():
        corpus.files.append(stories_path.name)
        stories = _stories(stories_path)
        rng.shuffle(stories)
        num_story_heldout = num_heldout - len(corpus.heldout)
        for j, story in enumerate(stories[:num_story_heldout]):
            prompt = STORY_REQUESTS[j % len(STORY_REQUESTS)].format(opening=_opening(story))
            corpus.heldout.append({"id": f"tinystories:{j}", "source": "tinystories", "prompt": prompt})
        for j, story in enumerate(stories[num_story_heldout:]):
            corpus.texts.append(story)
            corpus.requests.append(STORY_REQUESTS[j % len(STORY_REQUESTS)].format(opening=_opening(story)))

    for book in sorted((corpus_dir / "gutenberg").glob("*.txt")):
        corpus.files.append(f"gutenberg/{book.name}")
        text = book.read_text(encoding="utf-8", errors="replace")
        corpus.texts += [text[k : k + BOOK_PIECE_CHARS] for k in range(0, len(text), BOOK_PIECE_CHARS)]

    if not corpus.texts or not corpus.requests:
        raise UserError(
            f"{corpus_dir}: found no usable corpus files (need topical_chat.jsonl or tinystories_valid_head.txt); "
            "pass the shared corpus directory with --data"
        )
    if len(corpus.heldout) < num_heldout:
        raise UserError(f"{corpus_dir}: too little dialogue/story data to hold out {num_heldout} prompts; use a larger corpus")
    corpus.requests = list(dict.fromkeys(corpus.requests))  # "Hi!" and the like, once
    rng.shuffle(corpus.requests)
    return corpus


def heldout_general() -> list[dict]:
    """Held-out code and question-answering prompts (``heldout_general.jsonl``,
    ``{"id", "source": "code"|"qa", "prompt"}``): the kinds the corpus lacks, written for
    evaluation only; self-written requests equal to one of them are dropped."""
    text = resources.files("edgemtp.training").joinpath("heldout_general.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def chat_prompt_ids(tokenizer, request: str) -> list[int]:
    """Token ids of a one-turn chat in the trunk's template, ending with the assistant header."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def text_chunks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """All documents tokenized, joined with EOS and cut into (N, seq_len) windows."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"the corpus holds only {len(ids)} tokens, fewer than one --seq-len window ({seq_len}); lower --seq-len")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def generate_replies(trunk, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int, temperature: float, eos_id: int, pad_id: int) -> list[list[int]]:
    """Each prompt followed by the trunk's own reply (up to and including EOS).

    Prompts are batched by length (left-padded) so little compute goes to padding.
    ``temperature == 0`` is greedy, which is what speculative decoding drafts for.
    """
    device = next(trunk.parameters()).device
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[k]) for k in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, k in enumerate(rows):
            input_ids[r, width - len(prompts[k]) :] = torch.tensor(prompts[k])
            mask[r, width - len(prompts[k]) :] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        out = trunk.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            **sampling,
        ).cpu()
        for r, k in enumerate(rows):
            reply = out[r, width:].tolist()
            if eos_id in reply:
                reply = reply[: reply.index(eos_id) + 1]
            results[k] = prompts[k] + reply
    return results


def self_instruct_requests(trunk, tokenizer, count: int, *, temperature: float, max_new_tokens: int, batch_size: int,
                           eos_id: int, pad_id: int, seed: int) -> list[str]:
    """Up to ``count`` distinct user requests written by the trunk itself.

    The trunk's chat template up to the user's text, plus an opening from
    ``SELF_INSTRUCT_OPENINGS``, is sampled until the turn ends; turns cut off by
    ``max_new_tokens`` are dropped, as are duplicates.
    """
    marker = "\x00"
    template = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    head = template[: template.index(marker)]
    rng = random.Random(seed)
    openings = [rng.choice(SELF_INSTRUCT_OPENINGS) for _ in range(count)]
    prompts = [tokenizer(head + opening, add_special_tokens=False)["input_ids"] for opening in openings]
    written = generate_replies(trunk, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               temperature=temperature, eos_id=eos_id, pad_id=pad_id)
    requests: dict[str, None] = {}  # ordered set
    for opening, prompt, turn in zip(openings, prompts, written):
        tail = turn[len(prompt):]
        if tail and tail[-1] == eos_id:
            text = (opening + tokenizer.decode(tail[:-1])).strip()
            if text:
                requests[text] = None
    return list(requests)
