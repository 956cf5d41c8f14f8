"""Paged decode attention: kernels vs the reference, the reference vs dense numpy."""

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

    @pytest.mark.parametrize("G,Hkv,D,S,dtype,quant,window,cap", CASES)
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


def test_auto_on_cpu_is_reference():
    if jax.default_backend() == "cpu":
        assert pa.default_impl() == "reference"


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
