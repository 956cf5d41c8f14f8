"""Backend dispatch for every kernel, in one place: TPU -> Mosaic kernels, GPU -> Pallas Triton
kernels, CPU -> each kernel file's "xla" formulation (its reference restructured for XLA:CPU).
The model calls only the front doors below, and chooses no backend of its own.

`JAXSERVE_KERNELS` overrides the choice:
  auto       by jax.default_backend() (the default)
  reference  the jnp references everywhere (debugging, numerics baselines)
  interpret  the Pallas kernels (the GPU/Triton variants) in Pallas interpret mode, on any
             backend: slow, for checking kernel code on CPU.
The variable is read when a front door is traced, so set it before the first jit of a step.
"""

from __future__ import annotations

import os

import jax

from pallas_kernels import paged_attention as _pa
from pallas_kernels import quant_matmul as _qm
from pallas_kernels import ragged_paged_attention as _rpa

ENV_VAR = "JAXSERVE_KERNELS"
MODES = ("auto", "reference", "interpret")


def kernel_mode() -> str:
    """The validated value of JAXSERVE_KERNELS ("auto" when unset or empty)."""
    mode = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {MODES}, got {os.environ[ENV_VAR]!r}")
    return mode


def _impl(mode: str | None = None) -> tuple[str, bool]:
    """(impl, interpret) for the kernel wrappers, for `mode` (None: read JAXSERVE_KERNELS).
    "auto" lets each wrapper pick by backend (CPU: its "xla" path) and fall back to its
    reference for shapes its kernel does not cover."""
    mode = kernel_mode() if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    if mode == "interpret":
        return "gpu", True
    return mode, False


def paged_decode_attention(
    q: jax.Array,  # [B, Hq, Dh]
    k_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    v_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    layer: jax.Array,  # [] int32
    kv_lens: jax.Array,  # [B] int32
    page_tables: jax.Array,  # [B, W] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32
    v_scale: jax.Array | None = None,  # [L, P, S, Hkv] f32
    mode: str | None = None,  # a MODES value; None: JAXSERVE_KERNELS
) -> jax.Array:
    """One decode token per sequence -> [B, Hq, Dh]; see pallas_kernels.paged_attention."""
    impl, interpret = _impl(mode)
    return _pa.paged_decode_attention(
        q, k_cache, v_cache, layer, kv_lens, page_tables, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale,
        impl=impl, interpret=interpret)


def ragged_paged_attention(
    q: jax.Array,  # [T, Hq, Dh]
    k_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    v_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    layer: jax.Array,  # [] int32
    kv_lens: jax.Array,  # [N] int32
    page_tables: jax.Array,  # [N, W] int32
    cu_q_lens: jax.Array,  # [N + 1] int32
    num_seqs: jax.Array,  # [] or [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    mode: str | None = None,
) -> jax.Array:
    """Flat ragged batch of prefill chunks and decode tokens -> [T, Hq, Dh]; see
    pallas_kernels.ragged_paged_attention."""
    impl, interpret = _impl(mode)
    return _rpa.ragged_paged_attention(
        q, k_cache, v_cache, layer, kv_lens, page_tables, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale,
        v_scale=v_scale, impl=impl, interpret=interpret)


def paged_prefill_attention(
    q: jax.Array,  # [B, T, Hq, Dh]
    k_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    v_cache: jax.Array,  # [L, P, S, Hkv, Dh]
    layer: jax.Array,  # [] int32
    kv_lens: jax.Array,  # [B] int32
    page_tables: jax.Array,  # [B, W] int32
    positions: jax.Array,  # [B, T] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """Padded rows of T query tokens at `positions` -> [B, T, Hq, Dh] (scoring and logprob
    steps). One pure-jnp formulation on every backend and in every mode: no kernel covers it
    (see pallas_kernels.paged_attention)."""
    return _pa.paged_prefill_attention(
        q, k_cache, v_cache, layer, kv_lens, page_tables, positions, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)


def quant_matmul(x: jax.Array, w_q: jax.Array, w_scale: jax.Array,
                 w_min: jax.Array | None = None, *, w8a8: bool = False,
                 mode: str | None = None) -> jax.Array:
    """x [M, K] @ a quantised weight -> [M, N] in x.dtype. The weight's layout picks the kernel:
      int8 w_q [K, N] + w_scale [N]          -> int8 weight-only (w8a8=True: W8A8)
      int8 w_q [K, N] + w_scale [G, N]       -> int8 group-wise (K/G rows per scale, as GGUF
                                                Q8_0); the reference for K/G outside 32/64/128
      int8 w_q [K/2, N] packed int4 + w_scale/w_min [K/g, N]
                                             -> int4 group-wise, w = nibble * scale + min
    (layouts in pallas_kernels.quant_matmul)."""
    impl, interpret = _impl(mode)
    if w_min is not None:
        if w8a8:
            raise ValueError("w8a8 needs an int8 weight [K, N] with w_scale [N], not int4")
        return _qm.int4_matmul(x, w_q, w_scale, w_min, impl=impl, interpret=interpret)
    fn = _qm.w8a8_matmul if w8a8 else _qm.int8_matmul
    return fn(x, w_q, w_scale, impl=impl, interpret=interpret)
