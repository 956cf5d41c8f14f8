"""GGUF files: metadata, config, tokenizer fields and (dequantised) weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from jaxserve.errors import CheckpointError


def open_reader(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/IndexError on damage
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value metadata as plain Python values (str, int, float, bool, lists of them)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out
