"""The runtime tokenizer agrees with transformers and streams valid UTF-8."""

from __future__ import annotations

import json

import pytest

from edgemtp.errors import UserError
from edgemtp.tokenizer import Tokenizer

TEXTS = ["Hello world, how are you?", "  leading spaces\nand\ttabs", "naïve café — 世界 🙂!", ""]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "Déjà vu 🙂"},
]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, add_generation_prompt):
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    expected = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == expected["input_ids"]
    # Special tokens are single ids, not spelled out byte by byte.
    assert ids.count(tokenizer.token_to_id("<|im_start|>")) == len(MESSAGES) + add_generation_prompt


def test_eos_ids_collect_every_source(model_dir, tmp_path, tokenizer):
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.eos_token_ids == {im_end}
    copy = tmp_path / "m"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, 0]}))
    assert Tokenizer.from_dir(copy).eos_token_ids == {im_end, 0}


def test_streaming_detokenizer_never_emits_broken_utf8(tokenizer):
    text = "Emoji 🙂🙃 and 世界, then naïve words."
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.add(token) for token in ids]
    pieces.append(detokenizer.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text
    # Text is held back only while a character is incomplete, so most steps emit something.
    assert sum(1 for piece in pieces if piece) >= len(text.split())


def test_streaming_flush_returns_an_unfinished_character(tokenizer):
    ids = tokenizer.encode("a🙂")
    detokenizer = tokenizer.detokenizer()
    streamed = "".join(detokenizer.add(token) for token in ids[:-1])
    assert streamed == "a"
    assert detokenizer.flush() == "\ufffd"


def test_missing_files_and_template(model_dir, tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    tokenizer = Tokenizer.from_dir(tmp_path)  # no tokenizer_config.json: usable, but no chat template
    assert tokenizer.encode("hi") and tokenizer.eos_token_ids == set()
    with pytest.raises(UserError, match="no chat_template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
