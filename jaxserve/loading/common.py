"""Pieces shared by the checkpoint readers: dtype names, the output buffers, the Hugging Face
[out, in] -> param_specs layout mapping, and ModelConfig <-> JSON-able dict."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

from jaxserve.config import DTYPES, ModelConfig, RopeScaling
from jaxserve.errors import CheckpointError, ConfigError
from jaxserve.model.params import ArrayInfo, param_specs

_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}

def resolve_dtype(dtype: Any) -> np.dtype:
    """"float32" | "bfloat16" | "float16" | a numpy dtype of one of those -> np.dtype."""
    if isinstance(dtype, str):
        if dtype not in _NP_DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        return _NP_DTYPES[dtype]
    dt = np.dtype(dtype)
    if dt not in _NP_DTYPES.values():
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dt}")
    return dt


def empty_params(cfg: ModelConfig, dtype: np.dtype) -> dict[str, Any]:
    """Uninitialised host buffers in the param_specs layout; readers fill them in place so each
    weight is written once, straight into its final (stacked, cast) home."""

    def alloc(spec):
        if isinstance(spec, ArrayInfo):
            return np.empty(spec.shape, dtype)
        return {k: alloc(v) for k, v in spec.items()}

    return alloc(param_specs(cfg))


def hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of one layer's tensor as Hugging Face stores it (Linear weights are [out, in])."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "embed": (V, D), "lm_head": (V, D), "final_norm": (D,),
        "attn_norm": (D,), "mlp_norm": (D,),
        "wq": (q, D), "wk": (kv, D), "wv": (kv, D), "wo": (D, q),
        "bq": (q,), "bk": (kv,), "bv": (kv,),
        "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F),
    }[name]


def put_hf(dst: np.ndarray, name: str, w: np.ndarray) -> None:
    """Write HF-layout `w` into `dst` (one layer's slice of a param_specs array), casting to
    dst's dtype. The transposes are views, so the only copy is the write itself."""
    if name in ("wq", "wk", "wv"):  # [H*Dh, D] -> [D, H, Dh]
        dst[...] = w.T.reshape(dst.shape)
    elif name == "wo":  # [D, Hq*Dh] -> [Hq, Dh, D]
        dst[...] = w.T.reshape(dst.shape)
    elif name in ("w_gate", "w_up", "w_down", "lm_head"):
        dst[...] = w.T
    else:  # embed [V, D], norms [D], biases [H*Dh] -> [H, Dh]
        dst[...] = w.reshape(dst.shape)


def check_shape(w_shape: tuple[int, ...], name: str, cfg: ModelConfig, source: str,
                tensor: str) -> None:
    want = hf_shape(name, cfg)
    if tuple(w_shape) != want:
        raise CheckpointError(f"{source}: tensor {tensor} has shape {tuple(w_shape)}, expected "
                              f"{want} for the model's config")


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-able dict; `config_from_dict` inverts it exactly."""
    d = dataclasses.asdict(cfg)
    d["eos_token_ids"] = list(cfg.eos_token_ids)
    return d


def config_from_dict(d: dict[str, Any], source: str = "model config") -> ModelConfig:
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise CheckpointError(f"{source}: unknown ModelConfig field(s) {unknown}")
    try:
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return ModelConfig(**d)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{source}: invalid model config: {e}") from e
