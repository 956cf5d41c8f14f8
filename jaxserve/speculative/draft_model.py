"""Draft-model proposer: a smaller model with the target's vocabulary drafts K tokens, one
decode step at a time, inside the fused step. Good drafts are the target itself quantised
(int4 / int8: "quantised self-draft"; it agrees with the target on most top-1 tokens and reads
a fraction of the bytes) or cut to its first layers.

Its KV cache is its own, laid out on the SAME page ids as the target's: every step that writes
target K/V for a token writes the draft's for it too (the proposer is `stateful`, so every
engine step runs through the fused step), hence the target's block tables, prefix-cache hits,
truncation after rejection and preemption hold for the draft cache unchanged.

Per step: one draft forward over the whole flat row (prompt chunks and pending decode tokens:
the draft's K/V for them, and logits at each sequence's last token -> draft 1), then K decode
steps of the draft, step j feeding draft j at the next position (its K/V is needed if the target
accepts it) and giving draft j+1. A row stops writing after its own number of drafts.

Drafts are the draft model's argmax (`sample_drafts=False`: deterministic, so output equals
plain decoding token for token) or drawn from its distribution under the request's own sampling
transforms (`sample_drafts=True`: q is returned and verification is rejection sampling, which
accepts more under temperature sampling; greedy rows are one-hot either way).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.engine.sampling import draw_weighted, fast_argmax, probs
from jaxserve.model.attention import AttentionMetadata, KVCache
from jaxserve.model.llama import forward
from jaxserve.speculative.proposer import DraftBatch, Proposer, register

_DRAFT_STREAM = 0x64726674  # fold_in tag of the draft's own uniforms ("drft")


def _draft_uniforms(seed: jax.Array, step: jax.Array) -> jax.Array:
    """[B] U[0, 1) for drawing the draft at generated-token count `step` ([B]); a key stream
    apart from the sampler's and the verifier's, so drafts are independent of both."""
    keys = jax.random.wrap_key_data(seed, impl="threefry2x32")

    def one(key, s):
        k = jax.random.fold_in(jax.random.fold_in(key, s), _DRAFT_STREAM)
        return jax.random.uniform(k, (), jnp.float32)

    return jax.vmap(one)(keys, step)


@register("draft_model")
@dataclasses.dataclass(frozen=True)
class DraftModelProposer(Proposer):
    cfg: ModelConfig = None  # the draft model's config (same vocabulary as the target)
    sample_drafts: bool = False
    stateful = True

    @property
    def deterministic(self) -> bool:
        return not self.sample_drafts

    def init_state(self, num_pages: int, page_size: int, dtype: Any, kv_cache_dtype: str):
        c = self.cfg
        return {"cache": KVCache.create(c.num_layers, num_pages, page_size, c.num_kv_heads,
                                        c.head_dim, dtype, kv_cache_dtype)}

    def propose(self, params, state, inputs, batch: DraftBatch, num_spec: int,
                kernels: str, flags):
        cache = state["cache"]
        meta = batch.meta
        logits, cache = forward(params, self.cfg, batch.tokens, cache, meta, batch.base_index,
                                kernels=kernels)
        N = batch.base_index.shape[0]
        if num_spec == 0:
            return jnp.zeros((N, 0), jnp.int32), None, dict(state, cache=cache)
        S = cache.page_size
        rows = jnp.arange(N)
        pos0 = meta.positions[0, batch.base_index]  # [N] position of the last pending token
        st = batch.st

        def pick(logits, j):
            """Draft j+1 (0-based j) from the draft's logits: argmax, or a draw from q."""
            if not self.sample_drafts:
                return fast_argmax(logits), None
            q = probs(logits, st.replace(step=st.step + j), flags)
            return draw_weighted(q, _draft_uniforms(st.seed, st.step + j)), q

        def step(carry, j):
            token, q, cache = carry
            active = j <= batch.num_draft
            # Inactive rows recompute their pending position into page 0 (no write lands).
            pos = jnp.where(active, pos0 + j, pos0)
            slot = jnp.where(active, meta.page_tables[rows, pos // S] * S + pos % S, 0)
            m = AttentionMetadata(positions=pos[:, None], slot_mapping=slot[:, None],
                                  page_tables=meta.page_tables, kv_lens=pos + 1)
            logits, cache = forward(params, self.cfg, token[:, None], cache, m,
                                    jnp.zeros_like(token), kernels=kernels)
            nxt, nq = pick(logits, j)
            return (nxt, nq if q is not None else None, cache), (token, q)

        first, q0 = pick(logits, 0)
        (_, _, cache), (drafts, qs) = jax.lax.scan(
            step, (first, q0, cache), jnp.arange(1, num_spec + 1, dtype=jnp.int32))
        # drafts [K, N] -> [N, K]; qs [K, N, V] -> [N, K, V]
        return drafts.T, None if qs is None else qs.transpose(1, 0, 2), dict(state, cache=cache)
