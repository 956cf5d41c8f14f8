"""Quantised matmuls, x @ w convention: x [M, K] (f32/bf16) times a quantised w [K, N].

GPU path: the Pallas Triton backend (same reasons as paged_attention.py: verifiable in interpret
mode on CPU; decode-time weight-only matmuls are bandwidth-bound, so Hopper's wgmma/TMA do not
change the roofline for M <= 64). TPU path: Mosaic with a K grid axis and a VMEM accumulator.

Layouts (what the quantise functions produce, and what the model stores in its params):
  int8 weight-only: w_q int8 [K, N], w_scale f32 [N]; symmetric per output channel,
    w ~= w_q * w_scale. The scale is applied once to the [M, N] result, after the K reduction.
  int8 group-wise (GGUF Q8_0's form; Q8_0 itself is g = 32): the same w_q with w_scale f32
    [K/g, N], symmetric per group of g input rows (scale = the group's absmax / 127),
    w[k] = w_q[k] * w_scale[k // g]. Dequantised in f32 before the dot (exact for GGUF's f16
    scales), like int4, since the scale changes along the reduction. The kernels take
    g in {32, 64, 128}; any other g dividing K (possible in a GGUF file) takes the reference.
  int4 (group-wise, asymmetric): w_packed int8 [K/2, N], scales f32 [K/g, N], mins f32 [K/g, N];
    w = nibble * scale + min, computed in f32, g in {32, 64, 128}. (scale, min) rather than
    (scale, zero point) so that GGUF Q4_0 / Q4_1 blocks (value = d * q + m, d and m f16; Q4_0 has
    m = -8 d) load without re-quantising and dequantise bit-exactly: for f16 d, nibble * d is
    exact in f32 (4 + 11 significant bits), so the one rounding left is that of the add, which
    is what gguf's own dequantiser does (with or without an FMA). quantize_int4 still rounds to
    integer zero points and returns min = -zero * scale.
    Packing is per group, split in halves: packed row r of group i = r // (g/2), j = r % (g/2),
    holds w[i*g + j] in its low nibble and w[i*g + g/2 + j] in its high nibble (for g = 32 this
    is GGUF's Q4_0 / Q4_1 nibble order). Both nibbles of a byte therefore share one scale/min
    row, and unpacking a tile needs no interleave (a shuffle on both TPU and GPU): x is split
    once into the matching halves and the kernel does x_lo @ deq(low) + x_hi @ deq(high).
  W8A8: the int8 weight layout above, plus activations quantised per token at call time
    (x_scale f32 [M] = max|x_row| / 127); int8 x int8 -> int32 accumulate, then
    * x_scale[:, None] * w_scale[None, :].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

IMPLS = ("auto", "reference", "xla", "gpu", "tpu")
GROUP_SIZES = (32, 64, 128)


# --------------------------------------------------------------------------------------------
# Quantisation (float weight [K, N] -> layouts above)
# --------------------------------------------------------------------------------------------


def quantize_int8(w: jax.Array, group_size: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """w [K, N] float -> (w_q int8 [K, N], w_scale f32 [N]), symmetric per output channel;
    with group_size g: w_scale f32 [K/g, N], symmetric per group of g input rows (GGUF Q8_0's
    scheme: scale = absmax / 127, round to nearest; an all-zero group gets scale 1)."""
    _check_weight(w)
    K, N = w.shape
    if group_size is None:
        amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0)  # [N]
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        w_q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
        return w_q, scale.astype(jnp.float32)
    if group_size not in GROUP_SIZES or K % group_size:
        raise ValueError(f"group_size must be None (per channel) or one of {GROUP_SIZES} "
                         f"dividing K={K}, got {group_size}")
    wg = w.astype(jnp.float32).reshape(K // group_size, group_size, N)
    amax = jnp.max(jnp.abs(wg), axis=1)  # [K/g, N]
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    w_q = jnp.clip(jnp.round(wg / scale[:, None]), -127, 127).astype(jnp.int8)
    return w_q.reshape(K, N), scale


def quantize_int4(w: jax.Array, group_size: int = 128
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """w [K, N] float -> (w_packed int8 [K/2, N], scales f32 [K/g, N], mins f32 [K/g, N]).

    Round to nearest, asymmetric: min = the group's minimum, scale = its range / 15 (GGUF
    Q4_1's scheme). A float min rather than an integer zero point: re-quantising weights that
    came from 4-bit blocks at the same group size then reproduces them (an integer zero point
    would shift every element by up to scale/2), and each element is within scale/2."""
    _check_weight(w)
    K, N = w.shape
    if group_size not in GROUP_SIZES or K % group_size:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} and divide K={K}, got "
                         f"{group_size}")
    g = group_size
    wg = w.astype(jnp.float32).reshape(K // g, g, N)
    lo, hi = jnp.min(wg, axis=1), jnp.max(wg, axis=1)  # [K/g, N]
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
    q = jnp.clip(jnp.round((wg - lo[:, None]) / scale[:, None]), 0, 15).astype(jnp.uint8)
    packed = q[:, : g // 2] | (q[:, g // 2:] << 4)  # [K/g, g/2, N]
    packed = jax.lax.bitcast_convert_type(packed, jnp.int8).reshape(K // 2, N)
    return packed, scale, lo


def quantize_activations_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] float -> (x_q int8 [M, K], x_scale f32 [M]), symmetric per token (row)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    x_q = jnp.clip(jnp.round(x / scale[:, None]), -127, 127).astype(jnp.int8)
    return x_q, scale


def dequantize_int4(w_packed: jax.Array, scales: jax.Array, mins: jax.Array) -> jax.Array:
    """Inverse of quantize_int4 -> f32 [K, N]: nibble * scale + min (bit-exact GGUF Q4_0/Q4_1
    dequantisation when scales/mins are f16 values)."""
    K2, N = w_packed.shape
    G = scales.shape[0]
    low, high = _nibbles(w_packed.reshape(G, K2 // G, N))
    q = jnp.concatenate([low, high], axis=1).astype(jnp.float32)  # [K/g, g, N]
    return (q * scales[:, None] + mins[:, None]).reshape(2 * K2, N)


def dequantize_int8(w_q: jax.Array, w_scale: jax.Array) -> jax.Array:
    """int8 w_q [K, N] with w_scale [N] (per channel) or [G, N] (group K/G) -> f32 [K, N]."""
    w = w_q.astype(jnp.float32)
    if w_scale.ndim == 1:
        return w * w_scale
    K, N = w_q.shape
    G = w_scale.shape[0]
    return (w.reshape(G, K // G, N) * w_scale[:, None]).reshape(K, N)


def _nibbles(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 bytes -> (low, high) nibbles as int32 in [0, 15] (sign extension masked away)."""
    p = p.astype(jnp.int32)
    return p & 15, (p >> 4) & 15


def _split_halves(x: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> x_lo, x_hi [M, K/2]: the activations matching low / high nibbles."""
    M, K = x.shape
    xg = x.reshape(M, K // group_size, 2, group_size // 2)
    return xg[:, :, 0].reshape(M, K // 2), xg[:, :, 1].reshape(M, K // 2)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_weight(w):
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be a float [K, N] matrix, got {w.dtype} {w.shape}")


def _check_x(x, K):
    if x.ndim != 2 or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"x must be float32/bfloat16 [M, K], got {x.dtype} {x.shape}")
    if x.shape[1] != K:
        raise ValueError(f"x must be [M, K={K}] to match the weight, got {x.shape}")


def _check_int8(x, w_q, w_scale, grouped: bool = False) -> int:
    """Validates an int8 weight; returns G, the number of scale rows (1: per channel). grouped
    allows w_scale [G, N] with G dividing K (weight-only int8; W8A8 stays per channel)."""
    if w_q.ndim != 2 or w_q.dtype != jnp.int8:
        raise ValueError(f"w_q must be int8 [K, N], got {w_q.dtype} {w_q.shape}")
    K, N = w_q.shape
    _check_x(x, K)
    if w_scale.dtype == jnp.float32 and w_scale.shape == (N,):
        return 1
    if (grouped and w_scale.dtype == jnp.float32 and w_scale.ndim == 2
            and w_scale.shape[1] == N and 0 < w_scale.shape[0] <= K
            and K % w_scale.shape[0] == 0):
        return w_scale.shape[0]
    want = f"[N]=[{N}] or [G, N] with G dividing K={K}" if grouped else f"[N]=[{N}]"
    raise ValueError(f"w_scale must be float32 {want}, got {w_scale.dtype} {w_scale.shape}")


def _check_int4(x, w_packed, scales, mins) -> int:
    if w_packed.ndim != 2 or w_packed.dtype != jnp.int8:
        raise ValueError(f"w_packed must be int8 [K/2, N], got {w_packed.dtype} "
                         f"{w_packed.shape}")
    K, N = 2 * w_packed.shape[0], w_packed.shape[1]
    _check_x(x, K)
    if scales.ndim != 2 or scales.shape[1] != N or scales.dtype != jnp.float32 or (
            K % scales.shape[0]) or K // scales.shape[0] not in GROUP_SIZES:
        raise ValueError(f"scales must be float32 [K/g, N] with K={K}, N={N}, g in "
                         f"{GROUP_SIZES}; got {scales.dtype} {scales.shape}")
    if mins.shape != scales.shape or mins.dtype != jnp.float32:
        raise ValueError(f"mins must be float32 {scales.shape}, got {mins.dtype} "
                         f"{mins.shape}")
    return K // scales.shape[0]


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


# --------------------------------------------------------------------------------------------
# References (pure jnp; also the CPU path)
# --------------------------------------------------------------------------------------------


def int8_matmul_reference(x: jax.Array, w_q: jax.Array, w_scale: jax.Array) -> jax.Array:
    """x [M, K] @ int8 w_q [K, N] * w_scale -> [M, N] in x.dtype. w_scale [N]: per channel,
    applied after the reduction; [G, N]: per group of K/G rows (GGUF Q8_0), so the weight is
    dequantised first (in f32, exact for f16 scales; then cast to x.dtype like int4)."""
    if _check_int8(x, w_q, w_scale, grouped=True) > 1:
        w = dequantize_int8(w_q, w_scale).astype(x.dtype)
        return jnp.einsum("mk,kn->mn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    y = jnp.einsum("mk,kn->mn", x, w_q.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w_scale.reshape(-1)).astype(x.dtype)


def int4_matmul_reference(x: jax.Array, w_packed: jax.Array, scales: jax.Array,
                          mins: jax.Array) -> jax.Array:
    """x [M, K] @ dequant(w_packed [K/2, N], scales/mins [K/g, N]) -> [M, N] in x.dtype."""
    _check_int4(x, w_packed, scales, mins)
    w = dequantize_int4(w_packed, scales, mins).astype(x.dtype)
    return jnp.einsum("mk,kn->mn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def w8a8_matmul_reference(x: jax.Array, w_q: jax.Array, w_scale: jax.Array) -> jax.Array:
    """Per-token int8 x [M, K] (quantised here) @ int8 w_q [K, N] -> [M, N] in x.dtype."""
    _check_int8(x, w_q, w_scale)
    x_q, x_scale = quantize_activations_int8(x)
    acc = jnp.einsum("mk,kn->mn", x_q, w_q, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x_scale[:, None] * w_scale[None, :]).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# CPU path ("xla", what "auto" picks on CPU): the references, restructured for XLA:CPU
# --------------------------------------------------------------------------------------------
# Measured on a 2-core Xeon (jax 0.10): XLA:CPU does not fuse a dequantise into its dot. The
# reference's whole-matrix convert writes a full f32 copy of the weight (113 MB for the
# SmolLM2 LM head: ~60 ms a token, 10x slower than reading the f32 weight). Dequantising a
# block of columns at a time inside a loop keeps the f32 block in cache and reuses one
# buffer. And its int8 x int8 dot has a slow M=1 path (~7x slower than M=8), so W8A8 pads rows.

_CPU_CHUNK_BYTES = 1 << 22  # f32 bytes of one dequantised column block (measured: 1-8 MiB)


def _column_block(N: int, K: int) -> int:
    n = 1 << max(7, (_CPU_CHUNK_BYTES // (4 * K)).bit_length() - 1)
    while n > 128 and N % n:
        n //= 2
    return n if N % n == 0 and n < N else N


def _by_column_blocks(M: int, N: int, K: int, block) -> jax.Array:
    """f32 [M, N] computed `block(start, n)` -> f32 [M, n] a block of output columns at a time,
    n chosen so one block's dequantised weight (K rows) stays a few MiB."""
    n = _column_block(N, K)
    if n == N:
        return block(0, N)

    def body(i, y):
        return jax.lax.dynamic_update_slice_in_dim(y, block(i * n, n), i * n, axis=1)

    return jax.lax.fori_loop(0, N // n, body, jnp.zeros((M, N), jnp.float32))


def _cols(a: jax.Array, start, n: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, start, n, axis=a.ndim - 1)


def int8_matmul_xla(x, w_q, w_scale):
    (M, K), N = x.shape, w_q.shape[1]
    grouped = w_scale.ndim == 2 and w_scale.shape[0] > 1

    def block(s, n):
        w = (dequantize_int8(_cols(w_q, s, n), _cols(w_scale, s, n)) if grouped
             else _cols(w_q, s, n))
        return _dot(x, w.astype(x.dtype))

    y = _by_column_blocks(M, N, K, block)
    return (y if grouped else y * w_scale.reshape(-1)).astype(x.dtype)


def int4_matmul_xla(x, w_packed, scales, mins):
    # The kernels' split-halves form (x_lo @ deq(low) + x_hi @ deq(high)): no interleave of the
    # two nibble planes back into K order, which XLA:CPU would materialise.
    K2, N = w_packed.shape
    G = scales.shape[0]
    x_lo, x_hi = _split_halves(x, 2 * K2 // G)

    def block(s, n):
        low, high = _nibbles(_cols(w_packed, s, n).reshape(G, K2 // G, n))
        sc, mn = _cols(scales, s, n)[:, None], _cols(mins, s, n)[:, None]
        deq = [(h.astype(jnp.float32) * sc + mn).reshape(K2, n).astype(x.dtype)
               for h in (low, high)]
        return _dot(x_lo, deq[0]) + _dot(x_hi, deq[1])

    return _by_column_blocks(x.shape[0], N, K2, block).astype(x.dtype)


def w8a8_matmul_xla(x, w_q, w_scale):
    M = x.shape[0]
    xp = jnp.pad(x, ((0, -M % 8), (0, 0)))
    return w8a8_matmul_reference(xp, w_q, w_scale)[:M]


# --------------------------------------------------------------------------------------------
# Tile math shared by both backends
# --------------------------------------------------------------------------------------------


def _dot(a, b, acc_dtype=jnp.float32):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=acc_dtype)


def _int8_group_tile(x, w_q, scale):
    """x [bm, bk], w_q [bk, bn] int8, scale [bk/g, bn] -> [bm, bn] f32: the tile dequantised in
    f32 (each group's scale over its g rows, as the reference), cast to x.dtype, one dot."""
    bk, bn = w_q.shape
    ng = scale.shape[0]
    w = w_q.astype(jnp.float32).reshape(ng, bk // ng, bn) * scale[:, None, :]
    return _dot(x, w.reshape(bk, bn).astype(x.dtype))


def _int4_tile(x_lo, x_hi, packed, scale, mn):
    """x_lo/x_hi [bm, bk2], packed [bk2, bn] int8, scale/mn [bk2/(g/2), bn] -> [bm, bn] f32."""
    bk2, bn = packed.shape
    ng = scale.shape[0]
    low, high = _nibbles(packed)

    def deq(nib):  # repeat each group's scale/min over its g/2 packed rows; f32 as the reference
        nib = nib.astype(jnp.float32).reshape(ng, bk2 // ng, bn)
        return (nib * scale[:, None, :] + mn[:, None, :]).reshape(bk2, bn).astype(x_lo.dtype)

    return _dot(x_lo, deq(low)) + _dot(x_hi, deq(high))


# --------------------------------------------------------------------------------------------
# Tuning table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatmulBlocks:
    bm: int
    bn: int
    bk: int  # K rows per step (packed rows for int4)


def _largest_divisor(n: int, options) -> int | None:
    return next((o for o in options if n % o == 0), None)


def gpu_blocks(M: int, N: int, K: int) -> MatmulBlocks | None:
    """Triton: power-of-two tiles that divide N and K (weights are never padded per call);
    bm >= 16 (dot minimum), x rows are padded instead. None -> use the reference."""
    bn = _largest_divisor(N, (128, 64, 32, 16))
    bk = _largest_divisor(K, (128, 64, 32, 16))
    if bn is None or bk is None:
        return None
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    return MatmulBlocks(bm=bm, bn=bn, bk=bk)


def tpu_blocks(M: int, N: int, K: int, k_align: int = 128) -> MatmulBlocks:
    """Mosaic: bn a multiple of 128 dividing N (else all of N), bk likewise for K (multiple of
    k_align, which int4 raises so that a scale tile keeps >= 8 rows), bm a multiple of 8."""
    bn = _largest_divisor(N, (512, 256, 128)) or N
    bk = next((o for o in (512, 256, 128) if K % o == 0 and o % k_align == 0), K)
    bm = min(256, 8 * pl.cdiv(M, 8))
    return MatmulBlocks(bm=bm, bn=bn, bk=bk)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
# kind: "int8" (x float, w int8, epilogue * w_scale), "int8g" (x float, w int8, group scales
# applied per tile before the dot), "w8a8" (x int8, int32 accumulate, epilogue * x_scale *
# w_scale), "int4" (x split in halves, packed w, group scales/mins).


def _gpu_kernel(*refs, kind: str, bk: int, K: int):
    # Blocks: x [bm, K] (int4: x_lo, x_hi [bm, K/2]), w [K, bn] (int4: packed [K/2, bn],
    # scale/min [K/g, bn]), epilogue scales, out [bm, bn]. K is looped inside the program.
    o_ref = refs[-1]
    bm, bn = o_ref.shape
    if kind == "int4":
        xlo_ref, xhi_ref, w_ref, s_ref, m_ref, _ = refs
        rows_per_group = w_ref.shape[0] // s_ref.shape[0]

        def body(i, acc):
            k = pl.ds(i * bk, bk)
            g = pl.ds(i * (bk // rows_per_group), bk // rows_per_group)
            return acc + _int4_tile(xlo_ref[:, k], xhi_ref[:, k], w_ref[k, :], s_ref[g, :],
                                    m_ref[g, :])

        acc = jax.lax.fori_loop(0, K // bk, body, jnp.zeros((bm, bn), jnp.float32))
    elif kind == "int8g":
        x_ref, w_ref, s_ref, _ = refs
        rows_per_group = w_ref.shape[0] // s_ref.shape[0]

        def body(i, acc):
            k = pl.ds(i * bk, bk)
            g = pl.ds(i * (bk // rows_per_group), bk // rows_per_group)
            return acc + _int8_group_tile(x_ref[:, k], w_ref[k, :], s_ref[g, :])

        acc = jax.lax.fori_loop(0, K // bk, body, jnp.zeros((bm, bn), jnp.float32))
    else:
        x_ref, w_ref, ws_ref = refs[:3]
        acc_dtype = jnp.int32 if kind == "w8a8" else jnp.float32

        def body(i, acc):
            k = pl.ds(i * bk, bk)
            x, w = x_ref[:, k], w_ref[k, :]
            return acc + _dot(x, w if kind == "w8a8" else w.astype(x.dtype), acc_dtype)

        acc = jax.lax.fori_loop(0, K // bk, body, jnp.zeros((bm, bn), acc_dtype))
        acc = acc.astype(jnp.float32) * ws_ref[...]
        if kind == "w8a8":
            acc = acc * refs[3][...]
    o_ref[...] = acc.astype(o_ref.dtype)


def _tpu_kernel(*refs, kind: str):
    # Same blocks as the GPU kernel but one K tile per grid step; acc [bm, bn] in VMEM scratch.
    o_ref, acc_ref = refs[-2], refs[-1]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    if kind == "int4":
        xlo_ref, xhi_ref, w_ref, s_ref, m_ref = refs[:5]
        acc_ref[...] += _int4_tile(xlo_ref[...], xhi_ref[...], w_ref[...], s_ref[...],
                                   m_ref[...])
    elif kind == "int8g":
        acc_ref[...] += _int8_group_tile(refs[0][...], refs[1][...], refs[2][...])
    else:
        x, w = refs[0][...], refs[1][...]
        if kind == "w8a8":
            acc_ref[...] += _dot(x, w, jnp.int32)
        else:
            acc_ref[...] += _dot(x, w.astype(x.dtype))

    @pl.when(k == pl.num_programs(2) - 1)
    def _done():
        acc = acc_ref[...]
        if kind not in ("int4", "int8g"):
            acc = acc.astype(jnp.float32) * refs[2][...]
            if kind == "w8a8":
                acc = acc * refs[3][...]
        o_ref[...] = acc.astype(o_ref.dtype)


def _run(kind, backend, x_args, w_args, out_dtype, M, N, K, interpret):
    """x_args: [M, *] arrays tiled by rows; w_args: [*, N] arrays tiled by columns.
    Epilogue row scales (w8a8 x_scale) come last in x_args as [M, 1]."""
    Kw = w_args[0].shape[0]  # rows of the weight operand (K, or K/2 packed)
    grouped = kind in ("int4", "int8g")
    rpg = Kw // w_args[1].shape[0] if grouped else 1  # weight rows per scale row
    if backend == "gpu":
        blk = gpu_blocks(M, N, Kw)
        if grouped:  # a K step covers whole groups
            blk = MatmulBlocks(blk.bm, blk.bn, max(blk.bk, rpg))
    else:
        blk = tpu_blocks(M, N, Kw, k_align=max(128, 8 * rpg))
    Mp = blk.bm * pl.cdiv(M, blk.bm)
    x_args = [jnp.pad(a, ((0, Mp - M), (0, 0))) for a in x_args]
    kk = blk.bk
    x_ops = [a for a in x_args if a.shape[1] != 1]
    x_row = [a for a in x_args if a.shape[1] == 1]  # w8a8 x_scale [Mp, 1]
    out_shape = jax.ShapeDtypeStruct((Mp, N), out_dtype)
    if backend == "gpu":
        grid = (Mp // blk.bm, N // blk.bn)
        in_specs = ([pl.BlockSpec((blk.bm, a.shape[1]), lambda i, j: (i, 0)) for a in x_ops]
                    + [pl.BlockSpec((a.shape[0], blk.bn), lambda i, j: (0, j)) for a in w_args]
                    + [pl.BlockSpec((blk.bm, 1), lambda i, j: (i, 0)) for a in x_row])
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, kind=kind, bk=kk, K=Kw),
            grid=grid, in_specs=in_specs,
            out_specs=pl.BlockSpec((blk.bm, blk.bn), lambda i, j: (i, j)),
            out_shape=out_shape,
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
            interpret=interpret, name=f"jaxserve_{kind}_matmul_gpu",
        )(*x_ops, *w_args, *x_row)
    else:
        nk = Kw // kk

        def w_spec(a):
            if a.shape[0] == 1:  # per-channel scale [1, N]
                return pl.BlockSpec((1, blk.bn), lambda i, j, k: (0, j))
            rows = kk * a.shape[0] // Kw  # group scale/min tiles shrink with the group size
            return pl.BlockSpec((rows, blk.bn), lambda i, j, k: (k, j))

        in_specs = ([pl.BlockSpec((blk.bm, kk), lambda i, j, k: (i, k)) for _ in x_ops]
                    + [w_spec(a) for a in w_args]
                    + [pl.BlockSpec((blk.bm, 1), lambda i, j, k: (i, 0)) for _ in x_row])
        out = pl.pallas_call(
            functools.partial(_tpu_kernel, kind=kind),
            grid=(Mp // blk.bm, N // blk.bn, nk), in_specs=in_specs,
            out_specs=pl.BlockSpec((blk.bm, blk.bn), lambda i, j, k: (i, j)),
            out_shape=out_shape,
            scratch_shapes=[pltpu.VMEM((blk.bm, blk.bn),
                                       jnp.int32 if kind == "w8a8" else jnp.float32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=pltpu.InterpretParams() if interpret else False,
            name=f"jaxserve_{kind}_matmul_tpu",
        )(*x_ops, *w_args, *x_row)
    return out[:M]


def _resolve(impl, N, K) -> str:
    _check_impl(impl)
    if impl == "auto":
        backend = jax.default_backend()
        impl = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(backend, "xla")
        if impl == "gpu" and gpu_blocks(16, N, K) is None:
            return "reference"  # shapes the Triton tiles cannot cover: XLA's dot instead
    if impl == "gpu" and gpu_blocks(16, N, K) is None:
        raise ValueError(f"gpu quant matmul needs N={N} and K={K} divisible by 16")
    return impl


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def int8_matmul(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, impl: str = "auto",
                interpret: bool = False) -> jax.Array:
    """x [M, K] @ int8 w_q [K, N] * w_scale -> [M, N] in x.dtype. w_scale [N] (or [1, N]): per
    channel. w_scale [G, N] with G > 1: group-wise, g = K/G rows per scale; the Pallas kernels
    take g in GROUP_SIZES, other group sizes (GGUF files may have them) the reference."""
    _check_impl(impl)
    G = _check_int8(x, w_q, w_scale, grouped=True)
    K, N = w_q.shape
    impl = _resolve(impl, N, K)
    if impl == "xla":
        return int8_matmul_xla(x, w_q, w_scale)
    if impl == "reference" or (G > 1 and K // G not in GROUP_SIZES):
        return int8_matmul_reference(x, w_q, w_scale)
    if G > 1:
        return _run("int8g", impl, [x], [w_q, w_scale], x.dtype, x.shape[0], N, K, interpret)
    return _run("int8", impl, [x], [w_q, w_scale.reshape(1, N)], x.dtype, x.shape[0], N, K,
                interpret)


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def int4_matmul(x: jax.Array, w_packed: jax.Array, scales: jax.Array, mins: jax.Array, *,
                impl: str = "auto", interpret: bool = False) -> jax.Array:
    """x [M, K] @ int4 (w_packed [K/2, N], scales/mins [K/g, N]) -> [M, N] in x.dtype."""
    g = _check_int4(x, w_packed, scales, mins)
    K, N = 2 * w_packed.shape[0], w_packed.shape[1]
    impl = _resolve(impl, N, K // 2)
    if impl == "xla":
        return int4_matmul_xla(x, w_packed, scales, mins)
    if impl == "reference":
        return int4_matmul_reference(x, w_packed, scales, mins)
    x_lo, x_hi = _split_halves(x, g)
    return _run("int4", impl, [x_lo, x_hi], [w_packed, scales, mins], x.dtype, x.shape[0], N,
                K, interpret)


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def w8a8_matmul(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, impl: str = "auto",
                interpret: bool = False) -> jax.Array:
    """Quantises x [M, K] per token, int8 x int8 [K, N] -> int32, rescales -> [M, N] x.dtype."""
    _check_int8(x, w_q, w_scale)
    K, N = w_q.shape
    impl = _resolve(impl, N, K)
    if impl == "xla":
        return w8a8_matmul_xla(x, w_q, w_scale)
    if impl == "reference":
        return w8a8_matmul_reference(x, w_q, w_scale)
    x_q, x_scale = quantize_activations_int8(x)
    return _run("w8a8", impl, [x_q, x_scale[:, None]], [w_q, w_scale.reshape(1, N)], x.dtype,
                x.shape[0], N, K, interpret)
