"""The engine loop on a tiny random model (real tokenizer, vocab 49152): bounded compiles,
batched == alone, preempted == uninterrupted, and stale/NaN pages never reach an output.

Every request here sets ignore_eos, so when a request finishes depends only on max_tokens and
the scheduling of a round depends only on its prompt lengths, never on the (random) tokens."""

import dataclasses
import random

import jax
import jax.numpy as jnp
import pytest

from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.runner import compile_count
from jaxserve.engine.sampling import SamplingParams
from tests.engine.helpers import ECFG, assert_idle, greedy, random_prompts, run_all

pytestmark = pytest.mark.slow  # loads the real tokenizer


@pytest.fixture(autouse=True)
def engine_left_idle(tiny):
    yield
    assert_idle(tiny.engine)
    # Other tests' engines write the shared runner's pages behind this engine's prefix cache.
    tiny.engine.reset_prefix_cache()


def test_no_recompilation_once_the_buckets_are_warm(tiny):
    def round_(seed: int) -> tuple[int, set]:
        rng = random.Random(seed)
        lengths = [rng.randint(1, 300) for _ in range(40)]
        params = greedy(rng, len(lengths), max_tokens=20)
        first_step, before = len(tiny.shapes), compile_count()
        run_all(tiny.engine, random_prompts(rng, lengths), params)
        return compile_count() - before, set(tiny.shapes[first_step:])

    warm_compiles, warm_shapes = round_(seed=1)
    # Every padded shape is one program, compiled once: nothing else in the key may vary.
    assert warm_compiles <= len(warm_shapes)
    assert {s[1] for s in warm_shapes} == set(ECFG.batch_buckets)
    assert {s[2] for s in warm_shapes if not s[0]} == {64, 320}
    assert {s[3] for s in warm_shapes} == set(tiny.runner.width_buckets) == {16, 32}

    for seed in (2, 3):
        compiles, shapes = round_(seed)
        # A later round may meet a (batch, length, width) combination the first did not (which
        # rows share a step depends on preemptions and prefix-cache hits); it compiles that
        # combination and nothing else.
        new = shapes - warm_shapes
        assert compiles <= len(new), f"round {seed} recompiled {compiles - len(new)} program(s)"
        warm_shapes |= shapes
    # The programs are bounded by the buckets: {decode, 2 lengths} x 2 batches x 2 widths.
    assert len(warm_shapes) <= 3 * 2 * 2


def test_batched_equals_alone(tiny):
    rng = random.Random(7)
    lengths = [1, 15, 16, 17, 63, 64, 65, 120, 200, 256, 257, 300]
    prompts = random_prompts(rng, lengths)
    params = greedy(rng, len(prompts), max_tokens=12)
    together = run_all(tiny.engine, prompts, params)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        tiny.engine.reset_prefix_cache()  # alone and cold (cached == cold is tested apart)
        assert run_all(tiny.engine, [p], [sp])[0] == together[i], f"request {i} ({len(p)} tok)"


def test_preemption_by_recompute_changes_no_output(tiny):
    rng = random.Random(3)
    lengths = [rng.randint(5, 40) for _ in range(10)]
    prompts = random_prompts(rng, lengths)
    # Sampled, not greedy: a preempted request must redraw exactly the same tokens, since its
    # key depends only on (seed, tokens generated so far). top_k keeps the draw away from CDF
    # boundaries: the recompute prefill matches the decode logits only to ~1e-6, which over a
    # random model's near-uniform 49152-way distribution would move a draw now and then.
    params = [
        SamplingParams(
            temperature=1.0, top_k=8, seed=100 + i, max_tokens=rng.randint(16, 40), ignore_eos=True
        )
        for i in range(len(prompts))
    ]
    reference = run_all(tiny.engine, prompts, params)

    # Same runner (so the same programs), but the scheduler may only use 12 pages: any one
    # request fits (<= 80 tokens = 5 pages), ten together do not.
    small = LLMEngine(tiny.runner, tiny.tokenizer, dataclasses.replace(ECFG, num_pages=13))
    assert run_all(small, prompts, params) == reference
    assert small.num_preemptions > 0


def test_nan_in_unused_and_stale_pages_changes_no_output(tiny):
    rng = random.Random(11)
    lengths = [1, 5, 16, 33, 70, 150, 290]
    prompts = random_prompts(rng, lengths)
    params = greedy(rng, len(prompts), max_tokens=10)
    tiny.runner.cache = jax.tree.map(jnp.zeros_like, tiny.runner.cache)
    clean = run_all(tiny.engine, prompts, params)
    # Every page, the reserved padding page 0 included, now holds NaN; the prefix cache must
    # forget what the pages held.
    tiny.runner.cache = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), tiny.runner.cache)
    tiny.engine.reset_prefix_cache()
    try:
        assert run_all(tiny.engine, prompts, params) == clean
    finally:
        tiny.runner.cache = jax.tree.map(jnp.zeros_like, tiny.runner.cache)


def test_mixed_steps_equal_alone(tiny):
    """Requests arriving every other step join the running ones: their prompt chunks share
    steps with the others' decodes (a 150-token prompt over several steps, under a 64-token
    budget). Every request's greedy tokens equal its tokens run alone."""
    rng = random.Random(5)
    prompts = random_prompts(rng, [9, 40, 150, 1, 64, 17])
    params = greedy(rng, len(prompts), max_tokens=10)
    engine = tiny.new_engine(max_num_batched_tokens=64)
    seen = []
    run = tiny.runner.run

    def recording_run(sched):
        seen.append([(s.status.name, n) for s, n in zip(sched.seqs, sched.num_tokens,
                                                         strict=True)])
        return run(sched)

    tiny.runner.run = recording_run
    try:
        pending, seqs, n = list(zip(prompts, params, strict=True)), [], 0
        while pending or engine.has_unfinished():
            if pending and n % 2 == 0:
                seqs.append(engine.add_request(*pending.pop(0)))
            engine.step()
            n += 1
    finally:
        tiny.runner.run = run
    assert_idle(engine)
    mixed = [s for s in seen if ("RUNNING", 1) in s and any(c > 1 for _, c in s)]
    assert len(mixed) >= 4 and engine.stats()["mixed_steps"] >= 4
    assert all(sum(c for _, c in s) <= 64 for s in seen)
    together = [engine.output(s).token_ids for s in seqs]
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        tiny.engine.reset_prefix_cache()
        assert run_all(tiny.engine, [p], [sp])[0] == together[i], f"request {i} ({len(p)} tok)"
