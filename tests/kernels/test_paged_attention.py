"""Paged decode attention: kernels and the XLA (CPU) path vs the reference, the reference vs
dense numpy; the padded-rows attention vs the reference."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention as pa
from tests.kernels.helpers import (
    assert_close,
    dense_attention_np,
    gather_dense,
    has_gpu,
    has_tpu,
    lower_for,
    make_paged_kv,
)
from tests.lanes import fast_first

# (G = Hq/Hkv, Hkv, Dh, S, dtype, quant, sliding_window, soft_cap); lengths always include
# 0, 1, page boundary S, S + 1 and the maximum W * S.
CASES = [
    pytest.param(1, 2, 64, 8, jnp.float32, False, None, None, id="mha-f32"),
    pytest.param(3, 3, 64, 16, jnp.bfloat16, False, None, None, id="gqa3-bf16"),
    pytest.param(4, 2, 128, 4, jnp.float32, False, 7, None, id="gqa4-d128-window"),
    pytest.param(8, 1, 64, 8, jnp.bfloat16, False, None, 5.0, id="mqa8-softcap-bf16"),
    pytest.param(4, 2, 64, 8, jnp.float32, True, None, None, id="int8-f32"),
    pytest.param(3, 2, 64, 16, jnp.bfloat16, True, 20, 30.0, id="int8-bf16-window-cap"),
]
W = 4
LAYER, L = 1, 3


def make_inputs(seed, G, Hkv, D, S, dtype, quant):
    rng = np.random.default_rng(seed)
    kv_lens = [0, 1, S, S + 1, W * S]
    k, v, ks, vs, pt = make_paged_kv(rng, kv_lens=kv_lens, L=L, layer=LAYER, S=S, Hkv=Hkv, D=D,
                                     W=W, dtype=dtype, quant=quant)
    q = jnp.asarray(rng.standard_normal((len(kv_lens), G * Hkv, D)), dtype)
    return q, k, v, jnp.int32(LAYER), jnp.asarray(kv_lens, jnp.int32), pt, ks, vs


class _KernelVsReference:
    impl = "gpu"
    interpret = False

    @pytest.mark.parametrize("G,Hkv,D,S,dtype,quant,window,cap", fast_first(CASES))
    def test_matches_reference(self, G, Hkv, D, S, dtype, quant, window, cap):
        q, k, v, layer, lens, pt, ks, vs = make_inputs(hash((G, D, S)) % 2**31, G, Hkv, D, S,
                                                       dtype, quant)
        kw = dict(sm_scale=D**-0.5, sliding_window=window, soft_cap=cap, k_scale=ks,
                  v_scale=vs)
        out = pa.paged_decode_attention(q, k, v, layer, lens, pt, impl=self.impl,
                                        interpret=self.interpret, **kw)
        ref = pa.paged_decode_attention_reference(q, k, v, layer, lens, pt, **kw)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert not np.isnan(np.asarray(out, np.float32)).any()
        np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0)  # kv_len 0 -> zeros
        assert_close(out, ref, dtype)


class TestGpuKernelInterpret(_KernelVsReference):
    interpret = True


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
class TestGpuKernelNative(_KernelVsReference):
    pass


class TestTpuKernelInterpret(_KernelVsReference):
    impl = "tpu"
    interpret = True


@pytest.mark.skipif(not has_tpu(), reason="needs a TPU")
class TestTpuKernelNative(_KernelVsReference):
    impl = "tpu"


class TestXlaPath(_KernelVsReference):
    impl = "xla"


@pytest.mark.parametrize("block_bytes", [1, 3 * 2**12, 2**30])
@pytest.mark.parametrize("G,dtype,quant,window", [(1, jnp.float32, False, None),
                                                  (4, jnp.float32, False, 7),
                                                  (3, jnp.bfloat16, True, 20)])
def test_xla_blocks_match_reference(monkeypatch, block_bytes, G, dtype, quant, window):
    """The XLA path with blocks of 1 page, a few pages, and the whole table per loop step.
    (Called unjitted: the block size is read at trace time, which the wrapper's jit cache would
    not see.)"""
    monkeypatch.setattr(pa, "DECODE_BLOCK_BYTES", block_bytes)
    q, k, v, layer, lens, pt, ks, vs = make_inputs(3, G, 2, 64, 8, dtype, quant)
    kw = dict(sm_scale=0.125, sliding_window=window, k_scale=ks, v_scale=vs)
    want = pa.paged_decode_attention_reference(q, k, v, layer, lens, pt, **kw)
    got = pa.paged_decode_attention_xla(q, k, v, layer, lens, pt, **kw)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert not np.isnan(np.asarray(got, np.float32)).any()
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), 0)  # kv_len 0
    assert_close(got, want, dtype)


def test_xla_skips_blocks_before_every_window(monkeypatch):
    """Long rows with a short window (and an empty row): the loop starts past the first
    blocks, and gives what the reference gives."""
    monkeypatch.setattr(pa, "DECODE_BLOCK_BYTES", 1)  # one page per step
    rng = np.random.default_rng(4)
    lens = [60, 0, 64, 41]
    k, v, _, _, pt = make_paged_kv(rng, kv_lens=lens, L=2, layer=1, S=8, Hkv=2, D=16, W=8,
                                   dtype=jnp.float32, quant=False)
    q = jnp.asarray(rng.standard_normal((4, 4, 16)), jnp.float32)
    lens = jnp.asarray(lens, jnp.int32)
    kw = dict(sm_scale=0.25, sliding_window=9)
    want = pa.paged_decode_attention_reference(q, k, v, jnp.int32(1), lens, pt, **kw)
    got = pa.paged_decode_attention_xla(q, k, v, jnp.int32(1), lens, pt, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_page_gather_equals_plain_indexing(dtype):
    """The XLA path gathers 16-bit pools through their uint16 bits (an XLA:CPU speed fix); the
    result must be the plain gather, bit for bit."""
    pool = jax.random.normal(jax.random.key(6), (2, 6, 4, 2, 8)).astype(dtype)
    pt = jnp.array([[3, 1, 0], [5, 5, 2]], jnp.int32)
    got = pa._gather_pages(pool, jnp.int32(1), pt)
    assert got.dtype == dtype and got.shape == (2, 3, 4, 2, 8)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                  np.asarray(pool[1, pt].astype(jnp.float32)))


@pytest.mark.parametrize("G,Hkv,D,S,dtype,quant,window,cap", fast_first(CASES))
def test_prefill_rows_match_decode_reference(G, Hkv, D, S, dtype, quant, window, cap):
    """Padded [B, T] rows: a query at position p attends exactly like a decode query of a
    sequence holding p + 1 tokens. Rows end at each sequence's last token (kv_len 0, 1, S,
    S + 1, max); queries at negative positions (before the sequence) are padding and give 0."""
    q1, k, v, layer, lens, pt, ks, vs = make_inputs(hash((G, D, S, 2)) % 2**31, G, Hkv, D, S,
                                                    dtype, quant)
    T = S + 2
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((len(lens), T, G * Hkv, D)), dtype)
    pos = lens[:, None] - T + jnp.arange(T, dtype=jnp.int32)  # [B, T]
    kw = dict(sm_scale=D**-0.5, sliding_window=window, soft_cap=cap, k_scale=ks, v_scale=vs)
    got = pa.paged_prefill_attention(q, k, v, layer, lens, pt, pos, **kw)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert not np.isnan(np.asarray(got, np.float32)).any()
    for t in range(T):
        row_lens = jnp.maximum(pos[:, t] + 1, 0)
        want = pa.paged_decode_attention_reference(q[:, t], k, v, layer, row_lens, pt, **kw)
        assert_close(got[:, t], want, dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32)[np.asarray(pos) < 0], 0)


def test_prefill_rows_validate_positions():
    q, k, v, layer, lens, pt, _, _ = make_inputs(0, 1, 2, 64, 8, jnp.float32, False)
    with pytest.raises(ValueError, match="positions must be int32"):
        pa.paged_prefill_attention(q[:, None], k, v, layer, lens, pt,
                                   jnp.zeros((len(lens), 2), jnp.int32), sm_scale=1.0)
    with pytest.raises(ValueError, match="q must be"):
        pa.paged_prefill_attention(q, k, v, layer, lens, pt, jnp.zeros((1, 1), jnp.int32),
                                   sm_scale=1.0)


@pytest.mark.parametrize("G,Hkv,D,S,dtype,quant,window,cap", CASES[::2] + CASES[5:])
def test_reference_matches_dense_numpy(G, Hkv, D, S, dtype, quant, window, cap):
    q, k, v, layer, lens, pt, ks, vs = make_inputs(7, G, Hkv, D, S, jnp.float32, quant)
    out = pa.paged_decode_attention_reference(q, k, v, layer, lens, pt, sm_scale=0.3,
                                              sliding_window=window, soft_cap=cap, k_scale=ks,
                                              v_scale=vs)
    for b, n in enumerate(np.asarray(lens)):
        kd, vd = gather_dense(k, v, ks, vs, LAYER, np.asarray(pt)[b], n)
        want = dense_attention_np(q[b:b + 1], kd, vd, [n - 1], n, sm_scale=0.3,
                                  sliding_window=window, soft_cap=cap)
        np.testing.assert_allclose(np.asarray(out[b]), want[0], atol=2e-5, rtol=2e-5)


def test_reference_has_kernel_signature():
    sig = inspect.signature(pa.paged_decode_attention).parameters
    ref = inspect.signature(pa.paged_decode_attention_reference).parameters
    assert list(ref) == [p for p in sig if p not in ("impl", "interpret")]


def test_xla_path_has_reference_signature():
    ref = inspect.signature(pa.paged_decode_attention_reference).parameters
    assert list(inspect.signature(pa.paged_decode_attention_xla).parameters) == list(ref)


def test_auto_on_cpu_is_xla():
    if jax.default_backend() == "cpu":
        assert pa.default_impl() == "xla"


@pytest.mark.parametrize("bad,match", [
    (dict(q=jnp.zeros((2, 4, 64, 1))), "q must be"),
    (dict(kv_lens=jnp.zeros((3,), jnp.int32)), "kv_lens must be int32"),
    (dict(kv_lens=jnp.zeros((2,), jnp.int64 if jax.config.x64_enabled else jnp.float32)),
     "kv_lens must be int32"),
    (dict(page_tables=jnp.zeros((2, 3), jnp.float32)), "page_tables must be int32"),
    (dict(k_cache=jnp.zeros((1, 4, 8, 3, 64))), "multiple of"),
    (dict(k_scale=jnp.ones((1, 4, 8, 2))), "k_scale/v_scale are only for an int8"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(sliding_window=0), "sliding_window must be"),
])
def test_validation_errors_name_the_argument(bad, match):
    args = dict(q=jnp.zeros((2, 4, 64)), k_cache=jnp.zeros((1, 4, 8, 2, 64)),
                v_cache=jnp.zeros((1, 4, 8, 2, 64)), layer=0,
                kv_lens=jnp.zeros((2,), jnp.int32), page_tables=jnp.zeros((2, 3), jnp.int32))
    kw = {k: bad.pop(k) for k in list(bad) if k in ("k_scale", "impl", "sliding_window")}
    args.update(bad)
    if "k_cache" in bad:
        args["v_cache"] = bad["k_cache"]
    with pytest.raises(ValueError, match=match):
        pa.paged_decode_attention(*args.values(), sm_scale=1.0, **kw)


@pytest.mark.parametrize("impl,platform", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8])
def test_lowers_for_accelerator(impl, platform, dtype):
    """Every construct of the kernel is accepted by the Triton / Mosaic lowering (no device)."""
    sd = jax.ShapeDtypeStruct
    L_, P, S, Hkv, D, B, G, W_ = 2, 12, 16, 2, 128, 3, 4, 4
    cache = sd((L_, P, S, Hkv, D), dtype)
    scale = sd((L_, P, S, Hkv), jnp.float32)

    def fn(q, k, v, layer, lens, pt, ks, vs):
        if dtype != jnp.int8:
            ks = vs = None
        return pa.paged_decode_attention(q, k, v, layer, lens, pt, sm_scale=0.1, impl=impl,
                                         sliding_window=20, soft_cap=30.0, k_scale=ks,
                                         v_scale=vs)

    text = lower_for(platform, fn, sd((B, G * Hkv, D), jnp.bfloat16), cache, cache,
                     sd((), jnp.int32), sd((B,), jnp.int32), sd((B, W_), jnp.int32), scale, scale)
    assert ("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
