"""Checkpoints -> (ModelConfig, params pytree of host numpy arrays in the param_specs layout).

One reader per format (gguf.py, hf.py, orbax_ckpt.py); `load_checkpoint` picks by what is on
disk. `fetch.py` downloads the default model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError, ConfigError
from jaxserve.loading.common import resolve_dtype
from jaxserve.loading.gguf import gguf_config, load_gguf
from jaxserve.loading.hf import INDEX, SINGLE, is_hf_dir, load_hf, read_hf_config
from jaxserve.loading.orbax_ckpt import (
    CONFIG_FILE,
    PARAMS_DIR,
    is_orbax_dir,
    load_orbax,
    orbax_config,
)
from jaxserve.model import quant
from jaxserve.model.awq import awq_quantize
from jaxserve.model.params import param_specs

__all__ = ["load_checkpoint", "load_gguf", "load_hf", "load_orbax"]


def load_checkpoint(path: str | Path, dtype: str = "float32", quantization: str | None = None,
                    group_size: int | None = None, calibration_tokens: list[int] | None = None,
                    ) -> tuple[ModelConfig, dict[str, Any]]:
    """Load a `.gguf` file, a jaxserve Orbax directory (save_orbax) or a Hugging Face directory
    (config.json + model.safetensors[.index.json]); params are numpy arrays of `dtype`.

    quantization (model/quant.py): "int8" / "int4" / "w8a8" quantise the matmul weights at load
    time (round to nearest, from f32; group_size: int4's, None = 128; int8's, None = per output
    channel; see quant.quantize_params); "gguf" keeps a GGUF file's Q8_0/Q4_0/Q4_1 blocks. An
    Orbax checkpoint that is already quantised loads as stored, without re-quantising.
    calibration_tokens: quantise with AWQ scales searched on them (model/awq.py) instead."""
    p = Path(path)
    np_dtype = resolve_dtype(dtype)
    if quantization == "gguf" and not (p.is_file() and p.suffix == ".gguf"):
        raise ConfigError(f"quantization='gguf' keeps a GGUF file's blocks; {p} is not a .gguf "
                          "file (use int8, int4 or w8a8 to quantise other checkpoints)")
    if quantization is not None:
        cfg = peek_config(p) if quantization != "gguf" else None
        if cfg is not None:
            quant.check_mode(quantization, group_size, quant.input_dims(param_specs(cfg)))
    if p.is_file() and p.suffix == ".gguf":
        cfg, params = load_gguf(p, np_dtype if quantization is None else np.float32,
                                native_quant=quantization == "gguf")
    elif p.is_dir() and is_orbax_dir(p):
        cfg, params = load_orbax(p, np_dtype if quantization is None else None)
    elif p.is_dir() and is_hf_dir(p):
        cfg, params = load_hf(p, np_dtype if quantization is None else np.float32)
    else:
        _not_a_checkpoint(p)
    stored = quant.tree_mode(params)
    if quantization in ("int8", "int4", "w8a8"):
        if stored not in (None, quantization):
            raise ConfigError(f"{p} is already quantised ({stored}); it cannot be loaded as "
                              f"{quantization}")
        if stored is None and calibration_tokens:
            params = awq_quantize(params, cfg, calibration_tokens, quantization, group_size)
        elif stored is None:
            params = quant.quantize_params(params, quantization, group_size)
    return cfg, params


def peek_config(p: Path) -> ModelConfig | None:
    """The config of a checkpoint without loading weights (None when p is no checkpoint)."""
    if p.is_file() and p.suffix == ".gguf":
        return gguf_config(p)
    if p.is_dir() and is_orbax_dir(p):
        return orbax_config(p)
    if p.is_dir() and is_hf_dir(p):
        return read_hf_config(p)
    return None


def _not_a_checkpoint(p: Path):
    what = ("no such file or directory" if not p.exists() else
            "a directory of none of the known layouts" if p.is_dir() else
            "a file without the .gguf suffix")
    raise CheckpointError(
        f"{p}: not a checkpoint ({what}). Looked for: a .gguf file; an Orbax directory "
        f"({CONFIG_FILE} + {PARAMS_DIR}/); a Hugging Face directory (config.json + {SINGLE} or "
        f"{INDEX})")
