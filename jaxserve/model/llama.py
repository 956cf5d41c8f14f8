"""The Llama-family decoder as pure functions of a params pytree (see params.py for the layout).

`forward` is the serving path: it writes this step's K/V into the paged cache and attends through
`attention.attention`. `forward_dense` is the simple path without any cache, kept as the
reference every cached/batched/kernel variant is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.model.attention import AttentionMetadata, KVCache, attention, write_kv
from jaxserve.model.layers import apply_rope, mlp, rms_norm, rope_inv_freq

Params = dict[str, Any]


def _block(cfg: ModelConfig, lp: Params, x: jax.Array, positions: jax.Array,
           inv_freq: jax.Array, attend: Callable) -> tuple[jax.Array, Any]:
    """One decoder layer. x [B, T, D]; `attend(q, k, v)` -> (o [B, T, Hq, Dh], state)."""
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("btd,dnh->btnh", h, lp["wq"])
    k = jnp.einsum("btd,dnh->btnh", h, lp["wk"])
    v = jnp.einsum("btd,dnh->btnh", h, lp["wv"])
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    o, state = attend(q, k, v)
    # Flattening (heads, head_dim) makes this a plain 2-D matmul; as a 3-index contraction
    # XLA:CPU transposed and copied wo every layer.
    B, T, D = x.shape
    x = x + jnp.einsum("btf,fd->btd", o.reshape(B, T, -1), lp["wo"].reshape(-1, D))
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    return x + mlp(h, lp["w_gate"], lp["w_up"], lp["w_down"]), state


def _logits(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    """Final norm and LM head. x [B, T, D] -> [B, T, V] f32."""
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:
        return jnp.einsum("btd,vd->btv", x, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", x, params["lm_head"], preferred_element_type=jnp.float32)


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, cache: KVCache,
            meta: AttentionMetadata, logits_index: jax.Array | None = None,
            kernels: str = "auto") -> tuple[jax.Array, KVCache]:
    """Paged forward. tokens [B, T] int32 -> (logits, updated cache).

    logits are [B, T, V] f32, or [B, V] for the single position per row picked by
    logits_index [B] (what sampling needs: the LM head over the whole padded prompt would cost
    T times more). kernels: the attention implementation (see attention.attention)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    sm_scale = cfg.head_dim ** -0.5
    x = params["embed"][tokens]  # [B, T, D]

    def layer(carry, lp):
        x, cache, i = carry

        def attend(q, k, v):
            c = write_kv(cache, i, k, v, meta.slot_mapping)
            o = attention(q, c, i, meta, sm_scale=sm_scale, sliding_window=cfg.sliding_window,
                          kernels=kernels)
            return o, c

        x, cache = _block(cfg, lp, x, meta.positions, inv_freq, attend)
        return (x, cache, i + 1), None

    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        # Unstacked layers (see `unstack_layers`): a Python loop, one copy of the body per layer.
        carry = (x, cache, jnp.int32(0))
        for lp in layers:
            carry, _ = layer(carry, lp)
        x, cache, _ = carry
    else:
        (x, cache, _), _ = jax.lax.scan(layer, (x, cache, jnp.int32(0)), layers)
    if logits_index is not None:
        x = x[jnp.arange(x.shape[0]), logits_index][:, None]  # [B, 1, D]
        return _logits(cfg, params, x)[:, 0], cache
    return _logits(cfg, params, x), cache


def unstack_layers(params: Params) -> Params:
    """The same weights with `layers` as a list of per-layer dicts instead of stacked arrays.

    Trade-off, measured on XLA:CPU: inside `lax.scan` each layer's weights are a dynamic slice
    of the stacked arrays, which XLA:CPU materialises (a copy) before every matmul — bs=1 decode
    moves each weight byte about twice. Unstacked, the matmuls read the weights in place
    (decode ~1.6x faster on the 2-core CPU), at the price of compile time growing with depth.
    Accelerator backends fuse the slice, so they keep the scan."""
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]}


def forward_dense(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Reference: full causal forward without a cache. tokens [B, T] -> logits [B, T, V] f32.
    Positions are 0..T-1 for every row."""
    B, T = tokens.shape
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    i = jnp.arange(T)
    causal = i[None, :] <= i[:, None]
    if cfg.sliding_window is not None:
        causal &= i[None, :] > i[:, None] - cfg.sliding_window

    def attend(q, k, v):
        k = jnp.repeat(k, cfg.q_per_kv, axis=2)
        v = jnp.repeat(v, cfg.q_per_kv, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        s = jnp.where(causal, s * cfg.head_dim ** -0.5, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v), None

    def layer(x, lp):
        x, _ = _block(cfg, lp, x, positions, inv_freq, attend)
        return x, None

    x, _ = jax.lax.scan(layer, params["embed"][tokens], params["layers"])
    return _logits(cfg, params, x)
