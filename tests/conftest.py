"""Session fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxserve.errors import FetchError


@pytest.fixture(scope="session")
def real_gguf_path() -> Path:
    """The default model's .gguf, from the checkpoint cache (fetched once if absent)."""
    from jaxserve.loading.fetch import fetch_model

    try:
        return fetch_model(progress=False)
    except FetchError as e:
        pytest.skip(f"default model weights unavailable: {e}")
