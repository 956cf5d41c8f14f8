"""The engine loop on a tiny random model (real tokenizer, vocab 49152): bounded compiles,
batched == alone, preempted == uninterrupted, and stale/NaN pages never reach an output.

Every request here sets ignore_eos, so when a request finishes depends only on max_tokens and
the scheduling of a round depends only on its prompt lengths, never on the (random) tokens."""

import dataclasses
import random

import jax
import jax.numpy as jnp
import pytest

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.runner import ModelRunner, compile_count
from jaxserve.engine.sampling import SamplingParams
from jaxserve.model.params import init_params
from jaxserve.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # loads the real tokenizer

VOCAB = 49152
# Few buckets keep the number of programs (and the test's compile time) small; what is tested
# is that the count is bounded by them, whatever they are.
ECFG = EngineConfig(
    dtype="float32",
    page_size=16,
    num_pages=160,
    max_model_len=512,
    max_num_seqs=16,
    prefill_buckets=(64, 320),
    batch_buckets=(4, 16),
    max_prefill_tokens=4096,
    compilation_cache_dir="",
)


@dataclasses.dataclass
class Tiny:
    runner: ModelRunner
    engine: LLMEngine
    tokenizer: object
    # (decode?, B, T, W) of every step the runner has packed, in order.
    shapes: list[tuple[bool, int, int, int]]


@pytest.fixture(scope="module")
def tiny(real_gguf_path):
    tokenizer = load_tokenizer(real_gguf_path)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        eos_token_ids=tokenizer.eos_token_ids,
    )
    runner = ModelRunner(cfg, init_params(cfg, jax.random.key(0)), ECFG, tokenizer.eos_token_ids)
    shapes = []
    pack = runner._pack

    def recording_pack(seqs, chunk_lens, B, T):
        tokens, meta = pack(seqs, chunk_lens, B, T)
        shapes.append((T == 1, B, T, meta.page_tables.shape[1]))
        return tokens, meta

    runner._pack = recording_pack
    return Tiny(runner, LLMEngine(runner, tokenizer, ECFG), tokenizer, shapes)


def assert_idle(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert not engine.waiting and not engine.running
    assert bm.num_free_pages == bm.num_usable_pages, "pages leaked"


@pytest.fixture(autouse=True)
def engine_left_idle(tiny):
    yield
    assert_idle(tiny.engine)


def run_all(engine: LLMEngine, prompts, params) -> list[list[int]]:
    """Submit every request at once, step until all finish; token ids in submission order."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    while engine.has_unfinished():
        engine.step()
    assert_idle(engine)
    outs = [engine.output(s) for s in seqs]
    for out, sp in zip(outs, params, strict=True):
        assert out.finish_reason == "length" and len(out.token_ids) == sp.max_tokens
    return [o.token_ids for o in outs]


def random_prompts(rng: random.Random, lengths) -> list[list[int]]:
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def greedy(rng: random.Random, n: int, max_tokens: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(1, max_tokens), ignore_eos=True)
        for _ in range(n)
    ]


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
        # Precondition (deterministic: scheduling depends only on the seeded lengths).
        assert shapes <= warm_shapes, shapes - warm_shapes
        assert compiles == 0, f"round {seed} recompiled {compiles} program(s)"


def test_batched_equals_alone(tiny):
    rng = random.Random(7)
    lengths = [1, 15, 16, 17, 63, 64, 65, 120, 200, 256, 257, 300]
    prompts = random_prompts(rng, lengths)
    params = greedy(rng, len(prompts), max_tokens=12)
    together = run_all(tiny.engine, prompts, params)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
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
    # Every page, the reserved padding page 0 included, now holds NaN.
    tiny.runner.cache = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), tiny.runner.cache)
    try:
        assert run_all(tiny.engine, prompts, params) == clean
    finally:
        tiny.runner.cache = jax.tree.map(jnp.zeros_like, tiny.runner.cache)
