"""Rejection sampling for speculative decoding: verify K drafted tokens per row in one pass.

Standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023). For one position with
target distribution p and draft distribution q, a draft d ~ q is accepted with probability
min(1, p(d) / q(d)); on rejection a token is drawn from the residual
r = max(p - q, 0) / sum(max(p - q, 0)). The emitted token is then distributed exactly as p:

    P(x) = q(x) min(1, p(x) / q(x)) + (1 - beta) r(x) = min(p(x), q(x)) + max(p(x) - q(x), 0)
         = p(x),   where beta = sum_v min(p(v), q(v)) is the acceptance probability.

Chaining positions: after draft j is accepted the next target row is p(. | prefix + d[:j+1]),
so by induction the emitted sequence is distributed as tokens drawn one by one from the target,
cut at a stopping time. When every draft is accepted, a bonus token is drawn from the target's
next row. Exactness needs the draft tokens (and q) to be independent of the uniforms used here,
which is why `spec_uniforms` has its own key stream, distinct from the sampler's.

Everything has a fixed [B, K] layout: acceptance is a cumprod over the accept mask, and the
recovered / bonus token is one vectorised inverse-CDF draw per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.engine.sampling import draw_weighted

# Folded into each position's key so these uniforms never coincide with the sampler's
# fold_in(key(seed), step) draws (nor with a draft model sampling under the same seed).
_SPEC_STREAM = 0x73706563  # "spec"


def rejection_sample(
    draft_tokens: jax.Array,  # [B, K] int32; entries at j >= num_draft[b] are ignored
    draft_probs: jax.Array | None,  # [B, K, V] f32 q, or None for deterministic (one-hot) drafts
    target_probs: jax.Array,  # [B, K+1, V] f32 p; row j is p(. | prefix + drafts[:j])
    num_draft: jax.Array,  # [B] int32 in [0, K]: how many drafts this row verifies
    u_accept: jax.Array,  # [B, K] f32 in [0, 1): acceptance test uniforms
    u_draw: jax.Array,  # [B, K+1] f32 in [0, 1): recovered / bonus draw uniforms
) -> tuple[jax.Array, jax.Array]:
    """Verify drafts; returns (tokens [B, K+1] int32, num_tokens [B] int32).

    Draft j is accepted iff ``u_accept[b, j] < min(1, p_j(d_j) / q_j(d_j))``, j < num_draft[b]
    and every earlier draft was accepted. With a accepted, ``tokens[b, :a]`` are the drafts and
    ``tokens[b, a]`` is drawn with ``u_draw[b, a]``: from the residual max(p_a - q_a, 0) if draft
    a was rejected, else (a == num_draft) the bonus from p_a. ``num_tokens = a + 1``; entries
    past it are 0. Traceable, no loops over B or K.

    Edge cases: a residual with no mass (p == q up to rounding, so a rejection had ~zero
    probability) falls back to p. A draft with q_j(d_j) == 0 cannot have been drawn from q; it is
    accepted iff p_j(d_j) > 0 (the limit of min(1, p/q) as q -> 0). A draft the target gives
    probability 0 is never accepted. With ``draft_probs=None``, q_j is one-hot at d_j: the accept
    probability is p_j(d_j) and the residual is p_j with d_j removed.
    """
    b, k = draft_tokens.shape
    v = target_probs.shape[-1]
    rows = jnp.arange(b)
    positions = jnp.arange(k, dtype=jnp.int32)
    vocab = jnp.arange(v, dtype=jnp.int32)
    draft = jnp.clip(draft_tokens, 0, v - 1)  # ignored entries may hold anything

    p_draft = jnp.take_along_axis(target_probs[:, :k], draft[..., None], axis=-1)[..., 0]  # [B, K]
    if draft_probs is None:
        accept_prob = p_draft
    else:
        q_draft = jnp.take_along_axis(draft_probs, draft[..., None], axis=-1)[..., 0]  # [B, K]
        ratio = p_draft / jnp.maximum(q_draft, jnp.finfo(jnp.float32).tiny)
        accept_prob = jnp.where(q_draft > p_draft, ratio, (p_draft > 0).astype(jnp.float32))
    accepted = (u_accept < accept_prob) & (positions[None, :] < num_draft[:, None])  # [B, K]
    num_accepted = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)  # [B]

    p_next = target_probs[rows, num_accepted]  # [B, V]
    weight = p_next
    if k > 0:
        rejected = num_accepted < num_draft  # [B]
        at = jnp.minimum(num_accepted, k - 1)
        if draft_probs is None:
            residual = jnp.where(vocab[None, :] == draft[rows, at][:, None], 0.0, p_next)
        else:
            residual = jnp.maximum(p_next - draft_probs[rows, at], 0.0)
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_next)
        weight = jnp.where(rejected[:, None], residual, p_next)
    drawn = draw_weighted(weight, u_draw[rows, num_accepted])  # [B]

    out_positions = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    drafts = jnp.pad(draft_tokens.astype(jnp.int32), ((0, 0), (0, 1)))
    a = num_accepted[:, None]
    tokens = jnp.where(out_positions < a, drafts, jnp.where(out_positions == a, drawn[:, None], 0))
    return tokens.astype(jnp.int32), (num_accepted + 1).astype(jnp.int32)


def spec_uniforms(
    seed: jax.Array,  # [B, 2] uint32: the sampler's per-row key data (SamplingTensors.seed)
    step: jax.Array,  # [B] int32: tokens the row has generated (SamplingTensors.step)
    num_speculative: int,  # K, static
) -> tuple[jax.Array, jax.Array]:
    """Per-row uniforms for `rejection_sample`: (u_accept [B, K], u_draw [B, K+1]) f32 in [0, 1).

    Position j of row b uses fold_in(fold_in(key(seed_b), step_b + j), _SPEC_STREAM), so the
    values belong to the token's absolute position (not to the batch, the row index or K) and
    are independent of the sampler's fold_in(key(seed_b), step_b + j) draws. Uniforms at
    positions past the first rejection are never looked at, so the next verification, which
    starts there, may reuse them.
    """
    keys = jax.random.wrap_key_data(seed, impl="threefry2x32")  # [B]
    offsets = jnp.arange(num_speculative + 1, dtype=jnp.int32)

    def one(key: jax.Array, s: jax.Array) -> jax.Array:
        def at(j: jax.Array) -> jax.Array:
            k = jax.random.fold_in(jax.random.fold_in(key, s + j), _SPEC_STREAM)
            return jax.random.uniform(k, (2,), jnp.float32)

        return jax.vmap(at)(offsets)  # [K+1, 2]

    u = jax.vmap(one)(keys, step)  # [B, K+1, 2]
    return u[:, :num_speculative, 0], u[:, :, 1]
