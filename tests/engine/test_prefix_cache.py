"""Prefix caching on the tiny random model: cached == cold (greedy tokens identical), shared
prefixes really hit, generated text is reusable in the next turn, and pages a request no longer
holds are never read by another (NaN in every page the cache does not vouch for changes no
output)."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.sampling import SamplingParams
from tests.engine.helpers import assert_idle, greedy, random_prompts

pytestmark = pytest.mark.slow  # loads the real tokenizer


def run_waves(engine: LLMEngine, waves) -> list[tuple[list[int], int]]:
    """Each wave submitted together and run to completion before the next; per request
    (tokens, cached prompt tokens)."""
    out = []
    for prompts, params in waves:
        seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        while engine.has_unfinished():
            engine.step()
        assert_idle(engine)
        out += [(s.output_ids, s.num_cached_tokens) for s in seqs]
    return out


def shared_prefix_waves(seed: int):
    rng = random.Random(seed)
    system = random_prompts(rng, [100])[0]  # 6 full pages of 16, then 4 tokens
    suffixes = random_prompts(rng, [5, 20, 37, 60, 3, 16, 1])
    prompts = [system + s for s in suffixes]
    params = greedy(rng, len(prompts), max_tokens=10)
    return [(prompts[:2], params[:2]), (prompts[2:], params[2:])]


def test_prefix_cached_equals_cold_and_shared_prefixes_hit(tiny):
    waves = shared_prefix_waves(seed=5)
    cold = run_waves(tiny.new_engine(enable_prefix_caching=False), waves)
    engine = tiny.new_engine()
    cached = run_waves(engine, waves)
    assert [t for t, _ in cached] == [t for t, _ in cold]
    assert all(n == 0 for _, n in cold)
    # Wave 1 is prefilled in one step, before anything is registered; wave 2 reuses the six
    # full pages of the shared prefix.
    assert [n for _, n in cached] == [0, 0] + [96] * 5
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 5 * 96
    assert stats["prefix_cache_queries"] == sum(len(p) for ps, _ in waves for p in ps)


def test_the_next_turn_reuses_the_generated_pages(tiny):
    rng = random.Random(8)
    first = random_prompts(rng, [40])[0]
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    results = {}
    for caching in (False, True):
        engine = tiny.new_engine(enable_prefix_caching=caching)
        (reply, _), = run_waves(engine, [([first], [sp])])
        follow_up = first + reply + [11, 12, 13]  # 73 tokens: 4 full pages known
        (again, cached), = run_waves(engine, [([follow_up], [sp])])
        results[caching] = (reply, again, cached)
    assert results[True][:2] == results[False][:2]
    assert results[True][2] == 64  # prompt and generated tokens alike


def test_a_prompt_of_whole_pages_still_computes_its_last_page(tiny):
    rng = random.Random(9)
    prompt = random_prompts(rng, [64])[0]
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine = tiny.new_engine()
    (a, n0), (b, n1) = run_waves(engine, [([prompt], [sp]), ([prompt], [sp])])
    assert a == b and n0 == 0 and n1 == 48  # not 64: the last token needs its logits


def poison(tiny, pages) -> None:
    pages = np.asarray(sorted(pages), np.int32)
    tiny.runner.cache = jax.tree.map(lambda a: a.at[:, pages].set(jnp.nan), tiny.runner.cache)


def test_freed_and_evicted_pages_are_never_read(tiny):
    tiny.runner.cache = jax.tree.map(jnp.zeros_like, tiny.runner.cache)
    waves = shared_prefix_waves(seed=6)
    # 40 usable pages: the seven prompts (8-11 pages each) cannot all stay cached, so later
    # requests evict and reuse pages other requests released.
    engine = tiny.new_engine(num_pages=41)
    clean = run_waves(engine, waves)
    # NaN in every page the prefix cache does not vouch for: free pages (released by finished
    # requests, stale), and the reserved padding page 0.
    bm = engine.block_manager
    cached = set(bm.cached_page_ids())
    assert cached and len(cached) < bm.num_usable_pages
    poison(tiny, set(range(bm.num_pages)) - cached)
    try:
        again = run_waves(engine, waves)
        assert [t for t, _ in again] == [t for t, _ in clean]
        assert any(n > 0 for _, n in again)
        # Now NaN in the cached pages too, and the cache told to forget them: cold == clean.
        poison(tiny, range(bm.num_pages))
        engine.reset_prefix_cache()
        cold = run_waves(engine, waves)
        assert [t for t, _ in cold] == [t for t, _ in clean]
    finally:
        tiny.runner.cache = jax.tree.map(jnp.zeros_like, tiny.runner.cache)


def test_an_aborted_requests_pages_are_never_read(tiny):
    rng = random.Random(12)
    victim_prompt, other_prompt = random_prompts(rng, [70, 50])
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    # 5 usable pages: the victim (70+ tokens) holds all of them, so the request after it can
    # only be given the victim's released pages.
    engine = tiny.new_engine(num_pages=6, enable_prefix_caching=False)
    (clean, _), = run_waves(engine, [([other_prompt], [sp])])
    victim = engine.add_request(victim_prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    pages = list(victim.block_table)
    assert len(pages) == 5
    assert engine.abort(victim.seq_id)
    poison(tiny, pages)
    try:
        (after, _), = run_waves(engine, [([other_prompt], [sp])])
        assert after == clean
    finally:
        tiny.runner.cache = jax.tree.map(jnp.zeros_like, tiny.runner.cache)
