"""Ragged paged attention: kernels and the XLA (CPU) path vs the reference, the reference vs
dense numpy."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention as rpa
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

CASES = [
    pytest.param(1, 2, 64, 8, jnp.float32, False, None, None, id="mha-f32"),
    pytest.param(3, 3, 64, 16, jnp.bfloat16, False, None, None, id="gqa3-bf16"),
    pytest.param(4, 2, 128, 4, jnp.float32, False, 6, None, id="gqa4-d128-window"),
    pytest.param(8, 1, 64, 8, jnp.float32, False, None, 5.0, id="mqa8-softcap"),
    pytest.param(4, 2, 64, 8, jnp.bfloat16, True, 9, 20.0, id="int8-bf16-window-cap"),
]
W = 4
LAYER, L = 2, 3
PAD_ROWS = 3


def seqs_for(S):
    """(q_len, kv_len): decode at 1 and at a page boundary, a whole prompt, a chunk in the
    middle of a prompt, an empty sequence, and a long chunk ending at the maximum length."""
    return [(1, 1), (1, S), (5, 5), (3, 2 * S + 1), (0, 0), (2 * S, W * S)]


def short_seqs_for(S):
    """(q_len, kv_len) of a speculative step: decode tokens with up to 7 drafts each (at most
    rpa.SHORT_ROWS rows a sequence), across a page boundary and at the maximum length."""
    return [(1, 1), (5, 5), (3, 2 * S + 1), (0, 0), (8, W * S), (2, S)]


def make_inputs(seed, G, Hkv, D, S, dtype, quant, seqs=None):
    rng = np.random.default_rng(seed)
    seqs = seqs_for(S) if seqs is None else seqs
    kv_lens = [kv for _, kv in seqs] + [0]  # one trailing slot beyond num_seqs
    k, v, ks, vs, pt = make_paged_kv(rng, kv_lens=kv_lens, L=L, layer=LAYER, S=S, Hkv=Hkv, D=D,
                                     W=W, dtype=dtype, quant=quant)
    cu = np.concatenate([[0], np.cumsum([ql for ql, _ in seqs])])
    cu = np.append(cu, cu[-1]).astype(np.int32)
    T = int(cu[-1]) + PAD_ROWS
    q = rng.standard_normal((T, G * Hkv, D))
    q[cu[-1]:] = np.nan  # padding rows may hold anything
    return (jnp.asarray(q, dtype), k, v, jnp.int32(LAYER), jnp.asarray(kv_lens, jnp.int32), pt,
            jnp.asarray(cu), jnp.asarray([len(seqs)], jnp.int32), ks, vs)


class _KernelVsReference:
    impl = "gpu"
    interpret = False

    @pytest.mark.parametrize("G,Hkv,D,S,dtype,quant,window,cap", fast_first(CASES))
    def test_matches_reference(self, G, Hkv, D, S, dtype, quant, window, cap):
        *args, ks, vs = make_inputs(hash((G, D, S, 1)) % 2**31, G, Hkv, D, S, dtype, quant)
        kw = dict(sm_scale=D**-0.5, sliding_window=window, soft_cap=cap, k_scale=ks,
                  v_scale=vs)
        out = rpa.ragged_paged_attention(*args, impl=self.impl, interpret=self.interpret, **kw)
        ref = rpa.ragged_paged_attention_reference(*args, **kw)
        assert out.shape == args[0].shape and out.dtype == args[0].dtype
        assert not np.isnan(np.asarray(out, np.float32)).any()
        np.testing.assert_array_equal(np.asarray(out[-PAD_ROWS:], np.float32), 0)
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


@pytest.mark.parametrize("block", fast_first([4, 16]))
@pytest.mark.parametrize("dtype,quant,window", [(jnp.float32, False, None),
                                                (jnp.float32, False, 6),
                                                (jnp.bfloat16, True, 9)])
def test_xla_query_blocks_match_reference(block, dtype, quant, window):
    """The XLA path with blocks of 4 and 16 query rows: blocks inside one sequence, blocks
    spanning sequences and all-padding blocks, on the adversarial batch above."""
    q, k, v, layer, lens, pt, cu, nseq, ks, vs = make_inputs(5, 2, 2, 64, 8, dtype, quant)
    kw = dict(sm_scale=0.125, sliding_window=window, k_scale=ks, v_scale=vs)
    want = rpa.ragged_paged_attention_reference(q, k, v, layer, lens, pt, cu, nseq, **kw)
    got = rpa.ragged_paged_attention_xla(q, k, v, layer, lens, pt, cu, nseq[0], **kw,
                                         block=block)
    assert got.shape == q.shape and got.dtype == q.dtype
    n = int(cu[-1])
    np.testing.assert_array_equal(np.asarray(got[n:], np.float32), 0)
    assert_close(got[:n], want[:n], dtype)


@pytest.mark.parametrize("seqs", fast_first([
    pytest.param(short_seqs_for, id="spec-step"),
    pytest.param(lambda S: [(5, 9)], id="one-seq-T-le-rows"),
    pytest.param(lambda S: [(8, 8), (1, 3)] + [(0, 0)] * 9, id="mostly-padding"),
    pytest.param(lambda S: [(2, 2), (9, 9)], id="one-too-long")]))
@pytest.mark.parametrize("G,Hkv,D,S,dtype,quant,window,cap", fast_first([CASES[4], CASES[0]]))
def test_xla_short_rows_match_reference(seqs, G, Hkv, D, S, dtype, quant, window, cap):
    """Steps whose sequences hold at most SHORT_ROWS rows take the padded short-rows path (by
    lax.cond, or directly when T itself is that short); one row more falls back to the
    blocks. Both must equal the reference, padding rows zero."""
    q, k, v, layer, lens, pt, cu, nseq, ks, vs = make_inputs(
        7, G, Hkv, D, S, dtype, quant, seqs=seqs(S))
    kw = dict(sm_scale=D**-0.5, sliding_window=window, soft_cap=cap, k_scale=ks, v_scale=vs)
    want = rpa.ragged_paged_attention_reference(q, k, v, layer, lens, pt, cu, nseq, **kw)
    got = rpa.ragged_paged_attention_xla(q, k, v, layer, lens, pt, cu, nseq, **kw)
    n = int(cu[-1])
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_array_equal(np.asarray(got[n:], np.float32), 0)
    assert_close(got[:n], want[:n], dtype)


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("block_q", fast_first([3, 1, 4]))
@pytest.mark.parametrize("G,Hkv,D,S,dtype,quant,window,cap", fast_first([CASES[4], CASES[2]]))
def test_small_query_blocks_match_reference(impl, block_q, G, Hkv, D, S, dtype, quant, window,
                                            cap):
    """Blocks much smaller than the chunks: a sequence spans several query blocks, blocks end
    mid-page and mid-window, so the per-block key ranges and the scatter back are exercised."""
    *args, ks, vs = make_inputs(hash((G, D, S, block_q)) % 2**31, G, Hkv, D, S, dtype, quant)
    kw = dict(sm_scale=D**-0.5, sliding_window=window, soft_cap=cap, interpret=True)
    if impl == "gpu":
        out = rpa._ragged_gpu(*args, ks, vs, **kw,
                              config=rpa.GpuRaggedConfig(block_q=block_q, pages_per_block=1))
    else:
        out = rpa._ragged_tpu(*args, ks, vs, **kw, block_q=block_q)
    del kw["interpret"]
    ref = rpa.ragged_paged_attention_reference(*args, k_scale=ks, v_scale=vs, **kw)
    assert not np.isnan(np.asarray(out, np.float32)).any()
    np.testing.assert_array_equal(np.asarray(out[-PAD_ROWS:], np.float32), 0)
    assert_close(out, ref, dtype)


def test_query_blocks_partition_the_rows():
    """Every real row lies in exactly one block of its own sequence; unused blocks are empty."""
    kv_lens = jnp.asarray([7, 1, 20, 0, 0], jnp.int32)
    cu = jnp.asarray([0, 7, 8, 13, 13, 13], jnp.int32)  # q_lens 7, 1, 5, 0 (+ one unused slot)
    seq, start, n, pos0, lo, hi, first = (np.asarray(x) for x in rpa._query_blocks(
        kv_lens, cu, jnp.int32(4), block_q=3, num_blocks=13 // 3 + 1 + 5, sliding_window=4))
    rows = [(s, r) for b in range(len(seq)) for s, r in
            ((seq[b], start[b] + k) for k in range(n[b]))]
    assert sorted(r for _, r in rows) == list(range(13))
    assert [s for s, r in sorted(rows, key=lambda x: x[1])] == [0] * 7 + [1] + [2] * 5
    assert list(first[:3]) == [0, 3, 4]
    # Sequence 2's second block holds positions 18-19: keys [15, 20) with a window of 4.
    assert (n[5], pos0[5], lo[5], hi[5]) == (2, 18, 15, 20)
    assert (n[6:] == 0).all() and (hi[6:] == 0).all()


@pytest.mark.parametrize("G,Hkv,D,S,dtype,quant,window,cap", CASES[2:])
def test_reference_matches_dense_numpy(G, Hkv, D, S, dtype, quant, window, cap):
    q, k, v, layer, lens, pt, cu, nseq, ks, vs = make_inputs(11, G, Hkv, D, S, jnp.float32,
                                                             quant)
    out = np.asarray(rpa.ragged_paged_attention_reference(
        q, k, v, layer, lens, pt, cu, nseq, sm_scale=0.3, sliding_window=window, soft_cap=cap,
        k_scale=ks, v_scale=vs))
    cu = np.asarray(cu)
    for i, (q_len, kv_len) in enumerate(seqs_for(S)):
        kd, vd = gather_dense(k, v, ks, vs, LAYER, np.asarray(pt)[i], kv_len)
        rows = slice(cu[i], cu[i + 1])
        want = dense_attention_np(q[rows], kd, vd, np.arange(kv_len - q_len, kv_len), kv_len,
                                  sm_scale=0.3, sliding_window=window, soft_cap=cap)
        np.testing.assert_allclose(out[rows], want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(out[cu[-1]:], 0)


def test_reference_has_kernel_signature():
    sig = inspect.signature(rpa.ragged_paged_attention).parameters
    ref = inspect.signature(rpa.ragged_paged_attention_reference).parameters
    assert list(ref) == [p for p in sig if p not in ("impl", "interpret")]


def test_xla_path_has_reference_signature():
    ref = inspect.signature(rpa.ragged_paged_attention_reference).parameters
    xla = inspect.signature(rpa.ragged_paged_attention_xla).parameters
    assert list(xla) == [*ref, "block"]


def test_num_seqs_may_be_a_scalar():
    *args, ks, vs = make_inputs(3, 2, 2, 64, 8, jnp.float32, False)
    args[7] = args[7][0]
    out = rpa.ragged_paged_attention(*args, sm_scale=0.1, impl="gpu", interpret=True)
    assert_close(out, rpa.ragged_paged_attention_reference(*args, sm_scale=0.1), jnp.float32)


@pytest.mark.parametrize("which,bad,match", [
    ("cu_q_lens", jnp.zeros((3,), jnp.int32), "cu_q_lens must be int32"),
    ("num_seqs", jnp.zeros((2,), jnp.int32), "num_seqs must be"),
    ("q", jnp.zeros((8, 4)), "q must be"),
    ("page_tables", jnp.zeros((3, 2), jnp.int32), "page_tables must be"),
])
def test_validation_errors_name_the_argument(which, bad, match):
    args = dict(q=jnp.zeros((8, 4, 64)), k_cache=jnp.zeros((1, 4, 8, 2, 64)),
                v_cache=jnp.zeros((1, 4, 8, 2, 64)), layer=0,
                kv_lens=jnp.zeros((2,), jnp.int32), page_tables=jnp.zeros((2, 3), jnp.int32),
                cu_q_lens=jnp.zeros((3,), jnp.int32), num_seqs=jnp.ones((1,), jnp.int32))
    args[which] = bad if which != "cu_q_lens" else jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match=match):
        rpa.ragged_paged_attention(*args.values(), sm_scale=1.0)


@pytest.mark.parametrize("impl,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_for_accelerator(impl, platform):
    sd = jax.ShapeDtypeStruct
    L_, P, S, Hkv, D, N, G, W_, T = 2, 12, 16, 2, 128, 3, 4, 4, 40
    cache = sd((L_, P, S, Hkv, D), jnp.int8)
    scale = sd((L_, P, S, Hkv), jnp.float32)

    def fn(q, k, v, layer, lens, pt, cu, nseq, ks, vs):
        return rpa.ragged_paged_attention(q, k, v, layer, lens, pt, cu, nseq, sm_scale=0.1,
                                          impl=impl, sliding_window=20, soft_cap=30.0,
                                          k_scale=ks, v_scale=vs)

    text = lower_for(platform, fn, sd((T, G * Hkv, D), jnp.bfloat16), cache, cache,
                     sd((), jnp.int32), sd((N,), jnp.int32), sd((N, W_), jnp.int32),
                     sd((N + 1,), jnp.int32), sd((1,), jnp.int32), scale, scale)
    assert ("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
