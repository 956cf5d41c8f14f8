"""The paged, cached forward equals the dense reference forward, for every supported variant."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig, RopeScaling
from jaxserve.model.attention import AttentionMetadata, KVCache, RaggedMetadata
from jaxserve.model.layers import rope_inv_freq
from jaxserve.model.llama import forward, forward_dense
from jaxserve.model.params import init_params
from tests.lanes import fast_first

BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=3, head_dim=16)
VARIANTS = {
    "llama2_mha_untied": ModelConfig(**BASE, num_heads=4, num_kv_heads=4),
    "llama3_gqa_rope_scaling": ModelConfig(
        **BASE, num_heads=8, num_kv_heads=2, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64)),
    "smollm2_tied_gqa3": ModelConfig(**BASE, num_heads=6, num_kv_heads=2,
                                     tie_word_embeddings=True, rope_theta=1e5),
    "qwen2_bias": ModelConfig(**BASE, num_heads=4, num_kv_heads=2, attention_bias=True,
                              model_type="qwen2"),
    "mistral_sliding_window": ModelConfig(**BASE, num_heads=4, num_kv_heads=2, sliding_window=5,
                                          model_type="mistral"),
    "mqa": ModelConfig(**BASE, num_heads=4, num_kv_heads=1),
}
PAGE = 4
NUM_PAGES = 32


def _cache(cfg, poison=True):
    c = KVCache.create(cfg.num_layers, NUM_PAGES, PAGE, cfg.num_kv_heads, cfg.head_dim)
    if poison:  # unused pages full of NaN: any read of them would show up in the output
        c = KVCache(k=jnp.full_like(c.k, jnp.nan), v=jnp.full_like(c.v, jnp.nan))
    return c


def _meta(rows, width):
    """rows: list of (page_table, start, n) -> metadata for n tokens from `start` per row."""
    B, T = len(rows), max(n for _, _, n in rows)
    pos = np.zeros((B, T), np.int32)
    slots = np.zeros((B, T), np.int32)
    pt = np.zeros((B, width), np.int32)
    kv = np.zeros((B,), np.int32)
    for i, (pages, start, n) in enumerate(rows):
        p = np.arange(start, start + n)
        pos[i, :n] = p
        slots[i, :n] = np.asarray(pages)[p // PAGE] * PAGE + p % PAGE
        pt[i, : len(pages)] = pages
        kv[i] = start + n
    return AttentionMetadata(positions=jnp.asarray(pos), slot_mapping=jnp.asarray(slots),
                             page_tables=jnp.asarray(pt), kv_lens=jnp.asarray(kv))


@pytest.mark.parametrize("name", fast_first(sorted(VARIANTS)))
def test_chunked_prefill_then_decode_equals_dense(name):
    cfg = VARIANTS[name]
    params = init_params(cfg, jax.random.key(0))
    T = 13
    tokens = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)
    ref = np.asarray(forward_dense(params, cfg, tokens))[0]  # [T, V]
    pages = [7, 2, 11, 5]  # out of order on purpose
    # Page 0 takes the padding writes; it must not be NaN (reads of it are masked anyway).
    cache = _cache(cfg)
    cache = KVCache(k=cache.k.at[:, 0].set(0), v=cache.v.at[:, 0].set(0))
    got = []
    # Prefill in two chunks (6 then 4 tokens), then decode the last 3 one at a time.
    for start, n in ((0, 6), (6, 4), (10, 1), (11, 1), (12, 1)):
        meta = _meta([(pages, start, n)], width=8)
        logits, cache = forward(params, cfg, tokens[:, start:start + n], cache, meta)
        got.append(np.asarray(logits)[0, :n])
    got = np.concatenate(got)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", fast_first(["smollm2_tied_gqa3", "mistral_sliding_window"]))
def test_batched_equals_alone(name):
    cfg = VARIANTS[name]
    params = init_params(cfg, jax.random.key(2))
    lens = [9, 3, 14]
    toks = [jax.random.randint(jax.random.key(10 + i), (n,), 0, cfg.vocab_size)
            for i, n in enumerate(lens)]
    tables = [[3, 9, 1], [4], [8, 6, 12, 10]]
    T = max(lens)

    # Alone: each sequence prefilled on its own.
    alone = []
    for t, pt, n in zip(toks, tables, lens, strict=True):
        cache = _cache(cfg, poison=False)
        logits, _ = forward(params, cfg, t[None], cache, _meta([(pt, 0, n)], 4),
                            logits_index=jnp.array([n - 1]))
        alone.append(np.asarray(logits)[0])

    # Together, padded to T, plus a padding row with kv_len 0.
    cache = _cache(cfg, poison=False)
    batch = np.zeros((4, T), np.int32)
    for i, t in enumerate(toks):
        batch[i, : lens[i]] = t
    meta = _meta([(pt, 0, n) for pt, n in zip(tables, lens, strict=True)] + [([], 0, 0)], 4)
    logits, _ = forward(params, cfg, jnp.asarray(batch), cache, meta,
                        logits_index=jnp.array([n - 1 for n in lens] + [0]))
    logits = np.asarray(logits)
    for i in range(3):
        np.testing.assert_allclose(logits[i], alone[i], atol=1e-4, rtol=1e-4)
    assert np.isfinite(logits[3]).all()


def test_llama3_rope_scaling_bands():
    cfg = VARIANTS["llama3_gqa_rope_scaling"]
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    scaled = rope_inv_freq(cfg)
    rs = cfg.rope_scaling
    wl = 2 * np.pi / plain
    high = wl < rs.original_max_position_embeddings / rs.high_freq_factor
    low = wl > rs.original_max_position_embeddings / rs.low_freq_factor
    assert high.any() and low.any()
    np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], plain[low] / rs.factor, rtol=1e-6)
    mid = ~high & ~low
    assert np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / rs.factor)


def test_linear_rope_scaling_divides_frequencies():
    cfg = dataclasses.replace(VARIANTS["mqa"], rope_scaling=RopeScaling("linear", factor=4.0))
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    np.testing.assert_allclose(rope_inv_freq(cfg), plain / 4.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_write_kv_equals_plain_scatter(dtype):
    """write_kv scatters 16-bit pools through their uint16 bits (an XLA:CPU speed fix); the
    result must be the plain scatter, bit for bit."""
    from jaxserve.model.attention import write_kv

    L, P, S, H, D = 2, 6, 4, 2, 8
    ks = jax.random.split(jax.random.key(3), 4)
    cache = KVCache(k=jax.random.normal(ks[0], (L, P, S, H, D)).astype(dtype),
                    v=jax.random.normal(ks[1], (L, P, S, H, D)).astype(dtype))
    k = jax.random.normal(ks[2], (2, 3, H, D)).astype(dtype)
    v = jax.random.normal(ks[3], (2, 3, H, D)).astype(dtype)
    slots = jnp.array([[5, 6, 7], [13, 21, 22]], jnp.int32)
    got = write_kv(cache, jnp.int32(1), k, v, slots)
    flat = slots.reshape(-1)
    for pool, new, out in ((cache.k, k, got.k), (cache.v, v, got.v)):
        want = pool.at[1, flat // S, flat % S].set(new.reshape(-1, H, D))
        assert out.dtype == dtype
        np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                      np.asarray(want.astype(jnp.float32)))


def test_unstacked_layers_equal_scan():
    from jaxserve.model.llama import unstack_layers

    cfg = VARIANTS["qwen2_bias"]
    params = init_params(cfg, jax.random.key(4))
    tokens = jax.random.randint(jax.random.key(5), (2, 7), 0, cfg.vocab_size)
    meta = _meta([([3, 1], 0, 7), ([5, 2], 0, 7)], width=4)
    want, want_cache = forward(params, cfg, tokens, _cache(cfg, poison=False), meta)
    got, got_cache = forward(unstack_layers(params), cfg, tokens, _cache(cfg, poison=False), meta)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got_cache.k), np.asarray(want_cache.k),
                               atol=1e-4, rtol=1e-5)


def _ragged_meta(rows, width, T, N):
    """rows: list of (page_table, start, n) -> a flat ragged step of n tokens from `start` per
    sequence, side by side in one row padded to T tokens, the sequences padded to N."""
    pos = np.zeros((1, T), np.int32)
    slots = np.zeros((1, T), np.int32)
    pt = np.zeros((N, width), np.int32)
    kv = np.zeros((N,), np.int32)
    cu = np.zeros((N + 1,), np.int32)
    for i, (pages, start, n) in enumerate(rows):
        p = np.arange(start, start + n)
        lo = cu[i]
        pos[0, lo : lo + n] = p
        slots[0, lo : lo + n] = np.asarray(pages)[p // PAGE] * PAGE + p % PAGE
        pt[i, : len(pages)] = pages
        kv[i] = start + n
        cu[i + 1 :] = lo + n
    return RaggedMetadata(positions=jnp.asarray(pos), slot_mapping=jnp.asarray(slots),
                          page_tables=jnp.asarray(pt), kv_lens=jnp.asarray(kv),
                          cu_q_lens=jnp.asarray(cu), num_seqs=jnp.int32(len(rows)))


@pytest.mark.parametrize("name,kernels", fast_first([(n, "auto") for n in sorted(VARIANTS)]
                                               + [("smollm2_tied_gqa3", "reference"),
                                                  ("smollm2_tied_gqa3", "interpret")]))
def test_flat_ragged_step_equals_dense(name, kernels):
    """One flat step mixing prompt chunks of different lengths (from position 0 and from the
    middle of a prompt) with 1-token decodes equals the dense forward at every token; unused
    pages hold NaN."""
    cfg = VARIANTS[name]
    params = init_params(cfg, jax.random.key(3))
    # (total tokens, tokens already cached before the flat step)
    seqs = [(11, 10), (9, 0), (14, 6), (1, 0), (7, 6), (5, 2)]
    tables = [[7, 2, 11], [4, 9, 1], [8, 6, 12, 10], [3], [14, 13], [5, 15]]
    toks = [np.asarray(jax.random.randint(jax.random.key(20 + i), (n,), 0, cfg.vocab_size))
            for i, (n, _) in enumerate(seqs)]
    cache = _cache(cfg)
    cache = KVCache(k=cache.k.at[:, 0].set(0), v=cache.v.at[:, 0].set(0))
    # The cached prefixes go in through the padded path, one sequence at a time.
    for t, pt, (_, done) in zip(toks, tables, seqs, strict=True):
        if done:
            _, cache = forward(params, cfg, jnp.asarray(t[None, :done]), cache,
                               _meta([(pt, 0, done)], width=8))
    rows = [(pt, done, n - done) for pt, (n, done) in zip(tables, seqs, strict=True)]
    T, N = 48, 8  # padding tokens and padding sequences, as the runner's buckets leave them
    flat = np.zeros((1, T), np.int32)
    flat[0, : sum(n - d for n, d in seqs)] = np.concatenate(
        [t[done:] for t, (_, done) in zip(toks, seqs, strict=True)])
    meta = _ragged_meta(rows, 8, T, N)
    last = np.asarray(meta.cu_q_lens[1:]) - 1
    last[len(seqs):] = 0
    logits, _ = jax.jit(forward, static_argnames=("cfg", "kernels"))(
        params, cfg, jnp.asarray(flat), cache, meta, jnp.asarray(last), kernels=kernels)
    logits = np.asarray(logits)  # [N, V]
    assert logits.shape == (N, cfg.vocab_size) and np.isfinite(logits).all()
    for i, (t, (n, _)) in enumerate(zip(toks, seqs, strict=True)):
        ref = np.asarray(forward_dense(params, cfg, jnp.asarray(t[None])))[0, n - 1]
        np.testing.assert_allclose(logits[i], ref, atol=1e-4, rtol=1e-4, err_msg=f"seq {i}")
    # Every token of the row, not only each sequence's last.
    every, _ = forward(params, cfg, jnp.asarray(flat), cache, meta, kernels=kernels)
    every = np.asarray(every)[0]
    for i, (t, (n, done)) in enumerate(zip(toks, seqs, strict=True)):
        ref = np.asarray(forward_dense(params, cfg, jnp.asarray(t[None])))[0, done:n]
        lo = int(meta.cu_q_lens[i])
        np.testing.assert_allclose(every[lo : lo + n - done], ref, atol=1e-4, rtol=1e-4)
