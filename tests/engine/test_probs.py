"""`probs`: the distribution `sample` draws from, exactly (support, normalisation, greedy
one-hots) and statistically (the sampler's empirical frequencies over many seeds)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine.sampling import (
    SamplingParams,
    SamplingTensors,
    probs,
    sample,
    sampleable_mask,
)
from tests.statistics import MIN_P_VALUE, chi_square, p_value

jit_probs = jax.jit(probs, static_argnums=2)
jit_sample = jax.jit(sample, static_argnums=2)
jit_mask = jax.jit(sampleable_mask, static_argnums=2)

STOP = 7


def _logits(b: int, v: int, seed: int, scale: float = 3.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, v)) * scale, jnp.float32)


def _random_params(rng: np.random.Generator, n: int) -> list[SamplingParams]:
    """Greedy and sampled rows with every transform: temperature, top-k (gathered and
    bisected), top-p, min-p, penalties and min_tokens bans on a stop id."""
    out = []
    for i in range(n):
        kw = {"seed": 100 + i}
        if rng.random() < 0.3:
            kw["temperature"] = 0.0
        else:
            kw["temperature"] = float(rng.uniform(0.3, 1.5))
            if rng.random() < 0.5:
                kw["top_k"] = int(rng.choice([1, 5, 40, 300, 1500]))
            if rng.random() < 0.5:
                kw["top_p"] = float(rng.uniform(0.5, 1.0))
            if rng.random() < 0.4:
                kw["min_p"] = float(rng.uniform(0.0, 0.2))
        if rng.random() < 0.4:
            kw["repetition_penalty"] = 1.3
            kw["frequency_penalty"] = 0.5
            kw["presence_penalty"] = 0.3
        if rng.random() < 0.4:
            kw["min_tokens"] = 3
            kw["stop_token_ids"] = [STOP]
        out.append(SamplingParams(**kw))
    return out


def _build(params, v, outputs=None, prompts=None):
    n = len(params)
    prompts = prompts if prompts is not None else [[0, 3, STOP]] * n
    outputs = outputs if outputs is not None else [[STOP, 9, 9][: i % 3] for i in range(n)]
    return SamplingTensors.build(params, prompts, outputs, v, eos_token_ids=(2,))


@pytest.mark.parametrize("seed", range(4))
def test_probs_normalised_zero_outside_the_mask_and_one_hot_on_greedy_rows(seed):
    rng = np.random.default_rng(seed)
    v, n = 2000, 8
    params = _random_params(rng, n)
    logits = _logits(n, v, seed, scale=float(rng.choice([0.3, 3.0])))
    t, flags = _build(params, v)
    p = jit_probs(logits, t, flags)
    assert p.shape == (n, v) and p.dtype == jnp.float32
    p = np.asarray(p)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-5)
    assert np.all(p >= 0)
    greedy = np.asarray(t.greedy)
    mask = np.asarray(jit_mask(logits, t, flags))
    assert np.all(p[~greedy][~mask[~greedy]] == 0)
    tokens = np.asarray(jit_sample(logits, t, flags).tokens)
    one_hot = np.eye(v, dtype=np.float32)[tokens]
    np.testing.assert_array_equal(p[greedy], one_hot[greedy])
    # Banned stop ids (rows 0, 3, 6 have fewer than min_tokens outputs) are never drawn.
    for i, sp in enumerate(params):
        if sp.min_tokens and i % 3 < sp.min_tokens:
            assert p[i, STOP] == 0 and p[i, 2] == 0
    # The compile tier gives the same distribution as the batch's exact flags.
    np.testing.assert_allclose(
        np.asarray(jit_probs(logits, t, flags.tier(v))), p, rtol=1e-6, atol=1e-7
    )


def test_temperature_rows_are_the_tempered_softmax():
    v = 300
    temperatures = [0.5, 1.0, 1.7]
    params = [SamplingParams(temperature=x, seed=i) for i, x in enumerate(temperatures)]
    logits = _logits(3, v, seed=1)
    t, flags = _build(params, v, outputs=[[]] * 3)
    expected = jax.nn.softmax(logits / jnp.asarray(temperatures)[:, None], axis=-1)
    np.testing.assert_allclose(
        np.asarray(jit_probs(logits, t, flags)), np.asarray(expected), rtol=1e-5, atol=1e-7
    )


def test_all_greedy_batch_is_one_hot_at_the_penalised_argmax():
    v, n = 500, 4
    params = [
        SamplingParams.greedy(repetition_penalty=2.0),
        SamplingParams.greedy(min_tokens=2, stop_token_ids=[STOP]),
        SamplingParams.greedy(),
        SamplingParams.greedy(frequency_penalty=1.5),
    ]
    logits = _logits(n, v, seed=2).at[:, STOP].set(100.0)  # the ban must move the argmax
    t, flags = _build(params, v, outputs=[[5], [], [], [STOP]])
    assert flags.all_greedy
    p = np.asarray(jit_probs(logits, t, flags))
    tokens = np.asarray(jit_sample(logits, t, flags).tokens)
    np.testing.assert_array_equal(p, np.eye(v, dtype=np.float32)[tokens])
    assert tokens[1] != STOP and tokens[2] == STOP


def test_sample_draws_from_probs():
    """Many rows with identical logits and params but their own seeds: each group's token
    frequencies fit its probs row (chi-square, fixed seeds so deterministic)."""
    v, n = 48, 5000
    configs = [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=5),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.9, repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.4),
        dict(temperature=1.2, top_k=20, top_p=0.9, min_p=0.02, min_tokens=3, stop_token_ids=[1]),
    ]
    params = [SamplingParams(**c, seed=g * n + i) for g, c in enumerate(configs) for i in range(n)]
    base = np.random.default_rng(3).standard_normal((len(configs), v)).astype(np.float32) * 1.5
    base[:, 1] += 3.0  # make the min_tokens ban matter
    logits = jnp.asarray(np.repeat(base, n, axis=0))
    history = [[4, 4]] * len(params)  # step 2 < min_tokens: token 1 is banned in the last group
    t, flags = SamplingTensors.build(params, [[0, 9, 12]] * len(params), history, v)
    p = np.asarray(jit_probs(logits, t, flags)).reshape(len(configs), n, v)
    np.testing.assert_array_equal(p, np.broadcast_to(p[:, :1], p.shape))  # seeds don't matter
    assert p[-1, 0, 1] == 0  # banned until min_tokens
    tokens = np.asarray(jit_sample(logits, t, flags).tokens).reshape(len(configs), n)
    for g in range(len(configs)):
        counts = np.bincount(tokens[g], minlength=v)
        assert p_value(chi_square(counts, p[g, 0])) > MIN_P_VALUE, configs[g]
