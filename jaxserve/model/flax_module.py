"""A Flax front door to the model: a linen Module whose parameters are the params pytree.

Linen, not NNX, because linen keeps the weights as they are. `module.apply(variables, ...)`
takes `variables["params"]` to be the params pytree of params.py itself: the same dicts, the
same array objects, no conversion in either direction, so `apply` is a pure function that jits
and donates like `forward`. NNX (flax's recommended API for new models) holds each array in an
`nnx.Param` inside Module attributes; getting the pytree back out needs `nnx.split` /
`nnx.to_pure_dict` around every jit, which is the conversion this wrapper exists to avoid.

The math is not repeated here: `__call__` calls `llama.forward`, which the engine keeps calling
directly. The KV cache stays an argument and a return value (not a Flax collection) for the
same reason: the engine donates it.

    module, variables = LlamaModule.from_params(cfg, params)    # or .from_config(cfg, key)
    logits, cache = jax.jit(module.apply)(variables, tokens, cache, meta, logits_index)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.model.attention import AttentionMetadata, KVCache, RaggedMetadata
from jaxserve.model.llama import Params, forward
from jaxserve.model.params import init_params, validate_params


class LlamaModule(nn.Module):
    """`forward` as a linen Module. Its "params" collection is the params pytree (float or
    quantised weights, stacked or unstacked layers: whatever `forward` takes).

    kernels: the attention/matmul implementation, as `forward`'s argument.
    param_dtype: the dtype `init` draws weights in."""

    cfg: ModelConfig
    kernels: str = "auto"
    param_dtype: Any = jnp.float32

    @classmethod
    def from_params(cls, cfg: ModelConfig, params: Params,
                    kernels: str = "auto") -> tuple[LlamaModule, dict[str, Params]]:
        """(module, variables) for existing weights; variables["params"] is `params` itself.
        Raises CheckpointError naming the first tensor whose presence or shape is wrong."""
        if not isinstance(params.get("layers"), (list, tuple)):  # validate_params wants stacked
            validate_params(cfg, params)
        return cls(cfg, kernels), {"params": params}

    @classmethod
    def from_config(cls, cfg: ModelConfig, key: jax.Array, dtype=jnp.float32,
                    kernels: str = "auto") -> tuple[LlamaModule, dict[str, Params]]:
        """(module, variables) with random weights: exactly `init_params(cfg, key, dtype)`."""
        return cls(cfg, kernels, dtype), {"params": init_params(cfg, key, dtype)}

    @nn.compact
    def __call__(self, tokens: jax.Array, cache: KVCache,
                 meta: AttentionMetadata | RaggedMetadata,
                 logits_index: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """tokens [B, T] int32 -> (logits [B, T, V] or [B, V] f32, updated cache); see
        `llama.forward`."""
        return forward(self._params(), self.cfg, tokens, cache, meta, logits_index,
                       kernels=self.kernels)

    def _params(self) -> Params:
        if self.is_initializing():
            # One draw of the whole tree, registered name by name so the collection has the
            # pytree's own top-level keys ("embed", "layers", ...).
            full = init_params(self.cfg, self.make_rng("params"), self.param_dtype)
            return {name: self.param(name, lambda _, v=v: v) for name, v in full.items()}
        # Read the collection as given. `self.param` would re-derive every init shape per call
        # and compare leaf by leaf, which a quantised or unstacked tree does not match.
        if "params" not in self.variables:
            raise ValueError("LlamaModule.apply needs variables={'params': params_pytree}")
        return self.variables["params"]
