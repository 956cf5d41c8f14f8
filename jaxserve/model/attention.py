"""Paged attention: the KV cache layout, the metadata a step passes, and the one dispatch function
every attention call in the model goes through.

Cache layout, per K and V: [L, P, S, Hkv, Dh] — all layers' page pools in one array, so the
layer scan carries it and updates it in place. A token's K/V lives at flat slot `page * S +
offset`; page 0 is never allocated to a sequence and absorbs the writes of padding tokens, so a
padded batch needs no masking on the write side.

int8 cache (EngineConfig.kv_cache_dtype = "int8"): k, v are int8 and k_scale, v_scale
[L, P, S, Hkv] f32 hold one symmetric scale per token per kv head (value = int8 * scale). The
scale pools mirror the cache minus Dh, so the same `.at[layer, page, offset]` scatter writes
both, and a page's scales travel with its page id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxserve.config import KV_CACHE_DTYPES
from pallas_kernels import dispatch
from pallas_kernels._attention_math import MASK_VALUE  # finite: a masked block leaves no NaN
from pallas_kernels.quant_matmul import quantize_activations_int8


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, P, S, Hkv, Dh] compute dtype, or int8
    v: jax.Array  # [L, P, S, Hkv, Dh]
    k_scale: jax.Array | None = None  # [L, P, S, Hkv] f32 (int8 cache only)
    v_scale: jax.Array | None = None  # [L, P, S, Hkv] f32

    @classmethod
    def create(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
               head_dim: int, dtype=jnp.float32, kv_cache_dtype: str = "auto") -> KVCache:
        """An empty cache. kv_cache_dtype "auto": k, v in `dtype`; "int8": int8 k, v with f32
        scales (ones)."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got "
                             f"{kv_cache_dtype!r}")
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        if kv_cache_dtype == "auto":
            return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
        return cls(k=jnp.zeros(shape, jnp.int8), v=jnp.zeros(shape, jnp.int8),
                   k_scale=jnp.ones(shape[:-1], jnp.float32),
                   v_scale=jnp.ones(shape[:-1], jnp.float32))

    def empty_like(self) -> KVCache:
        """A fresh empty cache of this one's shape and kind (works on deleted arrays too)."""
        kind = "auto" if self.k_scale is None else "int8"
        return KVCache.create(*self.k.shape, dtype=self.k.dtype, kv_cache_dtype=kind)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def bytes_per_token(self) -> int:
        """Device bytes one cached token takes over all layers: K and V, plus their scales."""
        L, _, _, H, D = self.k.shape
        per_head = D * self.k.dtype.itemsize
        if self.quantized:
            per_head += self.k_scale.dtype.itemsize
        return 2 * L * H * per_head

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per vector: x [..., Dh] -> (q int8 [..., Dh], scale f32 [...]), with
    scale = max|x| / 127 (1 for an all-zero vector) and q = round(x / scale): the per-row
    quantiser of the W8A8 matmul, one row per (token, head)."""
    q, scale = quantize_activations_int8(x.astype(jnp.float32).reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def dequantize_kv(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """q int8 [..., Dh], scale f32 [...] -> q * scale in `dtype` [..., Dh]."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


@struct.dataclass
class AttentionMetadata:
    """Where this step's tokens sit. B sequences (padded), T query tokens each (padded)."""

    positions: jax.Array  # [B, T] int32 absolute position of each query token
    slot_mapping: jax.Array  # [B, T] int32 flat cache slot each token's K/V is written to
    page_tables: jax.Array  # [B, W] int32 page ids of each sequence; unused entries 0
    kv_lens: jax.Array  # [B] int32 cached tokens of each sequence once this step's are written


@struct.dataclass
class RaggedMetadata:
    """A flat ragged step: N sequences (padded) whose scheduled tokens lie side by side in one
    row of T tokens (padded). Sequence i owns tokens cu_q_lens[i]:cu_q_lens[i+1], the last
    q_len_i of its kv_lens[i] cached tokens: a prompt chunk, or a single decode token. Padding
    tokens (from cu_q_lens[num_seqs] on) write to page 0 and attend to nothing."""

    positions: jax.Array  # [1, T] int32 absolute position of each token (RoPE)
    slot_mapping: jax.Array  # [1, T] int32 flat cache slot each token's K/V is written to
    page_tables: jax.Array  # [N, W] int32 page ids of each sequence; unused entries 0
    kv_lens: jax.Array  # [N] int32 cached tokens of each sequence once this step's are written
    cu_q_lens: jax.Array  # [N + 1] int32 start of each sequence's tokens in the row
    num_seqs: jax.Array  # [] int32 real sequences (the rest of the N are padding)


def write_kv(cache: KVCache, layer: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> KVCache:
    """Scatter k, v [B, T, Hkv, Dh] into `layer` of the cache at slot_mapping [B, T]; an int8
    cache stores them quantised (quantize_kv) and their scales at the same slots."""
    S = cache.page_size
    pages = slot_mapping.reshape(-1) // S
    offsets = slot_mapping.reshape(-1) % S
    H, D = cache.k.shape[3:]

    def put(pool, new):
        new = new.reshape(-1, H, D).astype(pool.dtype)
        bits = _as_bits(pool)
        if bits is None:
            return pool.at[layer, pages, offsets].set(new, mode="promise_in_bounds")
        bits = bits.at[layer, pages, offsets].set(
            jax.lax.bitcast_convert_type(new, jnp.uint16), mode="promise_in_bounds")
        return jax.lax.bitcast_convert_type(bits, pool.dtype)

    if not cache.quantized:
        return KVCache(k=put(cache.k, k), v=put(cache.v, v))

    def put_scale(pool, new):
        return pool.at[layer, pages, offsets].set(new.reshape(-1, H), mode="promise_in_bounds")

    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    return KVCache(k=put(cache.k, kq), v=put(cache.v, vq), k_scale=put_scale(cache.k_scale, ks),
                   v_scale=put_scale(cache.v_scale, vs))


def _as_bits(pool: jax.Array) -> jax.Array | None:
    """16-bit float pools as uint16 bits. XLA:CPU gathers and scatters 16-bit floats by
    converting the whole operand (seconds per step for a bf16 cache); on integer bits it moves
    only the rows it touches. None for other dtypes."""
    if pool.dtype.itemsize == 2 and jnp.issubdtype(pool.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(pool, jnp.uint16)
    return None


def _gather_pages(pool: jax.Array, layer: jax.Array, page_tables: jax.Array) -> jax.Array:
    """pool [L, P, S, H, D], page_tables [B, W] -> [B, W, S, H, D]."""
    bits = _as_bits(pool)
    if bits is None:
        return pool[layer, page_tables]
    return jax.lax.bitcast_convert_type(bits[layer, page_tables], pool.dtype)


def paged_attention_reference(q: jax.Array, cache: KVCache, layer: jax.Array,
                              meta: AttentionMetadata, *, sm_scale: float,
                              sliding_window: int | None = None) -> jax.Array:
    """q [B, T, Hq, Dh] -> [B, T, Hq, Dh], pure jnp.

    Gathers only the pages in each sequence's page table (never the whole pool), attends
    causally by absolute position, and groups query heads per KV head so KV is never repeated.
    Unused or stale pages may hold anything (NaN included): masked keys are excluded by `where`,
    and masked values are zeroed before the weighted sum, since 0 * NaN would leak. An int8
    cache's gathered pages are dequantised to q's dtype first.
    """
    B, T, Hq, D = q.shape
    Hkv = cache.k.shape[3]
    G = Hq // Hkv
    W = meta.page_tables.shape[1]
    S = cache.page_size
    k = _gather_pages(cache.k, layer, meta.page_tables).reshape(B, W * S, Hkv, D)  # [B,K,Hkv,Dh]
    v = _gather_pages(cache.v, layer, meta.page_tables).reshape(B, W * S, Hkv, D)
    if cache.quantized:
        k = dequantize_kv(k, cache.k_scale[layer, meta.page_tables].reshape(B, W * S, Hkv),
                          q.dtype)
        v = dequantize_kv(v, cache.v_scale[layer, meta.page_tables].reshape(B, W * S, Hkv),
                          q.dtype)
    kv_pos = jnp.arange(W * S, dtype=jnp.int32)
    key_valid = kv_pos[None, :] < meta.kv_lens[:, None]  # [B, K]
    v = jnp.where(key_valid[:, :, None, None], v, 0)

    qg = q.reshape(B, T, Hkv, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * sm_scale
    q_pos = meta.positions[:, :, None]  # [B, T, 1]
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


# Bytes of K gathered per step of decode_attention_blocked: large enough that the loop's
# per-step overhead is small, small enough that the gathered block stays in cache (measured on
# the 2-core Xeon, Llama-3-8B layer, batch 8: 2 MiB blocks 1.4-2x faster than 4-16 MiB ones).
DECODE_BLOCK_BYTES = 2 * 2**20


def decode_attention_blocked(q: jax.Array, cache: KVCache, layer: jax.Array,
                             page_tables: jax.Array, kv_lens: jax.Array, *, sm_scale: float,
                             sliding_window: int | None = None) -> jax.Array:
    """Decode attention for XLA:CPU: q [B, Hq, Dh] (each row's query at position kv_lens - 1)
    -> [B, Hq, Dh], the same function as paged_attention_reference with T = 1.

    The reference gathers every row's W pages into one [B, W*S, Hkv, Dh] copy before attending:
    the copy is written to and read back from memory, and on this CPU gathering costs as much as
    the attention itself. Here a loop walks the page table a few pages at a time (about
    DECODE_BLOCK_BYTES of K per step) with an online softmax, so each gathered block is used
    while it is still in cache, and the loop stops after the longest row's last page instead of
    walking the whole bucketed width W."""
    B, Hq, D = q.shape
    Hkv = cache.k.shape[3]
    G = Hq // Hkv
    S = cache.page_size
    W = page_tables.shape[1]
    page_bytes = B * S * Hkv * D * cache.k.dtype.itemsize
    ppb = 1 << max(0, min(W, DECODE_BLOCK_BYTES // page_bytes).bit_length() - 1)  # pages/step
    nblk = -(-W // ppb)
    page_tables = jnp.pad(page_tables, ((0, 0), (0, nblk * ppb - W)))
    qg = q.reshape(B, Hkv, G, D)
    lo = 0 if sliding_window is None else kv_lens - sliding_window  # first key each row sees

    def gather(pool, scale, pages):  # -> [B, ppb * S, Hkv, Dh] in q's dtype
        x = _gather_pages(pool, layer, pages).reshape(B, ppb * S, Hkv, D)
        if scale is None:
            return x
        return dequantize_kv(x, scale[layer, pages].reshape(B, ppb * S, Hkv), q.dtype)

    def step(i, carry):
        m, l, acc = carry  # [B, Hkv, G, 1] x2, [B, Hkv, G, Dh] f32
        pages = jax.lax.dynamic_slice_in_dim(page_tables, i * ppb, ppb, axis=1)
        k = gather(cache.k, cache.k_scale, pages)
        v = gather(cache.v, cache.v_scale, pages)
        pos = i * ppb * S + jnp.arange(ppb * S, dtype=jnp.int32)
        valid = (pos[None, :] < kv_lens[:, None]) & (pos[None, :] >= jnp.reshape(lo, (-1, 1)))
        s = jnp.einsum("bhgd,bnhd->bhgn", qg, k, preferred_element_type=jnp.float32) * sm_scale
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
    o = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)  # kv_len 0: zeros
    return o.reshape(B, Hq, D).astype(q.dtype)


RAGGED_BLOCK = 16  # query rows per block of ragged_attention_blocked


def ragged_attention_blocked(q: jax.Array, cache: KVCache, layer: jax.Array,
                             meta: RaggedMetadata, *, sm_scale: float,
                             sliding_window: int | None = None,
                             block: int = RAGGED_BLOCK) -> jax.Array:
    """A flat ragged step's attention for XLA:CPU: q [T, Hq, Dh] -> [T, Hq, Dh], the same
    function as pallas_kernels.ragged_paged_attention_reference.

    That reference attends each query row as its own decode query, gathering the row's
    sequence's W pages once per row: a prompt chunk of n tokens moves n times the K/V one
    gather needs. Here the row is cut into blocks of `block` query rows: a block inside one
    sequence (most of a prompt chunk) gathers that sequence's pages once and attends causally
    as a padded prompt row does; a block spanning sequences (decode tokens, chunk boundaries)
    attends row by row; an all-padding block is zeros. lax.switch runs only the branch a block
    needs."""
    T, Hq, D = q.shape
    N = meta.kv_lens.shape[0]
    nb = -(-T // block)
    q = jnp.pad(q, ((0, nb * block - T), (0, 0), (0, 0)))
    t = jnp.arange(nb * block, dtype=jnp.int32)
    cu = meta.cu_q_lens
    seq = jnp.minimum(jnp.sum(t[:, None] >= cu[None, 1:], axis=1), N - 1).astype(jnp.int32)
    real = t < cu[jnp.asarray(meta.num_seqs, jnp.int32).reshape(())]
    q_len = cu[1:] - cu[:-1]
    pos = jnp.where(real, meta.kv_lens[seq] - q_len[seq] + t - cu[seq], 0)
    seq, pos, real = (a.reshape(nb, block) for a in (seq, pos, real))  # [nb, block] each
    one_seq = real.all(axis=1) & (seq == seq[:, :1]).all(axis=1)
    kind = jnp.where(one_seq, 1, jnp.where(real.any(axis=1), 2, 0))  # [nb]

    def attend_block(x):
        qb, sb, pb, rb, k = x  # [block, Hq, Dh], [block] x3, []

        def padding():
            return jnp.zeros_like(qb)

        def same_sequence():
            m = AttentionMetadata(positions=pb[None], slot_mapping=pb[None],
                                  page_tables=meta.page_tables[sb[0]][None],
                                  kv_lens=meta.kv_lens[sb[0]][None])
            return paged_attention_reference(qb[None], cache, layer, m, sm_scale=sm_scale,
                                             sliding_window=sliding_window)[0]

        def row_by_row():  # each row a decode query of its own sequence, up to its position
            return decode_attention_blocked(qb, cache, layer, meta.page_tables[sb],
                                            jnp.where(rb, pb + 1, 0), sm_scale=sm_scale,
                                            sliding_window=sliding_window)

        return jax.lax.switch(k, (padding, same_sequence, row_by_row))

    o = jax.lax.map(attend_block, (q.reshape(nb, block, Hq, D), seq, pos, real, kind))
    return o.reshape(nb * block, Hq, D)[:T]


def attention(q: jax.Array, cache: KVCache, layer: jax.Array,
              meta: AttentionMetadata | RaggedMetadata, *, sm_scale: float,
              sliding_window: int | None = None, kernels: str = "auto") -> jax.Array:
    """The single attention entry point of the model: q [B, T, Hq, Dh] -> [B, T, Hq, Dh].

    A flat ragged step (RaggedMetadata, B == 1) goes to pallas_kernels' ragged paged attention,
    except on CPU under "auto", where XLA runs `ragged_attention_blocked` (the kernel's own
    reference gathers pages once per query row). Padded decode steps (T == 1) go to the paged
    decode kernel, except on CPU under "auto", where XLA runs `decode_attention_blocked`.
    Padded [B, T] prompt rows (scoring) run `paged_attention_reference`."""
    if isinstance(meta, RaggedMetadata):
        if kernels == "auto" and jax.default_backend() == "cpu":
            return ragged_attention_blocked(q[0], cache, layer, meta, sm_scale=sm_scale,
                                            sliding_window=sliding_window)[None]
        o = dispatch.ragged_paged_attention(
            q[0], cache.k, cache.v, layer, meta.kv_lens, meta.page_tables, meta.cu_q_lens,
            meta.num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
            k_scale=cache.k_scale, v_scale=cache.v_scale, mode=kernels)
        return o[None]
    if q.shape[1] == 1 and kernels == "auto" and jax.default_backend() == "cpu":
        return decode_attention_blocked(q[:, 0], cache, layer, meta.page_tables, meta.kv_lens,
                                        sm_scale=sm_scale, sliding_window=sliding_window)[:, None]
    if q.shape[1] == 1:
        o = dispatch.paged_decode_attention(
            q[:, 0], cache.k, cache.v, layer, meta.kv_lens, meta.page_tables,
            sm_scale=sm_scale, sliding_window=sliding_window, k_scale=cache.k_scale,
            v_scale=cache.v_scale, mode=kernels)
        return o[:, None]
    return paged_attention_reference(q, cache, layer, meta, sm_scale=sm_scale,
                                     sliding_window=sliding_window)
