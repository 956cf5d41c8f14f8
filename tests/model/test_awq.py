"""AWQ scale search (model/awq.py): never worse than round to nearest on its calibration data,
and the in_scale it stores is honoured by the model's matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.errors import ConfigError
from jaxserve.model import awq, quant
from jaxserve.model.llama import forward_dense
from jaxserve.model.params import cast_params, init_params, validate_params
from tests.model.test_llama import VARIANTS


def _outlier_inputs(T=64, K=128, seed=0):
    """Activations with a few large channels, the case AWQ exists for."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[:, :4] *= 30.0
    return jnp.asarray(x)


@pytest.mark.parametrize("kind,group", [("int4", 32), ("int8", 128)])
def test_search_beats_or_matches_round_to_nearest(kind, group):
    x = _outlier_inputs()
    w = jnp.asarray(np.random.default_rng(1).standard_normal((128, 48)).astype(np.float32))
    s = awq.search_scale(x, w, kind, group)
    assert s.shape == (128,) and bool(jnp.all(s > 0))

    def err(q, in_scale):
        return float(jnp.mean(((x / in_scale) @ quant.dequantize(q) - x @ w) ** 2))

    rtn = err(quant.quantize_matrix(w, kind, group), jnp.ones(128))
    searched = err(quant.quantize_matrix(w * s[:, None], kind, group), s)
    assert searched <= rtn * (1 + 1e-6)
    if kind == "int4":  # outlier channels: the search finds a real improvement
        assert searched < 0.9 * rtn


@pytest.mark.slow
def test_awq_params_run_through_the_model():
    cfg = VARIANTS["smollm2_tied_gqa3"]
    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 48).tolist()
    q = awq.awq_quantize(params, cfg, tokens, "int4", 32)
    validate_params(cfg, q)
    for name in quant.LAYER_MATMULS:
        assert q["layers"][name]["in_scale"].shape == (cfg.num_layers,
                                                       quant.input_dims(params)[name])
    # linear() with in_scale == x @ dequantize(w) (which divides the rows by in_scale).
    deq = dict(params, layers=dict(params["layers"]))
    for name in quant.LAYER_MATMULS:
        w = q["layers"][name]
        mats = [np.asarray(quant.dequantize({k: v[i] for k, v in w.items()}))
                for i in range(cfg.num_layers)]
        deq["layers"][name] = np.stack(mats).reshape(params["layers"][name].shape)
    deq["embed"] = np.asarray(quant.dequantize(q["embed"])).T
    t = jnp.asarray([tokens[:16]])
    got = forward_dense(cast_params(q, "float32"), cfg, t)
    want = forward_dense(cast_params(deq, "float32"), cfg, t)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=1e-4)


def test_calibration_tokens_are_the_first_n_and_at_least_64():
    class OnePerChar:
        def encode(self, text):
            return [ord(c) for c in text]

    assert awq.calibration_tokens(OnePerChar(), "ab" * 400) == [97, 98] * 256
    assert len(awq.calibration_tokens(OnePerChar(), "x" * 64, n=100)) == 64
    with pytest.raises(ConfigError, match="63 tokens of text; AWQ needs >= 64"):
        awq.calibration_tokens(OnePerChar(), "x" * 63)
