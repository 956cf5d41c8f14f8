"""Shared test inputs for the kernel tests: adversarial paged caches, dense numpy attention,
dtype-keyed tolerances, and lowering for an accelerator platform from a CPU-only machine."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Kernel vs reference (different summation order / bf16 probabilities); always by keyword.
TOL = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    jnp.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def tol(dtype) -> dict:
    return TOL[jnp.dtype(dtype).type]


def assert_close(actual, expected, dtype):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               **tol(dtype))


def has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def has_tpu() -> bool:
    try:
        return bool(jax.devices("tpu"))
    except RuntimeError:
        return False


def make_paged_kv(rng, *, kv_lens, L, layer, S, Hkv, D, W, dtype, quant):
    """A paged cache where everything a correct kernel must NOT read is NaN: page 0, pages not
    owned by any sequence, the tail of each last page, every other layer, and page-table entries
    past a sequence's pages (which point at stale NaN pages, not just page 0). Pages are handed
    out in a random permutation. Returns (k, v, k_scale, v_scale, page_tables [B, W])."""
    B = len(kv_lens)
    need = [-(-n // S) for n in kv_lens]
    P = 1 + sum(need) + 3
    order = rng.permutation(np.arange(1, P))
    pt = np.zeros((B, W), np.int32)
    live = np.zeros((P, S), bool)
    pos = 0
    for b, n in enumerate(kv_lens):
        pt[b, :need[b]] = order[pos:pos + need[b]]
        for j in range(need[b]):
            live[pt[b, j], :min(S, n - j * S)] = True
        pos += need[b]
        pt[b, need[b]:] = rng.choice(order[sum(need):], W - need[b])  # stale, NaN-filled pages
    shape = (L, P, S, Hkv, D)
    dead = ~live[None, :, :, None]  # [1, P, S, 1]
    other_layers = np.arange(L) != layer
    if quant:
        k = rng.integers(-127, 128, shape, dtype=np.int8)
        v = rng.integers(-127, 128, shape, dtype=np.int8)
        ks = rng.uniform(0.5, 1.5, shape[:4]).astype(np.float32) / 127
        vs = rng.uniform(0.5, 1.5, shape[:4]).astype(np.float32) / 127
        for sc in (ks, vs):
            sc[np.broadcast_to(dead, sc.shape)] = np.nan
            sc[other_layers] = np.nan
        return jnp.asarray(k), jnp.asarray(v), jnp.asarray(ks), jnp.asarray(vs), jnp.asarray(pt)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    for x in (k, v):
        x[np.broadcast_to(dead[..., None], shape)] = np.nan
        x[other_layers] = np.nan
    return (jnp.asarray(k, dtype), jnp.asarray(v, dtype), None, None, jnp.asarray(pt))


def dense_attention_np(q, k, v, q_pos, kv_len, *, sm_scale, sliding_window=None, soft_cap=None):
    """Independent float64 attention for one sequence: q [T, Hq, D], k/v [K, Hkv, D] (already
    dequantised, exactly kv_len rows), q_pos [T] absolute positions -> [T, Hq, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    out = np.zeros((T, Hq, D))
    for t in range(T):
        for hq in range(Hq):
            h = hq // (Hq // Hkv)
            keys = np.arange(kv_len)
            ok = keys <= q_pos[t]
            if sliding_window is not None:
                ok &= keys > q_pos[t] - sliding_window
            if not ok.any():
                continue
            s = k[ok, h] @ q[t, hq] * sm_scale
            if soft_cap is not None:
                s = np.tanh(s / soft_cap) * soft_cap
            p = np.exp(s - s.max())
            out[t, hq] = (p / p.sum()) @ v[ok, h]
    return out


def gather_dense(k, v, ks, vs, layer, page_table, kv_len):
    """One sequence's first kv_len cached tokens as dense numpy [kv_len, Hkv, D] (dequantised)."""
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    S = k.shape[2]
    rows_k, rows_v = [], []
    for t in range(kv_len):
        page, off = page_table[t // S], t % S
        sk = 1.0 if ks is None else np.asarray(ks)[layer, page, off][:, None]
        sv = 1.0 if vs is None else np.asarray(vs)[layer, page, off][:, None]
        rows_k.append(k[layer, page, off] * sk)
        rows_v.append(v[layer, page, off] * sv)
    Hkv, D = k.shape[3:]
    if not rows_k:
        return np.zeros((0, Hkv, D)), np.zeros((0, Hkv, D))
    return np.stack(rows_k), np.stack(rows_v)


@contextlib.contextmanager
def _fake_tpu_info():
    """Pallas' Mosaic lowering asks for the chip's TpuInfo; on CPU there is none, so pretend to be
    a v5e for the duration of a lowering-only check (nothing is compiled or run)."""
    from jax._src.pallas.mosaic import tpu_info
    from jax.experimental.pallas import tpu as pltpu

    had = "cpu" in tpu_info.registry
    tpu_info.registry["cpu"] = lambda: pltpu.get_tpu_info_for_chip(pltpu.ChipVersion.TPU_V5E, 1)
    try:
        yield
    finally:
        if not had:
            tpu_info.registry.pop("cpu", None)


def lower_for(platform: str, fn, *args, **static_kwargs) -> str:
    """Lower `fn(*args, **static_kwargs)` for 'tpu' (Mosaic) or 'cuda' (Triton) on this CPU
    machine and return the StableHLO text: proves Pallas could lower every construct in the
    kernel. It does not run the backend compiler (Mosaic's layout passes / ptxas), which only a
    device session can do. static_kwargs are bound as Python values, not traced."""
    import functools

    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
              export.DisabledSafetyCheck.custom_call("tpu_custom_call")]
    ctx = _fake_tpu_info() if platform == "tpu" else contextlib.nullcontext()
    with ctx:
        exp = export.export(jax.jit(functools.partial(fn, **static_kwargs)),
                            platforms=[platform], disabled_checks=checks)(*args)
    return exp.mlir_module()


gpu_only = pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
