"""The device side of the engine: the named jit entry points and the host code that packs a
batch of sequences into their padded, bucketed inputs.

Entry points (module level, so their compile caches are shared and countable):
  mixed_step    tokens [1, T]  -> sampled token per sequence: one flat ragged row holding N
                                 sequences' prompt chunks and decode tokens side by side,
                                 sampled at each sequence's last token in the row
  decode_step   tokens [B]     -> sampled token per row (steps of decode tokens only)
  multi_decode_step tokens [B] -> up to N tokens per row: N decode steps in one program
                                 (lax.while_loop), each row stopping on its own
  spec_step     tokens [1, T]  -> up to K+1 tokens per sequence: the fused speculative step
                                 (draft on device, target over every draft, verification),
                                 a mixed step for the sequences that do not speculate
  score_step    tokens [B, T]  -> log-prob of each given next token (teacher forcing)
  logprobs_step tokens [B, T]  -> full next-token log-prob rows [B, R, V] from a row offset
                                 (quality evaluation: KL divergence, top-1 agreement)
Each donates the KV cache, which is updated in place. B (or N), T and the page-table width W
are padded up to bucket sizes, and the sampling features are keyed by `SamplingFlags.tier` (a
fixed set), so a server compiles a bounded set of programs and then never again, whatever mix
of sampling parameters its traffic brings.

Multi-step decode: on GPU/TPU a decode step is a few milliseconds of device time and the host
round trip between steps (transfer the sampled tokens, run the scheduler, pack the next step,
dispatch) is a large share of it; running N steps in one program pays that once per N tokens.
Each row samples with its own per-step key and penalty counts updated on device, so the tokens
are those N single steps would give; a row stops writing K/V at its EOS / stop id / token limit,
and the host applies stop strings afterwards (cutting the emission there).

Why a flat row for steps with prompt tokens: padded [B, T] rows cost B * max(chunk) tokens of
matmul, so a 1-token decode beside a 512-token chunk would cost as much as another chunk. In
the flat row every real token costs one row of matmul whatever its sequence, and padding is only
up to the next token bucket. Decode-only steps keep the [B, 1] program: the same work, and on
GPU/TPU the paged decode kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxserve.config import EngineConfig, ModelConfig, bucket
from jaxserve.engine.sampling import (
    SampleOutput,
    SamplingFlags,
    SamplingTensors,
    probs,
    report_logprobs,
    sample,
)
from jaxserve.engine.scheduler import Schedule, StepOutput
from jaxserve.engine.sequence import Sequence
from jaxserve.model.attention import AttentionMetadata, KVCache, RaggedMetadata
from jaxserve.model.llama import forward, forward_hidden, lm_head, unstack_layers
from jaxserve.speculative.policy import draft_counts
from jaxserve.speculative.proposer import DraftBatch, Proposer
from jaxserve.speculative.rejection import rejection_sample, spec_uniforms
from jaxserve.speculative.verify import accept_matches, expand_for_verification

_STATIC = ("cfg", "flags", "kernels")

# Decode steps per program by backend (EngineConfig.num_decode_steps=None). CPU: measured with
# benchmarks/decode.py --decode_steps 1,4,8 (benchmarks/results/
# decode-cpu-2026-12-03-multistep.json, f32, batch 1/8/32): the host's work is 0.8-1.9% of a
# step's wall time at N=1, so no N can gain more than that, and tok/s at N=4 and N=8 was
# equal to N=1 within the shared VM's noise (0.87-1.19x). Neither 1 nor 8 being better, 4 is
# kept: it removes most of that host share while a request arriving during a program waits at
# most 4 steps for it. Accelerators: a step is short and host round trips dominate, so 8 (not
# measured yet: benchmarks/device_check.sh measures it on the first GPU lent).
DEFAULT_DECODE_STEPS = {"cpu": 4, "gpu": 8, "tpu": 8}
# Speculation policy's cost model (speculative/policy.py): the decodes of a step over T tokens
# cost step_overhead + T / cost_tokens one-token steps when they verify drafts, 1 + T /
# cost_tokens when plain. CPU (2-core EPYC, default model in f32), measured on the engine's own
# programs: a one-token decode step 33.3 ms; fused n-gram steps over 1 + K tokens (K = 1, 2, 4)
# 42.6 / 44.7 / 49.6 ms at batch 1, i.e. 1.28-1.49x (1.43-1.67x the ~30 ms a token of the
# 4-step decode program the plain path runs); at batch 16 a plain step 88.6 ms and a K = 4 step
# verifying 57 tokens 263 ms. Small rows ride almost free on the weight reads, large ones are
# compute (an LM-head and a sampled row per verified token, ~4 ms each), so no straight line
# fits both: cost_tokens 15 (a prompt step's slope, benchmarks/speculative.py step_costs) with
# overhead 1.35 fits batch 1 (1.48-1.68x) and rejects batch 16 at the acceptance seen there;
# cost_tokens 8 with 1.1 (the batch-16 slope) made batch 1 verify 2 drafts where 4 pay (1.07x
# vs 1.83x off on input-grounded requests). Accelerators: a decode step is bound by reading the
# weights until hundreds of tokens (not measured yet; 1.0 overhead).
DEFAULT_SPEC_COST_TOKENS = {"cpu": 15.0, "gpu": 512.0, "tpu": 512.0}
DEFAULT_SPEC_STEP_OVERHEAD = {"cpu": 1.35, "gpu": 1.0, "tpu": 1.0}
# Per-step token budget by backend (EngineConfig.max_num_batched_tokens=None). CPU: a step of
# 512 prompt tokens takes ~0.5 s on the 2-core EPYC (default model, f32: 0.54 s through the API),
# so a long prompt is prefilled in half-second chunks with decodes and new requests between
# them; at 4096 a 2,900-token prompt was one 14 s step and a short request behind it waited
# 16 s for its first token. Accelerators: steps of thousands of tokens still take tens of ms.
DEFAULT_TOKEN_BUDGET = {"cpu": 512, "gpu": 8192, "tpu": 8192}


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


@struct.dataclass
class StopTensors:
    """Per-row stop rules the device applies inside a multi-step decode (the host re-checks
    every rule, stop strings included, when it appends the tokens)."""

    stop_ids: jax.Array  # [B, S] int32: EOS (unless ignore_eos) and stop_token_ids; -1 = none
    max_new: jax.Array  # [B] int32: tokens the row may still emit this step (0: padding row)


@functools.partial(jax.jit, static_argnames=_STATIC + ("num_steps",),
                   donate_argnames=("cache",))
def multi_decode_step(params, cache: KVCache, tokens, meta: AttentionMetadata,
                      st: SamplingTensors, stop: StopTensors, *, cfg: ModelConfig,
                      flags: SamplingFlags, num_steps: int, kernels: str = "auto",
                      ) -> tuple[dict[str, jax.Array], KVCache]:
    """Up to num_steps decode steps for B rows. tokens [B]: each row's newest token, at
    meta.positions [B, 1]; the page tables cover every position the row may write. Returns
    StepOutput's fields: tokens [B, num_steps], num_tokens [B], and logprobs [B, num_steps],
    top_ids / top_logprobs [B, num_steps, L] as `sample` gives them per step."""
    B = tokens.shape[0]
    S = cache.page_size
    rows = jnp.arange(B)
    pos0, kv0 = meta.positions[:, 0], meta.kv_lens
    L = max(flags.max_logprobs, 0)
    counts0 = st.output_counts if flags.needs_penalties else jnp.zeros((B, 0), jnp.int32)

    def body(carry):
        i, tok, cache, counts, active, n_out, out = carry
        # A stopped row recomputes its first position into page 0: no write lands in its pages.
        pos = jnp.where(active, pos0 + i, pos0)
        slot = jnp.where(active, meta.page_tables[rows, pos // S] * S + pos % S, 0)
        m = AttentionMetadata(positions=pos[:, None], slot_mapping=slot[:, None],
                              page_tables=meta.page_tables,
                              kv_lens=jnp.where(active, pos + 1, kv0))
        logits, cache = forward(params, cfg, tok[:, None], cache, m, jnp.zeros_like(tok),
                                kernels=kernels)
        st_i = st.replace(step=st.step + i,
                          output_counts=counts if flags.needs_penalties else st.output_counts)
        s = sample(logits, st_i, flags)
        new = jnp.where(active, s.tokens, 0)
        out = dict(out, tokens=out["tokens"].at[:, i].set(new))
        if flags.max_logprobs >= 0:
            out["logprobs"] = out["logprobs"].at[:, i].set(s.logprobs)
        if L:
            out["top_ids"] = out["top_ids"].at[:, i].set(s.top_ids)
            out["top_logprobs"] = out["top_logprobs"].at[:, i].set(s.top_logprobs)
        if flags.needs_penalties:
            counts = counts.at[rows, new].add(active.astype(jnp.int32))
        n_out = n_out + active
        stops = jnp.any(new[:, None] == stop.stop_ids, axis=1) & \
            (st.step + i + 1 >= st.min_tokens)
        active = active & ~stops & (n_out < stop.max_new)
        return i + 1, new, cache, counts, active, n_out, out

    def cond(carry):
        return (carry[0] < num_steps) & jnp.any(carry[4])

    out = {"tokens": jnp.zeros((B, num_steps), jnp.int32)}
    if flags.max_logprobs >= 0:
        out["logprobs"] = jnp.zeros((B, num_steps), jnp.float32)
    if L:
        out["top_ids"] = jnp.zeros((B, num_steps, L), jnp.int32)
        out["top_logprobs"] = jnp.zeros((B, num_steps, L), jnp.float32)
    active = stop.max_new > 0
    carry = (jnp.int32(0), tokens, cache, counts0, active, jnp.zeros((B,), jnp.int32), out)
    _, _, cache, _, _, n_out, out = jax.lax.while_loop(cond, body, carry)
    return dict(out, num_tokens=n_out), cache


@functools.partial(jax.jit, static_argnames=_STATIC + ("proposer", "num_spec"),
                   donate_argnames=("cache", "spec_state"))
def spec_step(params, cache: KVCache, spec_params, spec_state, tokens, meta: RaggedMetadata,
              base_index, num_draft, spec_inputs, st: SamplingTensors, *, cfg: ModelConfig,
              flags: SamplingFlags, proposer: Proposer, num_spec: int, kernels: str = "auto",
              ) -> tuple[dict[str, jax.Array], KVCache, object]:
    """One fused speculative step over a flat ragged row (tokens [1, T], as mixed_step).
    Sequence i owns its pending tokens ending at flat index base_index[i] (a prompt chunk or its
    newest token) followed by num_draft[i] <= num_spec empty slots. In one program: the proposer
    drafts into those slots (advancing its own state), the target runs over the whole row
    (K/V written for every draft), and each sequence's positions base_index .. + num_draft are
    verified: deterministic drafts by sampling each position as plain decoding would and
    keeping the matching prefix (speculative/verify.py), drafts with their own q by rejection
    sampling against the sampler's exact distribution (speculative/rejection.py). Returns
    StepOutput's fields: tokens [N, num_spec + 1], num_tokens [N] (accepted drafts + 1),
    logprobs [N, num_spec + 1] and top_ids / top_logprobs [N, num_spec + 1, L] as `sample`
    gives them."""
    N, K = base_index.shape[0], num_spec
    T = tokens.shape[1]
    batch = DraftBatch(tokens=tokens, meta=meta, base_index=base_index, num_draft=num_draft,
                       st=st)
    drafts, draft_probs, spec_state = proposer.propose(spec_params, spec_state, spec_inputs,
                                                       batch, K, kernels, flags)
    j = jnp.arange(K, dtype=jnp.int32)
    wanted = j[None, :] < num_draft[:, None]
    drafts = jnp.where(wanted, drafts, -1)  # [N, K]
    # Drafts go into their slots (a missing draft as token 0: it can never be accepted, and
    # nothing after it is used); the other rows' slots stay out of bounds and are dropped.
    at = jnp.where(wanted, base_index[:, None] + 1 + j[None, :], T)
    tokens = tokens.at[0, at].set(jnp.maximum(drafts, 0), mode="drop")
    positions = base_index[:, None] + jnp.minimum(jnp.arange(K + 1), num_draft[:, None])
    if proposer.observes_hidden:
        hidden, cache = forward_hidden(params, cfg, tokens, cache, meta, kernels=kernels)
        logits = lm_head(cfg, params, hidden[0, positions.reshape(-1)][:, None],
                         kernels)[:, 0]  # [N * (K+1), V]
        spec_state = proposer.observe(spec_params, spec_state, hidden,
                                      batch.replace(tokens=tokens), kernels)
    else:
        logits, cache = forward(params, cfg, tokens, cache, meta, positions.reshape(-1),
                                kernels=kernels)  # [N * (K+1), V]
    st_v = expand_for_verification(st, drafts, flags)
    if proposer.deterministic or K == 0:
        s = sample(logits, st_v, flags)
        out = {"tokens": s.tokens.reshape(N, K + 1)}
        out["num_tokens"] = accept_matches(out["tokens"], drafts)
    else:
        p = probs(logits, st_v, flags).reshape(N, K + 1, -1)
        u_accept, u_draw = spec_uniforms(st.seed, st.step, K)
        tokens, num_tokens = rejection_sample(drafts, draft_probs, p, num_draft, u_accept,
                                              u_draw)
        out = {"tokens": tokens, "num_tokens": num_tokens}
        s = report_logprobs(logits, tokens.reshape(-1), flags)
    if s.logprobs is not None:
        out["logprobs"] = s.logprobs.reshape(N, K + 1)
    if s.top_ids is not None:
        out["top_ids"] = s.top_ids.reshape(N, K + 1, -1)
        out["top_logprobs"] = s.top_logprobs.reshape(N, K + 1, -1)
    return out, cache, spec_state


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
    return sum(f._cache_size() for f in (mixed_step, decode_step, multi_decode_step, spec_step,
                                         score_step, logprobs_step))


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
                 eos_token_ids: tuple[int, ...] = (), proposer: Proposer | None = None,
                 proposer_params=None):
        """proposer: the speculative drafting method (None: no speculation); proposer_params:
        its read-only weights (a draft model's params), if any."""
        self.cfg = cfg
        self.eos_token_ids = eos_token_ids  # banned while a row is under its min_tokens
        self.kernels = ecfg.kernels or "auto"
        if ecfg.max_num_batched_tokens is None:
            ecfg = dataclasses.replace(ecfg, max_num_batched_tokens=DEFAULT_TOKEN_BUDGET.get(
                jax.default_backend(), DEFAULT_TOKEN_BUDGET["cpu"]))
        self.ecfg = ecfg  # with the backend's defaults filled in
        self.num_decode_steps = ecfg.num_decode_steps or DEFAULT_DECODE_STEPS.get(
            jax.default_backend(), 1)
        self.params = unstack_layers(params) if ecfg.unroll_layers else params
        self.page_size = ecfg.page_size
        dtype = jnp.dtype(ecfg.dtype)
        self.cache = KVCache.create(cfg.num_layers, ecfg.num_pages, ecfg.page_size,
                                    cfg.num_kv_heads, cfg.head_dim, dtype, ecfg.kv_cache_dtype)
        self.proposer = proposer
        self.spec_params = self.spec_state = None
        self.spec_cost_tokens = ecfg.speculative_cost_tokens or DEFAULT_SPEC_COST_TOKENS.get(
            jax.default_backend(), DEFAULT_SPEC_COST_TOKENS["cpu"])
        self.spec_step_overhead = ecfg.speculative_step_overhead or \
            DEFAULT_SPEC_STEP_OVERHEAD.get(jax.default_backend(), 1.0)
        if proposer is not None:
            if proposer_params is not None and ecfg.unroll_layers and \
                    "layers" in proposer_params:  # a draft model's stacked layers
                proposer_params = unstack_layers(proposer_params)
            self.spec_params = proposer.bind_params(proposer_params, self.params)
            # A draft decode step relative to a target one (the policy's cost model).
            self.spec_draft_cost = proposer.draft_cost(proposer_params, self.params)
            self.spec_state = self._proposer_init()
            if proposer.stateful:  # its state must see every step: no multi-step decode
                self.num_decode_steps = 1
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
        if proposer is not None:  # the scheduler keeps drafts within the budget too
            cap = max(cap, ecfg.max_num_seqs * (1 + ecfg.num_speculative_tokens))
        self.token_buckets = tuple(b for b in ecfg.prefill_buckets if b < cap) + (cap,)
        # A speculative decode step computes B x (K + 1) tokens; padding them to a prefill
        # bucket (32 and up) would make the target verify up to 6x the tokens at batch 1 (on a
        # CPU a step's cost grows ~5% per token). So its row length is exact for every batch
        # bucket and draft count (compiled on first use), the prefill buckets above them.
        self.spec_token_buckets = self.token_buckets
        if proposer is not None:
            ks = (0,) + draft_counts(ecfg.num_speculative_tokens)
            exact = {b * (k + 1) for b in ecfg.batch_buckets for k in ks}
            self.spec_token_buckets = tuple(sorted({t for t in exact if t < cap}
                                                   | set(self.token_buckets)))

    def recover(self) -> bool:
        """After a step failed inside the compiled program, the donated cache may be gone:
        recreate it (empty) so later steps can run. True if it had to. The engine then
        recomputes the surviving sequences."""
        if not self.cache.k.is_deleted():
            return False
        self.cache = self.cache.empty_like()
        if self.proposer is not None:
            self.spec_state = self._proposer_init()
        return True

    def _proposer_init(self):
        e = self.ecfg
        return self.proposer.init_state(e.num_pages, e.page_size, jnp.dtype(e.dtype),
                                        e.kv_cache_dtype)

    def _chunks(self, seqs: list[Sequence], chunk_lens: list[int]):
        """Per sequence (page table, tokens, positions, cache slots, kv length after the step)
        of its next chunk_lens[i] tokens from num_computed, and the step's page-table width W."""
        S = self.page_size
        out = []
        for seq, n in zip(seqs, chunk_lens, strict=True):
            start = seq.num_computed
            bt = _page_table(seq, start + n, S)
            pos = np.arange(start, start + n, dtype=np.int32)
            toks = seq.tokens(start, start + n)
            if len(toks) < n:  # draft slots past the sequence's tokens (speculative step)
                toks = toks + [0] * (n - len(toks))
            out.append((bt, toks, pos, bt[pos // S] * S + pos % S, start + n))
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

    def run(self, sched: Schedule) -> StepOutput:
        """Write each scheduled sequence's tokens into the cache and sample after those whose
        chunk reaches their last token. Only decode tokens: the padded [B, 1] decode step (or N
        of them in one program when the schedule asks); any prompt chunk: one flat mixed step."""
        seqs, chunk_lens = sched.seqs, sched.num_tokens
        n = len(seqs)
        B = bucket(n, self.ecfg.batch_buckets)
        st, flags = SamplingTensors.build(
            [s.params for s in seqs], [s.prompt_ids for s in seqs], [s.output_ids for s in seqs],
            self.cfg.vocab_size, pad_to=B, seeds=[s.seed for s in seqs],
            eos_token_ids=self.eos_token_ids)
        flags = flags.tier(self.cfg.vocab_size)
        if self.proposer is not None and (sched.num_spec or self.proposer.stateful):
            return self._run_spec(sched, st, flags, B)
        if sched.num_steps > 1:
            # Each page table already holds the lookahead pages the scheduler reserved.
            tokens, meta = self._pack(seqs, chunk_lens, B, 1)
            out, self.cache = multi_decode_step(
                self.params, self.cache, tokens[:, 0], meta, st, self._stop_tensors(sched, B),
                cfg=self.cfg, flags=flags, num_steps=sched.num_steps, kernels=self.kernels)
            out = {k: np.asarray(v)[:n] for k, v in out.items()}
            return StepOutput(**out)
        if max(chunk_lens) == 1:
            tokens, meta = self._pack(seqs, chunk_lens, B, 1)
            out, self.cache = decode_step(self.params, self.cache, tokens[:, 0], meta, st,
                                          cfg=self.cfg, flags=flags, kernels=self.kernels)
        else:
            T = bucket(sum(chunk_lens), self.token_buckets)
            tokens, meta, logits_index = self._pack_flat(seqs, chunk_lens, B, T)
            out, self.cache = mixed_step(self.params, self.cache, tokens, meta, logits_index,
                                         st, cfg=self.cfg, flags=flags, kernels=self.kernels)
        host = {f: None if getattr(out, f) is None else np.asarray(getattr(out, f))[:n]
                for f in ("tokens", "logprobs", "top_ids", "top_logprobs")}
        return StepOutput.single(samples=sched.samples, **host)

    def _run_spec(self, sched: Schedule, st: SamplingTensors, flags: SamplingFlags,
                  B: int) -> StepOutput:
        """The fused speculative step: sequence i computes its num_tokens[i] tokens plus
        lookahead[i] drafts (0 for prompt chunks and sequences not speculating)."""
        seqs, n, K = sched.seqs, len(sched), sched.num_spec
        lens = [c + k for c, k in zip(sched.num_tokens, sched.lookahead, strict=True)]
        T = bucket(sum(lens), self.spec_token_buckets)
        tokens, meta, _ = self._pack_flat(seqs, lens, B, T)
        base_index = np.zeros((B,), np.int32)
        base_index[:n] = meta.cu_q_lens[:n] + np.asarray(sched.num_tokens) - 1
        num_draft = np.zeros((B,), np.int32)
        num_draft[:n] = sched.lookahead
        inputs = self.proposer.host_inputs(seqs, B) if K else {}
        out, self.cache, self.spec_state = spec_step(
            self.params, self.cache, self.spec_params, self.spec_state, tokens, meta, base_index,
            num_draft, inputs, st, cfg=self.cfg, flags=flags, proposer=self.proposer, num_spec=K,
            kernels=self.kernels)
        out = {k: np.asarray(v)[:n] for k, v in out.items()}
        out["num_tokens"] = np.where(sched.samples, out["num_tokens"], 0).astype(np.int32)
        return StepOutput(**out)

    def _stop_tensors(self, sched: Schedule, B: int) -> StopTensors:
        """The device's stop rules for a multi-step decode: stop ids and the token budget (the
        pages reserved: lookahead + 1) of each row."""
        ids = []
        for s in sched.seqs:
            p = s.params
            ids.append(tuple(p.stop_token_ids) + (() if p.ignore_eos else self.eos_token_ids))
        width = 1 << max(max(map(len, ids)) - 1, 1).bit_length()  # a power of two >= 2
        stop_ids = np.full((B, width), -1, np.int32)
        for i, row in enumerate(ids):
            stop_ids[i, : len(row)] = row
        max_new = np.zeros((B,), np.int32)
        max_new[: len(sched)] = [1 + k for k in sched.lookahead]
        return StopTensors(stop_ids=stop_ids, max_new=max_new)

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
