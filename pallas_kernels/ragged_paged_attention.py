"""Ragged paged attention: one flat batch of query tokens mixing prefill chunks and decode tokens.

Both kernels work on query blocks: each sequence's rows cut into blocks of block_q tokens of that
sequence alone (`_query_blocks`: at most cdiv(T, block_q) + N blocks, so the grid does not grow
with N x T; unused blocks exit at once).
GPU path: the Pallas Triton backend, for the reasons given at the top of paged_attention.py
(interpret-mode verifiable on CPU, page gathers from refs, bandwidth-bound on Hopper too); grid
(block, kv head), each program walking its block's causal/window key range a few pages at a time.
TPU path (Mosaic): grid (block, page), one page of all kv heads per step as in the decode
kernel, pages outside the block's causal/window range skipped (no DMA, no compute). A block's
rows are block_q * G score rows (~128: one MXU pass), so a prefill chunk re-reads its K/V once
per block_q tokens, not once per token, and a decode token costs one block. Block metadata lives
in scalar-prefetched SMEM; the query gather into blocks and the scatter back are XLA gathers of
T * Hq * Dh values.
CPU path: impl "xla" (what "auto" picks on CPU), blocks of RAGGED_BLOCK query rows: a block
inside one sequence gathers its pages once (paged_attention.paged_prefill_attention), a block
spanning sequences runs row by row through paged_attention.paged_decode_attention_xla.

Layout: sequence i owns query rows cu_q_lens[i]:cu_q_lens[i+1] of q [T, Hq, Dh]; those rows are
the LAST q_len_i tokens of its kv_len_i cached tokens, so row cu_q_lens[i] + j sits at absolute
position kv_len_i - q_len_i + j and attends causally (and within the sliding window). Rows from
cu_q_lens[num_seqs] on are padding and come out as zeros. Cache, int8 scales and `layer` as in
paged_attention.py: k/v [L, P, S, Hkv, Dh], k_scale/v_scale [L, P, S, Hkv] f32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import paged_attention as pa
from pallas_kernels._attention_math import (
    MASK_VALUE,
    finalize,
    online_softmax_update,
    tile_scores,
)

IMPLS = pa.IMPLS


# --------------------------------------------------------------------------------------------
# Tuning table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuRaggedConfig:
    block_q: int  # query tokens per program (rows = block_q * padded group size)
    pages_per_block: int  # pages gathered per inner step
    num_warps: int = 4
    num_stages: int = 2


def gpu_ragged_config(num_tokens: int, group: int, page_size: int, head_dim: int
                      ) -> GpuRaggedConfig:
    """~64 query rows per program (block_q * G), ~64 keys per tile (128 for Dh <= 64)."""
    gp = pa._next_pow2(group)
    block_q = max(1, min(64 // gp, pa._next_pow2(num_tokens)))
    if block_q * gp < 16:  # Triton dot operands need >= 16 rows
        block_q = pl.cdiv(16, gp)
    keys = 128 if head_dim <= 64 else 64
    return GpuRaggedConfig(block_q=block_q, pages_per_block=max(1, keys // page_size))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_shapes(q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs,
                  k_scale, v_scale, sliding_window, soft_cap):
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Hq, Dh], got shape {q.shape}")
    N = kv_lens.shape[0] if kv_lens.ndim == 1 else -1
    if kv_lens.ndim != 1 or kv_lens.dtype != jnp.int32:
        raise ValueError(f"kv_lens must be int32 [N], got {kv_lens.dtype} {kv_lens.shape}")
    if cu_q_lens.shape != (N + 1,) or cu_q_lens.dtype != jnp.int32:
        raise ValueError(f"cu_q_lens must be int32 [N+1]=[{N + 1}], got {cu_q_lens.dtype} "
                         f"{cu_q_lens.shape}")
    if jnp.shape(num_seqs) not in ((), (1,)) or not jnp.issubdtype(jnp.result_type(num_seqs),
                                                                   jnp.integer):
        raise ValueError(f"num_seqs must be an int32 scalar or [1], got {jnp.shape(num_seqs)} "
                         f"{jnp.result_type(num_seqs)}")
    # The per-sequence checks are the decode ones with N sequences standing in for B.
    pa._check_shapes(jnp.zeros((N, q.shape[1], q.shape[2]), q.dtype), k_cache, v_cache, layer,
                     kv_lens, page_tables, k_scale, v_scale, sliding_window, soft_cap)


def _num_seqs_scalar(num_seqs) -> jax.Array:
    return jnp.asarray(num_seqs, jnp.int32).reshape(())


def _token_view(kv_lens, cu_q_lens, num_seqs, T):
    """Per query row t: its sequence, its absolute position, and whether it is real. [T] each."""
    t = jnp.arange(T, dtype=jnp.int32)
    N = kv_lens.shape[0]
    seq = jnp.minimum(jnp.sum(t[:, None] >= cu_q_lens[None, 1:], axis=1), N - 1).astype(jnp.int32)
    real = t < cu_q_lens[_num_seqs_scalar(num_seqs)]
    q_len = cu_q_lens[1:] - cu_q_lens[:-1]
    pos = kv_lens[seq] - q_len[seq] + (t - cu_q_lens[seq])
    return seq, pos, real


def _query_blocks(kv_lens, cu_q_lens, num_seqs, *, block_q: int, num_blocks: int,
                sliding_window: int | None):
    """Split every sequence's query rows into blocks of at most block_q rows of that sequence
    alone. Block b: seq[b], its first flat row start[b], its valid rows n[b] (0 for the unused
    blocks past the last one) and the key range [lo[b], hi[b]) its rows attend to; and each
    sequence's first block id [N]."""
    N = kv_lens.shape[0]
    live = jnp.arange(N) < _num_seqs_scalar(num_seqs)
    q_len = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    per_seq = pl.cdiv(q_len, block_q)  # [N]
    ends = jnp.cumsum(per_seq)  # block ids [ends[i] - per_seq[i], ends[i]) are sequence i's
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.minimum(jnp.sum(b[:, None] >= ends[None, :], axis=1), N - 1).astype(jnp.int32)
    j = b - (ends[seq] - per_seq[seq])  # block index within its sequence
    used = b < ends[-1]
    start = cu_q_lens[seq] + j * block_q
    n = jnp.where(used, jnp.clip(q_len[seq] - j * block_q, 0, block_q), 0)
    pos0 = kv_lens[seq] - q_len[seq] + j * block_q  # position of the block's first row
    hi = jnp.where(used, pos0 + n, 0)
    lo = 0 if sliding_window is None else jnp.clip(pos0 - sliding_window + 1, 0, hi)
    lo = jnp.where(used, lo, 0)
    return seq, start, n, pos0, lo, hi, ends - per_seq


# --------------------------------------------------------------------------------------------
# Reference (pure jnp; also the fallback for shapes a kernel does not cover)
# --------------------------------------------------------------------------------------------


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, Hq, Dh]
    k_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    v_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    layer: jax.Array,  # [] int32
    kv_lens: jax.Array,  # [N] int32
    page_tables: jax.Array,  # [N, W] int32
    cu_q_lens: jax.Array,  # [N + 1] int32
    num_seqs: jax.Array,  # [] or [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32
    v_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32
) -> jax.Array:
    """-> [T, Hq, Dh]. A query at position p attends exactly like a decode query whose sequence
    holds p + 1 tokens, so each row runs through the decode reference with kv_len = p + 1 (0 for
    padding rows). Rows go in chunks of 16 so at most 16 rows' pages are gathered at once."""
    _check_shapes(q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs,
                  k_scale, v_scale, sliding_window, soft_cap)
    seq, pos, real = _token_view(kv_lens, cu_q_lens, num_seqs, q.shape[0])
    row_lens = jnp.where(real, pos + 1, 0).astype(jnp.int32)  # [T]

    def rows(x):
        q_t, lens_t, seq_t = x  # [Hq, Dh], [], []
        return pa.paged_decode_attention_reference(
            q_t[None], k_cache, v_cache, layer, lens_t[None], page_tables[seq_t][None],
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
            k_scale=k_scale, v_scale=v_scale)[0]

    return jax.lax.map(rows, (q, row_lens, seq), batch_size=16)


# --------------------------------------------------------------------------------------------
# CPU path ("xla", what "auto" picks on CPU): the reference, restructured for XLA:CPU
# --------------------------------------------------------------------------------------------

RAGGED_BLOCK = 16  # query rows per block of ragged_paged_attention_xla


def ragged_paged_attention_xla(
    q: jax.Array,  # [T, Hq, Dh]
    k_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    v_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    layer: jax.Array,  # [] int32
    kv_lens: jax.Array,  # [N] int32
    page_tables: jax.Array,  # [N, W] int32
    cu_q_lens: jax.Array,  # [N + 1] int32
    num_seqs: jax.Array,  # [] or [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32
    v_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32
    block: int = RAGGED_BLOCK,
) -> jax.Array:
    """The reference's function for XLA:CPU -> [T, Hq, Dh].

    The reference attends each query row as its own decode query, gathering the row's
    sequence's W pages once per row: a prompt chunk of n tokens moves n times the K/V one
    gather needs. Here the row is cut into blocks of `block` query rows: a block inside one
    sequence (most of a prompt chunk) gathers that sequence's pages once and attends causally
    as a padded prompt row does; a block spanning sequences (decode tokens, chunk boundaries)
    attends row by row; an all-padding block is zeros. lax.switch runs only the branch a block
    needs.

    A step whose sequences each hold at most SHORT_ROWS rows (decode tokens with their drafts:
    the speculative step) takes `_short_rows` instead, chosen at run time by lax.cond: the
    block loop's fixed cost (~0.4 ms a layer on a 2-core CPU) is more than such a step's whole
    attention."""
    T = q.shape[0]
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
              k_scale=k_scale, v_scale=v_scale)
    args = (q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs)
    R = min(SHORT_ROWS, T)
    if T <= R:  # no sequence can hold more
        return _short_rows(*args, rows=R, **kw)
    live = jnp.arange(kv_lens.shape[0]) < _num_seqs_scalar(num_seqs)
    longest = jnp.max(jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0))
    return jax.lax.cond(longest <= R, functools.partial(_short_rows, rows=R, **kw),
                        functools.partial(_blocks, block=block, **kw), *args)


SHORT_ROWS = 8  # rows per sequence of _short_rows (the speculative step's K + 1 <= 8)


def _short_rows(q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs, *,
                rows: int, **kw) -> jax.Array:
    """Every sequence's rows (at most `rows`) gathered into a padded [N, rows] prompt row, so
    each sequence's pages are gathered once and all its rows attend together; rows past a
    sequence's q_len sit at position -1 (they see no key) and are dropped on the way back."""
    T = q.shape[0]
    N = kv_lens.shape[0]
    live = jnp.arange(N) < _num_seqs_scalar(num_seqs)
    q_len = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)  # [N]
    j = jnp.arange(rows, dtype=jnp.int32)
    valid = j[None, :] < q_len[:, None]  # [N, rows]
    src = jnp.where(valid, cu_q_lens[:-1, None] + j[None, :], 0)
    positions = jnp.where(valid, kv_lens[:, None] - q_len[:, None] + j[None, :], -1)
    o = pa.paged_prefill_attention(q[src], k_cache, v_cache, layer, jnp.where(live, kv_lens, 0),
                                   page_tables, positions, **kw)  # [N, rows, Hq, Dh]
    seq, _, real = _token_view(kv_lens, cu_q_lens, num_seqs, T)
    o = o[seq, jnp.clip(jnp.arange(T) - cu_q_lens[seq], 0, rows - 1)]
    return jnp.where(real[:, None, None], o, 0).astype(q.dtype)


def _blocks(q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs, *,
            block: int, **kw) -> jax.Array:
    """ragged_paged_attention_xla's block loop (above)."""
    T, Hq, D = q.shape
    nb = -(-T // block)
    q = jnp.pad(q, ((0, nb * block - T), (0, 0), (0, 0)))
    seq, pos, real = _token_view(kv_lens, cu_q_lens, num_seqs, nb * block)
    pos = jnp.where(real, pos, 0)
    seq, pos, real = (a.reshape(nb, block) for a in (seq, pos, real))  # [nb, block] each
    one_seq = real.all(axis=1) & (seq == seq[:, :1]).all(axis=1)
    kind = jnp.where(one_seq, 1, jnp.where(real.any(axis=1), 2, 0))  # [nb]

    def attend_block(x):
        qb, sb, pb, rb, k = x  # [block, Hq, Dh], [block] x3, []

        def padding():
            return jnp.zeros_like(qb)

        def same_sequence():
            return pa.paged_prefill_attention(
                qb[None], k_cache, v_cache, layer, kv_lens[sb[0]][None],
                page_tables[sb[0]][None], pb[None], **kw)[0]

        def row_by_row():  # each row a decode query of its own sequence, up to its position
            return pa.paged_decode_attention_xla(
                qb, k_cache, v_cache, layer, jnp.where(rb, pb + 1, 0), page_tables[sb], **kw)

        return jax.lax.switch(k, (padding, same_sequence, row_by_row))

    o = jax.lax.map(attend_block, (q.reshape(nb, block, Hq, D), seq, pos, real, kind))
    return o.reshape(nb * block, Hq, D)[:T]


# --------------------------------------------------------------------------------------------
# GPU kernel (Pallas Triton backend)
# --------------------------------------------------------------------------------------------


def _gpu_kernel(layer_ref, seq_ref, start_ref, n_ref, pos0_ref, lo_ref, hi_ref, pt_ref, q_ref,
                k_ref, v_ref, *rest, quantized: bool, num_pages: int, page_size: int,
                pages_per_block: int, block_q: int, sm_scale: float, soft_cap: float | None,
                sliding_window: int | None):
    # Refs: layer [1]; this query block's seq, start, n, pos0, lo, hi [1] each (_query_blocks);
    # pt [N, Wp] (all sequences' page tables), q [Tp, Gp, Dh] (this kv head), k/v
    # [L*P, S, Dh], (ks/vs [L*P, S]), o_in/o [Tp, Gp, Dh] (o_in aliases o: rows no program
    # owns keep their zeros).
    if quantized:
        ks_ref, vs_ref, _, o_ref = rest
    else:
        ks_ref = vs_ref = None
        _, o_ref = rest
    S, N = page_size, pages_per_block * page_size
    _, Gp, D = q_ref.shape
    R = block_q * Gp
    row0, n, pos0 = start_ref[0], n_ref[0], pos0_ref[0]
    tok_lo, pos_hi = lo_ref[0], hi_ref[0]  # keys [tok_lo, pos_hi) are this block's

    @pl.when(n > 0)
    def _run():
        q = q_ref[pl.ds(row0, block_q)].reshape(R, D)
        # Row r is token r // Gp of the block, at absolute position pos0 + r // Gp.
        pos_row = pos0 + jax.lax.broadcasted_iota(jnp.int32, (R, 1), 0) // Gp  # [R, 1]
        first = tok_lo // S
        num_blocks = pl.cdiv(jnp.maximum(pos_hi - first * S, 0), N)
        seq = seq_ref[0]

        def body(b, carry):
            m, l, acc = carry
            p0 = first + b * pages_per_block
            pages = pt_ref[seq, pl.ds(p0, pages_per_block)] + layer_ref[0] * num_pages
            k = k_ref[pages].reshape(N, D)
            v = v_ref[pages].reshape(N, D)
            ks = vs = None
            if quantized:
                ks = ks_ref[pages].reshape(1, N)
                vs = vs_ref[pages].reshape(1, N)
            key_row = p0 * S + jax.lax.broadcasted_iota(jnp.int32, (R, N), 1)
            key_col = p0 * S + jax.lax.broadcasted_iota(jnp.int32, (N, 1), 0)
            mask = (key_row <= pos_row) & (key_row < pos_hi)
            if sliding_window is not None:
                mask &= key_row > pos_row - sliding_window
            key_live = (key_col >= tok_lo) & (key_col < pos_hi)
            s = tile_scores(q, k, ks, sm_scale=sm_scale, soft_cap=soft_cap)
            return online_softmax_update(s, mask, key_live, v, vs, m, l, acc, q.dtype)

        carry = (jnp.full((R, 1), MASK_VALUE, jnp.float32), jnp.zeros((R, 1), jnp.float32),
                 jnp.zeros((R, D), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, num_blocks, body, carry)
        out = finalize(acc, l).astype(o_ref.dtype).reshape(block_q, Gp, D)
        rows = jax.lax.broadcasted_iota(jnp.int32, (block_q, Gp, D), 0)
        # Rows past the block's n belong to the next sequence (or are padding): leave them.
        pltriton.store(o_ref.at[pl.ds(row0, block_q)], out, mask=rows < n)


def _ragged_gpu(q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs,
                k_scale, v_scale, *, sm_scale, sliding_window, soft_cap, interpret, config=None):
    T, Hq, D = q.shape
    L, P, S, Hkv, _ = k_cache.shape
    Nseq, W = page_tables.shape
    G = Hq // Hkv
    if not pa._gpu_supported(k_cache):
        raise ValueError(f"gpu ragged attention needs power-of-two page size and head dim >= 16,"
                         f" got S={S}, Dh={D}")
    cfg = config or gpu_ragged_config(T, G, S, D)
    bq, ppb = cfg.block_q, cfg.pages_per_block
    NB = pl.cdiv(T, bq) + Nseq  # a sequence adds at most one partial block
    blocks = _query_blocks(kv_lens, cu_q_lens, num_seqs, block_q=bq, num_blocks=NB,
                           sliding_window=sliding_window)[:6]  # seq, start, n, pos0, lo, hi
    Gp = pa._next_pow2(G)
    Tp = T + bq  # a block may start at the last real row: reads/writes stay in bounds
    pt = jnp.pad(page_tables, ((0, 0), (0, ppb)))  # [N, W + ppb]
    qg = jnp.pad(q.reshape(T, Hkv, G, D), ((0, bq), (0, 0), (0, Gp - G), (0, 0)))
    quantized = k_scale is not None
    kv_spec = pl.BlockSpec((L * P, S, None, D), lambda b, h: (0, 0, h, 0))
    tok_spec = pl.BlockSpec((Tp, None, Gp, D), lambda b, h: (0, h, 0, 0))
    args = [pa._layer_scalar(layer).reshape(1), *blocks, pt, qg,
            k_cache.reshape(L * P, S, Hkv, D), v_cache.reshape(L * P, S, Hkv, D)]
    in_specs = ([pl.BlockSpec((1,), lambda b, h: (0,))]
                + [pl.BlockSpec((1,), lambda b, h: (b,))] * len(blocks)
                + [pl.BlockSpec((Nseq, W + ppb), lambda b, h: (0, 0)), tok_spec, kv_spec,
                   kv_spec])
    if quantized:
        args += [k_scale.reshape(L * P, S, Hkv), v_scale.reshape(L * P, S, Hkv)]
        in_specs += [pl.BlockSpec((L * P, S, None), lambda b, h: (0, 0, h))] * 2
    args.append(jnp.zeros((Tp, Hkv, Gp, D), q.dtype))
    in_specs.append(tok_spec)
    kernel = functools.partial(
        _gpu_kernel, quantized=quantized, num_pages=P, page_size=S, pages_per_block=ppb,
        block_q=bq, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    out = pl.pallas_call(
        kernel,
        # Query blocks (each inside one sequence; unused ones exit at once) x kv heads.
        grid=(NB, Hkv),
        in_specs=in_specs,
        out_specs=tok_spec,
        out_shape=jax.ShapeDtypeStruct((Tp, Hkv, Gp, D), q.dtype),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxserve_ragged_paged_gpu",
    )(*args)
    return out[:T, :, :G].reshape(T, Hq, D)


# --------------------------------------------------------------------------------------------
# TPU kernel (Mosaic)
# --------------------------------------------------------------------------------------------


def tpu_ragged_block_q(num_tokens: int, group: int) -> int:
    """Query tokens per TPU block: ~128 score rows (block_q * G, one MXU pass), at least 8,
    at most the (power-of-two padded) number of tokens."""
    return max(8, min(pa._next_pow2(num_tokens), 1 << (max(128 // group, 1).bit_length() - 1)))


def _tpu_kernel(layer_ref, meta_ref, pt_ref, q_ref, pos_ref, k_ref, v_ref, *rest,
                quantized: bool, page_size: int, pages_per_seq: int, sm_scale: float,
                soft_cap: float | None, sliding_window: int | None):
    # Scalar prefetch (SMEM): layer [1], meta [3 * NB] (seq, lo, hi per block), pt [N*W].
    # Blocks (VMEM): q [Hkv, R, Dh] (R = block_q * G rows, token-major: row r is token r // G
    # of the block), pos [R, 1] (absolute position of each row; -1 for unused rows),
    # k/v [S*Hkv, Dh] (one page, token-major rows s*Hkv + h), (ks/vs [S, Hkv]),
    # o [Hkv, R, Dh]; scratch m/l [Hkv, R, 1], acc [Hkv, R, Dh] f32 across the page axis.
    del layer_ref, pt_ref  # used by the index maps only
    if quantized:
        ks_ref, vs_ref, o_ref, m_scr, l_scr, acc_scr = rest
    else:
        o_ref, m_scr, l_scr, acc_scr = rest
    S = page_size
    Hkv, R, _ = q_ref.shape
    b, i = pl.program_id(0), pl.program_id(1)
    lo, hi = meta_ref[3 * b + 1], meta_ref[3 * b + 2]

    @pl.when(i == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when((i >= lo // S) & (i * S < hi))
    def _step():
        pos = pos_ref[...]  # [R, 1]
        key_row = i * S + jax.lax.broadcasted_iota(jnp.int32, (R, S), 1)
        key_col = i * S + jax.lax.broadcasted_iota(jnp.int32, (S, 1), 0)
        mask = (key_row <= pos) & (key_row >= lo)
        if sliding_window is not None:
            mask &= key_row > pos - sliding_window
        key_live = (key_col >= lo) & (key_col < hi)
        for h in range(Hkv):  # as in the decode kernel: one page DMA serves every kv head
            q = q_ref[h]  # [R, Dh]
            k = k_ref[pl.ds(h, S, stride=Hkv), :]  # [S, Dh]
            v = v_ref[pl.ds(h, S, stride=Hkv), :]
            if quantized:
                k = (k.astype(jnp.float32) * ks_ref[:, h:h + 1]).astype(q.dtype)
                v = v.astype(jnp.float32) * vs_ref[:, h:h + 1]
            s = tile_scores(q, k, None, sm_scale=sm_scale, soft_cap=soft_cap)
            m, l, acc = online_softmax_update(s, mask, key_live, v, None, m_scr[h], l_scr[h],
                                              acc_scr[h], q.dtype)
            m_scr[h], l_scr[h], acc_scr[h] = m, l, acc

    @pl.when(i == pages_per_seq - 1)
    def _done():
        o_ref[...] = finalize(acc_scr[...], l_scr[...]).astype(o_ref.dtype)


def _ragged_tpu(q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs,
                k_scale, v_scale, *, sm_scale, sliding_window, soft_cap, interpret,
                block_q=None):
    T, Hq, D = q.shape
    L, P, S, Hkv, _ = k_cache.shape
    N, W = page_tables.shape
    G = Hq // Hkv
    bq = block_q or tpu_ragged_block_q(T, G)
    R = bq * G
    NB = pl.cdiv(T, bq) + N  # a sequence adds at most one partial block
    seq, start, n, pos0, lo, hi, first_blk = _query_blocks(
        kv_lens, cu_q_lens, num_seqs, block_q=bq, num_blocks=NB, sliding_window=sliding_window)
    # Query rows gathered into per-sequence blocks (an XLA gather of T * Hq * Dh values, small
    # next to the K/V the kernel streams), [NB, Hkv, R, Dh] so a kv head's rows are one tile.
    t = jnp.arange(bq, dtype=jnp.int32)
    rows = jnp.clip(start[:, None] + t, 0, T - 1)  # [NB, bq]
    qb = q.reshape(T, Hkv, G, D)[rows].transpose(0, 2, 1, 3, 4).reshape(NB, Hkv, R, D)
    pos = jnp.where(t < n[:, None], pos0[:, None] + t, -1)  # [NB, bq]
    pos = jnp.repeat(pos, G, axis=1)[..., None]  # [NB, R, 1]
    meta = jnp.stack([seq, lo, hi], axis=1).reshape(3 * NB)

    def page_map(b, i, layer_ref, meta_ref, pt_ref):
        # Clamp to the block's live pages: repeated block indices skip the DMA.
        blo, bhi = meta_ref[3 * b + 1], meta_ref[3 * b + 2]
        j = jnp.clip(i, blo // S, jnp.maximum(pl.cdiv(bhi, S) - 1, 0))
        return layer_ref[0], pt_ref[meta_ref[3 * b] * W + j], 0, 0

    quantized = k_scale is not None
    kv_spec = pl.BlockSpec((None, None, S * Hkv, D), page_map)
    in_specs = [pl.BlockSpec((None, Hkv, R, D), lambda b, i, *_: (b, 0, 0, 0)),
                pl.BlockSpec((None, R, 1), lambda b, i, *_: (b, 0, 0)), kv_spec, kv_spec]
    args = [qb, pos, k_cache.reshape(L, P, S * Hkv, D), v_cache.reshape(L, P, S * Hkv, D)]
    if quantized:
        in_specs += [pl.BlockSpec((None, None, S, Hkv), page_map)] * 2
        args += [k_scale, v_scale]
    kernel = functools.partial(
        _tpu_kernel, quantized=quantized, page_size=S, pages_per_seq=W, sm_scale=sm_scale,
        soft_cap=soft_cap, sliding_window=sliding_window)
    ob = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(NB, W),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, Hkv, R, D), lambda b, i, *_: (b, 0, 0, 0)),
            scratch_shapes=[pltpu.VMEM((Hkv, R, 1), jnp.float32),
                            pltpu.VMEM((Hkv, R, 1), jnp.float32),
                            pltpu.VMEM((Hkv, R, D), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((NB, Hkv, R, D), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=pa.TPU_DIMENSION_SEMANTICS),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxserve_ragged_paged_tpu",
    )(pa._layer_scalar(layer).reshape(1), meta, page_tables.reshape(N * W), *args)
    # Back to flat rows: row t is row t - start[blk] of its sequence's block blk; padding rows
    # read an appended zero row.
    ob = ob.reshape(NB, Hkv, bq, G, D).transpose(0, 2, 1, 3, 4).reshape(NB * bq, Hq, D)
    ob = jnp.concatenate([ob, jnp.zeros((1, Hq, D), q.dtype)])
    tseq, _, real = _token_view(kv_lens, cu_q_lens, num_seqs, T)
    off = jnp.arange(T, dtype=jnp.int32) - cu_q_lens[tseq]
    src = jnp.where(real, (first_blk[tseq] + off // bq) * bq + off % bq, NB * bq)
    return ob[src]


# --------------------------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "impl",
                                             "interpret"))
def ragged_paged_attention(
    q: jax.Array,  # [T, Hq, Dh]
    k_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    v_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    layer: jax.Array,  # [] int32
    kv_lens: jax.Array,  # [N] int32
    page_tables: jax.Array,  # [N, W] int32
    cu_q_lens: jax.Array,  # [N + 1] int32
    num_seqs: jax.Array,  # [] or [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32
    v_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32
    impl: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of a flat ragged batch of query tokens -> [T, Hq, Dh].

    impl / interpret as in paged_decode_attention (CPU "auto" -> xla)."""
    pa._check_impl(impl)
    _check_shapes(q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs,
                  k_scale, v_scale, sliding_window, soft_cap)
    if impl == "auto":
        impl = pa.default_impl()
        if impl == "gpu" and not pa._gpu_supported(k_cache):
            impl = "reference"
    if impl == "reference":
        return ragged_paged_attention_reference(
            q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
            k_scale=k_scale, v_scale=v_scale)
    if impl == "xla":
        return ragged_paged_attention_xla(
            q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
            k_scale=k_scale, v_scale=v_scale)
    fn = _ragged_gpu if impl == "gpu" else _ragged_tpu
    return fn(q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs, k_scale,
              v_scale, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
              interpret=interpret)
