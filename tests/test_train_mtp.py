"""The MTP training recipe, end to end on CPU at a tiny scale."""

import json

import pytest
from safetensors import safe_open

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgemtp.errors import UserError  # noqa: E402
from edgemtp.factory import make_tiny  # noqa: E402
from edgemtp.layout import expected_weights, is_optional  # noqa: E402
from edgemtp.training import data  # noqa: E402
from edgemtp.training.recipe import RecipeConfig, chat_batches, train_mtp  # noqa: E402

WORDS = "the cat dog sun ran saw big red happy tree ball park little girl boy played jumped home".split()


def _tiny_corpus(root):
    """A corpus directory in the shared corpus' layout, with deterministic toy text."""
    root.mkdir()
    lines = []
    for c in range(12):
        turns = [{"agent": f"agent_{1 + t % 2}", "text": f"{c} {t} " + " ".join(WORDS[(c + t + k) % len(WORDS)] for k in range(6)) + "?"} for t in range(4)]
        lines.append(json.dumps({"id": f"conv{c}", "split": "test", "turns": turns}))
    (root / "topical_chat.jsonl").write_text("\n".join(lines) + "\n")
    stories = [f"Once upon a time {s} {' '.join(WORDS[(s + k) % len(WORDS)] for k in range(30))}." for s in range(9)]
    (root / "tinystories_valid_head.txt").write_text("\n\n".join(stories) + "\n")
    return root


def test_heldout_prompts_are_never_trained_on(tmp_path):
    corpus = data.load_corpus(_tiny_corpus(tmp_path / "corpus"), num_heldout=6, seed=0)
    assert len(corpus.heldout) == 6
    held = {h["prompt"] for h in corpus.heldout}
    assert not held & set(corpus.requests)
    # The held-out conversations' and stories' text is excluded from the text data too.
    assert not any(h["prompt"] in text for h in corpus.heldout if h["source"] == "topical_chat" for text in corpus.texts)


def test_every_turn_is_a_request_once(tmp_path):
    corpus = data.load_corpus(_tiny_corpus(tmp_path / "corpus"), num_heldout=6, seed=0)
    turns = [json.loads(line)["turns"] for line in (tmp_path / "corpus/topical_chat.jsonl").read_text().splitlines()]
    held = {h["prompt"] for h in corpus.heldout}
    trained_turns = {t["text"] for conv in turns if conv[0]["text"] not in held for t in conv}
    assert trained_turns <= set(corpus.requests)
    assert len(corpus.requests) == len(set(corpus.requests))


def test_chat_batches_visit_every_chat_once_per_epoch_within_the_budget():
    lengths = [5 + (k * 37) % 60 for k in range(300)]
    batches = chat_batches(lengths, token_budget=200, generator=torch.Generator().manual_seed(0), pool=64)
    seen = []
    while len(seen) < len(lengths):
        batch = next(batches)
        assert len(batch) * max(lengths[k] for k in batch) <= 200 or len(batch) == 1
        seen += batch
    assert sorted(seen) == list(range(len(lengths)))
    # Batching by length wastes little on padding: chats are 5..64 tokens, batches cut at 200.
    padded = sum(len(b) * max(lengths[k] for k in b) for b in _epoch(lengths))
    assert sum(lengths) / padded > 0.85


def _epoch(lengths):
    batches = chat_batches(lengths, token_budget=200, generator=torch.Generator().manual_seed(1), pool=64)
    seen, out = 0, []
    while seen < len(lengths):
        out.append(next(batches))
        seen += len(out[-1])
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # qwen: q/k/v biases, QK norm in the MTP block
def test_recipe_trains_and_writes_hf_named_weights(tmp_path, arch):
    trunk = make_tiny(tmp_path / "trunk", arch=arch, mtp_layers=0, vocab_size=320, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = RecipeConfig(steps=40, seq_len=32, batch_size=4, lr=3e-3, warmup_steps=5, chat_requests=6,
                          sampled_requests=2, self_instruct_requests=8, max_new_tokens=8, gen_batch_size=4,
                          num_heldout=6, eval_new_tokens=8, log_every=1)
    log = train_mtp(trunk, tmp_path / "out", _tiny_corpus(tmp_path / "corpus"), config, progress=lambda _: None)

    losses = [entry["loss"] for entry in log["loss_curve"]]
    assert len(losses) == 40
    # The loss is KL(trunk || heads), 0 at a perfect match.
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5

    trunk_config = json.loads((trunk / "config.json").read_text())
    promised = {name: shape for name, shape in expected_weights({**trunk_config, "num_nextn_predict_layers": 1}).items()
                if name.startswith("model.layers.2.") and not is_optional(name)}  # they use the trunk's head and embedding
    with safe_open(str(tmp_path / "out" / "mtp.safetensors"), "pt") as f:
        assert set(f.keys()) == set(promised)
        for name, shape in promised.items():
            tensor = f.get_tensor(name)
            assert tuple(tensor.shape) == shape and tensor.dtype == torch.float16

    heldout = [json.loads(line) for line in (tmp_path / "out" / "heldout_prompts.jsonl").read_text().splitlines()]
    assert len(heldout) == 6
    acceptance = log["heldout_greedy_acceptance"]
    assert acceptance["positions"] > 0 and len(acceptance["acceptance_by_position"]) == 3
    # Accepting position 2 requires accepting position 1.
    assert acceptance["acceptance_by_position"][0] >= acceptance["acceptance_by_position"][1] >= acceptance["acceptance_by_position"][2]


def test_hard_label_term_is_added_to_the_kl_and_falls(tmp_path):
    """--hard-label-weight w: the loss is the mean over depths of KL + w * (cross-entropy on the
    trunk's argmax), and training lowers that cross-entropy."""
    trunk = make_tiny(tmp_path / "trunk", arch="llama", mtp_layers=0, vocab_size=320, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = RecipeConfig(steps=30, seq_len=32, batch_size=4, lr=3e-3, warmup_steps=5, chat_requests=6,
                          sampled_requests=2, self_instruct_requests=8, max_new_tokens=8, gen_batch_size=4,
                          num_heldout=6, eval_new_tokens=8, log_every=1, hard_label_weight=0.5)
    log = train_mtp(trunk, tmp_path / "out", _tiny_corpus(tmp_path / "corpus"), config, progress=lambda _: None)
    curve = log["loss_curve"]
    for entry in curve:
        combined = [kl + 0.5 * ce for kl, ce in zip(entry["kl_by_depth"], entry["argmax_ce_by_depth"])]
        assert entry["loss"] == pytest.approx(sum(combined) / len(combined), rel=1e-5)
        assert all(ce > 0 for ce in entry["argmax_ce_by_depth"])
    mean_ce = [sum(entry["argmax_ce_by_depth"]) for entry in curve]
    assert sum(mean_ce[-5:]) < 0.85 * sum(mean_ce[:5])


def test_warm_start_seeds_two_layers_from_one(tmp_path):
    """--init-from: a one-layer run's weights seed both layers of a two-layer run, and a run of
    zero steps then saves exactly those weights back (under both layer names)."""
    from safetensors.torch import load_file

    trunk = make_tiny(tmp_path / "trunk", arch="llama", mtp_layers=0, vocab_size=320, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    corpus = _tiny_corpus(tmp_path / "corpus")
    small = dict(seq_len=32, batch_size=4, lr=3e-3, warmup_steps=5, chat_requests=6, sampled_requests=2,
                 self_instruct_requests=8, max_new_tokens=8, gen_batch_size=4, num_heldout=6, eval_new_tokens=8)
    train_mtp(trunk, tmp_path / "one", corpus, RecipeConfig(steps=5, **small), progress=lambda _: None)
    first = load_file(str(tmp_path / "one" / "mtp.safetensors"))

    log = train_mtp(trunk, tmp_path / "two", corpus, RecipeConfig(steps=0, layers=2, init_from=str(tmp_path / "one" / "mtp.safetensors"), **small),
                    progress=lambda _: None)
    second = load_file(str(tmp_path / "two" / "mtp.safetensors"))
    assert log["steps_done"] == 0
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor)
        assert torch.equal(second[name.replace("model.layers.2.", "model.layers.3.")], tensor)


def test_trunk_writes_its_own_requests(tmp_path):
    """Self-instruct requests start with their opening, are complete user turns and are distinct."""
    from edgemtp.training.trunk_torch import build_trunk, load_tokenizer, open_reader

    path = make_tiny(tmp_path / "trunk", arch="llama", mtp_layers=0, vocab_size=320, hidden_size=32,
                     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    reader = open_reader(path)
    trunk, tokenizer = build_trunk(reader), load_tokenizer(path, reader)
    torch.manual_seed(0)
    # A random tiny trunk rarely ends a turn by itself; a high temperature over 320 tokens with
    # 64 new tokens still gives some complete ones.
    requests = data.self_instruct_requests(trunk, tokenizer, 64, temperature=1.0, max_new_tokens=64, batch_size=64,
                                           eos_id=tokenizer.eos_token_id, pad_id=tokenizer.eos_token_id, seed=0)
    assert requests and len(requests) == len(set(requests))
    assert all(r == r.strip() and "<|im_end|>" not in r for r in requests)


def test_chats_file_is_reused_only_for_the_same_settings(tmp_path):
    trunk = make_tiny(tmp_path / "trunk", arch="llama", mtp_layers=0, vocab_size=320, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    corpus = _tiny_corpus(tmp_path / "corpus")
    cache = tmp_path / "chats.safetensors"
    small = dict(steps=1, seq_len=32, batch_size=4, warmup_steps=1, chat_requests=6, sampled_requests=2,
                 self_instruct_requests=8, max_new_tokens=8, gen_batch_size=4, num_heldout=6, eval_new_tokens=8,
                 chats_file=str(cache))
    messages = []
    first = train_mtp(trunk, tmp_path / "a", corpus, RecipeConfig(**small), progress=messages.append)
    assert cache.is_file() and not any("read from" in m for m in messages)
    messages.clear()
    second = train_mtp(trunk, tmp_path / "b", corpus, RecipeConfig(**small, lr=1e-4), progress=messages.append)
    assert any("read from" in m for m in messages)
    assert second["data"] == first["data"]
    messages.clear()
    third = train_mtp(trunk, tmp_path / "c", corpus, RecipeConfig(**{**small, "chat_requests": 4}), progress=messages.append)
    assert any("other data settings" in m for m in messages)
    assert third["data"]["chat_requests"] == 4


def test_a_chats_file_that_is_not_one_is_refused(tmp_path):
    trunk = make_tiny(tmp_path / "trunk", arch="llama", mtp_layers=0, vocab_size=320, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    bad = tmp_path / "chats.safetensors"
    bad.write_bytes(b"not safetensors")
    config = RecipeConfig(steps=1, seq_len=32, batch_size=4, chat_requests=6, sampled_requests=0, self_instruct_requests=0,
                          max_new_tokens=8, gen_batch_size=4, num_heldout=6, eval_new_tokens=8, chats_file=str(bad))
    with pytest.raises(UserError, match="not a chats file written by train-mtp"):
        train_mtp(trunk, tmp_path / "out", _tiny_corpus(tmp_path / "corpus"), config, progress=lambda _: None)
    assert bad.read_bytes() == b"not safetensors" and not (tmp_path / "out" / "mtp.safetensors").exists()


def test_moe_trunks_are_refused_with_one_line(tmp_path):
    trunk = make_tiny(tmp_path / "trunk", arch="glm4_moe", mtp_layers=0)
    with pytest.raises(UserError, match="ship their own MTP layers"):
        train_mtp(trunk, tmp_path / "out", tmp_path, RecipeConfig(steps=1))
    assert not (tmp_path / "out").exists()



def test_fusion_head_starts_as_the_plain_head(tmp_path):
    """fuse_proj = [0, 0, I]: a fusion head loaded from a plain head's weights gives exactly the
    plain head's depth outputs (the warm start of models/README.md's stage 10)."""
    from edgemtp.training.mtp_torch import MTPHeads
    from edgemtp.training.trunk_torch import build_trunk, open_reader

    trunk_dir = make_tiny(tmp_path / "trunk", arch="llama", mtp_layers=0, vocab_size=320, hidden_size=32,
                          intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    trunk = build_trunk(open_reader(trunk_dir))
    torch.manual_seed(0)
    plain = MTPHeads(trunk.config, 2)
    fused = MTPHeads(trunk.config, 2, fusion_layers=(0, 1))
    fused.load_hf_state_dict(plain.hf_state_dict(torch.float32))
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        out = trunk.model(input_ids=ids, output_hidden_states=True)
        feature = fused.trunk_feature(out)
        assert torch.equal(feature, out.last_hidden_state)
        for a, b in zip(plain(out.last_hidden_state, ids, trunk.model.embed_tokens, 3),
                        fused(feature, ids, trunk.model.embed_tokens, 3)):
            assert torch.equal(a, b)
    saved = fused.hf_state_dict()
    assert [name for name in saved if "fuse_proj" in name] == ["model.layers.4.fuse_proj.weight"]


def test_fusion_head_trains_and_is_saved_with_its_layers(tmp_path):
    """--fusion-layers: training moves fuse_proj toward the inner layers; it is saved on layer 0
    only, with the trunk layers it reads in the file's metadata; the log scores each kind."""
    from safetensors.torch import load_file

    trunk = make_tiny(tmp_path / "trunk", arch="llama", mtp_layers=0, vocab_size=320, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    config = RecipeConfig(steps=10, seq_len=32, batch_size=4, lr=3e-3, warmup_steps=5, chat_requests=6,
                          sampled_requests=2, self_instruct_requests=8, max_new_tokens=8, gen_batch_size=4,
                          num_heldout=6, eval_new_tokens=8, layers=2, fusion_layers=(0, 1))
    log = train_mtp(trunk, tmp_path / "fused", _tiny_corpus(tmp_path / "corpus"), config, progress=lambda _: None)
    assert log["steps_done"] == 10
    assert set(log["heldout_greedy_acceptance_by_kind"]) == {"chat", "story", "code", "qa"}
    weights = load_file(str(tmp_path / "fused" / "mtp.safetensors"))
    assert [name for name in weights if "fuse_proj" in name] == ["model.layers.4.fuse_proj.weight"]
    fuse = weights["model.layers.4.fuse_proj.weight"].float()
    assert fuse.shape == (32, 96) and fuse[:, :64].abs().max() > 0  # it learned to read the trunk's inner layers
    with safe_open(str(tmp_path / "fused" / "mtp.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["mtp_fusion_layers"]) == [0, 1]
