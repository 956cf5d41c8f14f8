"""Quantised matmuls: kernels vs references, references vs numpy, quantisers' error bounds."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import quant_matmul as qm
from tests.kernels.helpers import assert_close, has_gpu, has_tpu, lower_for

# (M, K, N, group, x dtype): decode-sized M, a ragged M, SmolLM2's K = 576 (groups of 64).
CASES = [
    pytest.param(1, 576, 192, 64, jnp.float32, id="m1-k576-g64-f32"),
    pytest.param(20, 256, 128, 32, jnp.bfloat16, id="m20-g32-bf16"),
    pytest.param(9, 512, 256, 128, jnp.float32, id="m9-g128-f32"),
]
KINDS = ("int8", "int4", "w8a8")


def make(seed, M, K, N, g, dtype):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((K, N)) * 0.05, jnp.float32)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    return x, w


def call(kind, x, w, g, **kw):
    if kind == "int4":
        return qm.int4_matmul(x, *qm.quantize_int4(w, g), **kw)
    fn = qm.int8_matmul if kind == "int8" else qm.w8a8_matmul
    return fn(x, *qm.quantize_int8(w), **kw)


def reference(kind, x, w, g):
    if kind == "int4":
        return qm.int4_matmul_reference(x, *qm.quantize_int4(w, g))
    fn = qm.int8_matmul_reference if kind == "int8" else qm.w8a8_matmul_reference
    return fn(x, *qm.quantize_int8(w))


class _KernelVsReference:
    impl = "gpu"
    interpret = False

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("M,K,N,g,dtype", CASES)
    def test_matches_reference(self, kind, M, K, N, g, dtype):
        x, w = make(hash((M, K, N)) % 2**31, M, K, N, g, dtype)
        out = call(kind, x, w, g, impl=self.impl, interpret=self.interpret)
        ref = reference(kind, x, w, g)
        assert out.shape == (M, N) and out.dtype == dtype
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


@pytest.mark.parametrize("group", qm.GROUP_SIZES)
def test_int4_roundtrip_and_layout(group):
    rng = np.random.default_rng(group)
    K, N = 256, 48
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[:, 0] = 0.0  # a constant column must not divide by zero
    packed, scales, zeros = qm.quantize_int4(jnp.asarray(w), group)
    assert packed.shape == (K // 2, N) and packed.dtype == jnp.int8
    assert scales.shape == zeros.shape == (K // group, N)
    deq = np.asarray(qm.dequantize_int4(packed, scales, zeros))
    bound = np.repeat(np.asarray(scales), group, axis=0) / 2 + 1e-6
    assert (np.abs(deq - w) <= bound).all()
    # The documented packing: byte r of group i holds rows i*g + j (low) and i*g + g/2 + j.
    p = np.asarray(packed).view(np.uint8).astype(np.int32)
    s, z = np.asarray(scales), np.asarray(zeros)
    r, col = 3, 5
    i, j = r // (group // 2), r % (group // 2)
    np.testing.assert_allclose(((p[r, col] & 15) - z[i, col]) * s[i, col], deq[i * group + j, col],
                               rtol=1e-6)
    np.testing.assert_allclose(((p[r, col] >> 4) - z[i, col]) * s[i, col],
                               deq[i * group + group // 2 + j, col], rtol=1e-6)


def test_int8_roundtrip():
    w = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    w_q, scale = qm.quantize_int8(jnp.asarray(w))
    err = np.abs(np.asarray(w_q, np.float32) * np.asarray(scale) - w)
    assert (err <= np.asarray(scale) / 2 + 1e-7).all()


@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_numpy(kind):
    """The references against float64 numpy on the dequantised operands."""
    x, w = make(5, 7, 256, 64, 64, jnp.float32)
    xn = np.asarray(x, np.float64)
    if kind == "int4":
        wn = np.asarray(qm.dequantize_int4(*qm.quantize_int4(w, 64)), np.float64)
    else:
        w_q, s = qm.quantize_int8(w)
        wn = np.asarray(w_q, np.float64) * np.asarray(s, np.float64)
    if kind == "w8a8":
        x_q, xs = qm.quantize_activations_int8(x)
        xn = np.asarray(x_q, np.float64) * np.asarray(xs, np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(reference(kind, x, w, 64)), xn @ wn, atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("kind,bound", [("int8", 0.02), ("w8a8", 0.03), ("int4", 0.2)])
def test_quantised_close_to_full_precision(kind, bound):
    x, w = make(6, 4, 512, 128, 64, jnp.float32)
    full = np.asarray(x @ w)
    rel = np.linalg.norm(np.asarray(reference(kind, x, w, 64)) - full) / np.linalg.norm(full)
    assert rel < bound


def test_reference_signatures_match_kernels():
    for k, r in [(qm.int8_matmul, qm.int8_matmul_reference),
                 (qm.int4_matmul, qm.int4_matmul_reference),
                 (qm.w8a8_matmul, qm.w8a8_matmul_reference)]:
        ks = [p for p in inspect.signature(k).parameters if p not in ("impl", "interpret")]
        assert ks == list(inspect.signature(r).parameters)


@pytest.mark.parametrize("call_,match", [
    (lambda: qm.int8_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4), jnp.int8), jnp.ones((5,))),
     "w_scale must be float32"),
    (lambda: qm.int8_matmul(jnp.zeros((2, 9)), jnp.zeros((8, 4), jnp.int8), jnp.ones((4,))),
     "x must be"),
    (lambda: qm.int4_matmul(jnp.zeros((2, 64)), jnp.zeros((32, 4), jnp.int8),
                            jnp.ones((3, 4)), jnp.ones((3, 4))), "scales must be"),
    (lambda: qm.quantize_int4(jnp.zeros((96, 4)), 64), "group_size"),
    (lambda: qm.int8_matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4), jnp.int8), jnp.ones((4,)),
                            impl="mosaic"), "impl must be"),
])
def test_validation_errors_name_the_argument(call_, match):
    with pytest.raises(ValueError, match=match):
        call_()


@pytest.mark.parametrize("impl,platform", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("kind", KINDS)
def test_lowers_for_accelerator(kind, impl, platform):
    sd = jax.ShapeDtypeStruct
    K, N, g = 1024, 512, 128
    x = sd((8, K), jnp.bfloat16)
    if kind == "int4":
        ws = (sd((K // 2, N), jnp.int8), sd((K // g, N), jnp.float32), sd((K // g, N), jnp.float32))
        text = lower_for(platform, lambda x, *w: qm.int4_matmul(x, *w, impl=impl), x, *ws)
    else:
        fn = qm.int8_matmul if kind == "int8" else qm.w8a8_matmul
        text = lower_for(platform, lambda x, w, s: fn(x, w, s, impl=impl), x,
                         sd((K, N), jnp.int8), sd((N,), jnp.float32))
    assert ("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
