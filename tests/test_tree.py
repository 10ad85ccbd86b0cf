"""Tree verification (edgemtp/engine/tree.py): lossless at every temperature, and a tree step whose
accepted path is kept leaves the caches as a step over that path alone would."""

from __future__ import annotations

import numpy as np
import pytest
from fake_backend import FakeBackend, FakeTokenizer
from test_engine_distribution import PROMPT, VOCAB, check_target_distribution
from test_engine_greedy import check_no_cache_drift

import edgemtp
import edgemtp.engine.generate as generate
from edgemtp.engine.generate import Session
from edgemtp.engine.tree import DraftTree, TreeShaper, ancestor_mask, node_depths, trunk_rows
from edgemtp.engine.tuning import Costs

SAMPLES = 10_000  # a few milliseconds of Python each


@pytest.fixture
def flat_costs(monkeypatch):
    """A trunk step costs the same for any number of rows (a memory-bound device), so the shaper
    offers every candidate it may: trees always have siblings."""
    monkeypatch.setattr(generate, "load_or_measure_costs",
                        lambda backend, drafter, name, max_k: Costs(trunk=[1.0] * (max_k + 1), draft=0.0))


def test_tree_layout():
    tree = DraftTree()
    a = tree.add(5, -1, None)
    b = tree.add(6, a, None)
    c = tree.add(7, -1, None)
    tokens, parents = trunk_rows(tree, 4)
    assert tokens == [4, 5, 6, 7] and parents == [-1, 0, 1, 0]
    assert node_depths(parents) == [0, 1, 2, 1]
    assert ancestor_mask(parents).tolist() == [[True, False, False, False], [True, True, False, False],
                                               [True, True, True, False], [True, False, False, True]]
    assert tree.first == [True, True, False] and tree.children(-1) == [a, c] and tree.depth() == 2 and b == 1


def test_greedy_verification_follows_the_targets_argmax_through_the_tree():
    from edgemtp.engine.sampling import Sampler
    from edgemtp.engine.speculative import tree_provenance
    from edgemtp.engine.tree import verify_tree

    tree = DraftTree()
    a = tree.add(1, -1, None)
    tree.add(2, a, None)
    b = tree.add(3, -1, None)
    c = tree.add(4, b, None)
    logits = np.zeros((5, 8), np.float32)  # rows: pending token, then nodes a, a's child, b, c
    logits[0, 3] = logits[b + 1, 4] = 1.0  # the target wants b after the pending token, then c
    logits[a + 1, 2] = 1.0  # (a's row agrees with a's child, but a was not taken)
    logits[c + 1, 6] = 1.0  # and then 6, which no node guessed
    path, token = verify_tree(logits, tree, Sampler())
    assert (path, token) == ([b, c], 6)
    assert tree_provenance(tree, path) == (["branch", "draft", "bonus"], 0)
    logits[0, 3], logits[0, 5] = 0.0, 1.0  # the target wants 5 after the pending token: a correction
    assert verify_tree(logits, tree, Sampler()) == ([], 5)
    assert tree_provenance(tree, []) == (["correction"], 0)


def test_shaper_widens_where_the_first_guess_is_uncertain():
    shaper = TreeShaper(Costs(trunk=[1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4], draft=0.0), max_k=2)
    for _ in range(50):  # the chain's first guess holds half of the time, its second always
        shaper.record(2, 0)
        shaper.record(2, 2)
    confident, unsure = [0.97, 0.01, 0.01, 0.01], [0.4, 0.3, 0.2, 0.1]
    widths = shaper.widths([unsure, confident])
    assert widths[0] > 1 and widths[1] == 1
    # Steep costs: no sibling pays.
    steep = TreeShaper(Costs(trunk=[1.0 + n for n in range(9)], draft=0.0), max_k=2)
    assert steep.widths([unsure, confident]) == [1, 1]


# name -> (target model options, generate options); num_draft=2 as in test_engine_distribution.
CASES = {
    "noise-head": (dict(mtp_accuracy=0.0), dict()),
    "good-head-warped": (dict(num_mtp_layers=2, mtp_accuracy=0.8, mtp_blur=0.5),
                         dict(temperature=0.7, top_k=4, top_p=0.9)),
}


@pytest.mark.parametrize("case", CASES)
def test_tree_sampling_follows_the_target_distribution(flat_costs, case):
    """The joint distribution of the first three tokens (the next two from one tree step) is the
    target's, and side branches were both taken and rejected."""
    model_options, options = CASES[case]
    options = dict(dict(temperature=1.0), **options)
    backend = FakeBackend(vocab_size=VOCAB, sharpness=1.5, **model_options)
    session = Session(backend, FakeTokenizer())
    counts: dict[tuple, int] = {}
    branches = corrections = 0
    for seed in range(SAMPLES):
        out = session.generate(PROMPT, max_tokens=4, seed=seed, num_draft=2, chat=False, spec="mtp-tree", **options)
        key = tuple(out.tokens[:3])
        counts[key] = counts.get(key, 0) + 1
        branches += out.stats.provenance.count("branch")
        corrections += out.stats.provenance.count("correction")
    assert branches > 0 and corrections > 0

    check_target_distribution(counts, backend, options)


def test_tree_greedy_equals_plain_and_leaves_no_drift_fake(flat_costs):
    from edgemtp.api import Model

    backend = FakeBackend(vocab_size=32, num_mtp_layers=2, mtp_accuracy=0.5, sharpness=1.0)
    model = Model({}, FakeTokenizer(), backend)
    reference = model.generate([1, 2, 3], max_tokens=500, chat=False, spec="none")
    out = check_no_cache_drift(model, [1, 2, 3], 500, atol=0, chat=False, spec="mtp-tree", num_draft=3)
    assert out.tokens == reference.tokens
    assert out.stats.provenance.count("branch") > 0
    assert out.stats.nodes_verified > out.stats.drafted


def test_chain_and_tree_share_the_mtp_caches_in_one_session(flat_costs):
    """Switching between --spec mtp and mtp-tree mid-conversation keeps one MTP drafter's view of
    the caches (the fake backend asserts every MTP entry's context)."""
    session = Session(FakeBackend(vocab_size=32, num_mtp_layers=2, mtp_accuracy=0.6, sharpness=1.0), FakeTokenizer())
    prompt = [1, 2, 3]
    for spec in ("mtp", "mtp-tree", "mtp", "mtp-tree"):
        out = session.generate(prompt, max_tokens=30, chat=False, spec=spec, num_draft=2)
        prompt = [*prompt, *out.tokens, 4]
    reference = Session(FakeBackend(vocab_size=32, num_mtp_layers=2, mtp_accuracy=0.6, sharpness=1.0), FakeTokenizer())
    assert out.tokens == reference.generate(prompt[: -len(out.tokens) - 1], max_tokens=30, chat=False,
                                            spec="none").tokens


def test_a_backend_without_tree_verification_refuses_mtp_tree():
    class ChainOnly(FakeBackend):
        trunk_step_tree = None

    session = Session(ChainOnly(num_mtp_layers=1), FakeTokenizer())
    with pytest.raises(edgemtp.errors.UserError, match="--spec mtp-tree needs tree verification"):
        session.generate([1, 2], max_tokens=4, chat=False, spec="mtp-tree")


# --- real backends ---------------------------------------------------------------------------

ARCHS = ["llama", "deepseek_v3"]  # GQA and MLA attention


def a_tree(vocab_size: int) -> tuple[DraftTree, list[int]]:
    """A tree with two branches at the root and one under the first, and the nodes of a path
    through the second branch's child (so keeping it moves entries)."""
    tokens = np.random.default_rng(3).integers(0, vocab_size, 6).tolist()
    tree = DraftTree()
    a = tree.add(tokens[0], -1, None)
    tree.add(tokens[1], a, None)
    b = tree.add(tokens[2], -1, None)
    tree.add(tokens[3], a, None)
    c = tree.add(tokens[4], b, None)
    tree.add(tokens[5], c, None)
    return tree, [b, c]


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_tree_step_keeps_the_path_as_a_chain_would(tiny_checkpoint, arch):
    from edgemtp.mlx_backend.backend import MLXBackend

    backend = MLXBackend.from_checkpoint(tiny_checkpoint(arch), max_kv_size=64)
    prompt = np.random.default_rng(2).integers(0, backend.vocab_size, 12).tolist()
    tree, path = a_tree(backend.vocab_size)
    tokens, parents = trunk_rows(tree, prompt[-1])
    rows = [0, *(node + 1 for node in path)]
    backend.trunk_step(prompt[:-1])
    tree_logits, tree_hidden = backend.trunk_step_tree(tokens, parents)
    backend.trunk_keep(len(tokens), rows)
    assert backend.trunk_len() == len(prompt) + len(path)
    caches = [(np.array(c.keys[..., : c.offset, :]), np.array(c.values[..., : c.offset, :]))
              for c in backend._trunk_caches]
    after_tree, _ = backend.trunk_step([7])

    backend.reset()
    backend.trunk_step(prompt[:-1])
    chain = [tokens[row] for row in rows]
    chain_logits, chain_hidden = backend.trunk_step(chain)
    after_chain, _ = backend.trunk_step([7])
    fresh = [(np.array(c.keys[..., : c.offset - 1, :]), np.array(c.values[..., : c.offset - 1, :]))
             for c in backend._trunk_caches]

    # The same positions, the same visible entries: the path's rows and its cache entries are the
    # chain's, and so is the next step.
    bound = 1e-5 * np.abs(chain_logits).max()
    assert np.abs(tree_logits[rows] - chain_logits).max() <= bound
    assert np.abs(tree_hidden[rows] - chain_hidden).max() <= 1e-5 * np.abs(chain_hidden).max()
    for (keys, values), (fresh_keys, fresh_values) in zip(caches, fresh):
        np.testing.assert_allclose(keys, fresh_keys, atol=1e-5 * np.abs(fresh_keys).max())
        np.testing.assert_allclose(values, fresh_values, atol=1e-5 * np.abs(fresh_values).max())
    assert np.abs(after_tree - after_chain).max() <= bound
    # The other branch is a different context: its rows differ from the path's.
    assert not np.allclose(tree_logits[1], tree_logits[3])


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_tree_greedy_equals_plain_and_leaves_no_drift(tiny_checkpoint, flat_costs, arch):
    model = edgemtp.load(tiny_checkpoint(arch, mtp_layers=2), backend="mlx")
    prompt = model.tokenizer.encode("The quick brown fox") if model.tokenizer else [1, 2, 3]
    reference = model.generate(prompt, max_tokens=64, spec="none", chat=False)
    out = check_no_cache_drift(model, prompt, 64, atol=1e-4, chat=False, spec="mtp-tree", num_draft=3)
    assert out.tokens == reference.tokens
    assert out.stats.nodes_verified > out.stats.drafted
