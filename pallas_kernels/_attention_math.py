"""Tile-level attention math shared by the paged and ragged kernels (GPU and TPU) and usable in
plain jnp: scores of one query tile against one key tile, and one online-softmax update.

Everything here works on 2-D tiles so that it lowers on Mosaic TPU (which wants rank >= 2
vectors) as well as on Triton and in interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf: exp(MASK - m) underflows to 0 without producing inf - inf = NaN
# when a whole tile is masked. Masked probabilities are additionally zeroed with `where`.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def tile_scores(q: jax.Array, k: jax.Array, k_scale: jax.Array | None, *, sm_scale: float,
                soft_cap: float | None) -> jax.Array:
    """q [R, Dh], k [N, Dh] (float or int8), k_scale [1, N] f32 or None -> scores [R, N] f32."""
    if k.dtype == jnp.int8:
        # int8 pages are dequantised after the dot: the per-key scale factors out of the sum
        # over Dh, so it multiplies a column of scores instead of a whole K tile.
        k = k.astype(q.dtype)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if k_scale is not None:
        s = s * k_scale
    s = s * sm_scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    return s


def online_softmax_update(s: jax.Array, mask: jax.Array, key_live: jax.Array, v: jax.Array,
                          v_scale: jax.Array | None, m_prev: jax.Array, l_prev: jax.Array,
                          acc_prev: jax.Array, compute_dtype
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One flash step. s [R, N] f32 scores, mask [R, N] bool, key_live [N, 1] bool (the key is
    inside the sequence's cached range, so its V row is real data), v [N, Dh] (float or int8),
    v_scale [1, N] f32 or None, m_prev/l_prev [R, 1] f32, acc_prev [R, Dh] f32.

    Masked keys may come from stale pages holding NaN (in K, V or their scales): the scores
    are replaced by `where`, the probabilities are zeroed by `where`, and V is zeroed per key
    before the weighted sum, because 0 * NaN = NaN would otherwise leak into the output.
    """
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [R, 1]
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)  # [R, N]
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    if v_scale is not None:
        # Per-key V scale: scale the probability column rather than dequantising the V tile.
        p = jnp.where(mask, p * v_scale, 0.0)
    v = jnp.where(key_live, v.astype(compute_dtype), 0)  # [N, Dh]
    pv = jax.lax.dot_general(p.astype(compute_dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return m_next, l_next, alpha * acc_prev + pv


def finalize(acc: jax.Array, l: jax.Array) -> jax.Array:
    """acc [R, Dh], l [R, 1] -> [R, Dh]; rows that saw no key (l == 0) give 0, never NaN."""
    return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)
