"""Sampling: request parameters, the per-batch device tensors built from them, and the sampler.

Three layers, matching who calls what:

* ``SamplingParams`` — one request's knobs, validated on construction (host, plain Python).
* ``SamplingTensors.build`` — turns the running batch's params and token histories into padded
  per-row arrays plus a static, hashable ``SamplingFlags`` that says which features the batch
  needs (host, vectorised numpy; one device transfer).
* ``sample`` — traceable; the engine calls it inside its jitted step with the flags as a static
  argument, so a batch only pays for the features some row uses. ``probs`` gives the
  distribution it draws from (the target of speculative verification).

Randomness is per row and never depends on the batch: row ``b`` draws from
``fold_in(key(seed_b), step_b)`` where ``step_b`` is the number of tokens that row has generated.
A request therefore produces the same tokens alone or inside any batch, at any row.
``sample`` always uses these per-row seeds; requests without a seed must be given one by the
engine when they are created (``SamplingParams.with_default_seed``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxserve.engine.sampling_params import (  # noqa: F401  (re-exported)
    GREEDY_TEMPERATURE,
    MAX_LOGPROBS,
    MAX_SEED,
    SamplingParams,
)

# Candidates gathered with lax.top_k for top-p rows. On CPU a full sort of [32, 49152] costs
# ~0.3 s while top_k(256) costs ~6 ms. A top-p nucleus rarely holds more than 256 tokens; when
# one does, an exact bisection (32 masked sums over [B, V]) runs for that step only.
MIN_NUCLEUS_CANDIDATES = 256
# Above this top_k the candidate gather costs about as much as bisection; bisect instead.
MAX_CANDIDATES = 1024
# Vocab block for the two-level inverse-CDF draw; the draw does one pass over [B, V] and two
# cumsums of ~V/_BLOCK and _BLOCK entries instead of a cumsum (or Gumbel noise) over all of V.
_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class SamplingFlags:
    """Static description of what a batch needs; part of the jit cache key of the step.

    ``num_candidates`` is the static K of the top-k/top-p candidate gather (0 when neither is
    used; equal to the vocab size when some top_k is too large to gather and the exact
    bisection runs instead). ``max_logprobs`` is -1
    when no row asked for logprobs, 0 for sampled-token logprobs only, else the (bucketed)
    number of top alternatives returned for every row.
    """

    all_greedy: bool = True
    any_greedy: bool = True
    needs_penalties: bool = False
    needs_min_tokens: bool = False
    needs_top_k: bool = False
    needs_top_p: bool = False
    needs_min_p: bool = False
    num_candidates: int = 0
    max_logprobs: int = -1

    def __post_init__(self) -> None:
        if (self.needs_top_k or self.needs_top_p) != (self.num_candidates > 0):
            raise ValueError("SamplingFlags.num_candidates must be > 0 iff top-k/top-p is used")
        if not -1 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"SamplingFlags.max_logprobs out of range: {self.max_logprobs}")

    def tier(self, vocab_size: int) -> SamplingFlags:
        """The coarse flags the engine's compiled programs are keyed on: a superset of this
        batch's features from a fixed set of 24 (greedy or not x penalties x min_tokens x
        logprobs or not x, when sampling, 256 candidates or the exact bisection). Mixed traffic
        then cannot grow the set of compiled programs. `sample` gives the same tokens under a
        tier as under the exact flags (switched-on features are no-ops on rows that do not use
        them); the tier only costs the unused passes (a top_k(256) and an exp over [B, V]).
        Penalty and min_tokens stay exact: turning them on would ship [B, V] arrays."""
        logprobs = -1 if self.max_logprobs < 0 else MAX_LOGPROBS
        if self.all_greedy:
            return SamplingFlags(needs_penalties=self.needs_penalties,
                                 needs_min_tokens=self.needs_min_tokens, max_logprobs=logprobs)
        fits = 0 < self.num_candidates <= MIN_NUCLEUS_CANDIDATES
        return SamplingFlags(
            all_greedy=False, any_greedy=True, needs_penalties=self.needs_penalties,
            needs_min_tokens=self.needs_min_tokens, needs_top_k=True, needs_top_p=True,
            needs_min_p=True, max_logprobs=logprobs,
            num_candidates=min(MIN_NUCLEUS_CANDIDATES, vocab_size) if fits or
            not self.num_candidates else vocab_size)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _bincount_rows(
    rows: Sequence[Sequence[int]], which: np.ndarray, num_rows: int, vocab_size: int
) -> np.ndarray:
    """Per-row token counts [num_rows, V] int32 for the rows flagged in ``which``."""
    ids = [np.asarray(rows[i], dtype=np.int64).reshape(-1) for i in np.flatnonzero(which)]
    counts = np.zeros((num_rows, vocab_size), np.int32)
    if not ids:
        return counts
    lengths = np.array([len(x) for x in ids])
    flat_ids = np.concatenate(ids)
    if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() >= vocab_size):
        raise ValueError(f"token id outside [0, {vocab_size}) in sampling history")
    row_of = np.repeat(np.flatnonzero(which), lengths)
    flat = np.bincount(row_of * vocab_size + flat_ids, minlength=num_rows * vocab_size)
    counts[:] = flat.reshape(num_rows, vocab_size)
    return counts


@struct.dataclass
class SamplingTensors:
    """Per-row sampling state for one padded batch of B rows (device arrays).

    Padding rows are inert: greedy, no truncation, no penalties. The ``[B, V]`` arrays are
    present only when ``flags.needs_penalties``; ``banned_ids`` only when
    ``flags.needs_min_tokens``.
    """

    greedy: jax.Array  # [B] bool
    temperature: jax.Array  # [B] f32; 1.0 on greedy rows so the division stays finite
    top_k: jax.Array  # [B] int32; V when off
    top_p: jax.Array  # [B] f32
    min_p: jax.Array  # [B] f32
    repetition_penalty: jax.Array  # [B] f32
    presence_penalty: jax.Array  # [B] f32
    frequency_penalty: jax.Array  # [B] f32
    seed: jax.Array  # [B, 2] uint32: (high, low) 32-bit words = threefry key data of the seed
    step: jax.Array  # [B] int32: tokens generated so far (folded into the row's key)
    min_tokens: jax.Array  # [B] int32: banned_ids apply while step < min_tokens
    output_counts: jax.Array | None = None  # [B, V] int32
    prompt_mask: jax.Array | None = None  # [B, V] bool
    banned_ids: jax.Array | None = None  # [B, S] int32; -1 = none. Stop ids under min_tokens.

    @classmethod
    def build(
        cls,
        params_list: Sequence[SamplingParams],
        prompt_ids_list: Sequence[Sequence[int]],
        output_ids_list: Sequence[Sequence[int]],
        vocab_size: int,
        pad_to: int | None = None,
        *,
        seeds: Sequence[int | None] | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> tuple[SamplingTensors, SamplingFlags]:
        """Host-side: tensors for rows ``0..n-1`` (n = len(params_list)) padded to ``pad_to``
        rows, plus the static flags. ``eos_token_ids`` are banned (with each row's
        ``stop_token_ids``) on rows that have not yet produced ``min_tokens`` tokens.
        ``seeds[i]``, when given and not None, overrides ``params_list[i].seed`` (for engines
        that keep the assigned seed on the sequence); every non-greedy row needs one.
        The row's step is ``len(output_ids_list[i])``.
        """
        n = len(params_list)
        num_rows = n if pad_to is None else pad_to
        if (
            num_rows < n
            or len(prompt_ids_list) != n
            or len(output_ids_list) != n
            or (seeds is not None and len(seeds) != n)
        ):
            raise ValueError(
                f"SamplingTensors.build: {n} params, {len(prompt_ids_list)} prompts, "
                f"{len(output_ids_list)} outputs, pad_to={pad_to}"
            )
        greedy = np.ones(num_rows, bool)
        temperature = np.ones(num_rows, np.float32)
        top_k = np.full(num_rows, vocab_size, np.int32)
        top_p = np.ones(num_rows, np.float32)
        min_p = np.zeros(num_rows, np.float32)
        repetition = np.ones(num_rows, np.float32)
        presence = np.zeros(num_rows, np.float32)
        frequency = np.zeros(num_rows, np.float32)
        seed = np.zeros((num_rows, 2), np.uint32)
        step = np.zeros(num_rows, np.int32)
        min_tokens = np.zeros(num_rows, np.int32)
        penalised = np.zeros(num_rows, bool)
        banned: list[tuple[int, ...]] = []
        max_logprobs = -1
        for i, p in enumerate(params_list):
            num_output = len(output_ids_list[i])
            step[i] = num_output
            min_tokens[i] = p.min_tokens
            if p.logprobs is not None:
                max_logprobs = max(max_logprobs, p.logprobs)
            if num_output < p.min_tokens:
                stops = p.stop_token_ids + (() if p.ignore_eos else tuple(eos_token_ids))
                if stops:
                    banned.append((i, *stops))
            if p.uses_penalties:
                penalised[i] = True
                repetition[i] = p.repetition_penalty
                presence[i] = p.presence_penalty
                frequency[i] = p.frequency_penalty
            if p.is_greedy:
                continue
            row_seed = p.seed if seeds is None or seeds[i] is None else int(seeds[i])
            if row_seed is None:
                raise ValueError(
                    f"row {i} samples but has no seed; assign one when the request is created "
                    "(SamplingParams.with_default_seed)"
                )
            greedy[i] = False
            temperature[i] = p.temperature
            if 0 < p.top_k < vocab_size:
                top_k[i] = p.top_k
            top_p[i] = p.top_p
            min_p[i] = p.min_p
            seed[i] = (row_seed >> 32, row_seed & 0xFFFFFFFF)

        sampled = ~greedy
        needs_top_k = bool(np.any(top_k < vocab_size))
        needs_top_p = bool(np.any(top_p < 1.0))
        num_candidates = 0
        if needs_top_k or needs_top_p:
            max_k = int(top_k[top_k < vocab_size].max()) if needs_top_k else 1
            # Rows with top-p but no top-k need a nucleus-sized gather (with a bisection fallback).
            nucleus_unbounded = bool(np.any((top_p < 1.0) & (top_k >= vocab_size)))
            num_candidates = max(
                _pow2_at_least(max(max_k, 16)),
                MIN_NUCLEUS_CANDIDATES if nucleus_unbounded else 0,
            )
            if num_candidates > MAX_CANDIDATES:
                num_candidates = vocab_size
            num_candidates = min(num_candidates, vocab_size)
        flags = SamplingFlags(
            all_greedy=not sampled.any(),
            any_greedy=bool(greedy[:n].any()),
            needs_penalties=bool(penalised.any()),
            needs_min_tokens=bool(banned),
            needs_top_k=needs_top_k,
            needs_top_p=needs_top_p,
            needs_min_p=bool(np.any(min_p > 0)),
            num_candidates=num_candidates,
            max_logprobs=max_logprobs
            if max_logprobs <= 0
            else _bucket(max_logprobs, (1, 2, 4, 8, 16, MAX_LOGPROBS)),
        )

        output_counts = prompt_mask = banned_ids = None
        if flags.needs_penalties:
            output_counts = _bincount_rows(output_ids_list, penalised, num_rows, vocab_size)
            prompt_mask = _bincount_rows(prompt_ids_list, penalised, num_rows, vocab_size) > 0
        if banned:
            # Width bucketed to a power of two so the shape (and the compile) rarely changes.
            width = _pow2_at_least(max(len(b) - 1 for b in banned))
            banned_ids = np.full((num_rows, width), -1, np.int32)
            for row, *ids in banned:
                banned_ids[row, : len(ids)] = ids
        tensors = cls(
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
            seed=seed,
            step=step,
            min_tokens=min_tokens,
            output_counts=output_counts,
            prompt_mask=prompt_mask,
            banned_ids=banned_ids,
        )
        return jax.device_put(tensors), flags


@struct.dataclass
class SampleOutput:
    """Result of ``sample``. Log-probs are under the model's raw distribution
    (log_softmax of the unmodified logits), as vLLM reports by default."""

    tokens: jax.Array  # [B] int32
    logprobs: jax.Array | None = None  # [B] f32; None when flags.max_logprobs == -1
    top_ids: jax.Array | None = None  # [B, K] int32, K = flags.max_logprobs > 0
    top_logprobs: jax.Array | None = None  # [B, K] f32, descending


def apply_penalties(
    logits: jax.Array,  # [B, V] f32
    output_counts: jax.Array,  # [B, V] int32
    prompt_mask: jax.Array,  # [B, V] bool
    repetition_penalty: jax.Array,  # [B]
    presence_penalty: jax.Array,  # [B]
    frequency_penalty: jax.Array,  # [B]
) -> jax.Array:
    """Repetition (HF: positive logits divided, negative multiplied, on prompt + output
    tokens), then frequency and presence (OpenAI: subtracted, output tokens only). [B, V]"""
    seen = prompt_mask | (output_counts > 0)
    rep = repetition_penalty[:, None]
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalised, logits)
    counts = output_counts.astype(logits.dtype)
    logits = logits - frequency_penalty[:, None] * counts
    return logits - presence_penalty[:, None] * (counts > 0).astype(logits.dtype)


def _ban(logits: jax.Array, banned_ids: jax.Array) -> jax.Array:
    """Set logits[b, banned_ids[b, s]] = -inf; -1 entries are ignored. [B, V]"""
    rows = jnp.arange(logits.shape[0])[:, None]
    # -1 -> out-of-bounds index V, which mode="drop" skips.
    ids = jnp.where(banned_ids < 0, logits.shape[1], banned_ids)
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def _blocked(x: jax.Array, fill: float) -> jax.Array:
    """[B, V] -> [B, NB, _BLOCK], padding the vocab with ``fill``."""
    b, v = x.shape
    pad = -v % _BLOCK
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
    return x.reshape(b, (v + pad) // _BLOCK, _BLOCK)


def fast_argmax(x: jax.Array) -> jax.Array:
    """First index of the row maximum, [B, V] -> [B] int32.

    XLA:CPU's variadic-reduce argmax is ~20x slower than a max over [B, V]; taking the max per
    vocab block, the argmax over blocks, then the argmax inside the winning block gives the
    same index (first occurrence) for a fraction of the cost.
    """
    if x.shape[1] < 4 * _BLOCK:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    blocks = _blocked(x, -jnp.inf)  # [B, NB, BLOCK]
    block = jnp.argmax(blocks.max(-1), axis=-1)  # [B]
    inner = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    return (block * _BLOCK + jnp.argmax(inner, axis=-1)).astype(jnp.int32)


def _first_above(cum: jax.Array, r: jax.Array, weight: jax.Array) -> jax.Array:
    """Inverse CDF on a nondecreasing [B, N] cumsum: first index with cum > r, clipped to the
    last positive-weight index (float rounding can leave r >= cum[-1]). Zero-weight entries
    never win: their cum equals their predecessor's. [B] int32"""
    n = cum.shape[-1]
    idx = jnp.sum(cum <= r[:, None], axis=-1, dtype=jnp.int32)
    last = jnp.max(jnp.where(weight > 0, jnp.arange(n, dtype=jnp.int32), 0), axis=-1)
    return jnp.minimum(idx, last)


def _kept_weights(scaled: jax.Array, row_max: jax.Array, threshold: jax.Array) -> jax.Array:
    """Unnormalised softmax(scaled) restricted to scaled >= threshold. [B, V] f32; the row max
    always survives, so each row has mass >= 1."""
    return jnp.where(scaled >= threshold[:, None], jnp.exp(scaled - row_max[:, None]), 0.0)


def draw_weighted(weight: jax.Array, u: jax.Array) -> jax.Array:
    """One token per row from unnormalised weights, by inverse CDF with one uniform per row.

    Two-level: pick a vocab block by its mass, then a token inside it. Zero-weight tokens are
    never drawn; every row needs positive mass. weight [B, V] >= 0, u [B] in [0, 1) -> [B] int32.
    """
    blocks = _blocked(weight, 0.0)  # [B, NB, BLOCK]
    block_mass = blocks.sum(-1)  # [B, NB]
    block_cum = jnp.cumsum(block_mass, axis=-1)  # [B, NB]
    r = u * block_cum[:, -1]
    block = _first_above(block_cum, r, block_mass)  # [B]
    before = jnp.where(
        block > 0, jnp.take_along_axis(block_cum, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0.0
    )
    inner = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    token = _first_above(jnp.cumsum(inner, axis=-1), r - before, inner)
    return block * _BLOCK + token


def _truncation_threshold(
    candidates: jax.Array,  # [B, K] scaled logits, descending
    top_k: jax.Array,  # [B] int32, V when off
    top_p: jax.Array,  # [B] f32
    full_lse: jax.Array,  # [B] logsumexp of all scaled logits
    vocab_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Lowest scaled logit kept by top-k then top-p (vLLM: the nucleus is taken on the
    distribution renormalised after top-k, and the top token always stays).

    Returns (threshold [B], -inf for rows that do not truncate; exact [B] bool, False where
    the nucleus may extend past the K candidates so the exact search is needed).
    """
    num = candidates.shape[-1]
    pos = jnp.arange(num, dtype=jnp.int32)
    in_k = pos[None, :] < top_k[:, None]  # [B, K]
    # After top-k the distribution is renormalised over the k kept tokens (all among the
    # candidates when k <= K); without top-k it is the full softmax.
    k_lse = jax.nn.logsumexp(jnp.where(in_k, candidates, -jnp.inf), axis=-1)
    lse = jnp.where(top_k < vocab_size, k_lse, full_lse)
    probs = jnp.where(in_k, jnp.exp(candidates - lse[:, None]), 0.0)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, K]
    keep = in_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    num_keep = jnp.sum(keep, axis=-1, dtype=jnp.int32)  # >= 1: position 0 has mass_before 0
    threshold = jnp.take_along_axis(candidates, (num_keep - 1)[:, None], axis=1)[:, 0]
    truncates = (top_k < vocab_size) | (top_p < 1.0)
    exact = (num_keep < num) | (top_k <= num) | ~truncates
    return jnp.where(truncates, threshold, -jnp.inf), exact


def _row_uniforms(seed: jax.Array, step: jax.Array) -> jax.Array:
    """One U[0, 1) per row from fold_in(key(seed), step). seed [B, 2] uint32, step [B]."""
    keys = jax.random.wrap_key_data(seed, impl="threefry2x32")  # [B]

    def one(key: jax.Array, s: jax.Array) -> jax.Array:
        return jax.random.uniform(jax.random.fold_in(key, s), (), jnp.float32)

    return jax.vmap(one)(keys, step)


def _penalised(raw: jax.Array, t: SamplingTensors, flags: SamplingFlags) -> jax.Array:
    x = raw
    if flags.needs_penalties:
        x = apply_penalties(
            x,
            t.output_counts,
            t.prompt_mask,
            t.repetition_penalty,
            t.presence_penalty,
            t.frequency_penalty,
        )
    if flags.needs_min_tokens:
        # Step-dependent so that programs sampling several steps (multi-step decode, speculative
        # verification) lift the ban at the right token.
        x = _ban(x, jnp.where((t.step < t.min_tokens)[:, None], t.banned_ids, -1))
    return x


def _truncated(
    x: jax.Array, t: SamplingTensors, flags: SamplingFlags
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Temperature, then the top-k/top-p/min-p cut as one threshold per row: tokens with
    scaled >= threshold stay. x [B, V] -> (scaled [B, V], row_max [B], threshold [B])."""
    scaled = x / t.temperature[:, None]
    row_max = scaled.max(axis=-1)
    threshold = jnp.full_like(row_max, -jnp.inf)
    if flags.num_candidates:
        threshold = _candidate_threshold(scaled, row_max, t, flags, x.shape[-1])
    if flags.needs_min_p:
        # min-p keeps p >= min_p * p_max, i.e. logit >= max + log(min_p): no softmax needed,
        # and the ratio does not change when top-k/top-p renormalise.
        threshold = jnp.maximum(threshold, row_max + jnp.log(t.min_p))
    return scaled, row_max, threshold


def sampleable_mask(logits: jax.Array, t: SamplingTensors, flags: SamplingFlags) -> jax.Array:
    """[B, V] bool: the tokens a non-greedy row can draw (after penalties, bans, temperature,
    top-k, top-p, min-p). The sampler never materialises this; it is for tests and debugging."""
    x = _penalised(logits.astype(jnp.float32), t, flags)
    scaled, _, threshold = _truncated(x, t, flags)
    return scaled >= threshold[:, None]


@partial(jax.named_call, name="sample")
def sample(logits: jax.Array, t: SamplingTensors, flags: SamplingFlags) -> SampleOutput:
    """Pick one token per row. Traceable; ``flags`` must be static under jit.

    logits [B, V] (any float dtype; computed in f32). Order: penalties -> (min_tokens bans)
    -> temperature -> top-k -> top-p -> min-p -> draw. Greedy rows take the argmax of the
    penalised logits. Every row draws with its own key, so results do not depend on the batch.
    """
    raw = logits.astype(jnp.float32)
    x = _penalised(raw, t, flags)
    if flags.all_greedy:
        tokens = fast_argmax(x)
    else:
        scaled, row_max, threshold = _truncated(x, t, flags)
        weight = _kept_weights(scaled, row_max, threshold)
        tokens = draw_weighted(weight, _row_uniforms(t.seed, t.step))
        if flags.any_greedy:
            tokens = jnp.where(t.greedy, fast_argmax(x), tokens)

    return report_logprobs(raw, tokens, flags)


def report_logprobs(logits: jax.Array, tokens: jax.Array, flags: SamplingFlags) -> SampleOutput:
    """SampleOutput for chosen tokens [B]: their log-probs and the top alternatives under the
    raw distribution (log_softmax of the unmodified logits [B, V]), as flags ask."""
    raw = logits.astype(jnp.float32)
    out = SampleOutput(tokens=tokens)
    if flags.max_logprobs >= 0:
        lse = jax.nn.logsumexp(raw, axis=-1)  # [B]
        chosen = jnp.take_along_axis(raw, tokens[:, None], axis=1)[:, 0] - lse
        out = out.replace(logprobs=chosen)
        if flags.max_logprobs > 0:
            top_vals, top_ids = jax.lax.top_k(raw, flags.max_logprobs)  # [B, K]
            out = out.replace(
                top_ids=top_ids.astype(jnp.int32), top_logprobs=top_vals - lse[:, None]
            )
    return out


def probs(logits: jax.Array, t: SamplingTensors, flags: SamplingFlags) -> jax.Array:
    """The distribution ``sample`` draws each row's token from, [B, V] logits -> [B, V] f32.

    Sampled rows: the normalised softmax of the scaled logits over the kept tokens (exactly 0
    elsewhere), from the same penalties, bans, temperature and truncation as ``sample``.
    Greedy rows (``t.greedy``, or every row under ``flags.all_greedy``) are one-hot at the
    argmax of the penalised logits. Traceable; ``flags`` must be static under jit. This is the
    target distribution speculative verification accepts drafts against.
    """
    x = _penalised(logits.astype(jnp.float32), t, flags)
    vocab = jnp.arange(x.shape[-1], dtype=jnp.int32)
    if flags.all_greedy:
        return (vocab == fast_argmax(x)[:, None]).astype(jnp.float32)
    weight = _kept_weights(*_truncated(x, t, flags))
    out = weight / weight.sum(axis=-1, keepdims=True)
    if flags.any_greedy:
        out = jnp.where(t.greedy[:, None], (vocab == fast_argmax(x)[:, None]), out)
    return out.astype(jnp.float32)


def _candidate_threshold(
    scaled: jax.Array,
    row_max: jax.Array,
    t: SamplingTensors,
    flags: SamplingFlags,
    vocab_size: int,
) -> jax.Array:
    """Top-k/top-p threshold [B] from the K = flags.num_candidates largest scaled logits,
    falling back to exact bisection on the (rare) steps where a nucleus outgrows K."""
    # Without top-p no row reads the full-vocab normaliser; skip that pass over [B, V].
    full_lse = row_max
    if flags.needs_top_p:
        full_lse = row_max + jnp.log(jnp.sum(jnp.exp(scaled - row_max[:, None]), axis=-1))
    if flags.num_candidates >= vocab_size:
        return _bisect_truncation(scaled, row_max, t.top_k, t.top_p, vocab_size, with_top_k=True)
    candidates = jax.lax.top_k(scaled, flags.num_candidates)[0]  # [B, K]
    threshold, exact = _truncation_threshold(candidates, t.top_k, t.top_p, full_lse, vocab_size)
    if not flags.needs_top_p:
        return threshold  # every top-k fits in K by construction

    def fallback(threshold: jax.Array) -> jax.Array:
        # Rows with top-k are exact here (k <= K); only top-p-only rows need the search.
        searched = _bisect_truncation(
            scaled, row_max, t.top_k, t.top_p, vocab_size, with_top_k=False
        )
        return jnp.where(exact, threshold, searched)

    return jax.lax.cond(jnp.all(exact), lambda th: th, fallback, threshold)


def _sortable(x: jax.Array) -> jax.Array:
    """f32 -> int32 with the same order (an involution on the bit patterns we use)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _unsortable(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _bisect_threshold(
    x: jax.Array, weight: jax.Array, target: jax.Array, row_max: jax.Array
) -> jax.Array:
    """Smallest float v with sum(weight[x > v]) < target, per row; keeping x >= v then keeps
    exactly the tokens a sort-and-cumsum would. Bisects the 2**32 ordered f32 bit patterns,
    so 32 masked-sum passes over [B, V] are exact — far cheaper than sorting on CPU.
    x, weight [B, V]; target, row_max [B] (target > 0) -> [B] f32.
    """
    lo = jnp.full(target.shape, _sortable(jnp.float32(-jnp.inf)), jnp.int32)  # mass >= target
    hi = _sortable(row_max)  # nothing above the max: mass 0 < target

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        mass = jnp.sum(jnp.where(x > _unsortable(mid)[:, None], weight, 0.0), axis=-1)
        below = mass < target
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return _unsortable(hi)


def _bisect_truncation(
    scaled: jax.Array,
    row_max: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    vocab_size: int,
    *,
    with_top_k: bool,
) -> jax.Array:
    """Exact top-k then top-p threshold [B] by bisection (no sort); -inf where a row keeps all."""
    k_threshold = jnp.full_like(row_max, -jnp.inf)
    if with_top_k:
        counts = jnp.ones_like(scaled)
        k_found = _bisect_threshold(scaled, counts, top_k.astype(jnp.float32), row_max)
        k_threshold = jnp.where(top_k < vocab_size, k_found, -jnp.inf)
    weight = jnp.where(
        scaled >= k_threshold[:, None], jnp.exp(scaled - row_max[:, None]), 0.0
    )  # [B, V]: the distribution after top-k, unnormalised
    p_found = _bisect_threshold(scaled, weight, top_p * weight.sum(-1), row_max)
    return jnp.maximum(k_threshold, jnp.where(top_p < 1.0, p_found, -jnp.inf))


def top_k_top_p_mask_reference(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Plain numpy reference of the top-k then top-p keep mask for one row [V] -> [V] bool."""
    v = logits.shape[-1]
    order = np.argsort(-logits, kind="stable")
    k = v if top_k <= 0 else min(top_k, v)
    kept = order[:k]
    probs = np.exp(logits[kept] - logits[kept].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    n = max(int(np.sum((before < top_p) | (top_p >= 1.0))), 1)
    threshold = logits[kept[n - 1]]
    return logits >= threshold
