"""The Flax module is `forward` behind linen's apply: same params pytree, same outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.errors import CheckpointError
from jaxserve.model.attention import KVCache
from jaxserve.model.flax_module import LlamaModule
from jaxserve.model.llama import forward, unstack_layers
from jaxserve.model.params import cast_params, init_params
from jaxserve.model.quant import quantize_params
from tests.lanes import fast_first
from tests.model.test_llama import NUM_PAGES, PAGE, VARIANTS, _meta, _ragged_meta


def _step(cfg, ragged=False):
    """A prefill step over out-of-order pages, on a cache of random (not zero) contents, so a
    cache that came back unchanged or rewritten in the wrong place would show."""
    cache = KVCache.create(cfg.num_layers, NUM_PAGES, PAGE, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(k=jax.random.normal(jax.random.key(7), cache.k.shape),
                    v=jax.random.normal(jax.random.key(8), cache.v.shape))
    lens, tables = [9, 3], [[7, 2, 11], [5]]
    if ragged:
        meta = _ragged_meta([(pt, 0, n) for pt, n in zip(tables, lens, strict=True)], 4, 16, 3)
        tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, cfg.vocab_size)
        return tokens, cache, meta, jnp.array([8, 11, 0])
    meta = _meta([(pt, 0, n) for pt, n in zip(tables, lens, strict=True)], 4)
    tokens = jax.random.randint(jax.random.key(1), (2, max(lens)), 0, cfg.vocab_size)
    return tokens, cache, meta, jnp.array([n - 1 for n in lens])


def assert_same(got, want):
    """Same tree structure, every leaf equal bit for bit (dtype and shape included)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# jit both sides: eager forward dispatches op by op (minutes on CPU), and jit is how it runs.
FORWARD = jax.jit(forward, static_argnums=1)


@pytest.mark.parametrize("name,ragged,with_index", fast_first([("smollm2_tied_gqa3", False, True),
                                                               ("qwen2_bias", False, False),
                                                               ("llama2_mha_untied", True, True)]))
def test_apply_is_forward_bit_for_bit(name, ragged, with_index):
    cfg = VARIANTS[name]
    module, variables = LlamaModule.from_config(cfg, jax.random.key(0))
    tokens, cache, meta, idx = _step(cfg, ragged)
    idx = idx if with_index else None
    got = jax.jit(module.apply)(variables, tokens, cache, meta, idx)
    want = FORWARD(variables["params"], cfg, tokens, cache, meta, idx)
    assert_same(got, want)  # (logits, updated cache)


def test_params_are_the_pytree():
    cfg = VARIANTS["llama2_mha_untied"]
    params = init_params(cfg, jax.random.key(0))
    _, variables = LlamaModule.from_params(cfg, params)
    assert set(variables) == {"params"} and variables["params"] is params
    _, fresh = LlamaModule.from_config(cfg, jax.random.key(0))
    assert_same(fresh["params"], params)

    # linen's own init draws through init_params too: the same tree of arrays, and apply of it
    # is forward of it.
    module = LlamaModule(cfg)
    tokens, cache, meta, idx = _step(cfg)
    inited = jax.jit(module.init)(jax.random.key(3), tokens, cache, meta, idx)
    assert set(inited) == {"params"}
    assert jax.tree.structure(inited["params"]) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), inited["params"]) == jax.tree.map(
        lambda a: (a.shape, a.dtype), params)
    assert_same(jax.jit(module.apply)(inited, tokens, cache, meta, idx),
                FORWARD(inited["params"], cfg, tokens, cache, meta, idx))
    cache16 = KVCache.create(cfg.num_layers, NUM_PAGES, PAGE, cfg.num_kv_heads, cfg.head_dim,
                             jnp.bfloat16)  # the kernels take K/V in the activations' dtype
    bf16 = jax.eval_shape(LlamaModule(cfg, param_dtype=jnp.bfloat16).init, jax.random.key(3),
                          tokens, cache16, meta, idx)
    assert {a.dtype for a in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_jit_apply_equals_jit_forward_with_donated_cache():
    cfg = VARIANTS["smollm2_tied_gqa3"]
    module, variables = LlamaModule.from_config(cfg, jax.random.key(0))
    tokens, cache, meta, idx = _step(cfg)
    want = FORWARD(variables["params"], cfg, tokens, cache, meta, idx)
    apply = jax.jit(module.apply, donate_argnums=2)
    got = apply(variables, tokens, jax.tree.map(jnp.copy, cache), meta, idx)
    assert_same(got, want)
    # A second call with the returned cache reuses the compiled program.
    got2 = apply(variables, tokens, got[1], meta, idx)
    assert apply._cache_size() == 1
    assert_same(got2[0], want[0])


@pytest.mark.parametrize("transform", ["int8", "unstacked"])
def test_quantised_and_unstacked_trees_apply_as_forward(transform):
    """Whatever tree forward takes, apply takes as is (linen's `param` shape check would
    reject these: their leaves are not the float init's)."""
    cfg = VARIANTS["smollm2_tied_gqa3"]
    params = init_params(cfg, jax.random.key(0))
    params = quantize_params(params, "int8") if transform == "int8" else unstack_layers(params)
    module, variables = LlamaModule.from_params(cfg, params)
    assert variables["params"] is params
    tokens, cache, meta, idx = _step(cfg)
    assert_same(jax.jit(module.apply)(variables, tokens, cache, meta, idx),
                FORWARD(params, cfg, tokens, cache, meta, idx))


def test_from_params_names_a_wrong_tensor():
    cfg = VARIANTS["smollm2_tied_gqa3"]
    params = init_params(cfg, jax.random.key(0))
    bad = {**params, "layers": {**params["layers"], "wq": params["layers"]["wq"][:, :3]}}
    with pytest.raises(CheckpointError, match="wq"):
        LlamaModule.from_params(cfg, bad)
    module = LlamaModule(cfg)
    tokens, cache, meta, idx = _step(cfg)
    with pytest.raises(ValueError, match="params"):
        module.apply({}, tokens, cache, meta, idx)


@pytest.mark.slow
def test_real_model_apply_is_forward(real_gguf_path):
    from jaxserve.loading.gguf import load_gguf

    cfg, params = load_gguf(real_gguf_path)
    module, variables = LlamaModule.from_params(cfg, cast_params(params, jnp.float32))
    tokens, cache, meta, idx = _step(cfg)
    got = jax.jit(module.apply)(variables, tokens, cache, meta, idx)
    assert_same(got, FORWARD(variables["params"], cfg, tokens, cache, meta, idx))
    assert np.isfinite(np.asarray(got[0])).all()
