"""N-gram proposer (prompt lookup): continue the sequence the way it continued the last time
its final n tokens appeared in its own history (prompt + output). Costs no model work, and on
input-grounded tasks (summarise, extract, edit a given text or code) the output often copies
long spans of the input.

The search runs on device over a per-step history buffer [N, H] (the last H tokens of each
sequence): for n from max_n down to min_n, the most recent earlier occurrence of the last n
tokens; the K tokens after it are the drafts. O(N * H * max_n^2) compares, no host search.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.speculative.proposer import DraftBatch, Proposer, register

# History window searched (tokens). Longer contexts search their last MAX_HISTORY tokens.
MAX_HISTORY = 4096
_MIN_HISTORY = 64


def history_width(n: int) -> int:
    """Bucketed window width for a longest history of n tokens (powers of two)."""
    return min(max(_MIN_HISTORY, 1 << max(n - 1, 0).bit_length()), MAX_HISTORY)


def ngram_propose(history: jax.Array, hist_len: jax.Array, num_spec: int, min_n: int,
                  max_n: int) -> jax.Array:
    """history [N, H] int32 (row i's tokens in [:hist_len[i]]), hist_len [N] ->
    drafts [N, num_spec] int32, -1 past what the match offers (or everywhere: no match)."""
    N, H = history.shape
    idx = jnp.arange(H, dtype=jnp.int32)
    padded = jnp.pad(history, ((0, 0), (0, max_n)), constant_values=-1)
    start = jnp.full((N,), -1, jnp.int32)  # index of the first proposed token
    for n in range(max_n, min_n - 1, -1):
        suffix = jnp.take_along_axis(
            history, jnp.clip(hist_len[:, None] - n + jnp.arange(n), 0, H - 1), axis=1)
        match = (idx[None, :] + n < hist_len[:, None]) & (hist_len[:, None] > n)
        for m in range(n):
            match &= padded[:, m : m + H] == suffix[:, m : m + 1]
        last = jnp.max(jnp.where(match, idx[None, :], -1), axis=1)  # most recent match
        start = jnp.where((start < 0) & (last >= 0), last + n, start)
    pos = start[:, None] + jnp.arange(num_spec, dtype=jnp.int32)  # [N, K]
    ok = (start[:, None] >= 0) & (pos < hist_len[:, None])
    return jnp.where(ok, jnp.take_along_axis(history, jnp.clip(pos, 0, H - 1), axis=1), -1)


def ngram_propose_reference(tokens: list[int], num_spec: int, min_n: int, max_n: int
                            ) -> list[int]:
    """Plain Python reference of `ngram_propose` for one sequence (tests)."""
    L = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if L <= n:
            continue
        suffix = tokens[L - n:]
        for i in range(L - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                out = tokens[i + n: i + n + num_spec]
                return out + [-1] * (num_spec - len(out))
    return [-1] * num_spec


@register("ngram")
@dataclasses.dataclass(frozen=True)
class NgramProposer(Proposer):
    min_n: int = 2
    max_n: int = 4

    def __post_init__(self):
        if not 1 <= self.min_n <= self.max_n <= 16:
            raise ValueError(f"ngram sizes must satisfy 1 <= min_n <= max_n <= 16, got "
                             f"{self.min_n}, {self.max_n}")

    def host_inputs(self, seqs: list, num_rows: int) -> dict[str, np.ndarray]:
        H = history_width(max(s.num_tokens for s in seqs))
        history = np.zeros((num_rows, H), np.int32)
        hist_len = np.zeros((num_rows,), np.int32)
        for i, s in enumerate(seqs):
            n = min(s.num_tokens, H)
            history[i, :n] = s.tokens(s.num_tokens - n, s.num_tokens)
            hist_len[i] = n
        return {"history": history, "hist_len": hist_len}

    def propose(self, params, state, inputs, batch: DraftBatch, num_spec: int,
                kernels: str, flags):
        if num_spec == 0:
            return jnp.zeros((batch.num_draft.shape[0], 0), jnp.int32), None, state
        drafts = ngram_propose(inputs["history"], inputs["hist_len"], num_spec, self.min_n,
                               self.max_n)
        return drafts, None, state
