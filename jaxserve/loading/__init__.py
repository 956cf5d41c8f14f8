"""Checkpoints -> (ModelConfig, params pytree of host numpy arrays in the param_specs layout).

One reader per format (gguf.py, hf.py, orbax_ckpt.py); `load_checkpoint` picks by what is on
disk. `fetch.py` downloads the default model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError
from jaxserve.loading.common import resolve_dtype
from jaxserve.loading.gguf import load_gguf
from jaxserve.loading.hf import INDEX, SINGLE, is_hf_dir, load_hf
from jaxserve.loading.orbax_ckpt import CONFIG_FILE, PARAMS_DIR, is_orbax_dir, load_orbax

__all__ = ["load_checkpoint", "load_gguf", "load_hf", "load_orbax"]


def load_checkpoint(path: str | Path, dtype: str = "float32") -> tuple[ModelConfig, dict[str, Any]]:
    """Load a `.gguf` file, a jaxserve Orbax directory (save_orbax) or a Hugging Face directory
    (config.json + model.safetensors[.index.json]); params are numpy arrays of `dtype`."""
    p = Path(path)
    np_dtype = resolve_dtype(dtype)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p, np_dtype)
    if p.is_dir() and is_orbax_dir(p):
        return load_orbax(p, np_dtype)
    if p.is_dir() and is_hf_dir(p):
        return load_hf(p, np_dtype)
    what = ("no such file or directory" if not p.exists() else
            "a directory of none of the known layouts" if p.is_dir() else
            "a file without the .gguf suffix")
    raise CheckpointError(
        f"{p}: not a checkpoint ({what}). Looked for: a .gguf file; an Orbax directory "
        f"({CONFIG_FILE} + {PARAMS_DIR}/); a Hugging Face directory (config.json + {SINGLE} or "
        f"{INDEX})")
