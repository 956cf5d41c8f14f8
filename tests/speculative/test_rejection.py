"""Rejection sampling: the emitted tokens are distributed as the target's, whatever the
proposer (sampled, deterministic, always wrong, always right); acceptance matches theory;
greedy targets accept exactly the matching prefix; fixed shapes under jit. All statistical
checks run on tens of thousands of vectorised trials with fixed seeds, so they are
deterministic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine.sampling import (
    SamplingParams,
    SamplingTensors,
    _row_uniforms,
    draw_weighted,
    probs,
    sample,
)
from jaxserve.speculative.rejection import rejection_sample, spec_uniforms
from tests.statistics import MIN_P_VALUE, chi_square, fits, p_value

jit_rejection = jax.jit(rejection_sample)
N = 40_000  # trials per statistical test


def _uniforms(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    # float32 draws stay in [0, 1); float64 ones cast to f32 can round up to 1.0.
    return rng.random((n, k), dtype=np.float32), rng.random((n, k + 1), dtype=np.float32)


def _dirichlet(rng: np.random.Generator, shape: tuple[int, ...], zeros: float) -> np.ndarray:
    """Random distributions over the last axis with about a ``zeros`` fraction of exact
    zeros (never a whole row), as float32 rows that sum to 1."""
    x = rng.dirichlet(np.full(shape[-1], 0.7), shape[:-1])
    x = np.where(rng.random(shape) < zeros, 0.0, x)
    top = np.argmax(rng.random(shape), axis=-1)
    np.put_along_axis(x, top[..., None], np.maximum(x.max(-1, keepdims=True), 0.05), axis=-1)
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def _draw_np(rng: np.random.Generator, dist: np.ndarray) -> np.ndarray:
    """One token per row of dist [N, V] (float64 inverse CDF)."""
    cum = np.cumsum(dist.astype(np.float64), axis=-1)
    u = rng.random(dist.shape[0]) * cum[:, -1]
    return np.minimum((cum <= u[:, None]).sum(-1), dist.shape[-1] - 1)


def _markov_trials(rng, v, k, deterministic, n=N):
    """Trials of a first-order Markov target P[prev] verified against a draft model Q[prev]
    (sampled from Q, or its argmax when deterministic), from start token 0. Each trial
    verifies a random number of drafts; what lies past it is garbage that must be ignored.
    Returns (P, the rejection_sample arguments)."""
    target = _dirichlet(rng, (v, v), zeros=0.3)
    draft_model = 0.5 * target + 0.5 * _dirichlet(rng, (v, v), zeros=0.3)
    num_draft = rng.integers(0, k + 1, n).astype(np.int32)
    prev = np.zeros(n, np.int64)
    drafts = np.zeros((n, k), np.int32)
    q = np.zeros((n, k, v), np.float32)
    p = np.zeros((n, k + 1, v), np.float32)
    for j in range(k + 1):
        p[:, j] = target[prev]
        if j == k:
            break
        q[:, j] = draft_model[prev]
        d = np.argmax(q[:, j], -1) if deterministic else _draw_np(rng, q[:, j])
        drafts[:, j] = d
        prev = d
    past = np.arange(k)[None, :] >= num_draft[:, None]
    drafts[past] = rng.choice([-1, v + 3], past.sum())
    q[past] = 1.0 / v
    p[np.arange(k + 1)[None, :] > num_draft[:, None]] = np.eye(v, dtype=np.float32)[v - 1]
    u_accept, u_draw = _uniforms(rng, n, k)
    args = (drafts, None if deterministic else q, p, num_draft, u_accept, u_draw)
    return target, args


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("v, k", [(8, 1), (8, 3), (24, 3)])
def test_emitted_sequence_is_distributed_as_the_target(v, k, deterministic):
    """The first emitted token ~ P[start]; each later one, given the one before, ~ P[that]
    (conditioning on the sequence being that long, which is a stopping time)."""
    rng = np.random.default_rng(v * 10 + k + deterministic)
    target, args = _markov_trials(rng, v, k, deterministic)
    tokens, num_tokens = map(np.asarray, jit_rejection(*args))
    assert np.all(num_tokens <= args[3] + 1)
    tests = [chi_square(np.bincount(tokens[:, 0], minlength=v), target[0])]
    for j in range(1, k + 1):
        emitted = num_tokens > j
        for x in range(v):
            rows = emitted & (tokens[:, j - 1] == x)
            tests.append(chi_square(np.bincount(tokens[rows, j], minlength=v), target[x]))
    assert p_value(*tests) > MIN_P_VALUE
    assert fits(np.bincount(tokens[:, 0], minlength=v), target[0]) > MIN_P_VALUE


@pytest.mark.parametrize("with_q", [True, False])
def test_always_wrong_drafts_are_rejected_and_resampled_from_the_target(with_q):
    rng = np.random.default_rng(1)
    v, k = 16, 3
    p = _dirichlet(rng, (k + 1, v), zeros=0.0)
    p[:, 5] = 0.0  # the proposer always says 5, which the target never emits
    p /= p.sum(-1, keepdims=True)
    drafts = np.full((N, k), 5, np.int32)
    q = np.broadcast_to(np.eye(v, dtype=np.float32)[5], (N, k, v))
    target = np.broadcast_to(p, (N, k + 1, v))
    tokens, num_tokens = map(
        np.asarray,
        jit_rejection(
            drafts, q if with_q else None, target, np.full(N, k, np.int32), *_uniforms(rng, N, k)
        ),
    )
    np.testing.assert_array_equal(num_tokens, 1)
    np.testing.assert_array_equal(tokens[:, 1:], 0)
    assert fits(np.bincount(tokens[:, 0], minlength=v), p[0]) > MIN_P_VALUE


def test_drafts_drawn_from_the_target_are_always_accepted():
    rng = np.random.default_rng(2)
    v, k = 16, 3
    p = _dirichlet(rng, (N, k + 1, v), zeros=0.3)
    drafts = np.stack([_draw_np(rng, p[:, j]) for j in range(k)], axis=1).astype(np.int32)
    tokens, num_tokens = map(
        np.asarray,
        jit_rejection(drafts, p[:, :k], p, np.full(N, k, np.int32), *_uniforms(rng, N, k)),
    )
    np.testing.assert_array_equal(num_tokens, k + 1)  # min(1, p/q) == 1 and u < 1
    np.testing.assert_array_equal(tokens[:, :k], drafts)
    # The bonus: its inverse CDF over a fixed row, for rows sharing one bonus distribution.
    same = np.broadcast_to(p[:1, k], (N, v))
    _, u_draw = _uniforms(rng, N, k)
    tokens, _ = jit_rejection(
        drafts,
        p[:, :k],
        np.concatenate([p[:, :k], same[:, None]], 1),
        np.full(N, k, np.int32),
        np.zeros((N, k), np.float32),
        u_draw,
    )
    assert fits(np.bincount(np.asarray(tokens)[:, k], minlength=v), p[0, k]) > MIN_P_VALUE


@pytest.mark.parametrize("proposer", ["sampled", "uniform", "deterministic"])
def test_acceptance_matches_theory(proposer):
    """Position-independent of the prefix: draft j is accepted w.p. beta_j = sum min(p_j, q_j)
    (p_j(d_j) for a deterministic draft), so a accepted has P(a = m) = prod_{i<m} beta_i *
    (1 - beta_m), and P(a = K) = prod beta."""
    rng = np.random.default_rng(3)
    v, k = 32, 3
    p = _dirichlet(rng, (k + 1, v), zeros=0.2)
    if proposer == "uniform":
        q = np.full((k, v), 1.0 / v, np.float32)
    else:
        q = _dirichlet(rng, (k, v), zeros=0.2)
    if proposer == "deterministic":
        drafts = np.broadcast_to(np.argmax(q, -1), (N, k)).astype(np.int32)
        beta = p[np.arange(k), drafts[0]].astype(np.float64)
        draft_probs = None
    else:
        drafts = np.stack([_draw_np(rng, np.broadcast_to(q[j], (N, v))) for j in range(k)], 1)
        drafts = drafts.astype(np.int32)
        beta = np.minimum(p[:k], q).astype(np.float64).sum(-1)
        draft_probs = np.broadcast_to(q, (N, k, v))
    _, num_tokens = jit_rejection(
        drafts,
        draft_probs,
        np.broadcast_to(p, (N, k + 1, v)),
        np.full(N, k, np.int32),
        *_uniforms(rng, N, k),
    )
    accepted = np.asarray(num_tokens) - 1
    reach = np.concatenate([[1.0], np.cumprod(beta)])  # P(a >= m)
    expected = reach[: k + 1] * np.append(1 - beta, 1.0)  # P(a == m)
    assert fits(np.bincount(accepted, minlength=k + 1), expected) > MIN_P_VALUE
    first = np.mean(accepted >= 1)
    assert abs(first - beta[0]) < 4 * np.sqrt(beta[0] * (1 - beta[0]) / N)


@pytest.mark.parametrize("with_q", [True, False])
def test_greedy_target_accepts_the_matching_prefix_then_its_argmax(with_q):
    """Target rows from `probs` under greedy params (with penalties): verification emits the
    drafts while they equal `sample`'s greedy token, then that token, whatever the uniforms."""
    rng = np.random.default_rng(4)
    b, k, v = 64, 3, 300
    logits = jnp.asarray(rng.standard_normal((b * (k + 1), v)) * 3, jnp.float32)
    params = [SamplingParams.greedy(repetition_penalty=1.8)] * (b * (k + 1))
    t, flags = SamplingTensors.build(params, [[1, 2, 3]] * (b * (k + 1)), [[4]] * (b * (k + 1)), v)
    target = np.asarray(probs(logits, t, flags)).reshape(b, k + 1, v)
    greedy = np.asarray(sample(logits, t, flags).tokens).reshape(b, k + 1)
    drafts = np.where(rng.random((b, k)) < 0.7, greedy[:, :k], rng.integers(0, v, (b, k)))
    drafts = drafts.astype(np.int32)
    num_draft = rng.integers(0, k + 1, b).astype(np.int32)
    q = _dirichlet(rng, (b, k, v), zeros=0.0) if with_q else None
    tokens, num_tokens = map(
        np.asarray, jit_rejection(drafts, q, target, num_draft, *_uniforms(rng, b, k))
    )
    for i in range(b):
        a = 0
        while a < num_draft[i] and drafts[i, a] == greedy[i, a]:
            a += 1
        expected = np.zeros(k + 1, np.int32)
        expected[:a] = drafts[i, :a]
        expected[a] = greedy[i, a]
        assert num_tokens[i] == a + 1
        np.testing.assert_array_equal(tokens[i], expected)


def test_rows_without_drafts_return_the_bonus_and_ignore_draft_inputs():
    rng = np.random.default_rng(5)
    b, k, v = 512, 3, 40
    p = _dirichlet(rng, (b, k + 1, v), zeros=0.3)
    u_accept, u_draw = _uniforms(rng, b, k)
    zero = np.zeros(b, np.int32)
    results = []
    for _ in range(2):  # different garbage drafts, draft probs and later target rows
        drafts = rng.integers(-5, v + 5, (b, k)).astype(np.int32)
        q = _dirichlet(rng, (b, k, v), zeros=0.5)
        p[:, 1:] = _dirichlet(rng, (b, k, v), zeros=0.5)
        results.append(jit_rejection(drafts, q, p, zero, u_accept, u_draw))
        results.append(jit_rejection(drafts, None, p, zero, u_accept, u_draw))
    bonus = np.asarray(draw_weighted(jnp.asarray(p[:, 0]), jnp.asarray(u_draw[:, 0])))
    for tokens, num_tokens in results:
        np.testing.assert_array_equal(np.asarray(num_tokens), 1)
        np.testing.assert_array_equal(np.asarray(tokens[:, 0]), bonus)
        np.testing.assert_array_equal(np.asarray(tokens[:, 1:]), 0)
    assert np.all(p[np.arange(b), 0, bonus] > 0)


def test_empty_residual_falls_back_to_the_target():
    """With q == p a draft is rejected only if both give it probability 0; the residual
    max(p - q, 0) then has no mass and the recovered token comes from p."""
    v, b = 8, 4
    p = np.full((b, 2, v), 0.0, np.float32)
    p[:, :, :4] = 0.25
    drafts = np.full((b, 1), 6, np.int32)  # p(6) == 0: rejected
    tokens, num_tokens = jit_rejection(
        drafts,
        p[:, :1],
        p,
        np.ones(b, np.int32),
        np.zeros((b, 1), np.float32),
        np.asarray([[0.1, 0], [0.3, 0], [0.6, 0], [0.9, 0]], np.float32),
    )
    np.testing.assert_array_equal(np.asarray(num_tokens), 1)
    np.testing.assert_array_equal(np.asarray(tokens[:, 0]), [0, 1, 2, 3])


def test_draft_with_zero_draft_probability_is_accepted_iff_the_target_allows_it():
    q = np.array([[[1.0, 0.0, 0.0, 0.0]]] * 2, np.float32)  # drafts 1 and 2 "impossible"
    p = np.array([[0.0, 0.5, 0.0, 0.5]] * 2, np.float32)[:, None].repeat(2, 1)
    drafts = np.array([[1], [2]], np.int32)
    u = np.full((2, 1), 0.999, np.float32)
    tokens, num_tokens = jit_rejection(
        drafts, q, p, np.ones(2, np.int32), u, np.zeros((2, 2), np.float32)
    )
    np.testing.assert_array_equal(np.asarray(num_tokens), [2, 1])
    np.testing.assert_array_equal(np.asarray(tokens), [[1, 1], [1, 0]])


@pytest.mark.parametrize("k", [0, 1, 4])
def test_jit_fixed_shapes_and_one_compile(k):
    rng = np.random.default_rng(6)
    b, v = 6, 10
    fn = jax.jit(lambda *args: rejection_sample(*args))  # its own compile cache to count
    for trial in range(3):
        p = _dirichlet(rng, (b, k + 1, v), zeros=0.3)
        q = _dirichlet(rng, (b, k, v), zeros=0.3)
        drafts = rng.integers(0, v, (b, k)).astype(np.int32)
        num_draft = rng.integers(0, k + 1, b).astype(np.int32)
        u_accept, u_draw = _uniforms(rng, b, k)
        for draft_probs in (q, None):
            args = (drafts, draft_probs, p, num_draft, u_accept, u_draw)
            tokens, num_tokens = fn(*args)
            assert tokens.shape == (b, k + 1) and tokens.dtype == jnp.int32
            assert num_tokens.shape == (b,) and num_tokens.dtype == jnp.int32
            assert np.all((1 <= num_tokens) & (num_tokens <= num_draft + 1))
            past = np.arange(k + 1)[None, :] >= np.asarray(num_tokens)[:, None]
            assert np.all(np.asarray(tokens)[past] == 0)
            if trial == 0 and k == 1:  # op by op is slow on CPU; once is enough
                eager = rejection_sample(*args)
                np.testing.assert_array_equal(np.asarray(tokens), np.asarray(eager[0]))
                np.testing.assert_array_equal(np.asarray(num_tokens), np.asarray(eager[1]))
    assert fn._cache_size() == 2  # one program with draft probs, one without


def test_spec_uniforms_are_per_position_and_apart_from_the_sampler_stream():
    k, b = 3, 2048
    seed = jnp.asarray(
        np.random.default_rng(7).integers(0, 2**32, (b, 2), dtype=np.uint64), jnp.uint32
    )
    step = jnp.asarray(np.random.default_rng(8).integers(0, 50, b), jnp.int32)
    fn = jax.jit(spec_uniforms, static_argnums=2)
    u_accept, u_draw = fn(seed, step, k)
    assert u_accept.shape == (b, k) and u_draw.shape == (b, k + 1)
    assert u_accept.dtype == u_draw.dtype == jnp.float32
    both = np.concatenate([np.asarray(u_accept), np.asarray(u_draw)], axis=1)
    assert np.all((both >= 0) & (both < 1))
    # A token position's uniforms do not depend on where the verification window starts,
    # on K, or on the other rows of the batch.
    later_accept, later_draw = fn(seed[:5][::-1], step[:5][::-1] + 1, k + 2)
    np.testing.assert_array_equal(np.asarray(later_accept)[::-1, : k - 1], u_accept[:5, 1:])
    np.testing.assert_array_equal(np.asarray(later_draw)[::-1, :k], u_draw[:5, 1:])
    # Uncorrelated with each other and with the sampler's draw for the same position.
    sampler = np.asarray(jax.jit(_row_uniforms)(seed, step))
    for x, y in [
        (sampler, u_draw[:, 0]),
        (sampler, u_accept[:, 0]),
        (u_accept[:, 0], u_draw[:, 0]),
    ]:
        assert not np.any(np.asarray(x) == np.asarray(y))
        assert abs(np.corrcoef(x, y)[0, 1]) < 4 / np.sqrt(b)
    # Uniform: each column's deciles fit U[0, 1).
    for column in both.T:
        counts = np.bincount((column * 10).astype(int), minlength=10)
        assert fits(counts, np.full(10, 0.1)) > MIN_P_VALUE
