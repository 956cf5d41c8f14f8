"""The engine's own step programs, for the real model, lower for GPU and TPU with every attention
and every quantised matmul going through the Pallas kernels under JAXSERVE_KERNELS=auto.

No accelerator is needed: the steps are exported (jax.export) for 'cuda' / 'tpu' from abstract
inputs shaped exactly as the engine builds them, with jax.default_backend() reporting that
platform while tracing, so "auto" takes the branch it takes on that hardware (including the
fall-backs to XLA for shapes a kernel does not cover: none for this model). This proves the
kernels are wired into the model and accept its shapes and dtypes; running them is for a device
session (tests/kernels' native classes, benchmarks/kernels.py)."""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.engine import runner as runner_mod
from jaxserve.model.attention import KVCache
from jaxserve.model.params import cast_params
from jaxserve.model.quant import quantize_params
from tests.kernels.helpers import lower_for

pytestmark = pytest.mark.slow
BACKEND = {"cuda": "gpu", "tpu": "tpu"}
STEPS = ("mixed_step", "decode_step", "multi_decode_step")
# Matmul kernels per weight mode: the LM head is int8 per vocabulary row in int4 mode, and
# grouped like the layers in int8-g32 mode.
MATMUL_KERNELS = {None: set(), "int8": {"int8"}, "int8-g32": {"int8g"}, "int4": {"int4", "int8"},
                  "w8a8": {"w8a8"}}
QUANTIZE = {"int8": ("int8", None), "int8-g32": ("int8", 32), "int4": ("int4", 128),
            "w8a8": ("w8a8", None)}


@pytest.fixture(scope="module")
def engine_inputs(real_gguf_path):
    """(params, {step: (args, kwargs)}) as the engine passed them in a real generation."""
    llm = LLM(real_gguf_path, num_pages=64)
    seen = {}
    originals = {name: getattr(runner_mod, name) for name in STEPS}

    def recorder(name):
        def call(*args, **kwargs):
            seen.setdefault(name, (args, kwargs))
            return originals[name](*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        for name in STEPS:
            mp.setattr(runner_mod, name, recorder(name))
        prompts = ["Hello", "What is the capital of France?"]
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3))  # multi-step decode
        llm.engine.num_decode_steps = 1
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3))  # one step at a time
    assert set(seen) == set(STEPS)
    return llm.runner.params, seen


@contextlib.contextmanager
def tracing_as(platform: str):
    """jax.default_backend() answers `platform` while tracing; every trace cache is dropped on
    the way in and out, so no program traced for the accelerator is reused on CPU (or the
    reverse)."""
    jax.clear_caches()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(jax, "default_backend", lambda: BACKEND[platform])
            yield
    finally:
        jax.clear_caches()


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def bf16_params(params):
    """The params as an accelerator server holds them (the loader's cast: float weights bf16,
    quantised weights and their f32 scales as stored)."""
    return abstract(jax.eval_shape(lambda p: cast_params(p, jnp.bfloat16), params))


def bf16_cache(cache: KVCache, kv_cache_dtype: str = "auto") -> KVCache:
    L, P, S, H, D = cache.k.shape
    return jax.eval_shape(lambda: KVCache.create(L, P, S, H, D, jnp.bfloat16, kv_cache_dtype))


def lowered_kernels(platform: str, step: str, args, kwargs) -> list[str]:
    """The jaxserve Pallas kernels in the engine step `step` lowered for `platform`."""
    with tracing_as(platform):
        text = lower_for(platform, getattr(runner_mod, step), *args, **kwargs)
    return sorted(set(re.findall(r"jaxserve_\w+?_(?:gpu|tpu)\b", text)))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("weights", [None, "int8", "int8-g32", "int4", "w8a8"])
def test_steps_lower_through_kernels(engine_inputs, platform, weights):
    params, seen = engine_inputs
    if weights is not None:
        params = quantize_params(params, *QUANTIZE[weights])
    kind = BACKEND[platform]
    params = bf16_params(params)  # bf16 activations and cache, as served on accelerators
    for step in STEPS:
        args, kwargs = seen[step]
        names = lowered_kernels(platform, step, (params, bf16_cache(args[1]),
                                                 *abstract(args[2:])), kwargs)
        attention = "ragged_paged" if step == "mixed_step" else "paged_decode"
        want = {f"jaxserve_{attention}_{kind}"}
        want |= {f"jaxserve_{w}_matmul_{kind}" for w in MATMUL_KERNELS[weights]}
        assert set(names) == want, (step, names)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_int8_kv_cache_steps_lower_through_kernels(engine_inputs, platform):
    params, seen = engine_inputs
    for step in STEPS:
        args, kwargs = seen[step]
        names = lowered_kernels(platform, step, (bf16_params(params),
                                                 bf16_cache(args[1], "int8"),
                                                 *abstract(args[2:])), kwargs)
        attention = "ragged_paged" if step == "mixed_step" else "paged_decode"
        assert names == [f"jaxserve_{attention}_{BACKEND[platform]}"], (step, names)
