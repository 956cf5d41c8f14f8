"""A step that fails inside the compiled program may have consumed the donated KV cache; the
runner recreates it and the engine goes on (the engine's side is in test_scheduler.py)."""

from jaxserve.engine.sampling import SamplingParams
from tests.engine.helpers import assert_idle, run_all


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
