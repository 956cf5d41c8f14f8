"""The feature cache of the draft-head proposers (Medusa, EAGLE) and the target weights they
share.

Medusa and EAGLE draft from the target's final-norm hidden state ("feature", what the LM head
reads). A decoding sequence's newest token x_t is not computed yet when the step drafts, so the
heads read the feature of position t-1, computed by an earlier step. The features are kept like
K/V: one row per cache slot, `features [num_pages, page_size, D]`, written at each computed
token's slot (the step's slot mapping). They therefore live on the target's block tables:
prefix-cache hits find the features of the shared pages already there, and rejected drafts'
features sit past the committed tokens, where later steps overwrite them before anything reads
them (reads only go to committed positions).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig


def init_features(num_pages: int, page_size: int, dim: int, dtype: Any) -> jax.Array:
    """An empty feature cache: [num_pages, page_size, dim] in the compute dtype (paged like
    the KV cache, so the page size is in the shape)."""
    return jnp.zeros((num_pages, page_size, dim), dtype)


def write_features(features: jax.Array, hidden: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """features [P, S, D]; hidden [..., D] written at the flat slots slot_mapping [...]
    (padding tokens' slots are in page 0, which no sequence owns)."""
    S, D = features.shape[1:]
    slots = slot_mapping.reshape(-1)
    return features.at[slots // S, slots % S].set(hidden.reshape(-1, D).astype(features.dtype),
                                                  mode="promise_in_bounds")


def read_features(features: jax.Array, page_tables: jax.Array, positions: jax.Array
                  ) -> jax.Array:
    """The feature at each of positions [R] (page_tables [R, W]: the page table of each row's
    sequence) -> [R, D]; zeros at position -1 (nothing precedes the first token)."""
    S = features.shape[1]
    p = jnp.maximum(positions, 0)
    pages = page_tables[jnp.arange(positions.shape[0]), p // S]
    return jnp.where((positions >= 0)[:, None], features[pages, p % S], 0).astype(features.dtype)


def token_sequences(cu_q_lens: jax.Array, num_tokens: int) -> jax.Array:
    """The sequence index of every token of a flat ragged row: cu_q_lens [N + 1] -> [T] int32
    (padding tokens past the last sequence get the last index; their reads are never used)."""
    idx = jnp.searchsorted(cu_q_lens[1:], jnp.arange(num_tokens, dtype=jnp.int32), side="right")
    return jnp.minimum(idx, cu_q_lens.shape[0] - 2).astype(jnp.int32)


def target_view(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The target's weights a draft head reads (the embedding, the LM head): the same arrays,
    not copies, laid out so model.llama.lm_head / model.quant.embed take them."""
    keys = ("embed",) if cfg.tie_word_embeddings else ("embed", "lm_head")
    return {k: params[k] for k in keys}
