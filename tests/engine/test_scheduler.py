"""Scheduling policy on a model-free runner (microseconds a step): priority and FCFS order, the
token budget, mixed steps (every decode, then prompt chunks), the running-set bound, static
batches, abort and deadlines freeing pages at once, step failures failing only their step, and
no deadlock between half-prefilled prompts. Every test ends with the allocator all free and
nothing referenced."""

import time

import pytest

from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.protocol import EngineStepError, RequestAbortedError
from jaxserve.engine.sampling import SamplingParams
from tests.engine.helpers import assert_idle, fake_engine


def params(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def drain(engine: LLMEngine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished():
            assert_idle(engine)
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def first_step_of(steps) -> dict[int, int]:
    first: dict[int, int] = {}
    for i, step in enumerate(steps):
        for seq_id, _ in step:
            first.setdefault(seq_id, i)
    return first


def test_priority_then_arrival_order():
    engine, runner = fake_engine(max_num_seqs=1)
    seqs = [engine.add_request([1, 2, 3], params(2), priority=p) for p in (0, 5, -1, 0, -1)]
    drain(engine)
    first = first_step_of(runner.steps)
    order = sorted(range(len(seqs)), key=lambda i: first[seqs[i].seq_id])
    assert order == [2, 4, 0, 3, 1]
    assert all(s.finish_reason == "length" for s in seqs)


def test_token_budget_and_running_bound():
    engine, runner = fake_engine(max_num_seqs=3, max_num_batched_tokens=64,
                                 long_prefill_token_threshold=64,  # whole-budget chunks
                                 prefill_buckets=(16, 32, 64), batch_buckets=(1, 2, 4))
    seqs = [engine.add_request(list(range(1, n + 1)), params(3)) for n in (200, 10, 10, 10, 40)]
    max_running = 0
    while engine.has_unfinished():
        engine.step()
        max_running = max(max_running, len(engine.running))
    assert_idle(engine)
    assert max_running <= 3
    for step in runner.steps:
        assert sum(n for _, n in step) <= 64
    long_chunks = [n for step in runner.steps for sid, n in step if sid == seqs[0].seq_id]
    assert long_chunks[:4] == [64, 64, 64, 8]


def test_a_step_holds_every_decode_then_prompt_chunks_within_the_budget():
    engine, runner = fake_engine(max_num_seqs=8, max_num_batched_tokens=64,
                                 long_prefill_token_threshold=64)  # whole-budget chunks
    decoding = [engine.add_request([i + 1] * 5, params(20)) for i in range(3)]
    engine.step()  # the three prompts, 15 tokens in one step
    assert runner.steps[-1] == [(s.seq_id, 5) for s in decoding]
    assert engine.running == decoding
    big = engine.add_request([9] * 100, params(4))
    small = engine.add_request([8] * 10, params(4))
    engine.step()
    # Decodes first, then the head of the queue gets what is left: 64 - 3 = 61 tokens.
    assert runner.steps[-1] == [(s.seq_id, 1) for s in decoding] + [(big.seq_id, 61)]
    engine.step()
    # big's last 39 tokens and all of small (10) fit beside the decodes: 3 + 39 + 10 <= 64.
    assert runner.steps[-1] == [(s.seq_id, 1) for s in decoding] + [(big.seq_id, 39),
                                                                    (small.seq_id, 10)]
    assert engine.running == decoding + [big, small]
    engine.step()
    assert runner.steps[-1] == [(s.seq_id, 1) for s in decoding + [big, small]]
    stats = engine.stats()
    assert (stats["prefill_steps"], stats["mixed_steps"], stats["decode_steps"]) == (1, 2, 1)
    drain(engine)


def test_a_budget_below_the_batch_size_still_finishes_everything():
    engine, runner = fake_engine(max_num_seqs=8, max_num_batched_tokens=4)
    seqs = [engine.add_request([i + 1] * (1 + i % 3), params(6)) for i in range(6)]
    drain(engine)
    assert all(s.finish_reason == "length" for s in seqs)
    assert all(sum(n for _, n in step) <= 4 for step in runner.steps)


def test_running_sequences_get_a_token_every_step_while_requests_stream_in():
    engine, runner = fake_engine(max_num_seqs=64)
    long = engine.add_request([5] * 8, params(40))
    engine.step()
    arrivals = []
    for i in range(38):  # a new request before every step
        arrivals.append(engine.add_request([7] * 30, params(2)))
        engine.step()
        assert len(long.output_ids) == i + 2  # never skipped for a prefill
    drain(engine)
    assert all(s.finish_reason == "length" for s in arrivals)
    assert engine.stats()["mixed_steps"] >= 38


def test_static_batches_run_to_completion_without_joins():
    engine, runner = fake_engine(max_num_seqs=2, scheduler="static")
    seqs = [engine.add_request([i + 1] * 5, params(n)) for i, n in enumerate((3, 9, 2, 4, 6))]
    drain(engine)
    steps = [{sid for sid, _ in step} for step in runner.steps]
    ids = [s.seq_id for s in seqs]
    batches = [{ids[0], ids[1]}, {ids[2], ids[3]}, {ids[4]}]
    # Each step belongs to one batch, and batches run one after another.
    owner = [next(b for b, members in enumerate(batches) if step <= members) for step in steps]
    assert owner == sorted(owner) and set(owner) == {0, 1, 2}


def test_static_and_continuous_give_the_same_tokens():
    outs = {}
    for scheduler in ("static", "continuous"):
        engine, _ = fake_engine(max_num_seqs=3, scheduler=scheduler)
        seqs = [engine.add_request([i + 1] * (3 + 7 * i), params(2 + i % 4)) for i in range(8)]
        drain(engine)
        outs[scheduler] = [s.output_ids for s in seqs]
    assert outs["static"] == outs["continuous"]


def test_abort_frees_pages_at_once_queued_prefilling_or_decoding():
    engine, runner = fake_engine(max_num_seqs=2, max_num_batched_tokens=64,
                                 prefill_buckets=(16, 32, 64), batch_buckets=(1, 2, 4))
    bm = engine.block_manager
    decoding = engine.add_request([3] * 20, params(50), request_id="dec")
    engine.step()
    engine.step()
    assert decoding in engine.running and decoding.output_ids
    prefilling = engine.add_request([4] * 300, params(5))
    queued = engine.add_request([5] * 10, params(5), request_id="q")
    engine.step()  # dec's decode and the first 63-token chunk of `prefilling`
    assert prefilling.num_computed == 63 and prefilling.block_table

    def held_by(*seqs):
        return len({p for s in seqs for p in s.block_table})

    assert engine.abort(prefilling.seq_id)
    assert prefilling.finish_reason == "abort" and prefilling.block_table == []
    assert bm.num_held_pages == held_by(decoding)
    assert engine.abort("q") and queued.finish_reason == "abort"
    assert engine.abort("dec")
    assert decoding.finish_reason == "abort" and isinstance(decoding.error, RequestAbortedError)
    assert_idle(engine)
    assert not engine.abort("dec") and not engine.abort(12345)
    # Aborted requests are reported by the next step, which then has nothing to run.
    assert set(engine.step()) == {prefilling, queued, decoding}
    assert engine.stats()["aborted"] == 3


def test_deadline_aborts_at_the_next_step():
    engine, _ = fake_engine()
    late = engine.add_request([1] * 10, params(100), deadline=time.monotonic() + 3600)
    gone = engine.add_request([2] * 10, params(100), deadline=time.monotonic() - 1)
    done = engine.step()
    assert gone in done and gone.finish_reason == "abort"
    assert "deadline" in str(gone.error) and gone.block_table == []
    late.deadline = time.monotonic() - 1
    engine.step()
    assert late.finish_reason == "abort" and late.output_ids
    assert_idle(engine)


def test_a_failing_step_fails_only_its_requests():
    marked = 13

    def fail_if(seqs):
        return any(s.prompt_ids[0] == marked and s.num_pending > 1 for s in seqs)

    # A budget of 20 tokens: `bad` and `also_bad` fill a step, `ok` waits for the next one.
    engine, runner = fake_engine(fail_if=fail_if, max_num_batched_tokens=20)
    bad = engine.add_request([marked] * 10, params(6))
    also_bad = engine.add_request([2] * 10, params(6))  # prefilled in the same step as `bad`
    ok = engine.add_request([1] * 10, params(6))
    done = engine.step()
    assert {bad, also_bad} == set(done)
    for s in (bad, also_bad):
        assert s.finish_reason == "error" and isinstance(s.error, EngineStepError)
        assert "injected step failure" in str(s.error) and s.block_table == []
    after = engine.add_request([3] * 10, params(4))
    drain(engine)
    assert ok.finish_reason == after.finish_reason == "length"
    assert len(ok.output_ids) == 6 and engine.stats()["failed_steps"] == 1
    # The survivors' tokens are what they would have been without the failure.
    alone, _ = fake_engine()
    ref = alone.add_request([1] * 10, params(6))
    drain(alone)
    assert ok.output_ids == ref.output_ids


def test_half_prefilled_prompts_cannot_deadlock():
    # 30 usable pages of 4 tokens. A is half prefilled when B (higher priority) arrives; B's
    # first chunk does not fit beside A's pages, so A's are released and A starts over later.
    engine, _ = fake_engine(num_pages=31, page_size=4, max_num_batched_tokens=64,
                            prefill_buckets=(16, 32, 64), batch_buckets=(1, 2, 4),
                            max_model_len=128)
    a = engine.add_request([1] * 100, params(2))
    engine.step()
    assert a.num_computed == 64
    b = engine.add_request([2] * 100, params(2), priority=-1)
    drain(engine)
    assert a.finish_reason == b.finish_reason == "length"
    assert engine.num_preemptions >= 1


def test_a_sequence_that_outgrows_the_whole_pool_fails_instead_of_stalling():
    engine, _ = fake_engine(num_pages=9, page_size=4, max_model_len=128,
                            prefill_buckets=(16, 32, 64), batch_buckets=(1, 2, 4))
    seq = engine.add_request([1] * 10, params(100))  # 8 pages hold 32 tokens
    drain(engine)
    assert seq.finish_reason == "error" and "KV pages" in str(seq.error)
    assert len(seq.output_ids) == 32 - 10 + 1


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_preemption_under_page_pressure_keeps_outputs(scheduler):
    outs = []
    for num_pages in (160, 12):
        engine, _ = fake_engine(num_pages=num_pages, scheduler=scheduler)
        seqs = [engine.add_request([i + 1] * (5 + 3 * i), params(30)) for i in range(10)]
        drain(engine)
        outs.append([s.output_ids for s in seqs])
        if num_pages == 12:
            assert engine.num_preemptions > 0
    assert outs[0] == outs[1]


def test_a_failed_step_that_lost_the_kv_arrays_recomputes_the_survivors():
    marked = 13
    engine, runner = fake_engine(
        fail_if=lambda seqs: any(s.prompt_ids[0] == marked and s.num_pending > 1 for s in seqs),
        max_num_batched_tokens=20, long_prefill_token_threshold=20)
    runner.recover = lambda: True  # "the cache was donated and is gone; re-created empty"
    ok = engine.add_request([1] * 40, params(6))
    engine.step()  # ok's first 20 tokens
    # `bad` goes first and takes the whole budget: ok, half prefilled, is not in its step.
    bad = engine.add_request([marked] * 20, params(6), priority=-1)
    engine.step()
    assert bad.finish_reason == "error" and runner.steps[-1] == [(bad.seq_id, 20)]
    assert ok.num_computed == 0 and ok.block_table == [] and ok in engine.waiting
    assert engine.block_manager.num_cached_pages == 0
    drain(engine)
    reference, _ = fake_engine()
    ref = reference.add_request([1] * 40, params(6))
    drain(reference)
    assert ok.output_ids == ref.output_ids and ok.finish_reason == "length"


def test_a_short_request_behind_a_long_prompt_starts_in_the_next_step():
    """While others wait behind it, a prompt's chunk takes at most half the budget (the
    default long_prefill_token_threshold): a short request queued behind a 400-token prompt is
    prefilled in the next step and samples its first token there, instead of after the long
    prompt's 7 steps; alone, the long prompt takes whole-budget chunks."""
    engine, runner = fake_engine(max_num_seqs=4, max_num_batched_tokens=64)
    long = engine.add_request([5] * 400, params(2))
    engine.step()
    assert runner.steps[-1] == [(long.seq_id, 64)]  # alone: the whole budget
    short = engine.add_request([6] * 10, params(2))
    engine.step()
    assert runner.steps[-1] == [(long.seq_id, 32), (short.seq_id, 10)]
    assert len(short.output_ids) == 1  # its first token, one step after it arrived
    engine.step()  # short decodes; long takes the rest again (nothing waits behind it)
    assert runner.steps[-1] == [(short.seq_id, 1), (long.seq_id, 63)]
    drain(engine)
    assert long.finish_reason == short.finish_reason == "length"
