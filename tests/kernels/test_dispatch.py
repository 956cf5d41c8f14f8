"""Backend dispatch: env parsing and that every mode gives the reference's answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels import quant_matmul as qm
from tests.kernels import test_paged_attention as tpa
from tests.kernels import test_ragged_paged_attention as trpa
from tests.kernels.helpers import assert_close
from tests.lanes import fast_first


@pytest.mark.parametrize("value,mode", [("", "auto"), ("auto", "auto"),
                                        ("reference", "reference"), (" Interpret ", "interpret")])
def test_kernel_mode_parses(monkeypatch, value, mode):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    assert dispatch.kernel_mode() == mode


def test_kernel_mode_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="JAXSERVE_KERNELS.*'fast'"):
        dispatch.kernel_mode()


def test_unset_is_auto(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.kernel_mode() == "auto"


@pytest.mark.parametrize("mode", fast_first(dispatch.MODES))
def test_front_doors_agree_with_references(monkeypatch, mode):
    monkeypatch.setenv(dispatch.ENV_VAR, mode)
    q, k, v, layer, lens, pt, ks, vs = tpa.make_inputs(1, 2, 2, 64, 8, jnp.float32, True)
    kw = dict(sm_scale=0.125, k_scale=ks, v_scale=vs)
    out = dispatch.paged_decode_attention(q, k, v, layer, lens, pt, **kw)
    assert_close(out, tpa.pa.paged_decode_attention_reference(q, k, v, layer, lens, pt, **kw),
                 jnp.float32)

    *args, _, _ = trpa.make_inputs(2, 2, 2, 64, 8, jnp.float32, False)
    out = dispatch.ragged_paged_attention(*args, sm_scale=0.125)
    assert_close(out, trpa.rpa.ragged_paged_attention_reference(*args, sm_scale=0.125),
                 jnp.float32)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
    w_q, s = qm.quantize_int8(w)
    assert_close(dispatch.quant_matmul(x, w_q, s), qm.int8_matmul_reference(x, w_q, s),
                 jnp.float32)
    assert_close(dispatch.quant_matmul(x, w_q, s, w8a8=True),
                 qm.w8a8_matmul_reference(x, w_q, s), jnp.float32)
    p, sc, mn = qm.quantize_int4(w, 32)
    assert_close(dispatch.quant_matmul(x, p, sc, mn), qm.int4_matmul_reference(x, p, sc, mn),
                 jnp.float32)
    assert_close(dispatch.quant_matmul(x, p, sc, w_min=mn),
                 qm.int4_matmul_reference(x, p, sc, mn), jnp.float32)
    # int8 group-wise (Q8_0-style scale per 32 rows): the reference whatever the mode.
    gs = jnp.asarray(rng.uniform(0.5, 2, (128 // 32, 64)) * 1e-2, jnp.float32)
    assert_close(dispatch.quant_matmul(x, w_q, gs), qm.int8_matmul_reference(x, w_q, gs),
                 jnp.float32)


def test_quant_matmul_rejects_w8a8_with_int4_or_grouped_scales():
    x = jnp.zeros((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="w8a8 needs an int8 weight"):
        dispatch.quant_matmul(x, jnp.zeros((32, 8), jnp.int8), jnp.ones((2, 8)),
                              jnp.zeros((2, 8)), w8a8=True, mode="reference")
    with pytest.raises(ValueError, match="w_scale must be float32"):
        dispatch.quant_matmul(x, jnp.zeros((64, 8), jnp.int8), jnp.ones((2, 8)), w8a8=True,
                              mode="reference")


def test_auto_on_cpu_uses_references(monkeypatch):
    """On CPU, auto must not run Pallas at all (no pallas_call in the traced program)."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only check")
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    q, k, v, layer, lens, pt, _, _ = tpa.make_inputs(1, 2, 2, 64, 8, jnp.float32, False)
    text = str(jax.make_jaxpr(lambda *a: dispatch.paged_decode_attention(*a, sm_scale=0.1))(
        q, k, v, layer, lens, pt))
    assert "pallas_call" not in text
