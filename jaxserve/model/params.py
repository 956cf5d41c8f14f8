"""The one description of every weight array: shape, logical axes, init scale.

Random init, loading targets and shape validation are all derived from `param_specs`, so a
weight is described exactly once. Per-layer weights are stacked on a leading `layers` axis so the
forward pass can `lax.scan` over them (compile time independent of depth).

Layout: matmul weights are stored input-major (`x @ w`), with attention heads as their own axis
so einsums read "btd,dnh->btnh":
  embed    [V, D]                 lm_head  [D, V]  (absent when embeddings are tied)
  wq [L, D, Hq, Dh]  wk/wv [L, D, Hkv, Dh]  wo [L, Hq, Dh, D]  bq [L, Hq, Dh]  bk/bv [L, Hkv, Dh]
  w_gate/w_up [L, D, F]  w_down [L, F, D]  attn_norm/mlp_norm [L, D]  final_norm [D]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError
from jaxserve.model import quant


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, for sharding rules
    init: str  # "normal" (scaled by fan-in), "ones", "zeros"


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """Nested dict of ArrayInfo mirroring the params pytree."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    Hq, Hkv, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layers = {
        "attn_norm": ArrayInfo((L, D), ("layers", "embed"), "ones"),
        "wq": ArrayInfo((L, D, Hq, Dh), ("layers", "embed", "q_heads", "head_dim"), "normal"),
        "wk": ArrayInfo((L, D, Hkv, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wv": ArrayInfo((L, D, Hkv, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wo": ArrayInfo((L, Hq, Dh, D), ("layers", "q_heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ArrayInfo((L, D), ("layers", "embed"), "ones"),
        "w_gate": ArrayInfo((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_up": ArrayInfo((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_down": ArrayInfo((L, F, D), ("layers", "mlp", "embed"), "normal"),
    }
    if cfg.attention_bias:
        layers["bq"] = ArrayInfo((L, Hq, Dh), ("layers", "q_heads", "head_dim"), "normal")
        layers["bk"] = ArrayInfo((L, Hkv, Dh), ("layers", "kv_heads", "head_dim"), "normal")
        layers["bv"] = ArrayInfo((L, Hkv, Dh), ("layers", "kv_heads", "head_dim"), "normal")
    specs: dict[str, Any] = {
        "embed": ArrayInfo((V, D), ("vocab", "embed"), "normal"),
        "layers": layers,
        "final_norm": ArrayInfo((D,), ("embed",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ArrayInfo((D, V), ("embed", "vocab"), "normal")
    return specs


def _fan_in(name: str, info: ArrayInfo) -> int:
    if name in ("embed", "bq", "bk", "bv"):
        return 1
    if name == "wo":
        return info.shape[-3] * info.shape[-2]
    return info.shape[-2] if name != "lm_head" else info.shape[0]


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, Any]:
    """Random weights for tests: normal / sqrt(fan_in), so activations stay O(1) at any depth."""
    specs = param_specs(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, ArrayInfo))
    keys = jax.random.split(key, len(flat))
    out = []
    for (path, info), k in zip(flat, keys, strict=True):
        name = path[-1].key
        if info.init == "ones":
            # Perturb norms around 1 so a test would notice a norm weight being ignored.
            out.append((1.0 + 0.1 * jax.random.normal(k, info.shape)).astype(dtype))
        elif info.init == "zeros":
            out.append(jnp.zeros(info.shape, dtype))
        else:
            scale = 0.02 if name in ("bq", "bk", "bv") else 1.0 / np.sqrt(_fan_in(name, info))
            if name == "embed":
                scale = 1.0
            out.append((scale * jax.random.normal(k, info.shape)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def validate_params(cfg: ModelConfig, params: dict[str, Any], source: str = "params") -> None:
    """Raise CheckpointError naming the first tensor whose presence or shape is wrong."""
    specs = param_specs(cfg)

    def walk(spec: dict, got: dict, prefix: str):
        if not isinstance(got, dict):
            raise CheckpointError(f"{source}: {prefix or 'params'} should be a dict")
        extra = sorted(set(got) - set(spec))
        if extra:
            raise CheckpointError(f"{source}: unexpected tensor(s) {[prefix + e for e in extra]}")
        for name, info in spec.items():
            if name not in got:
                raise CheckpointError(f"{source}: missing tensor {prefix + name}")
            if isinstance(info, dict):
                walk(info, got[name], f"{prefix}{name}.")
                continue
            if quant.is_quantized(got[name]):
                _validate_quantized(name, info, got[name], f"{source}: tensor {prefix + name}")
                continue
            shape = tuple(np.shape(got[name]))
            if shape != info.shape:
                raise CheckpointError(f"{source}: tensor {prefix + name} has shape {shape}, "
                                      f"expected {info.shape}")

    walk(specs, params, "")


def _validate_quantized(name: str, info: ArrayInfo, w: dict, where: str) -> None:
    """A quantised dict (model/quant.py) standing for a float weight of spec `info`."""
    if name not in quant.MATMUL_NAMES:
        raise CheckpointError(f"{where} is quantised, but only matmul weights can be")
    stacked = info.axes[0] == "layers"
    lead = info.shape[:1] if stacked else ()
    K, N = quant.matmul_shape(name, info.shape, stacked)
    k = quant.kind(w)
    extra = sorted(set(w) - {k, "scale", "min", "in_scale"})
    rows = K // 2 if k == "int4" else K
    want = {k: (lead + (rows, N), np.int8)}
    G = np.shape(w.get("scale"))[-2] if np.ndim(w.get("scale")) == len(lead) + 2 else None
    if G is None or G == 0 or K % G or (k == "int4" and K // G not in (32, 64, 128)) or (
            k == "w8a8" and G != 1):
        raise CheckpointError(f"{where}: {k} scale has shape {np.shape(w.get('scale'))}, "
                              f"expected {lead + ('G', N)} with G dividing K={K}")
    want["scale"] = (lead + (G, N), np.float32)
    if k == "int4":
        want["min"] = (lead + (G, N), np.float32)
    if "in_scale" in w:
        want["in_scale"] = (lead + (K,), np.float32)
    if extra or set(want) != set(w):
        raise CheckpointError(f"{where}: quantised entries {sorted(w)}, expected "
                              f"{sorted(want)}")
    for key, (shape, dt) in want.items():
        got_shape, got_dt = tuple(np.shape(w[key])), np.dtype(w[key].dtype)
        if got_shape != shape or got_dt != dt:
            raise CheckpointError(f"{where}.{key} is {got_dt} {got_shape}, expected "
                                  f"{np.dtype(dt)} {shape}")


def cast_params(params: dict[str, Any], dtype) -> dict[str, Any]:
    """Host numpy tree -> device arrays: float weights in the compute dtype, quantised weights
    (model/quant.py) as stored (their scales stay f32)."""
    def cast(x):
        if quant.is_quantized(x):
            return {k: jnp.asarray(v) for k, v in x.items()}
        return jnp.asarray(x, dtype=dtype)

    return jax.tree.map(cast, params, is_leaf=quant.is_quantized)
