"""The device side of the engine: the named jit entry points and the host code that packs a
batch of sequences into their padded, bucketed inputs.

Entry points (module level, so their compile caches are shared and countable):
  mixed_step    tokens [1, T]  -> sampled token per sequence: one flat ragged row holding N
                                 sequences' prompt chunks and decode tokens side by side,
                                 sampled at each sequence's last token in the row
  decode_step   tokens [B]     -> sampled token per row (steps of decode tokens only)
  score_step    tokens [B, T]  -> log-prob of each given next token (teacher forcing)
  logprobs_step tokens [B, T]  -> full next-token log-prob rows [B, R, V] from a row offset
                                 (quality evaluation: KL divergence, top-1 agreement)
Each donates the KV cache, which is updated in place. B (or N), T and the page-table width W
are padded up to bucket sizes, so a server compiles a bounded set of programs and then never
again.

Why a flat row for steps with prompt tokens: padded [B, T] rows cost B * max(chunk) tokens of
matmul, so a 1-token decode beside a 512-token chunk would cost as much as another chunk. In
the flat row every real token costs one row of matmul whatever its sequence, and padding is only
up to the next token bucket. Decode-only steps keep the [B, 1] program: the same work, and on
GPU/TPU the paged decode kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import EngineConfig, ModelConfig, bucket
from jaxserve.engine.sampling import SampleOutput, SamplingTensors, sample
from jaxserve.engine.sequence import Sequence
from jaxserve.model.attention import AttentionMetadata, KVCache, RaggedMetadata
from jaxserve.model.llama import forward, unstack_layers

_STATIC = ("cfg", "flags", "kernels")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def mixed_step(params, cache: KVCache, tokens, meta: RaggedMetadata, logits_index,
               st: SamplingTensors, *, cfg: ModelConfig, flags, kernels: str = "auto",
               ) -> tuple[SampleOutput, KVCache]:
    """tokens [1, T] (flat ragged row), logits_index [N] (each sequence's last token in it)."""
    logits, cache = forward(params, cfg, tokens, cache, meta, logits_index, kernels=kernels)
    return sample(logits, st, flags), cache


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def decode_step(params, cache: KVCache, tokens, meta: AttentionMetadata, st: SamplingTensors, *,
                cfg: ModelConfig, flags, kernels: str = "auto") -> tuple[SampleOutput, KVCache]:
    """tokens [B]: one new token per sequence."""
    logits, cache = forward(params, cfg, tokens[:, None], cache, meta,
                            jnp.zeros(tokens.shape, jnp.int32), kernels=kernels)
    return sample(logits, st, flags), cache


@functools.partial(jax.jit, static_argnames=("cfg", "kernels"), donate_argnames=("cache",))
def score_step(params, cache: KVCache, tokens, meta: AttentionMetadata, targets, *,
               cfg: ModelConfig, kernels: str = "auto") -> tuple[jax.Array, KVCache]:
    """tokens, targets [B, T] -> [B, T] f32 log p(targets[b, t] | tokens[b, :t+1])."""
    logits, cache = forward(params, cfg, tokens, cache, meta, kernels=kernels)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "kernels", "rows"),
                   donate_argnames=("cache",))
def logprobs_step(params, cache: KVCache, tokens, meta: AttentionMetadata, row_offset, *,
                  cfg: ModelConfig, rows: int, kernels: str = "auto") -> tuple[jax.Array, KVCache]:
    """tokens [B, T], row_offset (int32 scalar) -> [B, rows, V] f32 log-softmax of the logits at
    positions row_offset .. row_offset+rows-1 (clamped into [0, T-rows] like any dynamic slice;
    the caller keeps the offset in range). Only those rows are normalised and returned, so the
    host transfers no padding or unwanted rows; `rows` is a bucket size, bounding compiles."""
    logits, cache = forward(params, cfg, tokens, cache, meta, kernels=kernels)
    logits = jax.lax.dynamic_slice_in_dim(logits, row_offset, rows, axis=1)
    return jax.nn.log_softmax(logits, axis=-1), cache


def compile_count() -> int:
    """Programs compiled so far by the entry points (for the no-recompilation test)."""
    return sum(f._cache_size() for f in (mixed_step, decode_step, score_step, logprobs_step))


def _page_table(seq: Sequence, num_tokens: int, page_size: int) -> np.ndarray:
    """seq.block_table, read once. The engine runs steps outside its lock, so an abort may
    empty the table while the step is being packed; the aborted sequence's writes then go to
    the padding page 0 (its output is discarded, and its freed pages are not handed out before
    the next step)."""
    bt = np.asarray(seq.block_table, np.int32)
    if len(bt) * page_size < num_tokens:
        return np.zeros(-(-num_tokens // page_size), np.int32)
    return bt


class ModelRunner:
    """Owns the device params and KV cache; runs one step for a list of sequences."""

    def __init__(self, cfg: ModelConfig, params, ecfg: EngineConfig,
                 eos_token_ids: tuple[int, ...] = ()):
        self.cfg = cfg
        self.eos_token_ids = eos_token_ids  # banned while a row is under its min_tokens
        self.kernels = ecfg.kernels or "auto"
        self.ecfg = ecfg
        self.params = unstack_layers(params) if ecfg.unroll_layers else params
        self.page_size = ecfg.page_size
        dtype = jnp.dtype(ecfg.dtype)
        self.cache = KVCache.create(cfg.num_layers, ecfg.num_pages, ecfg.page_size,
                                    cfg.num_kv_heads, cfg.head_dim, dtype, ecfg.kv_cache_dtype)
        # Page-table widths: powers of two from 16 pages up, so short contexts gather little
        # and long ones add only log2(max_pages) programs.
        max_pages = ecfg.max_pages_per_seq
        widths, w = [], min(16, max_pages)
        while w < max_pages:
            widths.append(w)
            w *= 2
        self.width_buckets = tuple(widths + [max_pages])
        self.prefill_buckets = tuple(b for b in ecfg.prefill_buckets if b < ecfg.max_model_len)
        self.prefill_buckets += (ecfg.max_model_len,)
        # Flat steps hold at most the token budget, or one decode per running sequence if that
        # is more (decodes are never held back by the budget).
        cap = max(ecfg.max_num_batched_tokens, ecfg.max_num_seqs)
        self.token_buckets = tuple(b for b in ecfg.prefill_buckets if b < cap) + (cap,)

    def recover(self) -> bool:
        """After a step failed inside the compiled program, the donated cache may be gone:
        recreate it (empty) so later steps can run. True if it had to. The engine then
        recomputes the surviving sequences."""
        if not self.cache.k.is_deleted():
            return False
        self.cache = self.cache.empty_like()
        return True

    def _chunks(self, seqs: list[Sequence], chunk_lens: list[int]):
        """Per sequence (page table, tokens, positions, cache slots, kv length after the step)
        of its next chunk_lens[i] tokens from num_computed, and the step's page-table width W."""
        S = self.page_size
        out = []
        for seq, n in zip(seqs, chunk_lens, strict=True):
            start = seq.num_computed
            bt = _page_table(seq, start + n, S)
            pos = np.arange(start, start + n, dtype=np.int32)
            out.append((bt, seq.tokens(start, start + n), pos, bt[pos // S] * S + pos % S,
                        start + n))
        return out, bucket(max(len(c[0]) for c in out), self.width_buckets)

    def _pack(self, seqs: list[Sequence], chunk_lens: list[int], B: int, T: int):
        """Host numpy arrays for rows seqs (each processing chunk_lens[i] tokens from its
        num_computed), padded to [B, T]."""
        chunks, W = self._chunks(seqs, chunk_lens)
        tokens = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        slots = np.zeros((B, T), np.int32)  # padding writes land in reserved page 0
        page_tables = np.zeros((B, W), np.int32)
        kv_lens = np.zeros((B,), np.int32)
        for i, (bt, toks, pos, slot, kv_len) in enumerate(chunks):
            n = len(pos)
            tokens[i, :n], positions[i, :n], slots[i, :n] = toks, pos, slot
            page_tables[i, : len(bt)] = bt
            kv_lens[i] = kv_len
        meta = AttentionMetadata(positions=positions, slot_mapping=slots,
                                 page_tables=page_tables, kv_lens=kv_lens)
        return tokens, meta

    def _pack_flat(self, seqs: list[Sequence], chunk_lens: list[int], N: int, T: int):
        """Host numpy arrays of a flat ragged step: chunk_lens[i] tokens of seqs[i] from its
        num_computed, side by side in one row padded to T tokens, sequences padded to N.
        Returns (tokens [1, T], RaggedMetadata, logits_index [N])."""
        chunks, W = self._chunks(seqs, chunk_lens)
        tokens = np.zeros((1, T), np.int32)
        positions = np.zeros((1, T), np.int32)
        slots = np.zeros((1, T), np.int32)  # padding writes land in reserved page 0
        page_tables = np.zeros((N, W), np.int32)
        kv_lens = np.zeros((N,), np.int32)
        cu_q_lens = np.zeros((N + 1,), np.int32)
        cu_q_lens[1 : len(seqs) + 1] = np.cumsum(chunk_lens)
        cu_q_lens[len(seqs) + 1 :] = cu_q_lens[len(seqs)]
        for i, (bt, toks, pos, slot, kv_len) in enumerate(chunks):
            lo, hi = cu_q_lens[i], cu_q_lens[i + 1]
            tokens[0, lo:hi], positions[0, lo:hi], slots[0, lo:hi] = toks, pos, slot
            page_tables[i, : len(bt)] = bt
            kv_lens[i] = kv_len
        logits_index = np.zeros((N,), np.int32)
        logits_index[: len(seqs)] = cu_q_lens[1 : len(seqs) + 1] - 1
        meta = RaggedMetadata(positions=positions, slot_mapping=slots, page_tables=page_tables,
                              kv_lens=kv_lens, cu_q_lens=cu_q_lens,
                              num_seqs=np.int32(len(seqs)))
        return tokens, meta, logits_index

    def run(self, seqs: list[Sequence], chunk_lens: list[int]) -> dict[str, np.ndarray]:
        """Write chunk_lens[i] tokens of seqs[i] into the cache and sample one token per
        sequence (meaningful for those whose chunk reaches their last token). Only decode
        tokens: the padded [B, 1] decode step; any prompt chunk: one flat mixed step. Returns
        host arrays of SampleOutput's fields, unpadded."""
        B = bucket(len(seqs), self.ecfg.batch_buckets)
        st, flags = SamplingTensors.build(
            [s.params for s in seqs], [s.prompt_ids for s in seqs], [s.output_ids for s in seqs],
            self.cfg.vocab_size, pad_to=B, seeds=[s.seed for s in seqs],
            eos_token_ids=self.eos_token_ids)
        if max(chunk_lens) == 1:
            tokens, meta = self._pack(seqs, chunk_lens, B, 1)
            out, self.cache = decode_step(self.params, self.cache, tokens[:, 0], meta, st,
                                          cfg=self.cfg, flags=flags, kernels=self.kernels)
        else:
            T = bucket(sum(chunk_lens), self.token_buckets)
            tokens, meta, logits_index = self._pack_flat(seqs, chunk_lens, B, T)
            out, self.cache = mixed_step(self.params, self.cache, tokens, meta, logits_index,
                                         st, cfg=self.cfg, flags=flags, kernels=self.kernels)
        n = len(seqs)
        fields = ("tokens", "logprobs", "top_ids", "top_logprobs")
        return {f: np.asarray(getattr(out, f))[:n] for f in fields
                if getattr(out, f) is not None}

    def score(self, seq: Sequence, targets: list[int], chunk: int) -> np.ndarray:
        """Teacher-forced log-probs of targets[i] after tokens[:i+1], written through the cache
        `chunk` tokens at a time. seq.block_table must cover all its tokens."""
        out = []
        total = seq.num_tokens
        while seq.num_computed < total:
            n = min(chunk, total - seq.num_computed)
            T = bucket(n, self.prefill_buckets)
            tokens, meta = self._pack([seq], [n], 1, T)
            tgt = np.zeros((1, T), np.int32)
            tgt[0, :n] = targets[seq.num_computed : seq.num_computed + n]
            lp, self.cache = score_step(self.params, self.cache, tokens, meta, tgt, cfg=self.cfg,
                                        kernels=self.kernels)
            out.append(np.asarray(lp)[0, :n])
            seq.num_computed += n
        return np.concatenate(out)

    def logprobs(self, seq: Sequence, chunk: int, start: int = 0) -> np.ndarray:
        """Like `score`, but the whole next-token distribution: row i is log p(. | tokens[:i+1])
        as f32 [V], for i = start .. num_tokens-1, i.e. [num_tokens - start, V]. The tokens go
        through the KV cache `chunk` at a time exactly as in `score`; chunks entirely before
        `start` are computed into the cache but nothing of theirs comes back to the host."""
        total = seq.num_tokens
        if not 0 <= start < total:
            raise ValueError(f"start {start} outside [0, {total})")
        out = []
        while seq.num_computed < total:
            begin = seq.num_computed
            n = min(chunk, total - begin)
            T = bucket(n, self.prefill_buckets)
            tokens, meta = self._pack([seq], [n], 1, T)
            lo = max(start - begin, 0)  # first wanted row of this chunk (n: none)
            lo = min(lo, n)
            R = bucket(max(n - lo, 1), self.prefill_buckets)  # <= T
            off = min(lo, T - R)  # dynamic_slice would clamp it anyway; do it explicitly
            lp, self.cache = logprobs_step(self.params, self.cache, tokens, meta, np.int32(off),
                                           cfg=self.cfg, rows=R, kernels=self.kernels)
            if lo < n:
                out.append(np.asarray(lp)[0, lo - off : n - off])
            seq.num_computed += n
        return np.concatenate(out)
