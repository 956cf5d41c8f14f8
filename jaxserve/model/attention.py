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
from pallas_kernels.paged_attention import as_bits
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
    cache stores them quantised (quantize_kv) and their scales at the same slots. 16-bit float
    pools are scattered as their uint16 bits (as_bits: XLA:CPU would convert the whole pool)."""
    S = cache.page_size
    pages = slot_mapping.reshape(-1) // S
    offsets = slot_mapping.reshape(-1) % S
    H, D = cache.k.shape[3:]

    def put(pool, new):
        new = new.reshape(-1, H, D).astype(pool.dtype)
        bits = as_bits(pool)
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


def attention(q: jax.Array, cache: KVCache, layer: jax.Array,
              meta: AttentionMetadata | RaggedMetadata, *, sm_scale: float,
              sliding_window: int | None = None, kernels: str = "auto") -> jax.Array:
    """The single attention entry point of the model: q [B, T, Hq, Dh] -> [B, T, Hq, Dh].

    A flat ragged step (RaggedMetadata, B == 1) goes to the ragged paged attention, a padded
    decode step (T == 1) to the paged decode attention, padded [B, T] prompt rows (scoring) to
    the padded-rows attention, all through pallas_kernels.dispatch. `kernels` is a dispatch
    mode; dispatch and the kernel wrappers choose the implementation (on CPU under "auto": the
    kernels' XLA formulations)."""
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, k_scale=cache.k_scale,
              v_scale=cache.v_scale)
    if isinstance(meta, RaggedMetadata):
        return dispatch.ragged_paged_attention(
            q[0], cache.k, cache.v, layer, meta.kv_lens, meta.page_tables, meta.cu_q_lens,
            meta.num_seqs, mode=kernels, **kw)[None]
    if q.shape[1] == 1:
        return dispatch.paged_decode_attention(
            q[:, 0], cache.k, cache.v, layer, meta.kv_lens, meta.page_tables, mode=kernels,
            **kw)[:, None]
    return dispatch.paged_prefill_attention(q, cache.k, cache.v, layer, meta.kv_lens,
                                            meta.page_tables, meta.positions, **kw)
