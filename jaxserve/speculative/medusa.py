"""Medusa proposer: K small heads on the target's own features draft K tokens at once.

Head k is one residual block, h + SiLU(h W_k + b_k), read by the target's own frozen LM head
(the target's arrays, shared: `bind_params`). At a step where a sequence's newest token x_t is
pending (at the row's base_index; its feature is computed by this very step), head k applied
to the stored feature of position t-1 predicts x_{t+k}: head 1 the token after x_t, and so on.
The heads were trained (speculative/train.py) on the target's greedy next tokens over the
target's own continuations; drafts are the argmax, so `deterministic` and the output is that
of plain decoding token for token.

Features come from the feature cache (speculative/features.py): the step's target forward
hands every row token's feature to `observe`, which writes it at the token's KV slot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine.sampling import fast_argmax
from jaxserve.model.llama import lm_head
from jaxserve.speculative.features import (
    init_features,
    read_features,
    target_view,
    write_features,
)
from jaxserve.speculative.proposer import DraftBatch, Proposer, register, tree_nbytes


def init_medusa(target: ModelConfig, num_heads: int) -> dict[str, np.ndarray]:
    """Host f32 head weights: w [K, D, D], b [K, D]. Zeros: every head starts as the identity,
    i.e. the target's own LM head on the previous feature, and the SiLU's slope at 0 (1/2)
    lets the gradient in."""
    D = target.hidden_size
    return {"w": np.zeros((num_heads, D, D), np.float32),
            "b": np.zeros((num_heads, D), np.float32)}


def medusa_features(heads: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """h [..., D] -> each head's output [..., K, D] (what the LM head reads)."""
    z = jnp.einsum("...d,kde->...ke", h, heads["w"].astype(h.dtype)) + heads["b"].astype(h.dtype)
    return h[..., None, :] + jax.nn.silu(z)


@register("medusa")
@dataclasses.dataclass(frozen=True)
class MedusaProposer(Proposer):
    target: ModelConfig = None  # the target's config (the heads read its LM head)
    num_heads: int = 4
    stateful = True  # the feature cache must see every computed token
    observes_hidden = True

    def __post_init__(self):
        if not 1 <= self.num_heads <= 16:
            raise ValueError(f"medusa num_heads must be in [1, 16], got {self.num_heads}")

    def init_state(self, num_pages: int, page_size: int, dtype: Any, kv_cache_dtype: str):
        return {"features": init_features(num_pages, page_size, self.target.hidden_size, dtype)}

    def bind_params(self, own, target):
        return {"heads": own, "target": target_view(self.target, target)}

    def draft_cost(self, own, target) -> float:
        # All heads run in one pass that reads the heads and the LM head once, however many
        # drafts are taken; the policy counts cost per drafting round, so spread it over K.
        read = tree_nbytes(own) + tree_nbytes(target_view(self.target, target))
        return read / tree_nbytes(target) / self.num_heads

    def propose(self, params, state, inputs, batch: DraftBatch, num_spec: int,
                kernels: str, flags):
        N = batch.base_index.shape[0]
        if num_spec == 0:
            return jnp.zeros((N, 0), jnp.int32), None, state
        meta = batch.meta
        k = min(num_spec, self.num_heads)
        pos0 = meta.positions[0, batch.base_index]  # [N] the pending token x_t's position
        f = read_features(state["features"], meta.page_tables, pos0 - 1)  # [N, D]
        out = medusa_features(jax.tree.map(lambda a: a[:k], params["heads"]), f)  # [N, k, D]
        logits = lm_head(self.target, params["target"], out, kernels)  # [N, k, V]
        drafts = fast_argmax(logits.reshape(N * k, -1)).reshape(N, k)
        if k < num_spec:  # more drafts wanted than there are heads: none past the last head
            drafts = jnp.pad(drafts, ((0, 0), (0, num_spec - k)), constant_values=-1)
        return drafts, None, state

    def observe(self, params, state, hidden, batch: DraftBatch, kernels: str):
        return {"features": write_features(state["features"], hidden[0],
                                           batch.meta.slot_mapping[0])}
