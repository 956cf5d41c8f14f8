"""Steps that emit several tokens per sequence (multi-step decode; the seam speculative decoding
uses): on a model-free runner, a variable number of emitted tokens per step leaves pages,
reference counts and the prefix cache exactly as if only the committed tokens had been computed
(with preemptions and aborts mixed in) and the tokens equal one-token steps."""

import random

import pytest

from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.sampling import SamplingParams
from tests.engine.helpers import assert_idle, fake_engine


def check_pages(engine: LLMEngine) -> None:
    """The allocator's state is what the committed tokens alone would give."""
    bm = engine.block_manager
    S = bm.page_size
    live = engine.running + engine.waiting
    refs = [0] * bm.num_pages
    for seq in live:
        for p in seq.block_table:
            refs[p] += 1
    assert refs == bm._ref_count, "reference counts differ from the live block tables"
    assert bm.num_free_pages + bm.num_held_pages == bm.num_usable_pages
    for seq in engine.running:
        # No lookahead page outlives its step; every token but the newest is committed.
        assert seq.num_computed == seq.num_tokens - 1
        assert -(-seq.num_computed // S) <= len(seq.block_table) <= -(-seq.num_tokens // S)
    for seq in live:
        for i, page in enumerate(seq.block_table):
            if page in bm._page_hash:  # registered: full of this sequence's committed tokens
                assert i < seq.num_computed // S
                assert bm._page_hash[page] == seq.block_hashes[i]


def run(engine, prompts, params, *, abort_at=None, check=False):
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    step = 0
    while engine.has_unfinished():
        for victim, at in (abort_at or {}).items():
            if at == step:
                engine.abort(seqs[victim])
        engine.step()
        step += 1
        if check:
            check_pages(engine)
    assert_idle(engine)
    return [engine.output(s) for s in seqs]


@pytest.mark.parametrize("seed", range(10))
def test_variable_emissions_commit_only_what_was_kept(seed):
    rng = random.Random(seed)
    n = 10
    prompts = [[rng.randrange(1, 900) for _ in range(rng.randint(1, 70))] for _ in range(n)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 40), ignore_eos=True)
              for _ in range(n)]
    aborted = set(rng.sample(range(n), 2))
    abort_at = {i: rng.randint(0, 30) for i in aborted}
    ref_engine, _ = fake_engine(num_pages=512)
    reference = run(ref_engine, prompts, params)

    def num_emitted(seq, limit):  # an accept length that varies by sequence and step
        return hash((seq.seq_id, seq.num_tokens, seed)) % limit + 1

    # A small pool: sequences are preempted, and multi-token steps sometimes get no lookahead.
    engine, runner = fake_engine(num_pages=14, num_decode_steps=4, num_emitted=num_emitted)
    outputs = run(engine, prompts, params, abort_at=abort_at, check=True)
    assert engine.stats()["multi_decode_steps"] > 0 and engine.num_preemptions > 0
    for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        if i in aborted:
            assert out.finish_reason == "abort" or out.token_ids == ref.token_ids
        else:
            assert out.token_ids == ref.token_ids and out.finish_reason == "length"


@pytest.mark.parametrize("seed", range(6))
def test_speculative_lookahead_commits_only_what_was_accepted(seed):
    """Speculative steps (drafts for the decodes while prompts are prefilled in the same step,
    per-sequence accept lengths, preemptions, aborts) leave the allocator as the committed
    tokens alone would and give the tokens of one-token steps."""
    rng = random.Random(100 + seed)
    n = 10
    prompts = [[rng.randrange(1, 900) for _ in range(rng.randint(1, 70))] for _ in range(n)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 40), ignore_eos=True,
                             num_speculative_tokens=rng.choice([None, None, 0, 2]))
              for _ in range(n)]
    aborted = set(rng.sample(range(n), 2))
    abort_at = {i: rng.randint(0, 30) for i in aborted}
    ref_engine, _ = fake_engine(num_pages=512)
    reference = run(ref_engine, prompts, params)

    def num_emitted(seq, limit):
        return hash((seq.seq_id, seq.num_tokens, seed)) % limit + 1

    engine, runner = fake_engine(num_pages=10, speculative=True, num_emitted=num_emitted,
                                 speculative_method="ngram", num_speculative_tokens=5,
                                 speculative_adaptive=False, max_num_batched_tokens=96)
    outputs = run(engine, prompts, params, abort_at=abort_at, check=True)
    stats = engine.stats()
    assert stats["spec_steps"] > 0 and stats["mixed_steps"] > 0 and engine.num_preemptions > 0
    assert 0 < stats["spec_accepted"] < stats["spec_proposed"]
    for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        if i in aborted:
            assert out.finish_reason == "abort" or out.token_ids == ref.token_ids
        else:
            assert out.token_ids == ref.token_ids and out.finish_reason == "length"
        if params[i].num_speculative_tokens == 0:
            assert out.num_spec_proposed == 0


def test_stop_inside_an_emission_drops_the_rest():
    """A stop id in the middle of a multi-token emission ends the sequence at that token."""
    ref_engine, _ = fake_engine()
    [ref] = run(ref_engine, [[5, 6, 7]], [SamplingParams(temperature=0.0, max_tokens=12,
                                                          ignore_eos=True)])
    stop_id = ref.token_ids[5]
    first = ref.token_ids.index(stop_id)
    engine, runner = fake_engine(num_decode_steps=8)
    [out] = run(engine, [[5, 6, 7]], [SamplingParams(temperature=0.0, max_tokens=12,
                                                      stop_token_ids=[stop_id])])
    assert out.token_ids == ref.token_ids[: first + 1] and out.finish_reason == "stop"
    assert engine.stats()["multi_decode_steps"] > 0


def test_multi_step_only_when_nothing_waits():
    engine, runner = fake_engine(num_decode_steps=4, max_num_seqs=1)
    seqs = [engine.add_request([1, 2], SamplingParams(temperature=0.0, max_tokens=9,
                                                      ignore_eos=True)) for _ in range(2)]
    while engine.has_unfinished():
        engine.step()
    assert_idle(engine)
    # The first request decoded one token per step while the second waited for a slot; the
    # second, alone, took 4 tokens per step: 1 (prefill) + 4 + 4.
    assert [len(s.output_ids) for s in seqs] == [9, 9]
    second = [step for step in runner.steps if step[0][0] == seqs[1].seq_id]
    assert len(second) == 3
