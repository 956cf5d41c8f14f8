"""Activation-aware weight quantisation (AWQ-style per-input-channel scale search).

Round to nearest spends the same precision on every input channel, but a few channels carry
much larger activations and their weight errors dominate the output error. AWQ (Lin et al.,
2023) scales weight row k up by s_k before quantising and divides the activation by s_k at run
time, with s = mean|x|^alpha and alpha searched per matmul on calibration text to minimise the
output error ||X W - (X / s) Q(s W)||. alpha = 0 is plain round to nearest, so the search never
does worse than it on the calibration data.

Here the scale is kept as the weight's "in_scale" (model/quant.py) rather than folded into the
preceding norm or matmul: one mechanism for every matmul (including wo and w_down, whose inputs
have no foldable producer under GQA/SwiGLU), at the cost of one elementwise divide per matmul.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import ConfigError
from jaxserve.model import quant
from jaxserve.model.layers import rope_inv_freq
from jaxserve.model.llama import _block, dense_attention, unstack_layers

ALPHAS = tuple(np.linspace(0.0, 1.0, 11).round(2))
CALIBRATION_TOKENS = 512
MIN_CALIBRATION_TOKENS = 64


def calibration_tokens(tokenizer, text: str, n: int = CALIBRATION_TOKENS) -> list[int]:
    """The first n token ids of the calibration text (loading/corpus.py `calibration_text`:
    a file, or a slice of the Brown corpus no evaluation scores); fewer than
    MIN_CALIBRATION_TOKENS is a ConfigError. `tokenizer`: anything with `encode(str)`."""
    ids = tokenizer.encode(text)[:n]
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise ConfigError(f"quant_calibration: {len(ids)} tokens of text; AWQ needs >= "
                          f"{MIN_CALIBRATION_TOKENS}")
    return ids


@functools.partial(jax.jit, static_argnames=("cfg",))
def _layer_inputs(cfg: ModelConfig, lp, x):
    """One layer on the calibration batch: (output, {matmul name: its input [T, K]})."""
    T = x.shape[1]
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    taps: dict[str, jax.Array] = {}
    out, _ = _block(cfg, lp, x, positions, jnp.asarray(rope_inv_freq(cfg)),
                    dense_attention(cfg, T), taps=taps)
    return out, {k: v.reshape(T, -1) for k, v in taps.items()}


@functools.partial(jax.jit, static_argnames=("kind", "group_size"))
def search_scale(x: jax.Array, w: jax.Array, kind: str, group_size: int | None) -> jax.Array:
    """The in_scale [K] minimising ||x w - (x / s) Q(s w)||^2 over s = mean|x|^alpha.
    x [T, K] calibration inputs, w [K, N] float weight."""
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    mag = jnp.mean(jnp.abs(x), axis=0) + 1e-6
    y = x @ w

    def candidate(alpha):
        s = mag ** alpha
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))  # centre the scales around 1
        q = quant.quantize_matrix(w * s[:, None], kind, group_size)
        err = jnp.mean(((x / s) @ quant.dequantize(q) - y) ** 2)
        return err, s

    errs, scales = jax.lax.map(candidate, jnp.asarray(ALPHAS, jnp.float32))
    return scales[jnp.argmin(errs)]


def search_scales(params: dict[str, Any], cfg: ModelConfig, tokens: list[int], mode: str,
                  group_size: int | None = None) -> dict[str, np.ndarray]:
    """{layer matmul name: in_scale [L, K]} from calibration `tokens` run through the float
    model layer by layer (each layer's inputs are the float model's activations)."""
    kind = "int8" if mode == "w8a8" else mode
    layers = unstack_layers(jax.tree.map(jnp.asarray, params))["layers"]
    x = jnp.asarray(params["embed"])[jnp.asarray(tokens)][None]
    found: dict[str, list[np.ndarray]] = {name: [] for name in quant.LAYER_MATMULS}
    for lp in layers:
        x_next, inputs = _layer_inputs(cfg, lp, x)
        for name in quant.LAYER_MATMULS:
            w = quant.to_matrix(name, lp[name], stacked=False)
            g = quant.weight_group(mode, w.shape[0], group_size, name)
            found[name].append(np.asarray(search_scale(inputs[name], w, kind, g)))
        x = x_next
    return {name: np.stack(v) for name, v in found.items()}


def awq_quantize(params: dict[str, Any], cfg: ModelConfig, tokens: list[int], mode: str,
                 group_size: int | None = None) -> dict[str, Any]:
    """quant.quantize_params with AWQ in_scales searched on `tokens`."""
    scales = search_scales(params, cfg, tokens, mode, group_size)
    return quant.quantize_params(params, mode, group_size, in_scales=scales)
