"""Paged attention: the KV cache layout, the metadata a step passes, and the one dispatch function
every attention call in the model goes through.

Cache layout, per K and V: [L, P, S, Hkv, Dh] — all layers' page pools in one array, so the
layer scan carries it and updates it in place. A token's K/V lives at flat slot `page * S +
offset`; page 0 is never allocated to a sequence and absorbs the writes of padding tokens, so a
padded batch needs no masking on the write side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import dispatch


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, P, S, Hkv, Dh]
    v: jax.Array  # [L, P, S, Hkv, Dh]

    @classmethod
    def create(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
               head_dim: int, dtype=jnp.float32) -> KVCache:
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]


@struct.dataclass
class AttentionMetadata:
    """Where this step's tokens sit. B sequences (padded), T query tokens each (padded)."""

    positions: jax.Array  # [B, T] int32 absolute position of each query token
    slot_mapping: jax.Array  # [B, T] int32 flat cache slot each token's K/V is written to
    page_tables: jax.Array  # [B, W] int32 page ids of each sequence; unused entries 0
    kv_lens: jax.Array  # [B] int32 cached tokens of each sequence once this step's are written


def write_kv(cache: KVCache, layer: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> KVCache:
    """Scatter k, v [B, T, Hkv, Dh] into `layer` of the cache at slot_mapping [B, T]."""
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

    return KVCache(k=put(cache.k, k), v=put(cache.v, v))


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
    and masked values are zeroed before the weighted sum, since 0 * NaN would leak.
    """
    B, T, Hq, D = q.shape
    Hkv = cache.k.shape[3]
    G = Hq // Hkv
    W = meta.page_tables.shape[1]
    S = cache.page_size
    k = _gather_pages(cache.k, layer, meta.page_tables).reshape(B, W * S, Hkv, D)  # [B,K,Hkv,Dh]
    v = _gather_pages(cache.v, layer, meta.page_tables).reshape(B, W * S, Hkv, D)
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


def attention(q: jax.Array, cache: KVCache, layer: jax.Array, meta: AttentionMetadata, *,
              sm_scale: float, sliding_window: int | None = None,
              kernels: str = "auto") -> jax.Array:
    """The single attention entry point of the model: q [B, T, Hq, Dh] -> [B, T, Hq, Dh].

    Decode steps (T == 1) go to the paged decode kernel through pallas_kernels.dispatch, except
    on CPU under "auto", where XLA runs `paged_attention_reference` (the kernels' own reference
    is a decode-only twin of it). Prefill (padded [B, T] rows) always runs
    `paged_attention_reference` until steps move to flat ragged batches, which is what
    pallas_kernels.ragged_paged_attention takes."""
    if q.shape[1] == 1 and not (kernels == "auto" and jax.default_backend() == "cpu"):
        o = dispatch.paged_decode_attention(
            q[:, 0], cache.k, cache.v, layer, meta.kv_lens, meta.page_tables,
            sm_scale=sm_scale, sliding_window=sliding_window, mode=kernels)
        return o[:, None]
    return paged_attention_reference(q, cache, layer, meta, sm_scale=sm_scale,
                                     sliding_window=sliding_window)
