"""EAGLE proposer: a one-layer draft decoder that extrapolates the target's features.

At position q the draft reads concat(f_{q-1}, e(x_q)) (the target's final-norm feature of the
previous position and the embedding of the token at q), maps it to D with `fc`, runs one Llama
decoder layer of the target's shape over it (causal, with its own paged KV cache) and outputs
f^_q, a prediction of the target's feature f_q; the target's own LM head on f^_q gives the
token after x_q. Drafting chains K such steps (lax.scan inside `propose`): from the pending
token x_t and the stored f_{t-1}, step 1 predicts f^_t -> draft d_1, step j feeds (f^, d_j)
back at position t+j. Drafts are the argmax: `deterministic`, output == plain decoding.

The draft's KV cache sits on the target's page ids, like draft_model.py's. After the target's
forward the step hands `observe` the row's true features: they go into the feature cache
(speculative/features.py), and the draft layer's K/V for every row token are rewritten from the
true f_{q-1} (its attention and MLP outputs are unused, so XLA keeps only the K/V projection),
so the positions the target accepts hold exactly what teacher-forced training saw, and the
predicted-feature K/V that drafting wrote there are replaced.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine.sampling import fast_argmax
from jaxserve.model.attention import AttentionMetadata, KVCache
from jaxserve.model.layers import rope_inv_freq
from jaxserve.model.llama import _block, decoder_layer, dense_attention, lm_head
from jaxserve.model.params import init_params
from jaxserve.model.quant import embed
from jaxserve.speculative.features import (
    init_features,
    read_features,
    target_view,
    token_sequences,
    write_features,
)
from jaxserve.speculative.proposer import DraftBatch, Proposer, register, tree_nbytes


def layer_config(target: ModelConfig) -> ModelConfig:
    """The draft decoder layer's shape: one layer of the target's."""
    return dataclasses.replace(target, num_layers=1)


def init_eagle(target: ModelConfig, key: jax.Array) -> dict[str, np.ndarray]:
    """Host f32 weights: fc [2D, D] (+ bias [D]) and `layer`, one decoder layer in the
    param_specs layout without the layers axis. It is drawn like a model's (model/params.py)
    but with its residual outputs (wo, w_down) zero and fc the identity on the feature half, so
    training starts from f^_q = f_{q-1}, the target's own prediction one position late (as
    Medusa's heads start), rather than from a random layer's noise on top of it."""
    D = target.hidden_size
    layer = init_params(dataclasses.replace(layer_config(target), vocab_size=1), key)["layers"]
    layer = {k: np.zeros(v.shape[1:], np.float32) if k in ("wo", "w_down") else
             np.asarray(v[0], np.float32) for k, v in layer.items()}
    fc = np.zeros((2 * D, D), np.float32)
    fc[:D] = np.eye(D, dtype=np.float32)
    return {"fc": fc, "fc_bias": np.zeros((D,), np.float32), "layer": layer}


def eagle_input(params: dict[str, Any], target: ModelConfig, view: dict[str, Any],
                prev: jax.Array, tokens: jax.Array) -> jax.Array:
    """prev [..., D] (f_{q-1}), tokens [...] (x_q) -> the layer input fc(concat) [..., D]."""
    e = embed(view["embed"], tokens, prev.dtype)
    x = jnp.concatenate([prev, e.astype(prev.dtype)], axis=-1)
    return x @ params["fc"].astype(prev.dtype) + params["fc_bias"].astype(prev.dtype)


def eagle_dense(params: dict[str, Any], target: ModelConfig, view: dict[str, Any],
                features: jax.Array, tokens: jax.Array) -> jax.Array:
    """Teacher-forced draft over whole sequences, no cache (training and the reference of the
    paged path). features [B, T, D] (the target's f_0..f_{T-1}), tokens [B, T] -> f^ [B, T, D],
    f^_q predicting f_q from f_{q-1} (zeros at q = 0) and x_q, causally."""
    B, T, _ = features.shape
    lcfg = layer_config(target)
    prev = jnp.pad(features[:, :-1], ((0, 0), (1, 0), (0, 0)))
    x = eagle_input(params, target, view, prev, tokens)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    lp = jax.tree.map(lambda a: a.astype(x.dtype), params["layer"])
    out, _ = _block(lcfg, lp, x, positions, jnp.asarray(rope_inv_freq(lcfg)),
                    dense_attention(lcfg, T))
    return out


@register("eagle")
@dataclasses.dataclass(frozen=True)
class EagleProposer(Proposer):
    target: ModelConfig = None  # the target's config (the draft reads its embedding, LM head)
    stateful = True  # the feature and draft KV caches must see every computed token
    observes_hidden = True

    def init_state(self, num_pages: int, page_size: int, dtype: Any, kv_cache_dtype: str):
        t = self.target
        return {"features": init_features(num_pages, page_size, t.hidden_size, dtype),
                "cache": KVCache.create(1, num_pages, page_size, t.num_kv_heads, t.head_dim,
                                        dtype, kv_cache_dtype)}

    def bind_params(self, own, target):
        return {"draft": own, "target": target_view(self.target, target)}

    def draft_cost(self, own, target) -> float:
        # A drafting round reads the draft layer, fc and the LM head.
        read = tree_nbytes(own) + tree_nbytes(target_view(self.target, target))
        return read / tree_nbytes(target)

    def propose(self, params, state, inputs, batch: DraftBatch, num_spec: int,
                kernels: str, flags):
        N = batch.base_index.shape[0]
        if num_spec == 0:
            return jnp.zeros((N, 0), jnp.int32), None, state
        meta, cache = batch.meta, state["cache"]
        draft, view, lcfg = params["draft"], params["target"], layer_config(self.target)
        lp = draft["layer"]
        S = cache.page_size
        rows = jnp.arange(N)
        pos0 = meta.positions[0, batch.base_index]  # [N] the pending token x_t's position
        prev0 = read_features(state["features"], meta.page_tables, pos0 - 1)  # [N, D]
        tok0 = batch.tokens[0, batch.base_index]  # [N]

        def step(carry, j):
            prev, token, cache = carry
            active = j < batch.num_draft
            # Inactive rows recompute their pending position into page 0 (no write lands).
            pos = jnp.where(active, pos0 + j, pos0)
            slot = jnp.where(active, meta.page_tables[rows, pos // S] * S + pos % S, 0)
            m = AttentionMetadata(positions=pos[:, None], slot_mapping=slot[:, None],
                                  page_tables=meta.page_tables, kv_lens=pos + 1)
            x = eagle_input(draft, self.target, view, prev, token)[:, None]  # [N, 1, D]
            f, cache = decoder_layer(lcfg, lp, x, cache, jnp.int32(0), m, kernels)
            nxt = fast_argmax(lm_head(self.target, view, f, kernels)[:, 0])
            return (f[:, 0], nxt, cache), nxt

        (_, _, cache), drafts = jax.lax.scan(step, (prev0, tok0, cache),
                                             jnp.arange(num_spec, dtype=jnp.int32))
        return drafts.T, None, dict(state, cache=cache)  # drafts [K, N] -> [N, K]

    def observe(self, params, state, hidden, batch: DraftBatch, kernels: str):
        meta = batch.meta
        T = hidden.shape[1]
        features = write_features(state["features"], hidden[0], meta.slot_mapping[0])
        seq = token_sequences(meta.cu_q_lens, T)  # [T]
        prev = read_features(features, meta.page_tables[seq], meta.positions[0] - 1)  # [T, D]
        draft, view = params["draft"], params["target"]
        x = eagle_input(draft, self.target, view, prev, batch.tokens[0])[None]  # [1, T, D]
        _, cache = decoder_layer(layer_config(self.target), draft["layer"], x, state["cache"],
                                 jnp.int32(0), meta, kernels)
        return {"features": features, "cache": cache}
