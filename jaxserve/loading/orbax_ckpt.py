"""jaxserve's own checkpoint format: an Orbax checkpoint of the params pytree beside
model_config.json (and, optionally, the tokenizer's files).

    <dir>/model_config.json   ModelConfig as JSON (common.config_to_dict)
    <dir>/params/             Orbax StandardCheckpointer output
    <dir>/tokenizer*.json     written by Tokenizer.save, when a tokenizer is given
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError
from jaxserve.loading.common import config_from_dict, config_to_dict, resolve_dtype
from jaxserve.model import quant
from jaxserve.model.params import validate_params

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def _orbax():
    # Importing orbax costs ~0.7 s; only pay it when an Orbax checkpoint is actually touched.
    import orbax.checkpoint as ocp

    return ocp


def is_orbax_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / PARAMS_DIR).is_dir()


def save_orbax(directory: str | Path, cfg: ModelConfig, params: dict[str, Any],
               tokenizer: Any = None) -> Path:
    """Write params (host numpy arrays, any dtype, saved bit-exactly) and cfg to `directory`;
    an existing checkpoint there is replaced. Returns the directory."""
    d = Path(directory).resolve()
    validate_params(cfg, params, str(d))
    d.mkdir(parents=True, exist_ok=True)
    # Config goes last and atomically: a directory only looks like a checkpoint once its params
    # are fully written, so an interrupted save is never mistaken for a good one.
    (d / CONFIG_FILE).unlink(missing_ok=True)
    with _orbax().StandardCheckpointer() as ckptr:
        ckptr.save(d / PARAMS_DIR, params, force=True)
        ckptr.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save(d)
    tmp = d / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    os.replace(tmp, d / CONFIG_FILE)
    return d


def orbax_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a jaxserve Orbax checkpoint, without touching its params."""
    d = Path(directory).resolve()
    cfg_path = d / CONFIG_FILE
    if not is_orbax_dir(d):
        raise CheckpointError(f"{d}: not a jaxserve Orbax checkpoint (needs {CONFIG_FILE} and "
                              f"{PARAMS_DIR}/)")
    try:
        return config_from_dict(json.loads(cfg_path.read_text()), str(cfg_path))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path}: invalid model config ({e})") from None


def load_orbax(directory: str | Path, dtype: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) as saved; `dtype` (e.g. "bfloat16") casts every float weight, None
    keeps the saved dtypes. Quantised weights (model/quant.py) always load as saved."""
    d = Path(directory).resolve()
    cfg = orbax_config(d)
    try:
        with _orbax().StandardCheckpointer() as ckptr:
            params = ckptr.restore(d / PARAMS_DIR)
    except Exception as e:  # orbax/tensorstore raise many unrelated types on damage
        raise CheckpointError(f"{d / PARAMS_DIR}: cannot restore Orbax checkpoint "
                              f"({type(e).__name__}: {e})") from e
    out_dtype = resolve_dtype(dtype) if dtype is not None else None

    def host(x):
        x = np.asarray(x)
        return x if out_dtype is None else x.astype(out_dtype, copy=False)

    params = _map(host, params)
    validate_params(cfg, params, str(d))
    return cfg, params


def _map(fn, tree):
    if quant.is_quantized(tree):
        return {k: np.asarray(v) for k, v in tree.items()}
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)
