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
from jaxserve.model.attention import (
    AttentionMetadata,
    KVCache,
    RaggedMetadata,
    attention,
    dequantize_kv,
    quantize_kv,
    write_kv,
)
from jaxserve.model.layers import apply_rope, rms_norm, rope_inv_freq
from jaxserve.model.quant import embed, is_quantized
from jaxserve.model.quant import linear as quant_linear

Params = dict[str, Any]


def _block(cfg: ModelConfig, lp: Params, x: jax.Array, positions: jax.Array,
           inv_freq: jax.Array, attend: Callable, kernels: str = "auto",
           taps: dict[str, jax.Array] | None = None) -> tuple[jax.Array, Any]:
    """One decoder layer. x [B, T, D]; `attend(q, k, v)` -> (o [B, T, Hq, Dh], state).
    Weights are float arrays or quantised dicts (model/quant.py); `linear` takes either.
    taps: if a dict, each matmul's input is stored in it by weight name (AWQ calibration)."""
    B, T, D = x.shape

    def linear(x, name):
        if taps is not None:
            taps[name] = x
        return quant_linear(x, lp[name], kernels)

    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q = linear(h, "wq").reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = linear(h, "wk").reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = linear(h, "wv").reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    o, state = attend(q, k, v)
    # wo as one 2-D matmul over the flattened (heads, head_dim): as a 3-index contraction
    # XLA:CPU transposed and copied wo every layer.
    x = x + linear(o.reshape(B, T, -1), "wo")
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    gate = linear(h, "w_gate")
    up = linear(h, "w_up")
    return x + linear(jax.nn.silu(gate) * up, "w_down"), state


def lm_head(cfg: ModelConfig, params: Params, h: jax.Array, kernels: str = "auto") -> jax.Array:
    """The LM head alone. h [B, T, D] (final-norm output) -> [B, T, V] f32."""
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    if is_quantized(head):  # stored [D, V] whether tied or not
        return quant_linear(h, head, kernels).astype(jnp.float32)
    if cfg.tie_word_embeddings:
        return jnp.einsum("btd,vd->btv", h, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", h, params["lm_head"], preferred_element_type=jnp.float32)


def final_norm(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    """The last layer's residual stream x [B, T, D] -> the features the LM head reads."""
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def _logits(cfg: ModelConfig, params: Params, x: jax.Array, kernels: str = "auto") -> jax.Array:
    """Final norm and LM head. x [B, T, D] -> [B, T, V] f32."""
    return lm_head(cfg, params, final_norm(cfg, params, x), kernels)


def decoder_layer(cfg: ModelConfig, lp: Params, x: jax.Array, cache: KVCache, layer: jax.Array,
                  meta: AttentionMetadata | RaggedMetadata, kernels: str = "auto",
                  ) -> tuple[jax.Array, KVCache]:
    """One paged decoder layer: x [B, T, D] -> [B, T, D]; this step's K/V go into `layer` of
    the cache at meta.slot_mapping, and attention reads the cache through meta."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))

    def attend(q, k, v):
        c = write_kv(cache, layer, k, v, meta.slot_mapping)
        o = attention(q, c, layer, meta, sm_scale=cfg.head_dim ** -0.5,
                      sliding_window=cfg.sliding_window, kernels=kernels)
        return o, c

    return _block(cfg, lp, x, meta.positions, inv_freq, attend, kernels)


def _decoder(params: Params, cfg: ModelConfig, tokens: jax.Array, cache: KVCache,
             meta: AttentionMetadata | RaggedMetadata, kernels: str) -> tuple[jax.Array, KVCache]:
    """Embedding and every layer: tokens [B, T] -> (residual stream [B, T, D], cache)."""
    x = embed(params["embed"], tokens, params["final_norm"].dtype)  # [B, T, D]

    def layer(carry, lp):
        x, cache, i = carry
        x, cache = decoder_layer(cfg, lp, x, cache, i, meta, kernels)
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
    return x, cache


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, cache: KVCache,
            meta: AttentionMetadata | RaggedMetadata, logits_index: jax.Array | None = None,
            kernels: str = "auto") -> tuple[jax.Array, KVCache]:
    """Paged forward. tokens [B, T] int32 -> (logits, updated cache).

    logits are [B, T, V] f32, or [B, V] for the single position per row picked by
    logits_index [B] (what sampling needs: the LM head over the whole padded prompt would cost
    T times more). kernels: the attention implementation (see attention.attention).

    With RaggedMetadata, tokens is one flat row [1, T] holding N sequences' tokens side by side
    (prompt chunks and decode tokens together) and logits_index [N] picks positions in that
    row: logits are [N, V] (or [1, T, V] without logits_index)."""
    x, cache = _decoder(params, cfg, tokens, cache, meta, kernels)
    if logits_index is not None and isinstance(meta, RaggedMetadata):
        x = x[0, logits_index][:, None]  # [N, 1, D]
        return _logits(cfg, params, x, kernels)[:, 0], cache
    if logits_index is not None:
        x = x[jnp.arange(x.shape[0]), logits_index][:, None]  # [B, 1, D]
        return _logits(cfg, params, x, kernels)[:, 0], cache
    return _logits(cfg, params, x, kernels), cache


def forward_hidden(params: Params, cfg: ModelConfig, tokens: jax.Array, cache: KVCache,
                   meta: AttentionMetadata | RaggedMetadata, kernels: str = "auto",
                   ) -> tuple[jax.Array, KVCache]:
    """`forward` without the LM head: tokens [B, T] -> (final-norm output h [B, T, D], cache);
    `lm_head(cfg, params, h)` gives forward's logits. Draft heads read h (their features)."""
    x, cache = _decoder(params, cfg, tokens, cache, meta, kernels)
    return final_norm(cfg, params, x), cache


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


def dense_attention(cfg: ModelConfig, T: int, kv_cache_dtype: str = "auto") -> Callable:
    """Causal attention over T positions without a cache (KV heads repeated: the simple way)."""
    i = jnp.arange(T)
    causal = i[None, :] <= i[:, None]
    if cfg.sliding_window is not None:
        causal &= i[None, :] > i[:, None] - cfg.sliding_window

    def attend(q, k, v):
        if kv_cache_dtype == "int8":
            k, v = dequantize_kv(*quantize_kv(k), k.dtype), dequantize_kv(*quantize_kv(v), v.dtype)
        k = jnp.repeat(k, cfg.q_per_kv, axis=2)
        v = jnp.repeat(v, cfg.q_per_kv, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        s = jnp.where(causal, s * cfg.head_dim ** -0.5, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v), None

    return attend


def forward_dense(params: Params, cfg: ModelConfig, tokens: jax.Array, *,
                  kv_cache_dtype: str = "auto") -> jax.Array:
    """Reference: full causal forward without a cache. tokens [B, T] -> logits [B, T, V] f32.
    Positions are 0..T-1 for every row. kv_cache_dtype "int8" rounds K and V through int8
    exactly as an int8 paged cache stores them, so it is the reference for that cache too."""
    return _logits(cfg, params, _decoder_dense(params, cfg, tokens, kv_cache_dtype))


def hidden_dense(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """`forward_dense` without the LM head: tokens [B, T] -> final-norm output [B, T, D] (the
    reference for `forward_hidden`, and the features draft heads are trained on)."""
    return final_norm(cfg, params, _decoder_dense(params, cfg, tokens))


def _decoder_dense(params: Params, cfg: ModelConfig, tokens: jax.Array,
                   kv_cache_dtype: str = "auto") -> jax.Array:
    """tokens [B, T] -> the last layer's residual stream [B, T, D], no cache."""
    B, T = tokens.shape
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    attend = dense_attention(cfg, T, kv_cache_dtype)

    def layer(x, lp):
        x, _ = _block(cfg, lp, x, positions, inv_freq, attend)
        return x, None

    x0 = embed(params["embed"], tokens, params["final_norm"].dtype)
    x, _ = jax.lax.scan(layer, x0, params["layers"])
    return x
