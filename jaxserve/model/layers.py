"""The small pure functions a Llama block is made of: RMSNorm and rotary embedding (the
matmuls are model/quant.py's `linear`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """x [..., D], w [D]. Statistics in f32 whatever the compute dtype (bf16 mean-of-squares
    loses ~3 significant digits at D=576)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[Dh/2] f32 inverse frequencies, with Llama-3 / linear scaling applied. Computed on host in
    float64 so every backend and dtype sees the same table."""
    dh = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    rs = cfg.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs is not None and rs.rope_type == "llama3":
        # Long wavelengths (low frequencies) are interpolated by `factor`, short ones kept, and
        # the band between is blended smoothly (Llama 3.1 context extension).
        low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
        wl = 2 * np.pi / inv
        smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        blended = (1 - smooth) * inv / rs.factor + smooth * inv
        inv = np.where(wl > low_wl, inv / rs.factor, np.where(wl < high_wl, inv, blended))
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [B, T, H, Dh], positions [B, T] int32 -> x rotated, rotate-half (HF) convention: the
    first and second halves of each head form the (real, imaginary) pairs."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
