"""AsyncEngine: the EngineClient over a background-stepped LLMEngine.

Lifecycle and error paths run on a model-free runner whose steps the test releases one by one
(so "abort while decoding" really aborts mid-step); numerics (streamed == offline, concurrent ==
alone, static == continuous) on the tiny random model; one module on the real model is slow."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time

import pytest

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.protocol import (
    Capacity,
    EngineDrainingError,
    EngineStepError,
    QueueFullError,
    RequestAbortedError,
    StreamDelta,
)
from jaxserve.engine.sampling import SamplingParams
from jaxserve.errors import InvalidRequestError
from tests.engine.helpers import FakeRunner, assert_idle, fake_engine, random_prompts

TIMEOUT = 30.0


def params(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


@contextlib.contextmanager
def serving(engine: LLMEngine, **kwargs):
    ae = AsyncEngine(engine, model_name="test", **kwargs)
    try:
        yield ae
    finally:
        ae.shutdown()
    assert not ae._thread.is_alive()
    assert_idle(engine)


async def collect(stream) -> list[StreamDelta]:
    return [d async for d in stream]


class GatedRunner(FakeRunner):
    """Each step waits for `release()`; `wait_entered()` waits until a step has started."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gate = threading.Semaphore(0)
        self._entered = threading.Semaphore(0)
        self.open = False

    def run(self, sched):
        self._entered.release()
        if not self.open:
            assert self._gate.acquire(timeout=TIMEOUT), "the test never released the step"
        return super().run(sched)

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._gate.release()

    def wait_entered(self) -> None:
        assert self._entered.acquire(timeout=TIMEOUT), "no step started"

    def open_gate(self) -> None:
        self.open = True
        self.release(100)


def gated_engine(**kwargs) -> tuple[LLMEngine, GatedRunner]:
    return fake_engine(runner_cls=GatedRunner, **kwargs)


# -- lifecycle and errors (model-free) ------------------------------------------------------------


def test_stream_ends_with_usage_and_timings():
    engine, _ = fake_engine()

    async def main():
        with serving(engine) as ae:
            deltas = await collect(ae.generate("r", [1, 2, 3], params(5, logprobs=0)))
            stats = ae.stats()
        return deltas, stats

    deltas, stats = run(main())
    assert [len(d.token_ids) for d in deltas] == [1] * 5
    assert all(d.finish_reason is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == "length"
    assert last.usage.prompt_tokens == 3 and last.usage.completion_tokens == 5
    assert last.usage.cached_prompt_tokens == 0
    assert 0 <= last.timings.queue_s <= last.timings.ttft_s
    assert all(len(d.logprobs) == 1 for d in deltas)
    assert stats["requests"] == 1 and stats["steps"] == 5


@pytest.mark.parametrize(
    ("prompt", "sp", "message"),
    [
        ([], params(4), "prompt is empty"),
        ([1, 5000], params(4), r"\[5000\] outside"),
        ([1] * 500, params(13), "exceeds the context length 512"),
        ([1] * 512, params(1), "context length is 512"),
        ([1, 2], {"max_tokens": 3}, "SamplingParams"),
    ],
)
def test_invalid_requests_fail_before_the_first_delta(prompt, sp, message):
    engine, runner = fake_engine()

    async def main():
        with serving(engine) as ae:
            with pytest.raises(InvalidRequestError, match=message):
                await ae.generate("r", prompt, sp).__anext__()
            # The offline API stops at the context limit instead (not strict).
            if message.startswith("exceeds"):
                engine.make_sequence(prompt, sp)

    run(main())
    assert runner.steps == []


def test_duplicate_request_id_queue_bound_and_draining():
    engine, runner = gated_engine(max_num_seqs=1)

    async def main():
        with serving(engine, max_waiting=2) as ae:
            a = ae.generate("a", [1] * 5, params(3))
            first = asyncio.ensure_future(a.__anext__())
            await asyncio.to_thread(runner.wait_entered)  # a's prefill is in flight
            with pytest.raises(InvalidRequestError, match="already in flight"):
                await ae.generate("a", [2] * 5, params(3)).__anext__()
            b = ae.generate("b", [2] * 5, params(3))
            second = asyncio.ensure_future(b.__anext__())
            await asyncio.sleep(0.01)
            assert ae.capacity().waiting == 2  # a (being prefilled) and b
            with pytest.raises(QueueFullError) as info:
                await ae.generate("c", [3] * 5, params(3)).__anext__()
            assert info.value.retry_after_s > 0
            drained = asyncio.ensure_future(ae.drain())
            await asyncio.sleep(0.01)
            with pytest.raises(EngineDrainingError):
                await ae.generate("d", [4] * 5, params(3)).__anext__()
            assert not drained.done()
            runner.open_gate()
            rest_a = [await first] + await collect(a)
            rest_b = [await second] + await collect(b)
            assert await drained is True
            assert rest_a[-1].finish_reason == rest_b[-1].finish_reason == "length"
            assert ae.stats()["rejected_queue_full"] == 1

    run(main())


def test_abort_while_queued_prefilling_or_decoding_frees_pages_at_once():
    engine, runner = gated_engine(max_num_seqs=2, max_num_batched_tokens=64,
                                  long_prefill_token_threshold=64,  # whole-budget chunks
                                  prefill_buckets=(16, 32, 64), batch_buckets=(1, 2, 4))
    bm = engine.block_manager

    async def main():
        with serving(engine) as ae:
            dec = ae.generate("dec", [1] * 20, params(100))
            got = asyncio.ensure_future(dec.__anext__())
            runner.release()  # dec's prefill
            await got
            await asyncio.to_thread(runner.wait_entered)  # prefill
            await asyncio.to_thread(runner.wait_entered)  # dec's first decode step, held
            long = ae.generate("long", [2] * 300, params(5))
            long_next = asyncio.ensure_future(long.__anext__())
            queued = ae.generate("queued", [3] * 10, params(5))
            queued_next = asyncio.ensure_future(queued.__anext__())
            await asyncio.sleep(0.01)
            held_by_dec = len(engine.find("dec").block_table)

            # Decoding, in the middle of its step: freed before abort() returns.
            assert ae.abort("dec")
            assert bm.num_held_pages == 0
            runner.release()
            with pytest.raises(RequestAbortedError):
                await dec.__anext__()

            # Prefilling: after its first 64-token chunk.
            await asyncio.to_thread(runner.wait_entered)
            runner.release()
            await asyncio.to_thread(runner.wait_entered)  # the next step is held
            seq = engine.find("long")
            assert seq is not None and seq.num_computed >= 64
            assert ae.abort("long") and engine.find("long") is None
            with pytest.raises(RequestAbortedError):
                await long_next
            queued_seq = engine.find("queued")  # maybe in the held step
            assert bm.num_held_pages == len(queued_seq.block_table)

            # Queued (or in the held step): gone at once too.
            assert ae.abort("queued")
            assert bm.num_held_pages == 0 and not engine.has_unfinished()
            with pytest.raises(RequestAbortedError):
                await queued_next
            assert not ae.abort("queued")
            runner.open_gate()
            return held_by_dec

    assert run(main()) > 0


def test_closing_the_stream_early_aborts_and_frees():
    engine, runner = gated_engine()
    bm = engine.block_manager

    async def main():
        with serving(engine) as ae:
            stream = ae.generate("r", [1] * 40, params(100))
            runner.release(3)
            for _ in range(3):
                await stream.__anext__()
            assert bm.num_held_pages > 0
            await stream.aclose()  # the client went away
            assert bm.num_held_pages == 0 and ae.stats()["requests_in_flight"] == 0
            runner.open_gate()

    run(main())


def test_deadline_aborts_the_request():
    engine, runner = gated_engine()

    async def main():
        with serving(engine) as ae:
            stream = ae.generate("r", [1] * 40, params(100), deadline=time.monotonic() + 0.3)
            runner.release(2)
            await stream.__anext__()
            await stream.__anext__()
            t0 = time.monotonic()
            with pytest.raises(RequestAbortedError, match="deadline"):
                await collect(stream)  # the next steps are held past the deadline
            assert time.monotonic() - t0 < 5
            assert engine.block_manager.num_held_pages == 0
            runner.open_gate()

    run(main())


def test_a_failing_step_fails_only_its_requests():
    marked = 13
    engine, runner = fake_engine(
        fail_if=lambda seqs: any(s.prompt_ids[0] == marked and s.num_pending > 1 for s in seqs))

    async def main():
        with serving(engine) as ae:
            good = asyncio.ensure_future(collect(ae.generate("good", [1] * 10, params(20))))
            await asyncio.sleep(0.05)
            with pytest.raises(EngineStepError, match="injected"):
                await collect(ae.generate("bad", [marked] * 10, params(5)))
            after = await collect(ae.generate("after", [2] * 10, params(5)))
            return await good, after

    good, after = run(main())
    assert good[-1].finish_reason == after[-1].finish_reason == "length"
    reference, _ = fake_engine()
    seq = reference.add_request([1] * 10, params(20))
    while reference.has_unfinished():
        reference.step()
    assert [t for d in good for t in d.token_ids] == seq.output_ids


def test_shutdown_aborts_what_is_in_flight():
    engine, runner = gated_engine()

    async def main():
        ae = AsyncEngine(engine, model_name="test")
        stream = ae.generate("r", [1] * 10, params(50))
        pending = asyncio.ensure_future(stream.__anext__())
        await asyncio.to_thread(runner.wait_entered)
        await asyncio.to_thread(ae.shutdown, 0.2)
        with pytest.raises(RequestAbortedError, match="shut down"):
            await pending
        runner.open_gate()
        await asyncio.to_thread(ae._thread.join, TIMEOUT)
        assert not ae._thread.is_alive()
        with pytest.raises(EngineDrainingError):
            await ae.generate("s", [1], params(1)).__anext__()

    run(main())
    assert_idle(engine)


# -- numerics on the tiny random model ------------------------------------------------------------


def alone(engine: LLMEngine, prompt, sp):
    seq = engine.add_request(prompt, sp)
    while engine.has_unfinished():
        engine.step()
    return engine.output(seq)


@pytest.mark.slow
def test_streamed_concurrent_requests_equal_each_alone_offline(tiny):
    rng = random.Random(21)
    lengths = [3, 17, 40, 64, 100, 130, 250, 9]
    prompts = random_prompts(rng, lengths)
    plain = [params(rng.randint(4, 20)) for _ in prompts]
    offline = tiny.new_engine(enable_prefix_caching=False)
    texts = [alone(offline, p, sp).text for p, sp in zip(prompts, plain, strict=True)]
    # Stop strings taken from the middle of some outputs (streamed text must hold back their
    # prefixes), logprobs on others.
    final = []
    for i, (sp, text) in enumerate(zip(plain, texts, strict=True)):
        if i % 2 == 0 and len(text) >= 6:
            sp = SamplingParams(temperature=0.0, max_tokens=sp.max_tokens, ignore_eos=True,
                                stop=[text[len(text) // 2 : len(text) // 2 + 2]])
        elif i % 3 == 1:
            sp = params(sp.max_tokens, logprobs=2)
        final.append(sp)
    expected = [alone(offline, p, sp) for p, sp in zip(prompts, final, strict=True)]
    assert any(e.finish_reason == "stop" for e in expected)

    engine = tiny.new_engine(enable_prefix_caching=False)

    async def one(ae, i):
        await asyncio.sleep(0.02 * i)  # staggered: requests join a running batch
        return await collect(ae.generate(f"r{i}", prompts[i], final[i]))

    async def main():
        with serving(engine) as ae:
            return await asyncio.gather(*(one(ae, i) for i in range(len(prompts))))

    streams = run(main())
    for i, (deltas, exp) in enumerate(zip(streams, expected, strict=True)):
        assert [t for d in deltas for t in d.token_ids] == exp.token_ids, i
        assert "".join(d.text for d in deltas) == exp.text, i
        assert deltas[-1].finish_reason == exp.finish_reason, i
        if exp.logprobs is not None:
            streamed = [lp for d in deltas for lp in d.logprobs]
            assert [lp for lp, _ in streamed] == pytest.approx([lp for lp, _ in exp.logprobs],
                                                               abs=1e-5)
            assert all(len(top) == 2 for _, top in streamed)
        stop = final[i].stop
        if stop:  # no delta ever showed text past where the output was cut
            assert stop[0] not in "".join(d.text for d in deltas)


@pytest.mark.slow
def test_static_equals_continuous_on_the_model(tiny):
    rng = random.Random(33)
    prompts = random_prompts(rng, [5, 90, 33, 200, 16, 61, 120])
    sps = [params(rng.randint(2, 15)) for _ in prompts]
    outs = {}
    for scheduler in ("static", "continuous"):
        engine = tiny.new_engine(scheduler=scheduler, max_num_seqs=3)
        seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, sps, strict=True)]
        while engine.has_unfinished():
            engine.step()
        assert_idle(engine)
        outs[scheduler] = [s.output_ids for s in seqs]
    assert outs["static"] == outs["continuous"]


@pytest.mark.slow
def test_warmup_info_capacity(tiny):
    engine = tiny.new_engine()

    async def main():
        with serving(engine) as ae:
            await ae.warmup()
            info = ae.model_info()
            assert info.vocab_size == 49152 and info.max_model_len == 512
            assert info.page_size == 16 and info.extra["prefix_caching"] is True
            assert ae.capacity() == Capacity(free_pages=159, total_pages=159, running=0,
                                             waiting=0)
            assert ae.tokenize("Hello") == tiny.tokenizer.encode("Hello")
            with pytest.raises(InvalidRequestError):
                ae.render_chat([{"role": "wizard", "content": "hi"}])
            assert ae.stats()["decode_steps"] == 1

    run(main())
