"""The persistent compilation cache: per-machine directory, and the ways to leave it off."""

from __future__ import annotations

import jax
import pytest

from jaxserve import llm as llm_mod


@pytest.fixture
def restore_cache_config():
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_cache_directory_is_per_machine_kind(tmp_path, restore_cache_config):
    llm_mod.enable_compilation_cache(str(tmp_path))
    key = llm_mod._machine_key()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / key)
    assert (tmp_path / key).is_dir()
    assert key == llm_mod._machine_key() and len(key) == 16


@pytest.mark.parametrize("env", ["off", "OFF", ""])
def test_cache_left_off(monkeypatch, tmp_path, restore_cache_config, env):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAXSERVE_COMPILATION_CACHE", env)
    llm_mod.enable_compilation_cache(None)
    llm_mod.enable_compilation_cache("")
    assert jax.config.jax_compilation_cache_dir == before
