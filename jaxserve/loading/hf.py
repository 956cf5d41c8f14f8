"""Hugging Face checkpoint directories: config.json + model.safetensors (or a sharded index)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError, ConfigError
from jaxserve.loading.common import check_shape, empty_params, put_hf, resolve_dtype

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

_TOP = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm",
        "lm_head.weight": "lm_head"}
_LAYER = {"self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
          "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
          "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk",
          "self_attn.v_proj.bias": "bv", "mlp.gate_proj.weight": "w_gate",
          "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down",
          "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and ((p / SINGLE).is_file() or (p / INDEX).is_file())


def read_hf_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint needs config.json)")\
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    try:
        return ModelConfig.from_hf_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _weight_map(d: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    index = d / INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") \
                from None
        return {name: d / shard for name, shard in wm.items()}
    single = d / SINGLE
    if not single.is_file():
        raise CheckpointError(f"{d}: no {SINGLE} or {INDEX}")
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: missing safetensors shard")
    try:
        return safe_open(str(path), framework="np")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _target(hf_name: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """(param name, layer or None) for a tensor we load; None for tensors we skip."""
    if hf_name in _TOP:
        return _TOP[hf_name], None
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER and int(m.group(1)) < cfg.num_layers:
        return _LAYER[m.group(2)], int(m.group(1))
    return None


def load_hf(directory: str | Path, dtype: Any = np.float32) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) from a Hugging Face directory; params are host numpy arrays of `dtype`
    in the param_specs layout (HF Linear [out, in] weights transposed, heads split out)."""
    d = Path(directory)
    cfg = read_hf_config(d)
    params = empty_params(cfg, resolve_dtype(dtype))
    wmap = _weight_map(d)

    wanted: dict[tuple[str, int | None], str] = {}
    for hf_name in wmap:
        tgt = _target(hf_name, cfg)
        if tgt is None:
            if hf_name.endswith("rotary_emb.inv_freq"):  # a recomputable buffer, not a weight
                continue
            raise CheckpointError(f"{wmap[hf_name]}: unexpected tensor {hf_name} (not part of a "
                                  f"{cfg.model_type} model with this config.json)")
        is_bias = tgt[0] in ("bq", "bk", "bv")
        if tgt[0] == "lm_head" and cfg.tie_word_embeddings:
            continue  # some exporters save the tied head too; it is the embedding
        if is_bias and not cfg.attention_bias:
            raise CheckpointError(f"{wmap[hf_name]}: tensor {hf_name} present but config.json "
                                  "says attention_bias is false")
        wanted[tgt] = hf_name

    missing = [_hf_name(p, i) for p, i in _expected(cfg) if (p, i) not in wanted]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise CheckpointError(f"{d}: missing tensor(s) {shown}")

    by_file: dict[Path, list[tuple[str, int | None, str]]] = {}
    for (name, layer), hf_name in wanted.items():
        by_file.setdefault(wmap[hf_name], []).append((name, layer, hf_name))
    for path, items in by_file.items():
        with _open(path) as f:
            keys = set(f.keys())
            for name, layer, hf_name in items:
                if hf_name not in keys:
                    raise CheckpointError(f"{path}: missing tensor {hf_name} (the index says it "
                                          "is in this shard)")
                check_shape(tuple(f.get_slice(hf_name).get_shape()), name, cfg, str(path),
                            hf_name)
                try:
                    w = f.get_tensor(hf_name)
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{path}: cannot read tensor {hf_name} ({e})") from None
                dst = params[name] if layer is None else params["layers"][name][layer]
                put_hf(dst, name, w)
    return cfg, params


def _expected(cfg: ModelConfig):
    yield "embed", None
    yield "final_norm", None
    if not cfg.tie_word_embeddings:
        yield "lm_head", None
    names = [n for n in _LAYER.values() if cfg.attention_bias or n not in ("bq", "bk", "bv")]
    for i in range(cfg.num_layers):
        for n in names:
            yield n, i


def _hf_name(name: str, layer: int | None) -> str:
    if layer is None:
        return next(k for k, v in _TOP.items() if v == name)
    return f"model.layers.{layer}." + next(k for k, v in _LAYER.items() if v == name)
