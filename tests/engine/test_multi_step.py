"""Multi-step decode on the tiny random model: N decode steps in one program give exactly the
tokens of N single steps (greedy and seeded sampling with penalties, top-k/p, min-p, min_tokens,
stop ids and max_tokens landing inside a block); aborts and deadlines are honoured at a block's
end; mixed sampling traffic compiles one program per (shape, sampling tier) and nothing else."""

import random
import time

import numpy as np
import pytest

from jaxserve.engine.runner import compile_count
from jaxserve.engine.sampling import SamplingParams, SamplingTensors
from tests.engine.helpers import VOCAB, assert_idle, random_prompts, run_all

pytestmark = pytest.mark.slow  # loads the real tokenizer


@pytest.fixture(autouse=True)
def engine_left_idle(tiny):
    yield
    assert_idle(tiny.engine)
    tiny.engine.reset_prefix_cache()


def outputs(engine, prompts, params):
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    while engine.has_unfinished():
        engine.step()
    assert_idle(engine)
    return [engine.output(s) for s in seqs]


def sampling_mix(stop_id: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=40, seed=1, max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.4,
                       presence_penalty=0.2, seed=2, max_tokens=9, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=1.2, min_p=0.1, seed=3, max_tokens=14, ignore_eos=True),
        # Stops at its stop id inside a block ...
        SamplingParams(temperature=0.0, max_tokens=15, stop_token_ids=[stop_id]),
        # ... or not before min_tokens (banned until then).
        SamplingParams(temperature=0.0, max_tokens=15, stop_token_ids=[stop_id], min_tokens=7),
        SamplingParams(temperature=0.7, seed=4, max_tokens=10, logprobs=0, ignore_eos=True,
                       repetition_penalty=1.1),
    ]


@pytest.mark.parametrize("num_steps", [4, 8])
def test_n_steps_equal_single_steps(tiny, num_steps):
    rng = random.Random(11)
    prompts = random_prompts(rng, [5, 17, 40, 3, 9, 9, 30])
    [greedy] = run_all(tiny.engine, [prompts[4]], [SamplingParams(temperature=0.0, max_tokens=15,
                                                                  ignore_eos=True)])
    params = sampling_mix(stop_id=greedy[3])
    single = outputs(tiny.engine, prompts, params)
    multi_engine = tiny.new_engine(num_decode_steps=num_steps)
    multi = outputs(multi_engine, prompts, params)
    assert multi_engine.stats()["multi_decode_steps"] > 0
    assert single[4].finish_reason == "stop" and len(single[4].token_ids) == 4
    assert len(single[5].token_ids) >= 7
    for i, (a, b) in enumerate(zip(single, multi, strict=True)):
        assert b.token_ids == a.token_ids, f"request {i}"
        assert (b.finish_reason, b.text) == (a.finish_reason, a.text)
        if a.logprobs is not None:
            np.testing.assert_allclose([lp for lp, _ in b.logprobs],
                                       [lp for lp, _ in a.logprobs], rtol=1e-4, atol=1e-4)
            assert [sorted(t) for _, t in b.logprobs] == [sorted(t) for _, t in a.logprobs]


def test_abort_and_deadline_are_honoured_at_the_block_end(tiny):
    engine = tiny.new_engine(num_decode_steps=4)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    aborted, expiring, other = (engine.add_request([7, 8, 9], params) for _ in range(3))
    run = tiny.runner.run
    blocks = []

    def run_and_interrupt(sched):
        if sched.num_steps > 1 and blocks == [1]:  # another thread acts while the block runs
            engine.abort(aborted)
            expiring.deadline = time.monotonic()
        out = run(sched)
        blocks.append(sched.num_steps)
        return out

    tiny.runner.run = run_and_interrupt
    try:
        engine.step()  # prefill
        done = engine.step()  # the first 4-token block: `aborted` finishes now
        assert aborted in done and aborted.finish_reason == "abort"
        assert len(aborted.output_ids) == 1  # nothing of the block it was aborted in
        assert len(expiring.output_ids) == 5 and not expiring.is_finished  # block kept
        engine.step()
        assert expiring.finish_reason == "abort" and len(expiring.output_ids) == 5
        while engine.has_unfinished():
            engine.step()
    finally:
        tiny.runner.run = run
    assert blocks[1] == 4 and len(other.output_ids) == 30
    assert_idle(engine)


def random_params(rng: random.Random) -> SamplingParams:
    kw = {"max_tokens": rng.randint(1, 12), "ignore_eos": True}
    if rng.random() < 0.3:
        kw["temperature"] = 0.0
    else:
        kw.update(temperature=rng.uniform(0.5, 1.5), seed=rng.randrange(1000))
        if rng.random() < 0.4:
            kw["top_k"] = rng.choice([1, 5, 50, 200, 600, 3000])
        if rng.random() < 0.4:
            kw["top_p"] = rng.uniform(0.5, 0.99)
        if rng.random() < 0.3:
            kw["min_p"] = rng.uniform(0.01, 0.2)
    if rng.random() < 0.3:
        kw["repetition_penalty"] = rng.uniform(1.0, 1.5)
    if rng.random() < 0.3:
        kw["logprobs"] = rng.randint(0, 7)
    return SamplingParams(**kw)


def test_mixed_sampling_traffic_compiles_one_program_per_shape_and_tier(tiny):
    engine = tiny.new_engine(num_decode_steps=4)
    keys: set = set()
    run = tiny.runner.run

    def recording_run(sched):
        seqs = sched.seqs
        _, flags = SamplingTensors.build([s.params for s in seqs], [s.prompt_ids for s in seqs],
                                         [s.output_ids for s in seqs], VOCAB,
                                         seeds=[s.seed for s in seqs])
        out = run(sched)
        keys.add((tiny.shapes[-1], sched.num_steps, flags.tier(VOCAB)))
        return out

    def round_(seed: int) -> tuple[int, int]:
        rng = random.Random(seed)
        prompts = random_prompts(rng, [rng.randint(1, 60) for _ in range(24)])
        params = [random_params(rng) for _ in prompts]
        before, keys_before = compile_count(), len(keys)
        for i in range(0, len(prompts), 8):  # waves, so batch sizes and tiers vary
            outputs(engine, prompts[i : i + 8], params[i : i + 8])
        return compile_count() - before, len(keys) - keys_before

    tiny.runner.run = recording_run
    try:
        rounds = [round_(seed) for seed in range(4)]
    finally:
        tiny.runner.run = run
    # Nothing but the padded shape, the number of steps and the sampling tier keys a program:
    # each round compiles at most one program per key it meets for the first time.
    for compiles, new_keys in rounds:
        assert compiles <= new_keys, rounds
    assert len({k[2] for k in keys}) >= 4  # the traffic really did mix sampling features
