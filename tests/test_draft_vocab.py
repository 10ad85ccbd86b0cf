"""Draft vocabulary: choosing the MTP head's tokens from a corpus, storing them with the model,
and both backends scoring only those tokens while decoding stays exactly the target's."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import edgemtp
from edgemtp import draft_vocab
from edgemtp.converters.convert import convert
from edgemtp.converters.onnx_export import export_onnx
from edgemtp.errors import UserError
from edgemtp.tokenizer import Tokenizer

EDGEMTP = shutil.which("edgemtp")
VOCAB = 384  # the factory's vocabulary size


def run_cli(*args) -> subprocess.CompletedProcess:
    assert EDGEMTP, "the edgemtp console script is not installed (pip install -e .)"
    return subprocess.run([EDGEMTP, *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def _write_ids(path, ids) -> None:
    save_file({"token_ids": np.asarray(ids, np.int32)}, str(path))


def _kept_ids() -> np.ndarray:
    """Half of the vocabulary, at random: plenty of the trunk's tokens fall outside it."""
    return np.sort(np.random.default_rng(3).choice(VOCAB, VOCAB // 2, replace=False))


CHAT_TURNS = ["Do you like the sea?", "Yes, the waves are wide and the water is deep."]
STORY_PARAGRAPHS = ["Once upon a time a dog ran after the ball.", "The old man read his newspaper in the park."]
BOOK_PARAGRAPH = "Computers store text as bytes; a tokenizer splits them."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus directory in the training layout: 20 chats, 10 two-paragraph stories, one book."""
    root = tmp_path_factory.mktemp("corpus")
    chat = {"id": "1", "turns": [{"agent": "a", "text": text} for text in CHAT_TURNS]}
    (root / "topical_chat.jsonl").write_text((json.dumps(chat) + "\n") * 20)
    (root / "tinystories_valid_head.txt").write_text("".join(p + "\n\n" for p in STORY_PARAGRAPHS) * 10)
    (root / "gutenberg").mkdir()
    (root / "gutenberg" / "book.txt").write_text((BOOK_PARAGRAPH + "\n\n") * 5)
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


# --- counting and choosing --------------------------------------------------------------------------------


def test_counts_every_token_of_every_corpus_file(corpus, tokenizer_dir):
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    counts = draft_vocab.count_tokens(tokenizer, VOCAB, corpus)
    assert counts.files == ["topical_chat.jsonl", "tinystories_valid_head.txt", "gutenberg/book.txt"]
    # A conversation is counted as its turns joined by newlines (as training reads it), plain
    # text paragraph by paragraph.
    pieces = ["\n".join(CHAT_TURNS)] * 20 + STORY_PARAGRAPHS * 10 + [BOOK_PARAGRAPH] * 5
    expected = sum(np.bincount(tokenizer.encode(piece, add_special_tokens=False), minlength=VOCAB) for piece in pieces)
    assert np.array_equal(counts.counts, expected) and counts.total == expected.sum()


@pytest.mark.parametrize("coverage", [0.5, 0.8, 0.95, 1.0])
def test_the_chosen_tokens_are_the_fewest_that_cover_the_target(corpus, tokenizer_dir, coverage):
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    counts = draft_vocab.count_tokens(tokenizer, VOCAB, corpus)
    size = counts.size_for(coverage)
    frequent = counts.by_frequency()
    assert counts.coverage(frequent[:size]) >= coverage - 1e-9
    assert counts.coverage(frequent[: size - 1]) < coverage  # one fewer would not do
    ids = draft_vocab.choose(counts, set(), coverage=coverage)
    assert len(ids) == size and np.all(np.diff(ids) > 0)


def test_special_and_chat_template_tokens_are_always_kept(corpus, tokenizer_dir):
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    counts = draft_vocab.count_tokens(tokenizer, VOCAB, corpus)
    keep = draft_vocab.always_kept(tokenizer, tokenizer_dir)
    special = {tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert special <= keep and tokenizer.eos_token_ids <= keep
    assert set(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])) <= keep
    assert all(counts.counts[t] == 0 for t in special)  # the plain-text corpus never writes them
    ids = draft_vocab.choose(counts, keep, size=10)
    assert keep <= set(ids.tolist()) and set(counts.by_frequency()[:10].tolist()) <= set(ids.tolist())


def test_command_writes_a_valid_file_with_its_provenance(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "draft_vocab.safetensors"
    result = run_cli("draft-vocab", tokenizer_dir, out, "--data", corpus, "--coverage", "0.9")
    assert result.returncode == 0, result.stderr
    ids = draft_vocab.read_draft_vocab(out, VOCAB)
    with safe_open(str(out), framework="numpy") as f:
        metadata = f.metadata()
    assert int(metadata["size"]) == len(ids) and float(metadata["coverage"]) >= 0.9
    assert json.loads(metadata["corpus_files"])[0] == "topical_chat.jsonl"
    assert f"{len(ids):,} of {VOCAB:,} tokens" in result.stdout


def _chats_file(path, chats) -> None:
    """A file in the layout `train-mtp --chats-file` writes: every chat's ids concatenated, and their lengths."""
    save_file({"tokens": np.concatenate(chats).astype(np.int32), "lengths": np.array([len(c) for c in chats])}, str(path))


def test_trunk_written_chats_are_counted_alone_or_with_the_corpus(corpus, tokenizer_dir, tmp_path):
    chats = tmp_path / "chats.safetensors"
    _chats_file(chats, [np.array([5, 7, 7, 9]), np.array([7, 300])])
    only = tmp_path / "only.safetensors"
    result = run_cli("draft-vocab", tokenizer_dir, only, "--chats", chats, "--coverage", "0.5")
    assert result.returncode == 0, result.stderr
    # Token 7 alone covers half of the 6 counted tokens; the special and chat-template tokens join it.
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    assert set(draft_vocab.read_draft_vocab(only, VOCAB).tolist()) == {7} | draft_vocab.always_kept(tokenizer, tokenizer_dir)

    both_ids, both = draft_vocab.make_draft_vocab(tokenizer_dir, tmp_path / "both.safetensors", corpus, chats, show_progress=False)
    corpus_counts = draft_vocab.count_tokens(tokenizer, VOCAB, corpus).counts
    assert np.array_equal(both.counts, corpus_counts + np.bincount([5, 7, 7, 9, 7, 300], minlength=VOCAB))
    assert both.files[0] == "chats.safetensors" and "topical_chat.jsonl" in both.files


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, fragment", [("missing", "nothing to count"), ("garbage", "not a readable safetensors"),
                                            ("no tokens", "no 1-D integer 'tokens'"), ("past vocabulary", "past the model's vocabulary")])
def test_draft_vocab_refuses_bad_chats(tokenizer_dir, tmp_path, case, fragment):
    chats = tmp_path / "chats.safetensors"
    if case == "garbage":
        chats.write_bytes(b"not safetensors")
    elif case == "no tokens":
        save_file({"ids": np.arange(4, dtype=np.int32)}, str(chats))
    elif case == "past vocabulary":
        _chats_file(chats, [np.array([1, VOCAB])])
    args = [] if case == "missing" else ["--chats", chats]
    result = run_cli("draft-vocab", tokenizer_dir, tmp_path / "v.safetensors", *args)
    assert_user_error(result, fragment)
    assert not (tmp_path / "v.safetensors").exists()


@pytest.mark.parametrize(("ids", "fragment"), [([1, 2, VOCAB + 5], f"token id {VOCAB + 5} is outside"),
                                               ([5, 3, 9], "sorted and unique"), ([], "non-empty")])
def test_convert_refuses_a_bad_draft_vocabulary(tiny_checkpoint, tmp_path, ids, fragment):
    bad = tmp_path / "bad.safetensors"
    _write_ids(bad, ids)
    result = run_cli("convert", tiny_checkpoint("llama"), tmp_path / "out", "--to", "onnx", "--draft-vocab", bad)
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_a_bad_file_in_a_model_directory_stops_loading(tiny_checkpoint, tmp_path, backend):
    good = tmp_path / "vocab.safetensors"
    _write_ids(good, _kept_ids())
    out = convert(tiny_checkpoint("llama"), tmp_path / backend, to=backend, bits=8, show_progress=False,
                  draft_vocab=good)
    _write_ids(out / draft_vocab.FILE_NAME, [0, 1, VOCAB])  # damaged after conversion
    result = run_cli("generate", "--model", out, "--backend", backend, "-p", "Hello", "-m", "4")
    assert_user_error(result, f"token id {VOCAB} is outside")


def test_convert_refuses_a_file_that_is_not_safetensors(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    result = run_cli("convert", tiny_checkpoint("llama"), tmp_path / "out", "--draft-vocab", bad)
    assert_user_error(result, "not a readable safetensors file")


@pytest.mark.parametrize("flags", [["--coverage", "1.5"], ["--size", "0"], ["--coverage", "0.9", "--size", "10"]])
def test_draft_vocab_command_refuses_bad_options(corpus, tokenizer_dir, tmp_path, flags):
    result = run_cli("draft-vocab", tokenizer_dir, tmp_path / "v.safetensors", "--data", corpus, *flags)
    assert_user_error(result, "--")


def test_corpus_without_any_known_file(tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match="topical_chat.jsonl"):
        draft_vocab.make_draft_vocab(tokenizer_dir, tmp_path / "v.safetensors", tmp_path, show_progress=False)


# --- both backends: pruned MTP logits, lossless decoding ---------------------------------------------------


def _checkpoint(tiny_checkpoint, tmp_path, head: str):
    """The tiny llama (tied embeddings) with its MTP layer's own head, or without it so that the
    MTP layer projects with the trunk's head (as the default model's layers do)."""
    source = tiny_checkpoint("llama", mtp_layers=1, confident=True)
    if head == "own":
        return source
    path = shutil.copytree(source, tmp_path / "trunk_head")
    weights = load_file(path / "model.safetensors")
    save_file({name: value for name, value in weights.items() if not name.endswith("shared_head.head.weight")},
              str(path / "model.safetensors"))
    return path


def _pair(kind: str, source, tmp_path, vocab_file):
    """(model whose MTP head scores the draft vocabulary, the same model with the full head)."""
    if kind == "onnx-8bit":
        pruned = export_onnx(source, tmp_path / "pruned", bits=8, draft_vocab=vocab_file)
        full = export_onnx(source, tmp_path / "full", bits=8)
        return edgemtp.load(pruned, backend="onnx"), edgemtp.load(full, backend="onnx")
    bits = {"mlx-float": 16, "mlx-4bit": 4}[kind]
    out = convert(source, tmp_path / "mlx", to="mlx", bits=bits, mtp_bits=bits, dtype="float32",
                  show_progress=False, draft_vocab=vocab_file)
    return edgemtp.load(out, backend="mlx"), edgemtp.load(out, backend="mlx", draft_vocab=False)


CASES = [(kind, head) for kind in ("onnx-8bit", "mlx-float", "mlx-4bit") for head in ("own", "trunk")]


@pytest.mark.parametrize(("kind", "head"), CASES)
def test_mtp_logits_are_the_full_heads_on_kept_tokens_and_minus_infinity_elsewhere(tiny_checkpoint, tmp_path,
                                                                                     kind, head):
    kept = _kept_ids()
    vocab_file = tmp_path / "vocab.safetensors"
    _write_ids(vocab_file, kept)
    pruned, full = _pair(kind, _checkpoint(tiny_checkpoint, tmp_path, head), tmp_path, vocab_file)
    dropped = np.setdiff1d(np.arange(VOCAB), kept)
    ids = np.random.default_rng(7).integers(0, VOCAB, 40).tolist()
    for depth in (1, 2):  # depth 2 reuses the one MTP layer with its own cache
        expected = full.mtp_logits(ids, depth)
        logits = pruned.mtp_logits(ids, depth)
        assert logits.shape == expected.shape == (len(ids) - depth, VOCAB)
        assert np.isneginf(logits[:, dropped]).all()
        np.testing.assert_allclose(logits[:, kept], expected[:, kept], rtol=0, atol=1e-5 * np.abs(expected).max())
    assert pruned.backend.draft_ids.tolist() == kept.tolist() and full.backend.draft_ids is None
    # The adaptive policy caches measured step costs: the cheaper pruned head gets its own entry.
    from edgemtp.engine.tuning import cost_key

    assert pruned.backend.config == full.backend.config
    assert cost_key(pruned.backend, "mtp") != cost_key(full.backend, "mtp")


@pytest.mark.parametrize(("kind", "head"), [("onnx-8bit", "trunk"), ("mlx-4bit", "trunk"), ("mlx-float", "own")])
def test_greedy_mtp_decoding_equals_plain_decoding(tiny_checkpoint, tmp_path, kind, head):
    """The factory's confident model keeps writing the prompt's last token, and its MTP layer
    drafts it: accepted when that token is in the draft vocabulary, never drafted when not."""
    kept = _kept_ids()
    vocab_file = tmp_path / "vocab.safetensors"
    _write_ids(vocab_file, kept)
    pruned, full = _pair(kind, _checkpoint(tiny_checkpoint, tmp_path, head), tmp_path, vocab_file)
    dropped = np.setdiff1d(np.arange(VOCAB), kept)
    accepted = {}
    for last in (int(kept[50]), int(dropped[50])):
        prompt = [5, 17, 40, last]
        plain = pruned.generate(prompt, max_tokens=32, spec="none", chat=False)
        for name, model in (("pruned", pruned), ("full", full)):
            spec = model.generate(prompt, max_tokens=32, spec="mtp", num_draft=3, chat=False)
            assert spec.tokens == plain.tokens
            accepted[name, last in kept] = spec.stats.accepted
    assert accepted["pruned", True] == accepted["full", True] > 0
    assert accepted["pruned", False] == 0 < accepted["full", False]


# --- storage with the model -------------------------------------------------------------------------------------


def _logits_width(model: onnx.ModelProto) -> int:
    output = next(output for output in model.graph.output if output.name == "logits")
    return output.type.tensor_type.shape.dim[2].dim_value


def test_onnx_export_stores_the_vocabulary_and_quantizes_the_smaller_head(tiny_checkpoint, tmp_path):
    kept = _kept_ids()
    vocab_file = tmp_path / "vocab.safetensors"
    _write_ids(vocab_file, kept)
    out = convert(tiny_checkpoint("llama"), tmp_path / "onnx", to="onnx", bits=8, show_progress=False,
                  draft_vocab=vocab_file)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["draft_vocab"] == {"file": draft_vocab.FILE_NAME, "size": len(kept)}
    assert draft_vocab.read_draft_vocab(out / draft_vocab.FILE_NAME, VOCAB).tolist() == kept.tolist()
    mtp = onnx.load(str(out / "mtp0" / "model.onnx"), load_external_data=False)
    assert _logits_width(mtp) == len(kept)
    head = next(node for node in mtp.graph.node if node.name.startswith("mtp.head"))
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["N"] == len(kept)
    trunk = onnx.load(str(out / "trunk" / "model.onnx"), load_external_data=False)
    assert _logits_width(trunk) == VOCAB  # verification stays over the full vocabulary


def test_convert_takes_the_file_beside_the_mtp_weights_unless_told_none(tiny_checkpoint, tmp_path):
    """How the default model is built: a GGUF-like source plus MTP weights kept in their own
    file, with the draft vocabulary beside them."""
    source = tiny_checkpoint("llama", mtp_layers=0)
    with_mtp = tiny_checkpoint("llama", mtp_layers=1)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    weights = load_file(with_mtp / "model.safetensors")
    save_file({name: value for name, value in weights.items() if name.startswith("model.layers.2.")},
              str(shipped / "mtp.safetensors"))
    _write_ids(shipped / draft_vocab.FILE_NAME, _kept_ids())
    found = convert(source, tmp_path / "found", to="mlx", bits=8, show_progress=False,
                    mtp_file=shipped / "mtp.safetensors")
    assert (found / draft_vocab.FILE_NAME).read_bytes() == (shipped / draft_vocab.FILE_NAME).read_bytes()
    none = convert(source, tmp_path / "none", to="mlx", bits=8, show_progress=False,
                   mtp_file=shipped / "mtp.safetensors", draft_vocab="none")
    assert not (none / draft_vocab.FILE_NAME).exists()


def test_a_checkpoint_directory_can_hold_its_draft_vocabulary(tiny_checkpoint, tmp_path):
    source = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "src")
    _write_ids(source / draft_vocab.FILE_NAME, _kept_ids())
    assert edgemtp.load(source, backend="mlx").backend.draft_ids.tolist() == _kept_ids().tolist()
    out = convert(source, tmp_path / "mlx", to="mlx", bits=8, show_progress=False)
    assert edgemtp.load(out, backend="mlx").backend.draft_ids.tolist() == _kept_ids().tolist()
    # The ONNX backend converts a checkpoint directory on first use, pruning its MTP head too.
    assert edgemtp.load(source, backend="onnx", bits=8).backend.draft_ids.tolist() == _kept_ids().tolist()


def test_a_model_without_mtp_layers_refuses_a_draft_vocabulary(tiny_checkpoint, tmp_path):
    vocab_file = tmp_path / "vocab.safetensors"
    _write_ids(vocab_file, _kept_ids())
    result = run_cli("convert", tiny_checkpoint("llama", mtp_layers=0), tmp_path / "out", "--draft-vocab", vocab_file)
    assert_user_error(result, "no MTP layers")


def test_default_model_has_a_separate_full_vocabulary_conversion(monkeypatch, tmp_path):
    from edgemtp import default_model

    calls = []

    def fake_convert(src, out, **options):
        calls.append(options)
        return out

    monkeypatch.setenv("EDGEMTP_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "verified_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr("edgemtp.converters.convert.convert", fake_convert)
    pruned = default_model.default_model_path("onnx", show_progress=False)
    full = default_model.default_model_path("onnx", show_progress=False, draft_vocab=False)
    assert pruned != full
    assert calls[0]["draft_vocab"] == default_model.draft_vocab_path() and calls[1]["draft_vocab"] == "none"
    assert draft_vocab.read_draft_vocab(default_model.draft_vocab_path(), 49152).size > 1000


def test_a_new_default_conversion_removes_the_ones_it_supersedes(monkeypatch, tmp_path):
    """Only conversions of the same backend, bits and head kind go: older weights or versions."""
    from edgemtp import default_model

    def fake_convert(src, out, **options):
        out.mkdir()
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setenv("EDGEMTP_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "verified_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr("edgemtp.converters.convert.convert", fake_convert)
    root = tmp_path / "default"
    older = ["onnx-8bit-b179c9523d0e-aaaaaaaaaaaa-bbbbbbbbbbbb-v0.1.0", "onnx-8bit-b179c9523d0e-5daeb91380f3-v0.1.0"]
    kept = ["onnx-8bit-b179c9523d0e-aaaaaaaaaaaa-fullvocab-v0.1.0", "onnx-4bit-b179c9523d0e-aaaaaaaaaaaa-bbbbbbbbbbbb-v0.1.0",
            "mlx-8bit-b179c9523d0e-aaaaaaaaaaaa-bbbbbbbbbbbb-v0.1.0",
            "onnx-8bit-b179c9523d0e-aaaaaaaaaaaa-cccccccccccc-v0.1.0.partial"]  # another process converting
    for name in older + kept:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    current = default_model.default_model_path("onnx", show_progress=False)
    assert sorted(path.name for path in root.iterdir()) == sorted(kept + [current.name])
    # Reusing a conversion removes nothing.
    assert default_model.default_model_path("onnx", show_progress=False) == current
    assert len(list(root.iterdir())) == len(kept) + 1


# --- bench: with and without the draft vocabulary ------------------------------------------------------------


def test_bench_compares_mtp_drafting_with_and_without_the_draft_vocabulary(tiny_checkpoint, tmp_path, monkeypatch):
    from edgemtp.bench import figures, report, runner

    monkeypatch.setenv("EDGEMTP_CACHE", str(tmp_path / "cache"))  # the auto policy caches step costs there
    vocab_file = tmp_path / "vocab.safetensors"
    _write_ids(vocab_file, _kept_ids())
    source = tiny_checkpoint("llama", mtp_layers=1, confident=True)
    pruned = convert(source, tmp_path / "pruned", to="onnx", bits=8, show_progress=False, draft_vocab=vocab_file)
    full = convert(source, tmp_path / "full", to="onnx", bits=8, show_progress=False)
    targets = [figures.Target(pruned, "onnx", "tiny"), figures.Target(full, "onnx", "tiny, full head", drafters=("mtp",))]
    result = runner.run_bench(targets, ["Once upon a time"], max_tokens=8, repeats=1, bandwidth_bytes=16 << 20,
                             progress=lambda line: None)

    with_vocab, without = result.targets
    assert with_vocab.draft_vocab_size == len(_kept_ids()) and without.draft_vocab_size is None
    assert {f.spec for f in with_vocab.speculative} == {"mtp", "ngram", "hybrid"}
    assert {f.spec for f in without.speculative} == {"mtp"} and set(without.draft_cost) == {"mtp"}
    assert all(f.identical_to_plain for target in result.targets for f in target.speculative)
    rows = report.draft_vocab_rows(result)
    assert [row[:2] for row in rows] == [["tiny", f"{len(_kept_ids())} tokens"], ["tiny, full head", "full vocabulary"]]
    assert "draft vocabulary vs full vocabulary" in report.to_markdown(result)
