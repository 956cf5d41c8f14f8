"""Verification of deterministic drafts (one-hot q) inside the fused step.

For a draft token d at a position where the target's distribution (after the sampler's
transforms) is p, rejection sampling with one-hot q accepts d with probability p(d) and
otherwise draws from p with d removed, renormalised. Drawing t ~ p with the step's ordinary
uniform and accepting iff t == d has exactly that law: P(t = d) = p(d), and given t != d, t is
distributed as p restricted to the other tokens. So verification is "sample every position as
plain decoding would, keep the prefix that matches the drafts, plus the first token that does
not (the recovered token) or, when all match, the bonus token".

Because each position is sampled with the uniform plain decoding would use at that step (the
row's key folded with its token count) and with penalty counts that include the drafts before
it, the emitted tokens are token for token those of non-speculative decoding with the same
seed, whatever K, the drafts or the batch: speculation changes only how many arrive per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.engine.sampling import SamplingFlags, SamplingTensors


def expand_for_verification(st: SamplingTensors, drafts: jax.Array, flags: SamplingFlags
                            ) -> SamplingTensors:
    """Per-row tensors [N] -> [N * (K+1)] rows, row (i, j) sampling position j of sequence i
    after drafts[i, :j] were generated: step + j, and penalty counts with those drafts added.
    drafts [N, K] int32 (-1: none; positions after one are never used)."""
    N, K = drafts.shape
    K1 = K + 1
    expanded = jax.tree.map(lambda x: jnp.repeat(x, K1, axis=0), st)
    expanded = expanded.replace(step=expanded.step + jnp.tile(jnp.arange(K1, dtype=jnp.int32), N))
    if flags.needs_penalties:
        V = st.output_counts.shape[1]
        onehot = jax.nn.one_hot(drafts, V, dtype=jnp.int32)  # [N, K, V]; -1 rows are zero
        before = jnp.concatenate([jnp.zeros((N, 1, V), jnp.int32), jnp.cumsum(onehot, axis=1)],
                                 axis=1)  # [N, K+1, V]: drafts[:j] for position j
        expanded = expanded.replace(
            output_counts=expanded.output_counts + before.reshape(N * K1, V))
    return expanded


def accept_matches(tokens: jax.Array, drafts: jax.Array) -> jax.Array:
    """tokens [N, K+1] sampled per position, drafts [N, K] (-1: none) -> emitted count [N]:
    the matching prefix plus one (the recovered or bonus token)."""
    match = (tokens[:, :-1] == drafts).astype(jnp.int32)
    return 1 + jnp.sum(jnp.cumprod(match, axis=1), axis=1)
