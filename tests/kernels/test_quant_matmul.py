"""Quantised matmuls: kernels vs references, references vs numpy, quantisers' error bounds."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import quant_matmul as qm
from tests.kernels.helpers import assert_close, has_gpu, has_tpu, lower_for, tol

# (M, K, N, group, x dtype): decode-sized M, a ragged M, SmolLM2's K = 576 (groups of 64).
CASES = [
    pytest.param(1, 576, 192, 64, jnp.float32, id="m1-k576-g64-f32"),
    pytest.param(20, 256, 128, 32, jnp.bfloat16, id="m20-g32-bf16"),
    pytest.param(9, 512, 256, 128, jnp.float32, id="m9-g128-f32"),
]
# int8g: int8 weights with a scale per group of g input rows (quantize_int8(w, g)).
KINDS = ("int8", "int8g", "int4", "w8a8")


def make(seed, M, K, N, g, dtype):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((K, N)) * 0.05, jnp.float32)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    return x, w


def call(kind, x, w, g, **kw):
    if kind == "int4":
        return qm.int4_matmul(x, *qm.quantize_int4(w, g), **kw)
    if kind == "int8g":
        return qm.int8_matmul(x, *qm.quantize_int8(w, g), **kw)
    fn = qm.int8_matmul if kind == "int8" else qm.w8a8_matmul
    return fn(x, *qm.quantize_int8(w), **kw)


def reference(kind, x, w, g):
    if kind == "int4":
        return qm.int4_matmul_reference(x, *qm.quantize_int4(w, g))
    if kind == "int8g":
        return qm.int8_matmul_reference(x, *qm.quantize_int8(w, g))
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

    @pytest.mark.parametrize("M,K,N,g,dtype", [
        pytest.param(1, 1536, 576, 64, jnp.bfloat16, id="m1-k1536-g64-bf16"),  # several K steps
        pytest.param(17, 384, 48, 128, jnp.float32, id="m17-k384-g128-f32"),  # K/g = 3, N = 48
        pytest.param(2, 32, 16, 32, jnp.float32, id="one-group"),
    ])
    def test_int8_grouped_matches_reference(self, M, K, N, g, dtype):
        """Group scales spread over five decades (f16-exact, as GGUF's Q8_0 stores them) and an
        all-zero group: a kernel that applied a group's scale to the wrong rows, or one scale
        per column, is off by orders of magnitude. Tolerances relative to each column's
        largest output."""
        x, w_q, d = make_int8_grouped(M * K + g, M, K, N, g, dtype)
        rng = np.random.default_rng(g)
        d = d * np.float32(10.0) ** rng.integers(-1, 5, d.shape)
        d = d.astype(np.float16).astype(np.float32)
        w_q[:g, 0] = 0  # an all-zero group
        w_q, d = jnp.asarray(w_q), jnp.asarray(d)
        fn = functools.partial(qm.int8_matmul, impl=self.impl, interpret=self.interpret)
        assert "pallas_call" in str(jax.make_jaxpr(fn)(x, w_q, d))
        out = fn(x, w_q, d)
        ref = qm.int8_matmul_reference(x, w_q, d)
        assert out.shape == (M, N) and out.dtype == dtype
        scale = np.maximum(np.abs(np.asarray(ref, np.float32)).max(axis=0), 1e-30)
        np.testing.assert_allclose(np.asarray(out, np.float32) / scale,
                                   np.asarray(ref, np.float32) / scale, **tol(dtype))


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
    packed, scales, mins = qm.quantize_int4(jnp.asarray(w), group)
    assert packed.shape == (K // 2, N) and packed.dtype == jnp.int8
    assert scales.shape == mins.shape == (K // group, N)
    assert scales.dtype == mins.dtype == jnp.float32
    deq = np.asarray(qm.dequantize_int4(packed, scales, mins))
    bound = np.repeat(np.asarray(scales), group, axis=0) / 2 + 1e-6
    assert (np.abs(deq - w) <= bound).all()
    # Asymmetric round to nearest: min is each group's minimum, reproduced exactly.
    s, m = np.asarray(scales), np.asarray(mins)
    np.testing.assert_array_equal(m, w.reshape(K // group, group, N).min(axis=1))
    # The documented packing: byte r of group i holds rows i*g + j (low) and i*g + g/2 + j.
    p = np.asarray(packed).view(np.uint8).astype(np.int32)
    r, col = 3, 5
    i, j = r // (group // 2), r % (group // 2)
    np.testing.assert_allclose((p[r, col] & 15) * s[i, col] + m[i, col], deq[i * group + j, col],
                               rtol=1e-6)
    np.testing.assert_allclose((p[r, col] >> 4) * s[i, col] + m[i, col],
                               deq[i * group + group // 2 + j, col], rtol=1e-6)


def test_int4_requantising_4bit_blocks_is_exact():
    """Weights that are already 4-bit blocks (as from a Q4_1 GGUF) re-quantise to themselves."""
    rng = np.random.default_rng(7)
    K, N, g = 128, 16, 32
    q = rng.integers(0, 16, (K, N))
    q[::g] = 0  # every group uses its full range, as a 4-bit quantiser's output does
    q[1::g] = 15
    d = np.repeat(rng.uniform(0.01, 0.1, (K // g, N)), g, axis=0).astype(np.float32)
    m = np.repeat(rng.uniform(-1, 0, (K // g, N)), g, axis=0).astype(np.float32)
    w = (q * d + m).astype(np.float32)
    deq = qm.dequantize_int4(*qm.quantize_int4(jnp.asarray(w), g))
    np.testing.assert_allclose(np.asarray(deq), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("M,K,N,g", [(1, 576, 3072, 64), (5, 1536, 2048, 128),
                                     (3, 64, 131072, 32)])
def test_cpu_xla_path_matches_reference(kind, M, K, N, g):
    """The CPU path (column blocks of dequantised weight in a loop, padded W8A8 rows) is the
    reference restructured: same result to f32 rounding, for shapes that take several blocks."""
    x, w = make(M * K, M, K, N, g, jnp.float32)
    out = call(kind, x, w, g, impl="xla")
    assert qm._column_block(N, K // 2 if kind == "int4" else K) < N
    assert_close(out, reference(kind, x, w, g), jnp.float32)


def test_cpu_xla_path_grouped_int8():
    x, w_q, d = make_int8_grouped(2, 1, 576, 8192, 32, jnp.float32)
    w_q, d = jnp.asarray(w_q), jnp.asarray(d)
    assert_close(qm.int8_matmul(x, w_q, d, impl="xla"), qm.int8_matmul_reference(x, w_q, d),
                 jnp.float32)


def pack_int4(q: np.ndarray, group: int) -> np.ndarray:
    """Nibbles q [K, N] in [0, 15] -> int8 [K/2, N] in the documented layout (numpy, so that the
    test does not share the packing code it checks)."""
    K, N = q.shape
    qg = q.astype(np.uint8).reshape(K // group, 2, group // 2, N)
    return (qg[:, 0] | (qg[:, 1] << 4)).reshape(K // 2, N).view(np.int8)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_int4_dequant_is_gguf_bit_exact(kind):
    """Hand-built GGUF-style blocks (group 32, f16 d and m; Q4_0: m = -8 d) dequantise to
    exactly numpy's float32 q * d + m, bit for bit (signed zeros included)."""
    rng = np.random.default_rng(7)
    K, N, g = 128, 24, 32
    q = rng.integers(0, 16, (K, N))
    d = (rng.standard_normal((K // g, N)) * 0.02).astype(np.float16)
    d[0, 0] = np.float16(3e-7)  # an f16 subnormal and a large (negative) d: still exact
    d[1, 0] = np.float16(-4000)  # (-8 d stays finite in f16)
    if kind == "q4_0":
        m = (np.float16(-8) * d).astype(np.float16)
    else:
        m = (rng.standard_normal((K // g, N)) * 0.1).astype(np.float16)
    ds, ms = np.repeat(d.astype(np.float32), g, 0), np.repeat(m.astype(np.float32), g, 0)
    want = q.astype(np.float32) * ds + ms
    assert want.dtype == np.float32
    got = np.asarray(qm.dequantize_int4(jnp.asarray(pack_int4(q, g)),
                                        jnp.asarray(d, jnp.float32), jnp.asarray(m, jnp.float32)))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_int4_quantize_roundtrip_within_half_scale():
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((256, 40)) * rng.uniform(0.01, 3, (1, 40))).astype(np.float32)
    w[:32, 1] = 0.5  # a constant group, an all-negative and an all-positive one (zero points
    w[32:64, 2] = -np.abs(w[32:64, 2]) - 1  # outside [0, 15])
    w[64:96, 3] = np.abs(w[64:96, 3]) + 2
    packed, scales, mins = qm.quantize_int4(jnp.asarray(w), 32)
    deq = np.asarray(qm.dequantize_int4(packed, scales, mins))
    s = np.repeat(np.asarray(scales), 32, axis=0)
    assert (np.abs(deq - w) <= s / 2 + 1e-6 * np.maximum(1, np.abs(w))).all()


def test_int8_roundtrip():
    w = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    w_q, scale = qm.quantize_int8(jnp.asarray(w))
    err = np.abs(np.asarray(w_q, np.float32) * np.asarray(scale) - w)
    assert (err <= np.asarray(scale) / 2 + 1e-7).all()


@pytest.mark.parametrize("group", qm.GROUP_SIZES)
def test_int8_grouped_quantize_is_q8_0(group):
    """Per group of `group` input rows: scale = absmax / 127 (numpy, GGUF Q8_0's d), values
    round(w / scale) in [-127, 127] with the group's extreme at +-127, each element within
    scale / 2; an all-zero group gets scale 1 and zeros; groups with wildly different ranges
    do not share a scale."""
    rng = np.random.default_rng(group)
    K, N = 384, 24
    w = rng.standard_normal((K, N)).astype(np.float32)
    w *= np.repeat(10.0 ** rng.uniform(-4, 2, (K // group, N)), group, axis=0).astype(np.float32)
    w[:group, 1] = 0.0
    w_q, scale = qm.quantize_int8(jnp.asarray(w), group)
    assert w_q.shape == (K, N) and w_q.dtype == jnp.int8
    assert scale.shape == (K // group, N) and scale.dtype == jnp.float32
    amax = np.abs(w.reshape(K // group, group, N)).max(axis=1)
    want = np.where(amax > 0, amax / np.float32(127), 1).astype(np.float32)
    np.testing.assert_allclose(np.asarray(scale), want, rtol=3e-7, atol=0)  # 1 ulp: XLA may
    # divide by multiplying with the reciprocal
    q = np.asarray(w_q, np.int32).reshape(K // group, group, N)
    np.testing.assert_array_equal(np.abs(q).max(axis=1)[amax > 0], 127)
    np.testing.assert_array_equal(q[0, :, 1], 0)
    assert float(scale[0, 1]) == 1.0
    deq = np.asarray(qm.dequantize_int8(w_q, scale))
    bound = np.repeat(np.asarray(scale), group, axis=0) / 2
    assert (np.abs(deq - w) <= bound * (1 + 1e-6)).all()
    # Relative to each group's own range, per channel is far coarser (ranges differ by decades).
    rng_g = np.repeat(np.maximum(amax, 1e-30), group, axis=0)
    w_c, s_c = qm.quantize_int8(jnp.asarray(w))
    err_c = (np.abs(np.asarray(qm.dequantize_int8(w_c, s_c)) - w) / rng_g).mean()
    assert (np.abs(deq - w) / rng_g).mean() < err_c / 10


def test_int8_quantize_of_q8_0_blocks_is_exact():
    """Weights that are already Q8_0-style blocks (a value at +-127 in every group, f16 d)
    re-quantise to the same int8 values and scales."""
    rng = np.random.default_rng(3)
    K, N, g = 128, 16, 32
    q = rng.integers(-127, 128, (K, N)).astype(np.int8)
    q[::g] = 127
    d = (rng.uniform(0.5, 2, (K // g, N)) * 1e-3).astype(np.float16).astype(np.float32)
    w = qm.dequantize_int8(jnp.asarray(q), jnp.asarray(d))
    w_q, scale = qm.quantize_int8(w, g)
    np.testing.assert_array_equal(np.asarray(w_q), q)
    np.testing.assert_allclose(np.asarray(scale), d, rtol=1e-6, atol=0)


def make_int8_grouped(seed, M, K, N, g, dtype):
    """GGUF Q8_0-style weight: int8 in [-127, 127] with an f16 scale per group of g rows."""
    rng = np.random.default_rng(seed)
    w_q = rng.integers(-127, 128, (K, N)).astype(np.int8)
    d = (rng.uniform(0.5, 2, (K // g, N)) * 1e-3).astype(np.float16).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    return x, w_q, d


@pytest.mark.parametrize("M,K,N,g,dtype", [(3, 256, 64, 32, jnp.float32),
                                           (5, 128, 48, 32, jnp.bfloat16),
                                           (2, 192, 16, 64, jnp.float32)])
def test_int8_grouped_reference_matches_numpy(M, K, N, g, dtype):
    x, w_q, d = make_int8_grouped(M * K, M, K, N, g, dtype)
    wn = w_q.astype(np.float32) * np.repeat(d, g, axis=0)  # value = q * scale[k // g]
    deq = np.asarray(qm.dequantize_int8(jnp.asarray(w_q), jnp.asarray(d)))
    np.testing.assert_array_equal(deq, wn)  # f16 scales: exact in f32
    out = qm.int8_matmul_reference(x, jnp.asarray(w_q), jnp.asarray(d))
    assert out.shape == (M, N) and out.dtype == dtype
    xn = np.asarray(x, np.float64)
    wn = np.asarray(jnp.asarray(wn, dtype), np.float64)  # the reference's weight is in x.dtype
    want = xn @ wn
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(out), want, atol=1e-4, rtol=1e-4)
    else:
        assert_close(out, want, dtype)


@pytest.mark.parametrize("impl,interpret", [("auto", False), ("reference", False),
                                            ("gpu", True), ("tpu", True), ("gpu", False),
                                            ("tpu", False)])
def test_int8_odd_group_wrapper_routes_to_reference(impl, interpret):
    """w_scale [G, N] with a group size the kernels do not take (K/G = 48, possible in a GGUF
    file): the reference on every impl, never a pallas_call (so the gpu/tpu impls work even
    without that accelerator, and on CPU)."""
    x, w_q, d = make_int8_grouped(3, 4, 192, 32, 48, jnp.float32)
    w_q, d = jnp.asarray(w_q), jnp.asarray(d)
    fn = functools.partial(qm.int8_matmul, impl=impl, interpret=interpret)
    assert "pallas_call" not in str(jax.make_jaxpr(fn)(x, w_q, d))
    np.testing.assert_array_equal(np.asarray(fn(x, w_q, d)),
                                  np.asarray(qm.int8_matmul_reference(x, w_q, d)))


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_int8_grouped_cpu_paths_are_not_kernels(impl):
    """On CPU, grouped int8 takes the XLA formulation (no pallas_call), same result."""
    x, w_q, d = make_int8_grouped(4, 3, 128, 32, 32, jnp.float32)
    w_q, d = jnp.asarray(w_q), jnp.asarray(d)
    fn = functools.partial(qm.int8_matmul, impl=impl)
    assert "pallas_call" not in str(jax.make_jaxpr(fn)(x, w_q, d))
    assert_close(fn(x, w_q, d), qm.int8_matmul_reference(x, w_q, d), jnp.float32)


def test_int8_single_group_scale_is_per_channel():
    """w_scale [1, N] is the per-channel layout: same answer as [N], and it keeps the kernel."""
    x, w = make(4, 5, 128, 64, 32, jnp.float32)
    w_q, s = qm.quantize_int8(w)
    ref = qm.int8_matmul_reference(x, w_q, s)
    assert_close(qm.int8_matmul_reference(x, w_q, s[None]), ref, jnp.float32)
    fn = functools.partial(qm.int8_matmul, impl="gpu", interpret=True)
    assert "pallas_call" in str(jax.make_jaxpr(fn)(x, w_q, s[None]))
    assert_close(fn(x, w_q, s[None]), ref, jnp.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_numpy(kind):
    """The references against float64 numpy on the dequantised operands."""
    x, w = make(5, 7, 256, 64, 64, jnp.float32)
    xn = np.asarray(x, np.float64)
    if kind == "int4":
        wn = np.asarray(qm.dequantize_int4(*qm.quantize_int4(w, 64)), np.float64)
    elif kind == "int8g":
        w_q, s = qm.quantize_int8(w, 64)
        wn = np.asarray(w_q, np.float64) * np.repeat(np.asarray(s, np.float64), 64, axis=0)
    else:
        w_q, s = qm.quantize_int8(w)
        wn = np.asarray(w_q, np.float64) * np.asarray(s, np.float64)
    if kind == "w8a8":
        x_q, xs = qm.quantize_activations_int8(x)
        xn = np.asarray(x_q, np.float64) * np.asarray(xs, np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(reference(kind, x, w, 64)), xn @ wn, atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("kind,bound", [("int8", 0.02), ("int8g", 0.02), ("w8a8", 0.03),
                                        ("int4", 0.2)])
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
    (lambda: qm.int4_matmul(jnp.zeros((2, 64)), jnp.zeros((32, 4), jnp.int8),
                            jnp.ones((2, 4)), jnp.ones((2, 3))), "mins must be"),
    (lambda: qm.int8_matmul(jnp.zeros((2, 64)), jnp.zeros((64, 4), jnp.int8),
                            jnp.ones((3, 4))), "w_scale must be float32 .*G dividing K"),
    (lambda: qm.w8a8_matmul(jnp.zeros((2, 64)), jnp.zeros((64, 4), jnp.int8),
                            jnp.ones((2, 4))), "w_scale must be float32 \\[N\\]"),
    (lambda: qm.quantize_int4(jnp.zeros((96, 4)), 64), "group_size"),
    (lambda: qm.quantize_int8(jnp.zeros((96, 4)), 64), "group_size"),
    (lambda: qm.quantize_int8(jnp.zeros((96, 4)), 48), "group_size"),
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
    elif kind == "int8g":
        text = lower_for(platform, lambda x, w, s: qm.int8_matmul(x, w, s, impl=impl), x,
                         sd((K, N), jnp.int8), sd((K // g, N), jnp.float32))
        assert "jaxserve_int8g_matmul" in text
    else:
        fn = qm.int8_matmul if kind == "int8" else qm.w8a8_matmul
        text = lower_for(platform, lambda x, w, s: fn(x, w, s, impl=impl), x,
                         sd((K, N), jnp.int8), sd((N,), jnp.float32))
    assert ("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
