"""Temperature 0: speculative decoding must reproduce plain greedy decoding
token for token, whatever the drafter guesses and however often it is wrong."""

from __future__ import annotations

import numpy as np
import pytest
from fake_backend import FakeBackend, FakeTokenizer

from edgemtp.engine.backend import PREFILL_CHUNK
from edgemtp.engine.generate import Session
from edgemtp.engine.sampling import Sampler
from edgemtp.engine.tuning import Costs

PROMPTS = [list(np.random.default_rng(i).integers(0, 32, size=1 + i % 12)) for i in range(20)]
NEW_TOKENS = 64

# name -> (target model options, generate options, draft model options or None)
CASES = {
    "mtp-1-layer-k1": (dict(mtp_accuracy=0.7), dict(spec="mtp", num_draft=1), None),
    "mtp-1-layer-k3": (dict(mtp_accuracy=0.7), dict(spec="mtp", num_draft=3), None),
    "mtp-2-layers-k4": (dict(num_mtp_layers=2, mtp_accuracy=0.8), dict(spec="mtp", num_draft=4), None),
    "mtp-noise-k2": (dict(mtp_accuracy=0.0), dict(spec="mtp", num_draft=2), None),
    "mtp-auto": (dict(num_mtp_layers=2, mtp_accuracy=0.8), dict(spec="mtp", num_draft="auto"), None),
    "ngram-k3": (dict(order=2), dict(spec="ngram", num_draft=3), None),
    "ngram-auto": (dict(order=2), dict(spec="ngram", num_draft="auto"), None),
    "draft-model-k3": (dict(), dict(spec="draft", num_draft=3), dict(noise=2.0)),
    # repetitive text and a fair MTP head: the hybrid drafter switches between the two
    "hybrid-auto": (dict(order=2, num_mtp_layers=2, mtp_accuracy=0.6), dict(spec="hybrid", num_draft="auto"), None),
    "hybrid-k3": (dict(order=2, num_mtp_layers=2, mtp_accuracy=0.6), dict(spec="hybrid", num_draft=3), None),
}


@pytest.fixture(autouse=True)
def flat_costs(inject_costs):
    """Auto mode gets a cost curve where drafting pays instead of timing the toy model."""
    inject_costs(lambda max_k: Costs(trunk=[1.0 + 0.01 * n for n in range(max_k + 1)], draft=0.01))


def greedy_reference(model_options: dict, prompt: list[int], n: int) -> list[int]:
    backend = FakeBackend(vocab_size=32, **model_options)
    return Session(backend, FakeTokenizer()).generate(prompt, max_tokens=n, spec="none", chat=False).tokens


@pytest.mark.parametrize("case", CASES)
def test_speculative_greedy_equals_plain_greedy(case):
    model_options, options, draft_options = CASES[case]
    backend = FakeBackend(vocab_size=32, **model_options)
    if draft_options is not None:
        options = dict(options, draft_model=FakeBackend(vocab_size=32, **draft_options))
    session = Session(backend, FakeTokenizer())  # one session: each prompt also exercises cache reuse
    rejections = 0
    for prompt in PROMPTS:
        out = session.generate(prompt, max_tokens=NEW_TOKENS, chat=False, **options)
        assert out.tokens == greedy_reference(model_options, prompt, NEW_TOKENS)
        assert out.stats.generated_tokens == NEW_TOKENS
        rejections += out.stats.provenance.count("correction")
    if case != "mtp-auto":
        assert rejections > 0, "the case must force rollbacks"


def test_drafts_are_accepted_when_right():
    backend = FakeBackend(vocab_size=32, num_mtp_layers=2, mtp_accuracy=1.0)
    out = Session(backend, FakeTokenizer()).generate([1, 2, 3], max_tokens=61, chat=False, spec="mtp", num_draft=4)
    assert out.stats.drafted == out.stats.accepted == 48  # 12 steps draft 4 each, all accepted
    assert out.stats.steps == 12 and out.stats.mean_accepted_length == 5.0
    assert out.stats.provenance == ["bonus"] + (["draft"] * 4 + ["bonus"]) * 12


def test_multi_turn_reuses_the_cached_prefix():
    backend = FakeBackend(vocab_size=32, num_mtp_layers=2, mtp_accuracy=0.7)
    session = Session(backend, FakeTokenizer())
    first = session.generate([5, 6, 7, 8], max_tokens=30, chat=False, num_draft=3)
    follow_up = [5, 6, 7, 8, *first.tokens, 9, 10]
    second = session.generate(follow_up, max_tokens=30, chat=False, num_draft=3)
    assert second.tokens == greedy_reference(dict(num_mtp_layers=2, mtp_accuracy=0.7), follow_up, 30)
    # Only the 2 new tokens plus the last 3 (one per MTP depth) were prefilled again.
    assert second.stats.prompt_tokens == 2 + 3


def test_stops_after_eos_and_omits_its_text():
    backend = FakeBackend(vocab_size=32, mtp_accuracy=0.7)
    reference = greedy_reference(dict(mtp_accuracy=0.7), [1, 2], 64)
    eos = reference[10]
    session = Session(backend, FakeTokenizer(eos_token_ids=[eos]))
    out = session.generate([1, 2], max_tokens=64, chat=False, num_draft=3)
    assert out.tokens == reference[: reference.index(eos) + 1]
    assert out.text == "".join(f"{t} " for t in out.tokens[:-1])


def test_stream_can_be_abandoned_and_resumed():
    backend = FakeBackend(vocab_size=32, num_mtp_layers=2, mtp_accuracy=0.7)
    session = Session(backend, FakeTokenizer())
    stream = session.stream([3, 1, 4], max_tokens=64, chat=False, num_draft=3)
    got = []
    for chunk in stream:
        got.extend(chunk.token_ids)
        if len(got) > 20:
            break
    stream.close()
    prompt = [3, 1, 4, *got]
    out = session.generate(prompt, max_tokens=20, chat=False, num_draft=3)
    assert out.tokens == greedy_reference(dict(num_mtp_layers=2, mtp_accuracy=0.7), prompt, 20)


def check_no_cache_drift(model, prompt, max_tokens, atol, **options):
    """After a long speculative run, the trunk's next logits and the draft
    logits of every MTP depth equal a fresh teacher-forced run over the same tokens."""
    out = model.generate(prompt, max_tokens=max_tokens, **options)
    session, backend = model._session, model.backend
    drafter = session._drafters["mtp"][1]
    seq = list(drafter.seq)  # prompt + output (+ tokens decoded past a stop token); the last one pending
    assert seq[: len(prompt) + len(out.tokens)] == [*prompt, *out.tokens]
    assert session.tokens == seq[:-1] and backend.trunk_len() == len(seq) - 1
    # Draft once more (greedy, every depth): depth d's draft logits sit at entry L-1,
    # teacher-forced over the sequence extended by the d-1 drafts before it.
    drafts, _ = drafter.draft(seq, drafter.max_depth, Sampler(), min_prob=0.0)
    draft_logits = {d: drafter.last_logits[d] for d in range(1, len(drafts) + 1)}
    next_logits, _ = backend.trunk_step(seq[-1:])
    np.testing.assert_allclose(next_logits[-1], model.logits(seq)[-1], atol=atol)
    for depth, logits in draft_logits.items():
        np.testing.assert_allclose(logits, model.mtp_logits(seq + drafts[: depth - 1], depth)[-1], atol=atol)
    assert len(draft_logits) == drafter.max_depth
    return out


def test_long_generation_has_no_cache_drift_fake():
    from edgemtp.api import Model

    model = Model({}, FakeTokenizer(), FakeBackend(vocab_size=32, num_mtp_layers=2, mtp_accuracy=0.7))
    out = check_no_cache_drift(model, [1, 2, 3], 2000, atol=0, chat=False, spec="mtp", num_draft=3)
    assert out.tokens == greedy_reference(dict(num_mtp_layers=2, mtp_accuracy=0.7), [1, 2, 3], 2000)


def test_a_stream_dropped_without_close_does_not_corrupt_the_next_one():
    session = Session(FakeBackend(vocab_size=32), FakeTokenizer())
    dropped = session.stream([2, 7], max_tokens=64, chat=False, spec="ngram")
    started = next(dropped).token_ids + next(dropped).token_ids
    session.generate([9, 9], max_tokens=30, chat=False, spec="ngram")  # the trunk now holds other tokens
    dropped.close()  # what the garbage collector does, late: must not claim the trunk holds its tokens
    prompt = [2, 7, *started]
    again = session.generate(prompt, max_tokens=30, chat=False, spec="ngram")
    assert again.tokens == greedy_reference({}, prompt, 30)


def test_hybrid_drafts_with_both_drafters_and_falls_back_to_ngram_without_mtp_layers():
    """On repetitive text with a fair MTP head, the hybrid policy uses each drafter on some steps;
    on a model without MTP layers it is n-gram lookup, still lossless."""
    backend = FakeBackend(vocab_size=32, order=2, num_mtp_layers=2, mtp_accuracy=0.6)
    session = Session(backend, FakeTokenizer())
    sources = []
    for prompt in PROMPTS[:6]:
        stream = session.stream(prompt, max_tokens=NEW_TOKENS, chat=False, spec="hybrid")
        drafter = session._drafters["mtp"][1]
        for _ in stream:
            sources.append(drafter.continuation is not None)
    assert any(sources) and not all(sources)

    no_mtp = dict(order=2, num_mtp_layers=0)
    session = Session(FakeBackend(vocab_size=32, **no_mtp), FakeTokenizer())
    out = session.generate(PROMPTS[3], max_tokens=NEW_TOKENS, chat=False, spec="hybrid")
    assert out.tokens == greedy_reference(no_mtp, PROMPTS[3], NEW_TOKENS)
    assert out.stats.drafted > 0  # n-gram drafts (an MTP drafter would have refused this model)


@pytest.mark.parametrize("step_rows", [PREFILL_CHUNK, 48])
def test_long_prompts_run_in_bounded_steps(step_rows):
    """A prompt longer than PREFILL_CHUNK reaches the trunk and the MTP layers in steps of at most
    PREFILL_CHUNK rows (a step's buffers grow with its rows), or of the backend's own
    ``prompt_step_rows`` (ONNX with routed experts), with the output of plain decoding."""
    options = dict(num_mtp_layers=2, mtp_accuracy=0.7)
    backend = FakeBackend(vocab_size=32, **options)
    if step_rows != PREFILL_CHUNK:
        backend.prompt_step_rows = step_rows
    rows = {"trunk": [], "mtp": []}
    trunk_step, mtp_step = backend.trunk_step, backend.mtp_step

    def recording_trunk_step(tokens):
        rows["trunk"].append(len(tokens))
        return trunk_step(tokens)

    def recording_mtp_step(depth, hidden, tokens):
        rows["mtp"].append(len(tokens))
        return mtp_step(depth, hidden, tokens)

    backend.trunk_step, backend.mtp_step = recording_trunk_step, recording_mtp_step
    prompt = list(np.random.default_rng(7).integers(0, 32, size=2 * PREFILL_CHUNK + 40))
    out = Session(backend, FakeTokenizer()).generate(prompt, max_tokens=24, chat=False, spec="mtp", num_draft=3)
    assert out.tokens == greedy_reference(options, prompt, 24)
    steps, last = divmod(len(prompt), step_rows)
    assert rows["trunk"][:steps + 1] == [step_rows] * steps + [last]
    assert max(rows["trunk"] + rows["mtp"]) == step_rows
    assert sum(1 for n in rows["mtp"] if n == step_rows) >= 4  # both depths caught up in steps


def test_steps_copying_weights_per_row_are_cut_to_the_gather_budget():
    """ONNX's routed experts copy each row's experts (converters/onnx_export/moe.py): the bench
    model's MTP layer, 2 experts of 4096 x 64, gathers 6 MiB a row, so its long inputs run in
    steps of 42 rows (256 MiB); models without routed experts keep PREFILL_CHUNK."""
    from edgemtp.converters.onnx_export.moe import gathered_bytes_per_row
    from edgemtp.engine.backend import GATHER_BUDGET, prompt_step_rows

    bench = {"n_routed_experts": 8, "num_experts_per_tok": 2, "hidden_size": 4096, "moe_intermediate_size": 64}
    assert gathered_bytes_per_row(bench) == 4 * 3 * 2 * 4096 * 64
    assert prompt_step_rows(gathered_bytes_per_row(bench)) == GATHER_BUDGET // (4 * 3 * 2 * 4096 * 64) == 42
    assert prompt_step_rows(gathered_bytes_per_row({"hidden_size": 4096})) == PREFILL_CHUNK
    assert prompt_step_rows(10 * GATHER_BUDGET) == 1
