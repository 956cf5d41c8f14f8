"""Speculative decoding inside continuous batching, on the tiny random model: with every
proposer (n-gram; a draft model equal to the target, which is always right for greedy rows; a
different random draft model, mostly wrong) the engine emits exactly the tokens, log-probs and
texts of plain decoding for greedy AND seeded sampling with penalties, top-k/p, min-p,
min_tokens, stop ids and max_tokens landing inside an accepted run; concurrent == alone,
preempted == uninterrupted and prefix cache on == off hold with speculation on; an abort during
speculation frees everything; mixed traffic (speculation on/off per request) compiles one program
per (shape, K, sampling tier)."""

import dataclasses
import random

import jax
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.runner import ModelRunner, compile_count
from jaxserve.engine.sampling import SamplingParams, SamplingTensors
from jaxserve.model.params import init_params
from jaxserve.speculative.draft_model import DraftModelProposer
from jaxserve.speculative.ngram import NgramProposer
from tests.engine.helpers import ECFG, VOCAB, assert_idle

pytestmark = pytest.mark.slow  # loads the real tokenizer

METHODS = ("ngram", "draft_self", "draft_other")


@pytest.fixture(scope="module")
def spec_runners(tiny):
    """One runner per proposer over the tiny model's weights (own KV caches)."""
    cfg, params = tiny.runner.cfg, tiny.runner.params
    other_cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                            num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=512)
    made = {}
    for name, method, proposer, draft in [
        ("ngram", "ngram", NgramProposer(1, 3), None),
        ("draft_self", "draft_model", DraftModelProposer(cfg=cfg), params),
        ("draft_other", "draft_model", DraftModelProposer(cfg=other_cfg),
         init_params(other_cfg, jax.random.key(7))),
        # The target with noisy weights: q near p but not equal, so drafts are both accepted
        # and rejected.
        ("draft_sampled", "draft_model", DraftModelProposer(cfg=cfg, sample_drafts=True),
         jax.tree.map(lambda a: a + 0.05 * np.std(a) * np.random.default_rng(3).standard_normal(
             a.shape).astype(a.dtype) if a.dtype == np.float32 else a, params)),
    ]:
        ecfg = dataclasses.replace(ECFG, speculative_method=method, num_speculative_tokens=4,
                                   speculative_adaptive=False)
        made[name] = (ModelRunner(cfg, params, ecfg, tiny.tokenizer.eos_token_ids,
                                  proposer=proposer, proposer_params=draft), ecfg)
    return made


def spec_engine(spec_runners, tiny, method, **kw) -> LLMEngine:
    runner, ecfg = spec_runners[method]
    return LLMEngine(runner, tiny.tokenizer, dataclasses.replace(ecfg, **kw))


def outputs(engine, prompts, params):
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    while engine.has_unfinished():
        engine.step()
    assert_idle(engine)
    return [engine.output(s) for s in seqs]


def assert_same(spec, plain):
    for i, (a, b) in enumerate(zip(plain, spec, strict=True)):
        assert b.token_ids == a.token_ids, f"request {i}"
        assert (b.finish_reason, b.text) == (a.finish_reason, a.text), f"request {i}"
        if a.logprobs is not None:
            np.testing.assert_allclose([lp for lp, _ in b.logprobs],
                                       [lp for lp, _ in a.logprobs], rtol=1e-4, atol=1e-4)
            assert [sorted(t) for _, t in b.logprobs] == [sorted(t) for _, t in a.logprobs]


def repetitive_prompts(rng, n):
    """Prompts that repeat a phrase, so the n-gram proposer finds matches."""
    out = []
    for _ in range(n):
        phrase = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 9))]
        out.append(phrase * rng.randint(2, 4) + [rng.randrange(VOCAB)
                                                   for _ in range(rng.randint(0, 5))])
    return out


def sampling_mix(stop_id: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=40, seed=1, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.4,
                       presence_penalty=0.2, seed=2, max_tokens=19, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=1.2, min_p=0.1, seed=3, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=25, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0.0, max_tokens=25, stop_token_ids=[stop_id], min_tokens=9),
        SamplingParams(temperature=0.0, max_tokens=21, ignore_eos=True, logprobs=2,
                       repetition_penalty=1.2),
        SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True, num_speculative_tokens=2),
    ]


@pytest.mark.parametrize("method", METHODS)
def test_speculative_equals_plain(tiny, spec_runners, method):
    rng = random.Random(5)
    prompts = repetitive_prompts(rng, 8)
    [greedy] = outputs(tiny.engine, [prompts[4]],
                       [SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)])
    params = sampling_mix(stop_id=greedy.token_ids[6])
    plain = outputs(tiny.engine, prompts, params)
    engine = spec_engine(spec_runners, tiny, method)
    spec = outputs(engine, prompts, params)
    assert_same(spec, plain)
    assert plain[4].finish_reason == "stop" and len(plain[5].token_ids) >= 9
    stats = engine.stats()
    assert stats["spec_steps"] > 0 and stats["spec_proposed"] > 0
    assert all(o.num_spec_proposed <= 2 * len(o.token_ids) for o in spec[-1:])
    if method == "draft_self":  # the target drafting for itself: greedy rows accept all
        assert spec[0].num_spec_accepted == spec[0].num_spec_proposed > 0
        assert stats["steps"] < tiny.engine.stats()["steps"]
    # Drafting's share of a step: none for n-gram lookup; the target drafting for itself costs
    # a target step per round, so its K rounds outweigh the one verification.
    share = stats["spec_draft_share"]
    assert {"ngram": share == 0.0, "draft_self": 0.5 < share < 1.0,
            "draft_other": 0.0 < share < 0.5}[method], share


@pytest.mark.parametrize("method", ["ngram", "draft_self"])
def test_concurrent_preempted_and_prefix_cached_equal_alone(tiny, spec_runners, method):
    rng = random.Random(9)
    shared = [rng.randrange(VOCAB) for _ in range(40)]  # 2.5 pages: prefix-cache hits
    prompts = [shared + p for p in repetitive_prompts(rng, 6)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=30 + i,
                             ignore_eos=True) for i in range(6)]
    alone = [outputs(spec_engine(spec_runners, tiny, method), [p], [sp])[0]
             for p, sp in zip(prompts, params, strict=True)]
    together = outputs(spec_engine(spec_runners, tiny, method), prompts, params)
    assert_same(together, alone)
    no_cache = outputs(spec_engine(spec_runners, tiny, method, enable_prefix_caching=False),
                       prompts, params)
    assert_same(no_cache, alone)
    small = spec_engine(spec_runners, tiny, method, num_pages=24)
    preempted = outputs(small, prompts, params)
    assert small.num_preemptions > 0
    assert_same(preempted, alone)


def test_abort_during_speculation_frees_everything(tiny, spec_runners):
    engine = spec_engine(spec_runners, tiny, "draft_self")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    a, b = (engine.add_request([7, 8, 9, 7, 8, 9], params) for _ in range(2))
    for _ in range(3):
        engine.step()
    assert engine.stats()["spec_steps"] > 0
    engine.abort(a)
    while engine.has_unfinished():
        engine.step()
    assert a.finish_reason == "abort" and len(b.output_ids) == 40
    assert_idle(engine)


def random_params(rng: random.Random) -> SamplingParams:
    kw = {"max_tokens": rng.randint(1, 16), "ignore_eos": True,
          "num_speculative_tokens": rng.choice([None, None, 0, 1, 3])}
    if rng.random() < 0.4:
        kw["temperature"] = 0.0
    else:
        kw.update(temperature=rng.uniform(0.5, 1.5), seed=rng.randrange(1000))
        if rng.random() < 0.4:
            kw["top_k"] = rng.choice([1, 5, 50, 600])
        if rng.random() < 0.4:
            kw["top_p"] = rng.uniform(0.5, 0.99)
    if rng.random() < 0.3:
        kw["repetition_penalty"] = rng.uniform(1.0, 1.5)
    if rng.random() < 0.3:
        kw["logprobs"] = rng.randint(0, 5)
    return SamplingParams(**kw)


def test_mixed_traffic_compiles_one_program_per_shape_k_and_tier(tiny, spec_runners):
    runner, _ = spec_runners["ngram"]
    engine = spec_engine(spec_runners, tiny, "ngram", speculative_adaptive=True,
                         speculative_cost_tokens=1e6)
    keys: set = set()
    run = runner.run

    shapes = []
    pack, pack_flat, inputs = runner._pack, runner._pack_flat, runner.proposer.host_inputs

    def recording_pack(seqs, chunk_lens, B, T):
        tokens, meta = pack(seqs, chunk_lens, B, T)
        shapes.append((B, T, meta.page_tables.shape[1]))
        return tokens, meta

    def recording_pack_flat(seqs, chunk_lens, N, T):
        tokens, meta, logits_index = pack_flat(seqs, chunk_lens, N, T)
        shapes.append((N, T, meta.page_tables.shape[1]))
        return tokens, meta, logits_index

    def recording_inputs(seqs, num_rows):
        out = inputs(seqs, num_rows)
        shapes[-1] += (out["history"].shape[1],)  # the n-gram history width is a shape too
        return out

    def recording_run(sched):
        seqs = sched.seqs
        _, flags = SamplingTensors.build([s.params for s in seqs], [s.prompt_ids for s in seqs],
                                         [s.output_ids for s in seqs], VOCAB,
                                         seeds=[s.seed for s in seqs])
        out = run(sched)
        keys.add((shapes[-1], sched.num_spec, sched.num_steps, flags.tier(VOCAB)))
        return out

    def round_(seed: int) -> tuple[int, int]:
        rng = random.Random(seed)
        prompts = repetitive_prompts(rng, 16)
        params = [random_params(rng) for _ in prompts]
        before, keys_before = compile_count(), len(keys)
        for i in range(0, len(prompts), 8):
            outputs(engine, prompts[i : i + 8], params[i : i + 8])
        return compile_count() - before, len(keys) - keys_before

    runner.run, runner._pack, runner._pack_flat = recording_run, recording_pack, recording_pack_flat
    object.__setattr__(runner.proposer, "host_inputs", recording_inputs)
    try:
        rounds = [round_(seed) for seed in range(3)]
    finally:
        runner.run, runner._pack, runner._pack_flat = run, pack, pack_flat
        object.__delattr__(runner.proposer, "host_inputs")
    for compiles, new_keys in rounds:
        assert compiles <= new_keys, rounds
    assert len({k[1] for k in keys}) >= 2 and 0 in {k[1] for k in keys}  # K varied, 0 included


def token_counts(outs, position, cells):
    counts = dict.fromkeys(cells, 0)
    for o in outs:
        counts[o.token_ids[position]] += 1
    return [counts[c] for c in cells]


def test_sampled_drafts_keep_the_output_distribution(tiny, spec_runners):
    """Drafts drawn from a different model's q, verified by rejection sampling: over many seeds
    the tokens at speculated positions are distributed as without speculation (chi-square
    homogeneity), greedy rows stay exact, and drafts are both accepted and rejected."""
    from scipy.stats import chi2_contingency

    prompt = [11, 12, 13, 14, 15]
    # top_k concentrates the tiny model's flat distribution on a few tokens per position.
    params = [SamplingParams(temperature=0.7, top_k=4, seed=s, max_tokens=4, ignore_eos=True)
              for s in range(480)]
    plain = [o for i in range(0, len(params), 16)
             for o in outputs(tiny.engine, [prompt] * 16, params[i:i + 16])]
    engine = spec_engine(spec_runners, tiny, "draft_sampled")
    spec = [o for i in range(0, len(params), 16)
            for o in outputs(engine, [prompt] * 16, params[i:i + 16])]
    stats = engine.stats()
    assert 0 < stats["spec_accepted"] < stats["spec_proposed"]
    assert [o.token_ids[0] for o in spec] == [o.token_ids[0] for o in plain]  # not speculated
    for position in (1, 2, 3):
        cells = sorted({o.token_ids[position] for o in plain + spec})
        table = [token_counts(plain, position, cells), token_counts(spec, position, cells)]
        assert chi2_contingency(table).pvalue > 1e-3, (position, table)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    assert outputs(engine, [prompt], [greedy])[0].token_ids == \
        outputs(tiny.engine, [prompt], [greedy])[0].token_ids
