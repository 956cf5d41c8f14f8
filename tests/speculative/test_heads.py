"""Medusa and EAGLE draft heads on a tiny random model (vocab 512): heads trained for a few
steps on the model's own continuations (the loss falls, and the engine then accepts drafts),
greedy and seeded speculative output equal plain decoding token for token, also concurrent,
preempted and with prefix-cache hits; the feature cache holds the target's hidden states at
every committed position; checkpoints round-trip and refuse another model."""

from __future__ import annotations

import dataclasses
import random

import jax
import numpy as np
import pytest

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.runner import ModelRunner
from jaxserve.engine.sampling import SamplingParams
from jaxserve.errors import ConfigError
from jaxserve.llm import LLM
from jaxserve.model.llama import hidden_dense
from jaxserve.model.params import cast_params, init_params
from jaxserve.speculative import train
from jaxserve.speculative.checkpoint import (
    head_proposer,
    load_head_proposer,
    save_heads,
    target_identity,
)
from tests.engine.helpers import FakeTokenizer, assert_idle
from tests.lanes import fast_first

VOCAB = 512
CFG = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=True)
# One token bucket (32), one batch bucket, one page-table width: few programs to compile.
ECFG = EngineConfig(dtype="float32", page_size=8, num_pages=96, max_model_len=128,
                    max_num_seqs=8, prefill_buckets=(32,), batch_buckets=(8,),
                    max_num_batched_tokens=32, compilation_cache_dir="", num_decode_steps=1,
                    num_speculative_tokens=3, speculative_adaptive=False)
METHODS = ("medusa", "eagle")


@pytest.fixture(scope="module")
def target():
    # Scaled-up embeddings make the random model's greedy continuations fall into short
    # cycles quickly: text a few training steps can learn to draft.
    params = init_params(CFG, jax.random.key(3))
    params["embed"] = params["embed"] * 4.0
    return cast_params(jax.tree.map(np.asarray, params), "float32")


@pytest.fixture(scope="module")
def plain(target):
    return ModelRunner(CFG, target, ECFG, FakeTokenizer.eos_token_ids)


def run(runner, prompts, params, **kw):
    engine = LLMEngine(runner, FakeTokenizer(), dataclasses.replace(ECFG, **kw))
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    while engine.has_unfinished():
        engine.step()
    assert_idle(engine)
    return [engine.output(s).token_ids for s in seqs], engine


def prompts_of(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 20))] for _ in range(n)]


@pytest.fixture(scope="module")
def data(plain):
    """The tiny model's greedy continuations of 24 prompts, as a training set."""
    prompts = prompts_of(1, 24)
    outs, _ = run(plain, prompts, [SamplingParams(temperature=0.0, max_tokens=40,
                                                  ignore_eos=True)] * len(prompts))
    return train.build_dataset(CFG, plain.params,
                               [(p + o, len(p)) for p, o in zip(prompts, outs, strict=True)])


@pytest.fixture(scope="module")
def trained(plain, data):
    """method -> (trained host params, loss curve)."""
    out = {}
    for method in METHODS:
        tcfg = train.TrainConfig(method=method, steps=60, lr=3e-3, warmup=5, num_heads=3,
                                 batch_positions=64, batch_seqs=4)
        out[method] = train.train_heads(tcfg, CFG, plain.params, data, log=lambda _: None)
    return out


def spec_runner(target, method, params, **kw):
    settings = {"num_heads": 3} if method == "medusa" else {}
    proposer, _ = head_proposer(method, settings, CFG)
    ecfg = dataclasses.replace(ECFG, speculative_method=method, speculative_model="x", **kw)
    return ModelRunner(CFG, target, ecfg, FakeTokenizer.eos_token_ids, proposer=proposer,
                       proposer_params=cast_params(params, "float32"))


@pytest.fixture(scope="module")
def spec_runners(target, trained):
    return {m: spec_runner(target, m, trained[m][0]) for m in METHODS}


def test_dataset_holds_the_targets_features_and_its_greedy_tokens(target, data):
    for i in (0, 7, 23):  # batches are built by length: rows must land back in place
        n, start = int(data.lengths[i]), int(data.starts[i])
        ids = data.tokens[i, :n]
        want = np.asarray(hidden_dense(target, CFG, ids[None]))[0]
        np.testing.assert_allclose(data.features[i, :n], want, rtol=1e-4, atol=1e-4)
        # Greedy continuations: the label after each position is the next token itself.
        np.testing.assert_array_equal(data.labels[i, start : n - 1], ids[start + 1 : n])


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss(trained, method):
    curve = trained[method][1]
    first, last = curve[0]["loss"], curve[-1]["loss"]
    assert last < 0.7 * first, curve


@pytest.mark.parametrize("method", fast_first(METHODS))
def test_greedy_and_seeded_output_equal_plain_with_drafts_accepted(plain, spec_runners,
                                                                   method):
    prompts = prompts_of(2, 6)  # held out: not the training prompts
    params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)] * 4 + [
        SamplingParams(temperature=0.8, seed=5, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=28, ignore_eos=True,
                       num_speculative_tokens=2)]
    want, _ = run(plain, prompts, params)
    got, engine = run(spec_runners[method], prompts, params)
    assert got == want
    st = engine.stats()
    assert st["spec_steps"] > 0 and st["spec_accepted"] > 0.2 * st["spec_proposed"], st


@pytest.mark.parametrize("method", fast_first(METHODS))
def test_concurrent_preempted_and_prefix_cached_equal_alone(plain, spec_runners, method):
    rng = random.Random(4)
    shared = [rng.randrange(1, VOCAB) for _ in range(20)]  # 2.5 pages: prefix-cache hits
    prompts = [shared + p for p in prompts_of(3, 5)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=24 + i,
                             ignore_eos=True) for i in range(5)]
    alone = [run(plain, [p], [sp])[0][0] for p, sp in zip(prompts, params, strict=True)]
    together, _ = run(spec_runners[method], prompts, params)
    assert together == alone
    preempted, engine = run(spec_runners[method], prompts, params, num_pages=14)
    assert engine.num_preemptions > 0
    assert preempted == alone


@pytest.mark.parametrize("method", METHODS)
def test_feature_cache_holds_target_hidden_states_at_committed_positions(target, trained,
                                                                         method):
    # Unrolled target layers (the CPU preset's layout) on the way.
    runner = spec_runner(target, method, trained[method][0], unroll_layers=True)
    engine = LLMEngine(runner, FakeTokenizer(), dataclasses.replace(ECFG,
                                                                    enable_prefix_caching=False))
    seq = engine.add_request(prompts_of(5, 1)[0], SamplingParams(temperature=0.0, max_tokens=20,
                                                                 ignore_eos=True))
    table = []
    while engine.has_unfinished():
        table = list(seq.block_table) or table
        engine.step()
    ids = seq.prompt_ids + seq.output_ids
    computed = len(ids) - 1  # the last token is emitted, never computed
    want = np.asarray(hidden_dense(target, CFG, np.asarray([ids[:computed]])))[0]
    S = ECFG.page_size
    pos = np.arange(computed)
    feats = np.asarray(runner.spec_state["features"])[np.asarray(table)[pos // S], pos % S]
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-4)
    assert engine.stats()["spec_accepted"] > 0  # accepted drafts' features are among them


def test_checkpoint_round_trip_and_another_model_is_refused(tmp_path, target, trained):
    identity = target_identity(CFG, target, "tiny")
    for method in METHODS:
        params = trained[method][0]
        settings = {"num_heads": 3} if method == "medusa" else {}
        save_heads(tmp_path / method, method, settings, params, identity, {"steps": 60})
        proposer, got = load_head_proposer(tmp_path / method, method, CFG, target, "tiny")
        assert proposer.name == method
        assert jax.tree.structure(got) == jax.tree.structure(params)
        jax.tree.map(np.testing.assert_array_equal, got, params)
    with pytest.raises(ConfigError, match="medusa heads, not eagle"):
        load_head_proposer(tmp_path / "medusa", "eagle", CFG, target)
    other = dataclasses.replace(CFG, intermediate_size=96)
    with pytest.raises(ConfigError, match="trained for tiny.*architecture"):
        load_head_proposer(tmp_path / "eagle", "eagle", other, init_params(other,
                                                                          jax.random.key(0)))
    retrained = dict(target, final_norm=target["final_norm"] * 1.5)
    with pytest.raises(ConfigError, match="trained for tiny.*weights"):
        load_head_proposer(tmp_path / "medusa", "medusa", CFG, retrained)
    with pytest.raises(ConfigError, match="not a draft-head checkpoint"):
        load_head_proposer(tmp_path / "nothing", "medusa", CFG, target)


def test_llm_builds_head_proposers_from_a_checkpoint_and_needs_one(tmp_path, target, trained):
    save_heads(tmp_path, "medusa", {"num_heads": 3}, trained["medusa"][0],
               target_identity(CFG, target, "tiny.gguf"))
    ecfg = EngineConfig(speculative_method="medusa", speculative_model=str(tmp_path),
                        num_speculative_tokens=3)
    proposer, params = LLM._make_proposer(ecfg, "tiny.gguf", CFG, target)
    assert proposer.num_heads == 3 and params["w"].shape == (3, 64, 64)
    with pytest.raises(ConfigError, match="exceeds the 3 heads"):
        LLM._make_proposer(dataclasses.replace(ecfg, num_speculative_tokens=4), "tiny.gguf",
                           CFG, target)
    for method in METHODS:
        with pytest.raises(ConfigError, match="needs speculative_model"):
            EngineConfig(speculative_method=method)
