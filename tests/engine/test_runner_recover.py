"""A step that fails inside the compiled program may have consumed the donated KV cache; the
runner recreates it and the engine goes on (the engine's side is in test_scheduler.py)."""

import jax
import jax.numpy as jnp
import pytest

from jaxserve.engine.sampling import SamplingParams
from jaxserve.model.attention import KVCache
from tests.engine.helpers import assert_idle, run_all

pytestmark = pytest.mark.slow  # loads the real tokenizer (the `tiny` fixture)


def test_recover_recreates_a_consumed_cache_and_generation_goes_on(tiny):
    runner = tiny.runner
    assert runner.recover() is False  # nothing to do while the cache is alive
    shape, dtype = runner.cache.k.shape, runner.cache.k.dtype
    runner.cache.k.delete()
    runner.cache.v.delete()
    assert runner.recover() is True
    assert runner.cache.k.shape == shape and runner.cache.k.dtype == dtype
    assert not runner.cache.v.is_deleted()
    engine = tiny.new_engine()
    prompts = [[5, 6, 7, 8], list(range(100, 140))]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert run_all(engine, prompts, params) == [run_all(engine, [p], params)[0] for p in prompts]
    assert_idle(engine)


def test_recover_recreates_an_int8_cache_as_int8(tiny):
    runner = tiny.runner
    before = runner.cache
    runner.cache = KVCache.create(*before.k.shape, kv_cache_dtype="int8")
    try:
        for a in jax.tree.leaves(runner.cache):
            a.delete()
        assert runner.recover() is True
        c = runner.cache
        assert c.k.shape == before.k.shape and c.k.dtype == c.v.dtype == jnp.int8
        assert c.k_scale.shape == c.v_scale.shape == before.k.shape[:-1]
        assert not any(a.is_deleted() for a in jax.tree.leaves(c))
    finally:
        runner.cache = before
