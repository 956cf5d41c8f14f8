"""Weight quantisation as a transformation of the params pytree, and the one matmul the model
calls (`linear`), which dispatches on what a weight is.

A quantised weight is a small dict in place of the float array, in the x @ w orientation
[K, N] (heads flattened into N or K), stacked on a leading layers axis like everything else:

  {"int8": int8 [K, N],      "scale": f32 [G, N]}                    w = q * scale[k // (K/G)]
  {"w8a8": int8 [K, N],      "scale": f32 [1, N]}                    same, activations int8 too
  {"int4": int8 [K/2, N],    "scale": f32 [K/g, N], "min": f32 [K/g, N]}
                                                                     w = nibble * scale + min
  optional "in_scale": f32 [K] (AWQ): the layer computes (x / in_scale) @ w

G = 1 is per-output-channel int8 (mode "int8" without a group size); G = K/g is group-wise int8
(mode "int8" with quant_group_size g, or a GGUF Q8_0 tensor kept as its blocks, g = 32). The int4
packing (two nibbles per byte, split halves per group) is pallas_kernels.quant_matmul's, which
is also GGUF Q4_0/Q4_1's own nibble order, so GGUF blocks are kept without repacking (see
loading/gguf.py). The key names make the tree self-describing: an Orbax checkpoint of a
quantised tree restores to the same tree with no side metadata.

The tied embedding is quantised in the LM head's orientation ([D, V], one scale per vocabulary
row); `embed` gathers columns and dequantises only the looked-up tokens.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels import quant_matmul as qm

log = logging.getLogger(__name__)

KINDS = ("int8", "w8a8", "int4")
MODES = ("int8", "int4", "w8a8", "gguf")
# group_size None: int4 takes this; int8 is then per output channel (w8a8 always is).
DEFAULT_INT4_GROUP = 128
# Matmul weights, by name: how a float weight's trailing dims fold into [K, N].
_IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1,
            "lm_head": 1}
LAYER_MATMULS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
MATMUL_NAMES = (*LAYER_MATMULS, "lm_head", "embed")


def is_quantized(w: Any) -> bool:
    return isinstance(w, dict) and any(k in w for k in KINDS)


def kind(w: dict) -> str:
    return next(k for k in KINDS if k in w)


def matmul_shape(name: str, shape: tuple[int, ...], stacked: bool) -> tuple[int, int]:
    """(K, N) of a float weight of param_specs shape `shape` used as x @ w. embed [V, D] is
    used as the LM head, so it is (D, V)."""
    s = shape[1:] if stacked else shape
    if name == "embed":
        return s[1], s[0]
    k = _IN_DIMS[name]
    return int(np.prod(s[:k])), int(np.prod(s[k:]))


def to_matrix(name: str, w: jax.Array, stacked: bool) -> jax.Array:
    """A float weight as [.., K, N] (free reshapes; embed transposed)."""
    K, N = matmul_shape(name, w.shape, stacked)
    lead = w.shape[:1] if stacked else ()
    if name == "embed":
        return jnp.swapaxes(w, -1, -2)
    return w.reshape(*lead, K, N)


# ------------------------------------------------------------------------------------------
# The model's matmul
# ------------------------------------------------------------------------------------------


def linear(x: jax.Array, w: Any, kernels: str = "auto") -> jax.Array:
    """x [..., K] @ w -> [..., N] in x.dtype, for a float weight of any param_specs shape whose
    leading dims flatten to K (wq [D, H, Dh], wo [H, Dh, D], ...) or a quantised dict."""
    K = x.shape[-1]
    if not is_quantized(w):
        return jnp.einsum("...k,kn->...n", x, w.reshape(K, -1))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if "in_scale" in w:
        x2 = x2 / w["in_scale"].astype(x2.dtype)
    k = kind(w)
    if k == "int4":
        y = dispatch.quant_matmul(x2, w["int4"], w["scale"], w["min"], mode=kernels)
    else:
        scale = w["scale"][0] if w["scale"].shape[0] == 1 else w["scale"]
        y = dispatch.quant_matmul(x2, w[k], scale, w8a8=k == "w8a8", mode=kernels)
    return y.reshape(*lead, -1)


def dequantize(w: dict) -> jax.Array:
    """The f32 [K, N] matrix a quantised weight stands for (what `linear` multiplies by, up to
    the activation quantisation of w8a8). Tests and AWQ use it; the serving path never does."""
    k = kind(w)
    if k == "int4":
        out = qm.dequantize_int4(w["int4"], w["scale"], w["min"])
    else:
        q = w[k].astype(jnp.float32)
        g = q.shape[0] // w["scale"].shape[0]
        out = q * jnp.repeat(w["scale"], g, axis=0)
    if "in_scale" in w:
        out = out / w["in_scale"][:, None]
    return out


def embed(table: Any, tokens: jax.Array, dtype) -> jax.Array:
    """Embedding lookup: table [V, D] float, or a quantised [D, V] LM-head weight -> [..., D]."""
    if not is_quantized(table):
        return table[tokens]
    flat = tokens.reshape(-1)
    cols = {key: jnp.take(v, flat, axis=1) for key, v in table.items()}
    return dequantize(cols).T.astype(dtype).reshape(*tokens.shape, -1)


# ------------------------------------------------------------------------------------------
# Quantising a params tree (round to nearest)
# ------------------------------------------------------------------------------------------


def quantize_matrix(w: jax.Array, kind_: str, group_size: int | None = None
                    ) -> dict[str, jax.Array]:
    """One float [K, N] matrix -> a quantised dict (round to nearest). group_size: int4's
    (None: DEFAULT_INT4_GROUP); int8's (None: per output channel); w8a8 takes none."""
    if kind_ not in KINDS:
        raise ValueError(f"unknown quantisation kind {kind_!r}; expected one of {KINDS}")
    K = w.shape[0]
    if kind_ == "int4" and group_size is None:
        group_size = DEFAULT_INT4_GROUP
    if kind_ == "w8a8" and group_size is not None:
        raise ValueError("w8a8 weights are per output channel; it takes no group size")
    if group_size is not None and K % group_size:
        raise ValueError(f"{kind_} group size {group_size} does not divide the input dimension "
                         f"{K}")
    if kind_ == "int4":
        p, s, m = qm.quantize_int4(w, group_size)
        return {"int4": p, "scale": s, "min": m}
    q, s = qm.quantize_int8(w, group_size)
    return {kind_: q, "scale": s if group_size is not None else s[None, :]}


_quantize_jit = jax.jit(quantize_matrix, static_argnames=("kind_", "group_size"))


def _quantize_named(name: str, w: Any, stacked: bool, kind_: str, group_size: int | None,
                    in_scale: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Quantise one param (stacked [L, ...] or not) to host numpy arrays, layer by layer so
    peak memory stays one layer's f32 matrix."""
    m = np.asarray(to_matrix(name, jnp.asarray(w, jnp.float32), stacked))
    mats = list(m) if stacked else [m]
    scales = list(in_scale) if stacked and in_scale is not None else [in_scale] * len(mats)
    outs = []
    for mat, s in zip(mats, scales, strict=True):
        if s is not None:
            mat = mat * s[:, None]
        q = jax.device_get(_quantize_jit(jnp.asarray(mat), kind_, group_size))
        if s is not None:
            q["in_scale"] = np.asarray(s, np.float32)
        outs.append(q)
    if not stacked:
        return outs[0]
    return {k: np.stack([o[k] for o in outs]) for k in outs[0]}


def fit_group(K: int, group_size: int, what: str = "weight", kind_: str = "int4") -> int:
    """The group size a weight with K inputs gets: `group_size` when it divides K, else the
    largest smaller one of qm.GROUP_SIZES that does (logged) — the way llama.cpp gives a
    tensor whose rows do not split into its type's blocks a finer type. No group size dividing
    K is an error."""
    if group_size not in qm.GROUP_SIZES:
        raise ValueError(f"{kind_} group size must be one of {qm.GROUP_SIZES}, got "
                         f"{group_size}")
    if K % group_size == 0:
        return group_size
    fits = [g for g in qm.GROUP_SIZES if g < group_size and K % g == 0]
    if not fits:
        raise ValueError(f"{kind_}: no group size in {qm.GROUP_SIZES} divides {what}'s input "
                         f"dimension {K}")
    log.info("%s: group size %d does not divide %s's input dimension %d; using %d",
             kind_, group_size, what, K, max(fits))
    return max(fits)


def int4_group(K: int, group_size: int, what: str = "weight") -> int:
    """fit_group for an int4 weight."""
    return fit_group(K, group_size, what, "int4")


def weight_group(mode: str, K: int, group_size: int | None, what: str = "weight"
                 ) -> int | None:
    """The group size a `mode` weight with K inputs is quantised with: int4 group_size (None:
    DEFAULT_INT4_GROUP) fitted to K; int8 None (per output channel) or group_size fitted to
    K; w8a8 None (a group size is an error)."""
    if mode == "w8a8":
        if group_size is not None:
            raise ValueError(f"w8a8 weights are per output channel; quant_group_size "
                             f"{group_size} does not apply (use int8 for group-wise weights)")
        return None
    if mode == "int4" and group_size is None:
        group_size = DEFAULT_INT4_GROUP
    return None if group_size is None else fit_group(K, group_size, what, mode)


def check_mode(mode: str | None, group_size: int | None, input_dims: dict[str, int]) -> None:
    """Typed errors before any work: unknown mode, a group size unknown, fitting no weight's
    input dimension (input_dims: weight name -> K), or given to w8a8."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES} or None, got {mode!r}")
    if mode in ("int8", "int4", "w8a8"):
        for name, K in input_dims.items():
            weight_group(mode, K, group_size, name)


def input_dims(params_or_specs: dict[str, Any]) -> dict[str, int]:
    """{layer matmul name: K} from a params tree or param_specs (anything with .shape)."""
    layers = params_or_specs["layers"]
    return {n: matmul_shape(n, tuple(layers[n].shape), True)[0] for n in LAYER_MATMULS}


def quantize_params(params: dict[str, Any], mode: str, group_size: int | None = None,
                    in_scales: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Round-to-nearest quantisation of every matmul weight of a float params tree.

    mode int8 (group_size None: per output channel; 32/64/128: group-wise, symmetric, GGUF
    Q8_0's scheme), w8a8 (per channel, no group size) or int4 (group-wise, group_size None:
    DEFAULT_INT4_GROUP). A group size that does not divide a weight's input dimension is
    fitted to it (`fit_group`). The embedding / LM head is int8 in every mode: per vocabulary
    row, or in int8 mode with the same groups as the layers (the way llama.cpp's Q4 files keep
    token_embd at Q8_0: at this model size a 4-bit vocabulary projection costs far more
    quality than the bytes it saves). in_scales (from AWQ, per layer-weight name, [L, K]) fold
    activation-aware scales into the weights. Norms and biases stay float. Weights already
    quantised are kept."""
    if mode not in ("int8", "int4", "w8a8"):
        raise ValueError(f"quantize_params mode must be int8, int4 or w8a8, got {mode!r}")
    in_scales = in_scales or {}
    out = dict(params)
    layers = dict(params["layers"])
    for name in LAYER_MATMULS:
        if not is_quantized(layers[name]):
            K = matmul_shape(name, layers[name].shape, True)[0]
            layers[name] = _quantize_named(name, layers[name], True, mode,
                                           weight_group(mode, K, group_size, name),
                                           in_scales.get(name))
    out["layers"] = layers
    head_kind = "w8a8" if mode == "w8a8" else "int8"
    for name in ("embed", "lm_head"):
        if name in params and not is_quantized(params[name]):
            K = matmul_shape(name, params[name].shape, False)[0]
            g = weight_group("int8", K, group_size, name) if mode == "int8" else None
            out[name] = _quantize_named(name, params[name], False, head_kind, g)
    return out


def group_size_of(w: dict) -> int | None:
    """A quantised weight's group size (input rows per scale row); None: per output channel."""
    k = kind(w)
    K = w[k].shape[-2] * (2 if k == "int4" else 1)
    G = w["scale"].shape[-2]
    return None if k != "int4" and G == 1 else K // G


def tree_mode(params: dict[str, Any]) -> str | None:
    """What a params tree's layer weights are: None (float), one of KINDS, or "mixed" (e.g.
    a GGUF file whose tensors are partly kept as blocks)."""
    kinds = {kind(w) for w in params["layers"].values() if is_quantized(w)}
    if not kinds:
        return None
    if len(kinds) > 1:
        return "mixed"
    return kinds.pop()
