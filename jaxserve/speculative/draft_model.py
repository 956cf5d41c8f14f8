"""Draft-model proposer: a smaller model with the target's vocabulary drafts K tokens greedily,
one decode step at a time, inside the fused step. Good drafts are the target itself quantised
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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.engine.sampling import fast_argmax
from jaxserve.model.attention import AttentionMetadata, KVCache
from jaxserve.model.llama import forward
from jaxserve.speculative.proposer import DraftBatch, Proposer, register


@register("draft_model")
@dataclasses.dataclass(frozen=True)
class DraftModelProposer(Proposer):
    cfg: ModelConfig = None  # the draft model's config (same vocabulary as the target)
    stateful = True

    def init_state(self, num_pages: int, page_size: int, dtype: Any, kv_cache_dtype: str):
        c = self.cfg
        return {"cache": KVCache.create(c.num_layers, num_pages, page_size, c.num_kv_heads,
                                        c.head_dim, dtype, kv_cache_dtype)}

    def propose(self, params, state, inputs, batch: DraftBatch, num_spec: int,
                kernels: str):
        cache = state["cache"]
        meta = batch.meta
        logits, cache = forward(params, self.cfg, batch.tokens, cache, meta, batch.base_index,
                                kernels=kernels)
        N = batch.base_index.shape[0]
        if num_spec == 0:
            return jnp.zeros((N, 0), jnp.int32), dict(state, cache=cache)
        S = cache.page_size
        rows = jnp.arange(N)
        pos0 = meta.positions[0, batch.base_index]  # [N] position of the last pending token

        def step(carry, j):
            token, cache = carry
            active = j <= batch.num_draft
            # Inactive rows recompute their pending position into page 0 (no write lands).
            pos = jnp.where(active, pos0 + j, pos0)
            slot = jnp.where(active, meta.page_tables[rows, pos // S] * S + pos % S, 0)
            m = AttentionMetadata(positions=pos[:, None], slot_mapping=slot[:, None],
                                  page_tables=meta.page_tables, kv_lens=pos + 1)
            logits, cache = forward(params, self.cfg, token[:, None], cache, m,
                                    jnp.zeros_like(token), kernels=kernels)
            return (fast_argmax(logits), cache), token

        first = fast_argmax(logits)
        (_, cache), drafts = jax.lax.scan(step, (first, cache),
                                          jnp.arange(1, num_spec + 1, dtype=jnp.int32))
        return drafts.T, dict(state, cache=cache)  # drafts [K, N] -> [N, K]
