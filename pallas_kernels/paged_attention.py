"""Paged attention: one query token per sequence against its paged KV cache (decode), and the
padded [B, T] query rows of scoring steps.

GPU path: the Pallas **Triton** backend, not Mosaic GPU. Why: (1) the Triton lowering accepts a
gather of a vector of page ids from a ref (`k_ref[pages]`), which is exactly what a paged
decode tile needs, and the same kernel runs unchanged in Pallas' generic interpret mode on CPU,
so CI checks the very code that ships; Mosaic GPU has no CPU interpret mode in jax 0.10.2 and
wants TMA-friendly dense tiles. (2) Decode attention is bandwidth-bound (~1 FLOP/byte), so the
Hopper-only features Mosaic GPU buys (wgmma, TMA multicast, warp specialisation) do not move the
roofline here; a Triton kernel with split-K (flash-decoding) over pages saturates HBM on Ampere
and Hopper alike. Revisit for prefill-heavy ragged batches on Hopper.

Cache layout (owned by jaxserve.model.attention, restated here):
  k_cache, v_cache: [L, P, S, Hkv, Dh] — all layers' page pools; page 0 is reserved for padding
  writes. `layer` is a scalar int32 (traced inside the layer scan); the kernels index the layer
  inside the kernel (TPU: in the BlockSpec index map; GPU: as an offset into a free
  [L*P, S, Hkv, Dh] reshape), so no per-layer slice of the pool is ever materialised.
int8 KV: k_cache/v_cache int8 with k_scale, v_scale: [L, P, S, Hkv] f32, one scale per token per
  kv head (dequantised value = int8 * scale). The scale pool mirrors the cache minus Dh, so it is
  written by the same scatter (`.at[layer, page, offset]`) as the cache itself.
Query: token of sequence b sits at absolute position kv_lens[b] - 1 (its own K/V is already
  written). kv_lens[b] == 0 gives a zero row. Entries of page_tables past a sequence's pages may
  point anywhere (page 0, stale pages full of NaN): they are masked, never read into a result.
CPU path: impl "xla" (what "auto" picks on CPU), the reference restructured for XLA:CPU (a loop
  over blocks of pages with an online softmax instead of one gather of every page).
Padded rows (`paged_prefill_attention`): q [B, T, Hq, Dh] at explicit positions, attending
  causally; pure jnp on every backend (no kernel: only scoring / logprob steps use it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._attention_math import (
    MASK_VALUE,
    finalize,
    online_softmax_update,
    tile_scores,
)

IMPLS = ("auto", "reference", "xla", "gpu", "tpu")


# --------------------------------------------------------------------------------------------
# Tuning table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuDecodeConfig:
    pages_per_block: int  # pages gathered per inner step (tile of pages_per_block * S keys)
    num_splits: int  # flash-decoding partitions of the page table, combined outside the kernel
    num_warps: int = 4
    num_stages: int = 2


def gpu_decode_config(batch: int, num_kv_heads: int, pages_per_seq: int,
                      page_size: int) -> GpuDecodeConfig:
    """Block sizes for the Triton kernel: ~64-128 keys per tile; enough (b, kv head, split)
    programs to cover an H100's 132 SMs twice, but never more splits than key tiles."""
    ppb = max(1, min(128 // page_size, _next_pow2(pages_per_seq)))
    tiles = pl.cdiv(pages_per_seq, ppb)
    splits = max(1, min(tiles, pl.cdiv(264, batch * num_kv_heads), 16))
    return GpuDecodeConfig(pages_per_block=ppb, num_splits=splits)


# TPU: one page (all kv heads) per grid step, auto-pipelined (Pallas double-buffers the page
# DMAs); steps outside a sequence's live pages re-use the previous block index, so they cost
# no DMA.
TPU_DIMENSION_SEMANTICS = ("parallel", "arbitrary")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_shapes(q, k_cache, v_cache, layer, kv_lens, page_tables, k_scale, v_scale,
                  sliding_window, soft_cap):
    """Raise ValueError naming the argument and the expected shape/dtype."""
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, Dh], got shape {q.shape}")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q must be float32/bfloat16/float16, got {q.dtype}")
    B, Hq, D = q.shape
    if k_cache.ndim != 5:
        raise ValueError(f"k_cache must be [L, P, S, Hkv, Dh], got shape {k_cache.shape}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must match k_cache {k_cache.shape} {k_cache.dtype}, got "
                         f"{v_cache.shape} {v_cache.dtype}")
    L, P, S, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache head dim must equal q's Dh={D}, got {Dk}")
    if Hq % Hkv:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of k_cache kv heads Hkv={Hkv}")
    if jnp.ndim(layer) > 1 or (jnp.ndim(layer) == 1 and jnp.shape(layer)[0] != 1):
        raise ValueError(f"layer must be a scalar int32, got shape {jnp.shape(layer)}")
    if not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise ValueError(f"layer must be an integer scalar, got {jnp.result_type(layer)}")
    if kv_lens.shape != (B,) or kv_lens.dtype != jnp.int32:
        raise ValueError(f"kv_lens must be int32 [B]=[{B}], got {kv_lens.dtype} {kv_lens.shape}")
    if page_tables.ndim != 2 or page_tables.shape[0] != B or page_tables.dtype != jnp.int32:
        raise ValueError(f"page_tables must be int32 [B={B}, W], got {page_tables.dtype} "
                         f"{page_tables.shape}")
    _check_kv_quant(k_cache, k_scale, v_scale, q.dtype)
    _check_window_cap(sliding_window, soft_cap)


def _check_kv_quant(k_cache, k_scale, v_scale, q_dtype):
    L, P, S, Hkv, _ = k_cache.shape
    if k_cache.dtype == jnp.int8:
        for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
            if sc is None or sc.shape != (L, P, S, Hkv) or sc.dtype != jnp.float32:
                got = None if sc is None else (sc.shape, sc.dtype)
                raise ValueError(f"{name} must be float32 [L, P, S, Hkv]={(L, P, S, Hkv)} for "
                                 f"an int8 cache, got {got}")
    else:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale are only for an int8 cache; cache is "
                             f"{k_cache.dtype}")
        if k_cache.dtype != q_dtype:
            raise ValueError(f"k_cache dtype must be q's dtype {q_dtype} or int8, got "
                             f"{k_cache.dtype}")


def _check_window_cap(sliding_window, soft_cap):
    if sliding_window is not None and (int(sliding_window) != sliding_window
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be a positive float or None, got {soft_cap}")


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _layer_scalar(layer) -> jax.Array:
    return jnp.asarray(layer, jnp.int32).reshape(())


# --------------------------------------------------------------------------------------------
# Reference (pure jnp; also the fallback for shapes a kernel does not cover)
# --------------------------------------------------------------------------------------------


def paged_decode_attention_reference(
    q: jax.Array,  # [B, Hq, Dh]
    k_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    v_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    layer: jax.Array,  # [] int32
    kv_lens: jax.Array,  # [B] int32
    page_tables: jax.Array,  # [B, W] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32 (int8 cache only)
    v_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32 (int8 cache only)
) -> jax.Array:
    """Gathers only the sequence's pages of `layer`, masked softmax in f32 -> [B, Hq, Dh]."""
    _check_shapes(q, k_cache, v_cache, layer, kv_lens, page_tables, k_scale, v_scale,
                  sliding_window, soft_cap)
    B, Hq, D = q.shape
    _, _, S, Hkv, _ = k_cache.shape
    W = page_tables.shape[1]
    G = Hq // Hkv
    layer = _layer_scalar(layer)
    k = k_cache[layer, page_tables].reshape(B, W * S, Hkv, D)  # [B, K, Hkv, Dh]
    v = v_cache[layer, page_tables].reshape(B, W * S, Hkv, D)
    if k_scale is not None:
        k = k.astype(jnp.float32) * k_scale[layer, page_tables].reshape(B, W * S, Hkv, 1)
        v = v.astype(jnp.float32) * v_scale[layer, page_tables].reshape(B, W * S, Hkv, 1)
    pos = jnp.arange(W * S, dtype=jnp.int32)[None, :]  # [1, K]
    valid = pos < kv_lens[:, None]  # [B, K]
    if sliding_window is not None:
        valid &= pos >= kv_lens[:, None] - sliding_window
    v = jnp.where(valid[:, :, None, None], v, 0)

    qg = q.reshape(B, Hkv, G, D)
    s = jnp.einsum("bhgd,bkhd->bhgk", qg, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    mask = valid[:, None, None, :]  # [B, 1, 1, K]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0)), 0)  # kv_len 0 -> p = 0
    denom = jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o = jnp.einsum("bhgk,bkhd->bhgd", p / denom, v.astype(jnp.float32),
                   preferred_element_type=jnp.float32)
    return o.reshape(B, Hq, D).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# CPU path ("xla", what "auto" picks on CPU): the reference, restructured for XLA:CPU
# --------------------------------------------------------------------------------------------
# The reference gathers every row's W pages into one [B, W*S, Hkv, Dh] copy before attending:
# the copy is written to and read back from memory, and on the 2-core Xeon gathering costs as
# much as the attention itself. The XLA path walks the page table a few pages at a time with an
# online softmax, so each gathered block is used while it is still in cache.

# Bytes of K gathered per step of paged_decode_attention_xla: large enough that the loop's
# per-step overhead is small, small enough that the gathered block stays in cache (measured on
# the 2-core Xeon, Llama-3-8B layer, batch 8: 2 MiB blocks 1.4-2x faster than 4-16 MiB ones).
DECODE_BLOCK_BYTES = 2 * 2**20


def as_bits(pool: jax.Array) -> jax.Array | None:
    """16-bit float pools as uint16 bits. XLA:CPU gathers and scatters 16-bit floats by
    converting the whole operand (seconds per step for a bf16 cache); on integer bits it moves
    only the rows it touches. None for other dtypes. (The model's cache writes use it too.)"""
    if pool.dtype.itemsize == 2 and jnp.issubdtype(pool.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(pool, jnp.uint16)
    return None


def _gather_pages(pool: jax.Array, layer: jax.Array, page_tables: jax.Array) -> jax.Array:
    """pool [L, P, S, H, D], page_tables [B, W] -> [B, W, S, H, D]."""
    bits = as_bits(pool)
    if bits is None:
        return pool[layer, page_tables]
    return jax.lax.bitcast_convert_type(bits[layer, page_tables], pool.dtype)


def _dequantize(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """int8 x [..., Dh] * scale f32 [...], in f32, cast to `dtype`."""
    return (x.astype(jnp.float32) * scale[..., None]).astype(dtype)


def paged_decode_attention_xla(
    q: jax.Array,  # [B, Hq, Dh]
    k_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    v_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    layer: jax.Array,  # [] int32
    kv_lens: jax.Array,  # [B] int32
    page_tables: jax.Array,  # [B, W] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32 (int8 cache only)
    v_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32 (int8 cache only)
) -> jax.Array:
    """The reference's function for XLA:CPU -> [B, Hq, Dh]: a loop over about
    DECODE_BLOCK_BYTES of K (a power of two of pages) per step, from the first block any row's
    window reaches to the longest row's last page (not the whole bucketed width W). An int8
    cache's blocks are dequantised to q's dtype."""
    B, Hq, D = q.shape
    _, _, S, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    W = page_tables.shape[1]
    layer = _layer_scalar(layer)
    page_bytes = B * S * Hkv * D * k_cache.dtype.itemsize
    ppb = 1 << max(0, min(W, DECODE_BLOCK_BYTES // page_bytes).bit_length() - 1)  # pages/step
    nblk = -(-W // ppb)
    page_tables = jnp.pad(page_tables, ((0, 0), (0, nblk * ppb - W)))
    qg = q.reshape(B, Hkv, G, D)
    lo = 0 if sliding_window is None else kv_lens - sliding_window  # first key each row sees

    def gather(pool, scale, pages):  # -> [B, ppb * S, Hkv, Dh] in q's dtype
        x = _gather_pages(pool, layer, pages).reshape(B, ppb * S, Hkv, D)
        if scale is None:
            return x
        return _dequantize(x, scale[layer, pages].reshape(B, ppb * S, Hkv), q.dtype)

    def step(i, carry):
        m, l, acc = carry  # [B, Hkv, G, 1] x2, [B, Hkv, G, Dh] f32
        pages = jax.lax.dynamic_slice_in_dim(page_tables, i * ppb, ppb, axis=1)
        k = gather(k_cache, k_scale, pages)
        v = gather(v_cache, v_scale, pages)
        pos = i * ppb * S + jnp.arange(ppb * S, dtype=jnp.int32)
        valid = (pos[None, :] < kv_lens[:, None]) & (pos[None, :] >= jnp.reshape(lo, (-1, 1)))
        s = jnp.einsum("bhgd,bnhd->bhgn", qg, k, preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            s = jnp.tanh(s / soft_cap) * soft_cap
        s = jnp.where(valid[:, None, None], s, MASK_VALUE)
        m_next = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.where(valid[:, None, None], jnp.exp(s - m_next), 0.0)
        alpha = jnp.exp(m - m_next)
        v = jnp.where(valid[:, :, None, None], v, 0)  # stale pages may hold NaN: 0 * NaN leaks
        pv = jnp.einsum("bhgn,bnhd->bhgd", p.astype(v.dtype), v,
                        preferred_element_type=jnp.float32)
        return m_next, alpha * l + jnp.sum(p, axis=-1, keepdims=True), alpha * acc + pv

    # Blocks before every row's window and after the longest row hold no key (empty rows,
    # kv_len 0, see none either way).
    first = 0 if sliding_window is None else (
        jnp.min(jnp.where(kv_lens > 0, jnp.maximum(lo, 0), W * S)) // (ppb * S))
    last = jnp.minimum(-(-jnp.max(kv_lens) // (ppb * S)), nblk)
    init = (jnp.full((B, Hkv, G, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((B, Hkv, G, 1), jnp.float32), jnp.zeros((B, Hkv, G, D), jnp.float32))
    _, l, acc = jax.lax.fori_loop(first, last, step, init)
    return finalize(acc, l).reshape(B, Hq, D).astype(q.dtype)  # kv_len 0: zeros


# --------------------------------------------------------------------------------------------
# Padded query rows (pure jnp on every backend; no kernel)
# --------------------------------------------------------------------------------------------


def paged_prefill_attention(
    q: jax.Array,  # [B, T, Hq, Dh]
    k_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    v_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    layer: jax.Array,  # [] int32
    kv_lens: jax.Array,  # [B] int32
    page_tables: jax.Array,  # [B, W] int32
    positions: jax.Array,  # [B, T] int32 absolute position of each query token
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32 (int8 cache only)
    v_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32 (int8 cache only)
) -> jax.Array:
    """Padded rows of T query tokens -> [B, T, Hq, Dh]: token t of row b attends causally by
    absolute position to the first kv_lens[b] cached tokens of its sequence.

    Gathers only the pages in each row's page table (never the whole pool) and groups query
    heads per KV head, so KV is never repeated. Unused or stale pages may hold anything (NaN
    included): masked keys are excluded by `where`, and masked values are zeroed before the
    weighted sum, since 0 * NaN would leak. A query that sees no key (padding) gives 0.
    An int8 cache's gathered pages are dequantised to q's dtype first."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, Hq, Dh], got shape {q.shape}")
    B, T, Hq, D = q.shape
    if positions.shape != (B, T) or positions.dtype != jnp.int32:
        raise ValueError(f"positions must be int32 [B, T]=[{B}, {T}], got {positions.dtype} "
                         f"{positions.shape}")
    _check_shapes(jnp.zeros((B, Hq, D), q.dtype), k_cache, v_cache, layer, kv_lens, page_tables,
                  k_scale, v_scale, sliding_window, soft_cap)
    Hkv = k_cache.shape[3]
    G = Hq // Hkv
    W = page_tables.shape[1]
    S = k_cache.shape[2]
    layer = _layer_scalar(layer)
    k = _gather_pages(k_cache, layer, page_tables).reshape(B, W * S, Hkv, D)  # [B, K, Hkv, Dh]
    v = _gather_pages(v_cache, layer, page_tables).reshape(B, W * S, Hkv, D)
    if k_scale is not None:
        k = _dequantize(k, k_scale[layer, page_tables].reshape(B, W * S, Hkv), q.dtype)
        v = _dequantize(v, v_scale[layer, page_tables].reshape(B, W * S, Hkv), q.dtype)
    kv_pos = jnp.arange(W * S, dtype=jnp.int32)
    key_valid = kv_pos[None, :] < kv_lens[:, None]  # [B, K]
    v = jnp.where(key_valid[:, :, None, None], v, 0)

    qg = q.reshape(B, T, Hkv, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    q_pos = positions[:, :, None]  # [B, T, 1]
    mask = key_valid[:, None, :] & (kv_pos[None, None, :] <= q_pos)  # [B, T, K]
    if sliding_window is not None:
        mask &= kv_pos[None, None, :] > q_pos - sliding_window
    mask = mask[:, None, None]  # [B, 1, 1, T, K]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    # A fully masked row (padding query) has m = -inf; give it weight 0 instead of NaN.
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0)), 0)
    denom = jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o = jnp.einsum("bkgts,bskd->btkgd", (p / denom).astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
    return o.reshape(B, T, Hq, D).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# GPU kernel (Pallas Triton backend)
# --------------------------------------------------------------------------------------------


def _gpu_kernel(layer_ref, len_ref, pt_ref, q_ref, k_ref, v_ref, *rest, quantized: bool,
                num_pages: int, page_size: int, pages_per_block: int, pages_per_split: int,
                sm_scale: float, soft_cap: float | None, sliding_window: int | None):
    # Refs: layer [1], len [1], pt [Wp], q [Gp, Dh], k/v [L*P, S, Dh] (this kv head),
    # (ks/vs [L*P, S]), out o [Gp, Dh] f32, m/l [Gp, 1] f32 for this (split, b, kv head).
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref = rest
    else:
        ks_ref = vs_ref = None
        o_ref, m_ref, l_ref = rest
    S, N = page_size, pages_per_block * page_size
    Gp, D = q_ref.shape
    split = pl.program_id(2)
    kv_len = len_ref[0]
    layer_off = layer_ref[0] * num_pages
    lo = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
    split_first = split * pages_per_split
    tok_lo = jnp.maximum(lo, split_first * S)  # live tokens of this split: [tok_lo, tok_hi)
    tok_hi = jnp.minimum(kv_len, (split_first + pages_per_split) * S)
    first = tok_lo // S
    num_blocks = pl.cdiv(jnp.maximum(tok_hi - first * S, 0), N)
    q = q_ref[...]

    def body(i, carry):
        m, l, acc = carry
        p0 = first + i * pages_per_block
        pages = pt_ref[pl.ds(p0, pages_per_block)] + layer_off  # [ppb]
        k = k_ref[pages].reshape(N, D)
        v = v_ref[pages].reshape(N, D)
        ks = vs = None
        if quantized:
            ks = ks_ref[pages].reshape(1, N)
            vs = vs_ref[pages].reshape(1, N)
        tok_row = p0 * S + jax.lax.broadcasted_iota(jnp.int32, (Gp, N), 1)
        tok_col = p0 * S + jax.lax.broadcasted_iota(jnp.int32, (N, 1), 0)
        mask = (tok_row >= tok_lo) & (tok_row < tok_hi)
        key_live = (tok_col >= tok_lo) & (tok_col < tok_hi)
        s = tile_scores(q, k, ks, sm_scale=sm_scale, soft_cap=soft_cap)
        return online_softmax_update(s, mask, key_live, v, vs, m, l, acc, q.dtype)

    carry = (jnp.full((Gp, 1), MASK_VALUE, jnp.float32), jnp.zeros((Gp, 1), jnp.float32),
             jnp.zeros((Gp, D), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, num_blocks, body, carry)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _decode_gpu(q, k_cache, v_cache, layer, kv_lens, page_tables, k_scale, v_scale, *,
                sm_scale, sliding_window, soft_cap, interpret, config=None):
    B, Hq, D = q.shape
    L, P, S, Hkv, _ = k_cache.shape
    W = page_tables.shape[1]
    G = Hq // Hkv
    # Triton tiles need power-of-two extents and dot operands of at least 16 rows.
    if S & (S - 1) or D & (D - 1) or D < 16:
        raise ValueError(f"gpu paged attention needs power-of-two page size and head dim >= 16,"
                         f" got S={S}, Dh={D}")
    cfg = config or gpu_decode_config(B, Hkv, W, S)
    ppb = cfg.pages_per_block
    Gp = max(16, _next_pow2(G))
    pages_per_split = pl.cdiv(pl.cdiv(W, cfg.num_splits), ppb) * ppb
    splits = pl.cdiv(W, pages_per_split)
    # Extra ppb entries: a split's first tile may start mid-block (sliding window).
    Wp = splits * pages_per_split + ppb
    pt = jnp.pad(page_tables, ((0, 0), (0, Wp - W)))  # [B, Wp]
    qg = jnp.pad(q.reshape(B, Hkv, G, D), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    quantized = k_scale is not None
    # Free reshapes (contiguous): the layer becomes an offset into the page axis.
    args = [_layer_scalar(layer).reshape(1), kv_lens, pt, qg,
            k_cache.reshape(L * P, S, Hkv, D), v_cache.reshape(L * P, S, Hkv, D)]
    kv_spec = pl.BlockSpec((L * P, S, None, D), lambda b, h, s: (0, 0, h, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, s: (0,)),
        pl.BlockSpec((1,), lambda b, h, s: (b,)),
        pl.BlockSpec((None, Wp), lambda b, h, s: (b, 0)),
        pl.BlockSpec((None, None, Gp, D), lambda b, h, s: (b, h, 0, 0)),
        kv_spec,
        kv_spec,
    ]
    if quantized:
        args += [k_scale.reshape(L * P, S, Hkv), v_scale.reshape(L * P, S, Hkv)]
        in_specs += [pl.BlockSpec((L * P, S, None), lambda b, h, s: (0, 0, h))] * 2
    kernel = functools.partial(
        _gpu_kernel, quantized=quantized, num_pages=P, page_size=S, pages_per_block=ppb,
        pages_per_split=pages_per_split, sm_scale=sm_scale, soft_cap=soft_cap,
        sliding_window=sliding_window)
    stat_spec = pl.BlockSpec((None, None, None, Gp, 1), lambda b, h, s: (s, b, h, 0, 0))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, Hkv, splits),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, None, Gp, D), lambda b, h, s: (s, b, h, 0, 0)),
                   stat_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct((splits, B, Hkv, Gp, D), jnp.float32),
                   jax.ShapeDtypeStruct((splits, B, Hkv, Gp, 1), jnp.float32),
                   jax.ShapeDtypeStruct((splits, B, Hkv, Gp, 1), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxserve_paged_decode_gpu",
    )(*args)
    out = combine_splits(o, m, l)  # [B, Hkv, Gp, Dh]
    return out[:, :, :G].reshape(B, Hq, D).astype(q.dtype)


def combine_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge flash-decoding partials: o [X, ..., Dh], m/l [X, ..., 1] over axis 0 -> [..., Dh].
    An empty split has m = MASK_VALUE, l = 0, o = 0, so its weight vanishes (or, if every split
    is empty, the row finalises to 0)."""
    m_max = jnp.max(m, axis=0)
    w = jnp.exp(m - m_max)
    return finalize(jnp.sum(o * w, axis=0), jnp.sum(l * w, axis=0))


# --------------------------------------------------------------------------------------------
# TPU kernel (Mosaic)
# --------------------------------------------------------------------------------------------


def _tpu_kernel(layer_ref, lens_ref, pt_ref, q_ref, k_ref, v_ref, *rest, quantized: bool,
                page_size: int, pages_per_seq: int, sm_scale: float, soft_cap: float | None,
                sliding_window: int | None):
    # Scalar prefetch (SMEM): layer [1], lens [B], pt [B*W]. Blocks (VMEM): q [Hkv, G, Dh],
    # k/v [S*Hkv, Dh] (page pt[b, i] of this layer, token-major rows s*Hkv + h),
    # (ks/vs [S, Hkv]), o [Hkv, G, Dh]; scratch m/l [Hkv, G, 1], acc [Hkv, G, Dh] f32 carried
    # across the page axis of the grid.
    del layer_ref, pt_ref  # used by the index maps only
    if quantized:
        ks_ref, vs_ref, o_ref, m_scr, l_scr, acc_scr = rest
    else:
        o_ref, m_scr, l_scr, acc_scr = rest
    S = page_size
    Hkv, G, _ = q_ref.shape
    b, i = pl.program_id(0), pl.program_id(1)
    kv_len = lens_ref[b]
    lo = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
    first, last = lo // S, pl.cdiv(kv_len, S) - 1

    @pl.when(i == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when((i >= first) & (i <= last))
    def _step():
        tok_row = i * S + jax.lax.broadcasted_iota(jnp.int32, (G, S), 1)
        tok_col = i * S + jax.lax.broadcasted_iota(jnp.int32, (S, 1), 0)
        mask = (tok_row >= lo) & (tok_row < kv_len)
        key_live = (tok_col >= lo) & (tok_col < kv_len)
        # The page arrives once for all kv heads (one DMA); each head's rows are a sublane-
        # strided view of it. Hkv is small (1-8), so a static loop keeps every index static.
        for h in range(Hkv):
            q = q_ref[h]  # [G, Dh]
            k = k_ref[pl.ds(h, S, stride=Hkv), :]  # [S, Dh]
            v = v_ref[pl.ds(h, S, stride=Hkv), :]
            if quantized:
                # Dequantise the tile in VMEM: a per-row scale broadcasts along lanes for free,
                # whereas scaling score columns would need a [S, 1] -> [1, S] relayout.
                k = (k.astype(jnp.float32) * ks_ref[:, h:h + 1]).astype(q.dtype)
                v = v.astype(jnp.float32) * vs_ref[:, h:h + 1]
            s = tile_scores(q, k, None, sm_scale=sm_scale, soft_cap=soft_cap)
            m, l, acc = online_softmax_update(s, mask, key_live, v, None, m_scr[h], l_scr[h],
                                              acc_scr[h], q.dtype)
            m_scr[h], l_scr[h], acc_scr[h] = m, l, acc

    @pl.when(i == pages_per_seq - 1)
    def _done():
        o_ref[...] = finalize(acc_scr[...], l_scr[...]).astype(o_ref.dtype)


def _decode_tpu(q, k_cache, v_cache, layer, kv_lens, page_tables, k_scale, v_scale, *,
                sm_scale, sliding_window, soft_cap, interpret):
    B, Hq, D = q.shape
    L, P, S, Hkv, _ = k_cache.shape
    W = page_tables.shape[1]
    G = Hq // Hkv

    def page_map(b, i, layer_ref, lens_ref, pt_ref):
        # Clamp to the live pages: repeated block indices skip the DMA entirely.
        kv_len = lens_ref[b]
        lo = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
        j = jnp.clip(i, lo // S, jnp.maximum(pl.cdiv(kv_len, S) - 1, 0))
        return layer_ref[0], pt_ref[b * W + j], 0, 0

    quantized = k_scale is not None
    # [L, P, S*Hkv, Dh] is a free reshape; a page block then has full trailing dims, as Mosaic
    # requires (a squeezed Hkv block dim in the second-minor position is rejected).
    kv_spec = pl.BlockSpec((None, None, S * Hkv, D), page_map)
    in_specs = [pl.BlockSpec((None, Hkv, G, D), lambda b, i, *_: (b, 0, 0, 0)), kv_spec, kv_spec]
    args = [q.reshape(B, Hkv, G, D), k_cache.reshape(L, P, S * Hkv, D),
            v_cache.reshape(L, P, S * Hkv, D)]
    if quantized:
        in_specs += [pl.BlockSpec((None, None, S, Hkv), page_map)] * 2
        args += [k_scale, v_scale]
    kernel = functools.partial(
        _tpu_kernel, quantized=quantized, page_size=S, pages_per_seq=W, sm_scale=sm_scale,
        soft_cap=soft_cap, sliding_window=sliding_window)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, W),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, Hkv, G, D), lambda b, i, *_: (b, 0, 0, 0)),
            scratch_shapes=[pltpu.VMEM((Hkv, G, 1), jnp.float32),
                            pltpu.VMEM((Hkv, G, 1), jnp.float32),
                            pltpu.VMEM((Hkv, G, D), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, G, D), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=TPU_DIMENSION_SEMANTICS),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxserve_paged_decode_tpu",
    )(_layer_scalar(layer).reshape(1), kv_lens, page_tables.reshape(B * W), *args)
    return out.reshape(B, Hq, D)


# --------------------------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------------------------


def default_impl() -> str:
    backend = jax.default_backend()
    return {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(backend, "xla")


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "impl",
                                             "interpret"))
def paged_decode_attention(
    q: jax.Array,  # [B, Hq, Dh]
    k_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    v_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    layer: jax.Array,  # [] int32
    kv_lens: jax.Array,  # [B] int32
    page_tables: jax.Array,  # [B, W] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32
    v_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32
    impl: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Decode attention of one query token per sequence -> [B, Hq, Dh].

    impl: "reference" (pure jnp), "xla" (the reference restructured for XLA:CPU), "gpu" (Pallas
    Triton), "tpu" (Pallas Mosaic) or "auto" (by the default backend; CPU -> xla; GPU shapes the
    Triton tiles cannot cover -> reference). interpret=True runs the chosen Pallas kernel in
    interpret mode on CPU ("tpu" uses TPU interpret mode)."""
    _check_impl(impl)
    _check_shapes(q, k_cache, v_cache, layer, kv_lens, page_tables, k_scale, v_scale,
                  sliding_window, soft_cap)
    if impl == "auto":
        impl = default_impl()
        if impl == "gpu" and not _gpu_supported(k_cache):
            impl = "reference"
    if impl == "reference":
        return paged_decode_attention_reference(
            q, k_cache, v_cache, layer, kv_lens, page_tables, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)
    if impl == "xla":
        return paged_decode_attention_xla(
            q, k_cache, v_cache, layer, kv_lens, page_tables, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)
    fn = _decode_gpu if impl == "gpu" else _decode_tpu
    return fn(q, k_cache, v_cache, layer, kv_lens, page_tables, k_scale, v_scale,
              sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
              interpret=interpret)


def _gpu_supported(k_cache) -> bool:
    S, D = k_cache.shape[2], k_cache.shape[4]
    return not (S & (S - 1) or D & (D - 1) or D < 16)


__all__ = ["paged_decode_attention", "paged_decode_attention_reference",
           "paged_decode_attention_xla", "paged_prefill_attention", "as_bits", "gpu_decode_config",
           "GpuDecodeConfig", "combine_splits", "default_impl"]
