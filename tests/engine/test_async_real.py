"""AsyncEngine and the prefix cache on the real SmolLM2 model: streamed == `LLM.generate`,
shared chat prefixes hit the cache without changing a token, `LLM.generate` keeps working on the
same engine."""

from __future__ import annotations

import asyncio

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.engine import LLMEngine
from tests.engine.helpers import assert_idle

pytestmark = pytest.mark.slow

SYSTEM = ("You are a helpful assistant for a small bakery. You answer questions about bread, "
          "opening hours and prices politely and briefly, in plain English, without lists.")
QUESTIONS = ["When do you open on Sundays?", "Is the rye bread vegan?",
             "What does a baguette cost?"]


@pytest.fixture(scope="module")
def llm(real_gguf_path):
    return LLM(real_gguf_path, dtype="float32", num_pages=64, max_model_len=256)


def chat(llm: LLM, question: str) -> list[int]:
    return llm.encode_chat([{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": question}])


def shared_pages_tokens(a: list[int], b: list[int], page_size: int = 16) -> int:
    """Tokens in the full pages of the longest common prefix of a and b."""
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return n // page_size * page_size


def test_streamed_equals_offline_and_shared_prefixes_hit(llm):
    prompts = [chat(llm, q) for q in QUESTIONS]
    prompts.append(llm.tokenizer.encode("The capital of France is"))
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    offline = llm.generate(prompts, greedy)
    stop = offline[3].text[4:7]
    with_stop = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop])
    offline[3] = llm.generate([prompts[3]], with_stop)[0]
    assert offline[3].finish_reason == "stop"
    llm.engine.reset_prefix_cache()  # the streamed run below starts cold
    ae = AsyncEngine.from_llm(llm)

    async def one(i, sp):
        return [d async for d in ae.generate(f"r{i}", prompts[i], sp)]

    async def main():
        first = await one(0, greedy)  # alone: registers the system prompt's pages
        rest = await asyncio.gather(one(1, greedy), one(2, greedy), one(3, with_stop))
        return [first, *rest]

    try:
        streams = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        ae.shutdown()
    for deltas, out in zip(streams, offline, strict=True):
        assert [t for d in deltas for t in d.token_ids] == out.token_ids
        assert "".join(d.text for d in deltas) == out.text
        assert deltas[-1].finish_reason == out.finish_reason
    usage = [s[-1].usage for s in streams]
    assert usage[0].cached_prompt_tokens == 0
    for i in (1, 2):
        expected = shared_pages_tokens(prompts[0], prompts[i])
        assert usage[i].cached_prompt_tokens == expected > 0
    assert_idle(llm.engine)
    # The offline API still works on the same engine.
    assert llm.generate([prompts[0]], greedy)[0].token_ids == offline[0].token_ids


def test_prefix_cache_on_equals_off(llm):
    prompts = [chat(llm, q) for q in QUESTIONS]
    sp = SamplingParams(temperature=0.0, max_tokens=16)
    llm.engine.reset_prefix_cache()
    warm = llm.generate(prompts[:1], sp) + llm.generate(prompts[1:], sp)
    hits = [o.num_cached_tokens for o in warm]
    off = LLMEngine(llm.runner, llm.tokenizer, llm.engine_config, enable_prefix_caching=False)
    seqs = [off.add_request(p, sp) for p in prompts]
    while off.has_unfinished():
        off.step()
    llm.engine.reset_prefix_cache()  # `off` wrote pages behind the cache's back
    assert [s.output_ids for s in seqs] == [o.token_ids for o in warm]
    assert hits[0] == 0
    assert hits[1:] == [shared_pages_tokens(prompts[0], p) for p in prompts[1:]]
    assert min(hits[1:]) > 0
