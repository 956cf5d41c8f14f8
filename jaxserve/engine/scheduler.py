"""Which sequences compute which tokens in the next step: the waiting and running queues, the
page allocator, and the two policies. Plain Python (no jax), so it is tested without a model.

`Scheduler.schedule()` returns a `Schedule`: per sequence the tokens to compute this step (a
prompt chunk, or one decode token), the lookahead tokens whose pages are reserved on top (for
steps that emit several tokens per sequence: multi-step decode, speculative verification), and
whether the step samples for it. The engine runs it and hands the result back through
`commit()`, which appends nothing itself but returns unused lookahead pages and offers full
pages of committed tokens to the prefix cache.

Policy "continuous" (the default): mixed steps under one token budget, decodes first.
  - Every step first gives each running sequence its decode token, then fills what is left of
    `max_num_batched_tokens` with prompt chunks of waiting sequences in (priority, arrival)
    order: lower priority value first, FCFS among equals. A prompt that does not fit is
    prefilled in chunks over several steps. Prompts are taken while there is budget, room (at
    most `max_num_seqs` running) and free pages for their chunk; the first that does not get
    pages ends the step (no overtaking), so a big request is not starved by small ones.
  - While other prompts wait behind it, a prompt's chunk takes at most
    `long_prefill_token_threshold` tokens (default: half the budget), so a short request
    arriving behind a long prompt is prefilled in the next step instead of after the long
    one's whole prefill; a prompt alone takes the whole budget.
  - The budget counts real tokens, one per decode included (the runner pads the flat row to a
    bucket outside the budget).
  - A new sequence first reuses the longest run of its full pages found in the prefix cache
    (never the page holding its last token: that token must be computed to get logits).
  - When a decode needs a page and none is free, the lowest-priority, newest running sequence is
    preempted by recompute (and that step takes no prompt chunks, as in vLLM, so the freed pages
    go to the decodes): its pages are released (they stay in the prefix cache until evicted, so
    the recompute is often mostly a cache hit) and it goes back to the queue in its original
    place. Recompute rather than swapping to host memory: on CPU and TPU hosts copying a
    sequence's K/V out and back costs about as much as recomputing a short prompt. Its sampling
    key depends only on (seed, tokens generated so far), so it later produces the same tokens.
  - Several tokens per step: when every scheduled sequence decodes and nothing waits, a step may
    run `num_decode_steps` decode steps in one program; its extra tokens' pages are reserved
    up front (lookahead), or the step stays single if the pool cannot spare them.

Policy "static": the benchmark baseline. A batch of up to `max_num_seqs` waiting requests is
formed when the previous batch has entirely finished; it is prefilled (prefill-only steps within
the token budget), then decoded until its last member finishes. Nothing joins mid-batch.

Rejected or never-computed tokens are never registered in the prefix cache: only pages full of
committed tokens (`seq.num_computed`) are offered, and `commit()` truncates each table to the
pages its committed tokens and next input need.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any

import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.engine.block_manager import BlockManager, hash_page
from jaxserve.engine.sequence import Sequence, SequenceStatus
from jaxserve.speculative.policy import SpecPolicy

POLICIES = ("continuous", "static")


@dataclasses.dataclass
class Schedule:
    """One step's work. Parallel lists, one entry per scheduled sequence, decodes first."""

    seqs: list[Sequence]
    num_tokens: list[int]  # tokens to compute (write into the cache) from seq.num_computed
    lookahead: list[int]  # extra tokens whose pages are reserved for this step's emissions
    samples: list[bool]  # the chunk reaches the sequence's last token: sample after it
    num_steps: int = 1  # decode steps run in one program (each sampling sequence)
    # Speculative step: the most drafts any sequence verifies (0: none). Then lookahead[i] is
    # the number of drafts sequence i verifies, and its pages are reserved for them.
    num_spec: int = 0
    num_preempted: int = 0  # sequences preempted while scheduling this step

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def is_decode(self) -> bool:
        """Only decode tokens (one per sequence)."""
        return all(s.status == SequenceStatus.RUNNING for s in self.seqs)

    @property
    def kind(self) -> str:
        """'decode', 'prefill' (prompt chunks only) or 'mixed'."""
        num_decodes = sum(s.status == SequenceStatus.RUNNING for s in self.seqs)
        if num_decodes == len(self.seqs):
            return "decode"
        return "prefill" if num_decodes == 0 else "mixed"


class Scheduler:
    def __init__(self, ecfg: EngineConfig, policy: str = "continuous",
                 enable_prefix_caching: bool = True):
        if policy not in POLICIES:
            raise ValueError(f"scheduler must be one of {POLICIES}, got {policy!r}")
        if ecfg.max_num_batched_tokens is None:
            raise ValueError("the scheduler needs a token budget: LLMEngine fills in the "
                             "backend's default for max_num_batched_tokens=None")
        self.ecfg = ecfg
        self.policy = policy
        self.block_manager = BlockManager(ecfg.num_pages, ecfg.page_size, enable_prefix_caching)
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        self.static_batch: set[int] = set()  # seq_ids of the batch in flight ("static")
        self.num_preemptions = 0

    # -- queues -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and release its pages (it is finished)."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq.block_table)
        self.static_batch.discard(seq.seq_id)

    def start_running(self, seq: Sequence) -> None:
        """Its prompt is fully computed: it decodes from now on."""
        if seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING

    def release(self, seq: Sequence) -> None:
        """Drop a sequence's pages and computed state; it stays or goes back in the queue."""
        self.block_manager.free(seq.block_table)
        seq.num_computed = 0
        seq.num_registered_pages = 0
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            seq.status = SequenceStatus.WAITING
            bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)
        self.num_preemptions += 1

    # -- prefix cache -----------------------------------------------------------------------

    def _hash_pages(self, seq: Sequence, num_pages: int) -> list[bytes]:
        S = self.block_manager.page_size
        while len(seq.block_hashes) < num_pages:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(hash_page(parent, seq.tokens(i * S, (i + 1) * S)))
        return seq.block_hashes[:num_pages]

    def _match_prefix(self, seq: Sequence) -> list[int]:
        bm = self.block_manager
        if not bm.enable_prefix_caching:
            return []
        # Never the page of the last token: it must be computed so the step yields logits.
        return bm.match_prefix(self._hash_pages(seq, (seq.num_tokens - 1) // bm.page_size))

    def commit(self, seq: Sequence) -> None:
        """After a step: `seq.num_computed` tokens are committed. Give back reserved pages past
        what its tokens need, and offer pages now full of committed K/V to the prefix cache."""
        bm = self.block_manager
        bm.truncate(seq.block_table, seq.num_tokens)
        num_full = seq.num_computed // bm.page_size
        if not bm.enable_prefix_caching or num_full <= seq.num_registered_pages:
            return
        hashes = self._hash_pages(seq, num_full)
        for i in range(seq.num_registered_pages, num_full):
            bm.register(seq.block_table[i], hashes[i])
        seq.num_registered_pages = num_full

    # -- scheduling -------------------------------------------------------------------------

    def schedule(self, num_steps: int = 1, spec: SpecPolicy | None = None) -> Schedule:
        """The next step, running decodes first; empty when nothing fits. `spec`: the decodes
        may verify drafts (the policy picks how many; their pages are reserved and they count
        against the token budget before prompt chunks). `num_steps` > 1 asks for a multi-step
        decode, granted only when no sequence speculates, every scheduled sequence decodes,
        nothing waits and the pool has pages for all of their lookahead."""
        budget = self.ecfg.max_num_batched_tokens
        preemptions = self.num_preemptions
        if self.policy == "static":
            if not self.running and not any(s.seq_id in self.static_batch for s in self.waiting):
                # The previous batch has finished: the next one is the head of the queue.
                self.static_batch = {s.seq_id for s in self.waiting[: self.ecfg.max_num_seqs]}
            sched = self._schedule_prefill(
                [s for s in self.waiting if s.seq_id in self.static_batch], budget)
            if not sched.seqs:
                sched = self._schedule_decode()
                if spec is not None:
                    self._plan_speculation(sched, spec, budget)
        else:
            sched = self._schedule_decode()
            prefill_ok = self.waiting and (self.num_preemptions == preemptions or not sched.seqs)
            if spec is not None and sched.seqs:
                self._plan_speculation(sched, spec, budget)
            if prefill_ok:
                used = len(sched) + sum(sched.lookahead)
                prefill = self._schedule_prefill(self.waiting, budget - used)
                for field in ("seqs", "num_tokens", "lookahead", "samples"):
                    getattr(sched, field).extend(getattr(prefill, field))
        sched.num_preempted = self.num_preemptions - preemptions
        if num_steps > 1 and sched.seqs and not sched.num_spec and not self.waiting and \
                sched.is_decode:
            self._reserve_lookahead(sched, num_steps)
        return sched

    def _plan_speculation(self, sched: Schedule, spec: SpecPolicy, budget: int) -> None:
        """Drafts for the scheduled decodes (sched holds only decodes here): the policy's
        choice, capped by each request's num_speculative_tokens, its room to max_len, the token
        budget and the free pages (a sequence whose pages cannot be had verifies none: drafts
        never preempt anyone)."""
        bm = self.block_manager
        idx, caps = [], []
        for i, s in enumerate(sched.seqs):
            want = s.params.num_speculative_tokens
            cap = min(spec.max_k if want is None else want, s.max_len - s.num_tokens - 1)
            if cap > 0:
                idx.append(i)
                caps.append(cap)
        K, ks = spec.choose([sched.seqs[i].spec_stats for i in idx], caps)
        if K == 0:
            return
        room = budget - len(sched)
        for i, k in zip(idx, ks, strict=True):
            seq = sched.seqs[i]
            k = min(k, room)
            if k and bm.pages_needed(seq.block_table, seq.num_tokens + k) > bm.num_free_pages:
                k = 0
            if k:
                bm.allocate(seq.block_table, seq.num_tokens + k)
                sched.lookahead[i] = k
                room -= k
        if any(sched.lookahead):
            sched.num_spec = K

    def _reserve_lookahead(self, sched: Schedule, num_steps: int) -> None:
        """Pages for up to num_steps tokens per sequence (never past its length limit), all
        or nothing: a multi-step decode is an optimisation, never a reason to preempt."""
        bm = self.block_manager
        lookahead = [min(num_steps, s.max_len - s.num_tokens) - 1 for s in sched.seqs]
        needed = sum(bm.pages_needed(s.block_table, s.num_tokens + n)
                     for s, n in zip(sched.seqs, lookahead, strict=True))
        if needed > bm.num_free_pages:
            return
        for s, n in zip(sched.seqs, lookahead, strict=True):
            bm.allocate(s.block_table, s.num_tokens + n)
        sched.lookahead = lookahead
        sched.num_steps = num_steps

    def _schedule_decode(self) -> Schedule:
        bm = self.block_manager
        for seq in list(self.running):
            if seq not in self.running:  # preempted below for an earlier sequence
                continue
            while not bm.can_allocate(seq.block_table, seq.num_tokens):
                victim = max(self.running, key=lambda s: s.sort_key)
                self.release(victim)
                if victim is seq:
                    break
            if seq in self.running:
                bm.allocate(seq.block_table, seq.num_tokens)
        n = len(self.running)
        return Schedule(list(self.running), [1] * n, [0] * n, [True] * n)

    def _schedule_prefill(self, candidates: list[Sequence], budget: int) -> Schedule:
        """Prompt chunks of `candidates`, in order, within `budget` tokens in all."""
        bm = self.block_manager
        sched = Schedule([], [], [], [])
        room = self.ecfg.max_num_seqs - len(self.running)
        long_cap = self.ecfg.long_prefill_token_threshold or max(
            self.ecfg.max_num_batched_tokens // 2, 1)
        for i, seq in enumerate(candidates):
            if len(sched) >= room or budget <= 0:
                break
            fresh = not seq.block_table  # first chunk: new, or re-admitted after preemption
            reuse = self._match_prefix(seq) if fresh else []
            start = len(reuse) * bm.page_size if fresh else seq.num_computed
            n = min(seq.num_tokens - start, budget)
            if i + 1 < len(candidates) and len(sched) + 1 < room:
                n = min(n, long_cap)  # leave the rest of the step to the prompts behind it
            if not bm.can_allocate(seq.block_table, start + n, reuse):
                if sched.seqs or not self._reclaim_partial_prefills(seq, start + n, reuse):
                    break
            bm.allocate(seq.block_table, start + n, reuse)
            if fresh:
                seq.num_computed = start
                seq.num_registered_pages = len(reuse)
                if seq.num_cached_tokens is None:  # first admission: count it once
                    seq.num_cached_tokens = start
                    bm.record_query(seq.num_tokens, start)
            sched.seqs.append(seq)
            sched.num_tokens.append(n)
            sched.lookahead.append(0)
            sched.samples.append(start + n == seq.num_tokens)
            budget -= n
        return sched

    def _reclaim_partial_prefills(self, seq: Sequence, num_tokens: int, reuse) -> bool:
        """Release the pages of half-prefilled sequences queued behind `seq` (newest first)
        until `seq` fits: prompts prefilled in chunks side by side could otherwise each hold
        part of the pool with none able to finish."""
        bm = self.block_manager
        partial = [s for s in self.waiting
                   if s is not seq and s.block_table and s.sort_key > seq.sort_key]
        while partial and not bm.can_allocate(seq.block_table, num_tokens, reuse):
            self.release(partial.pop())
        return bm.can_allocate(seq.block_table, num_tokens, reuse)


@dataclasses.dataclass
class StepOutput:
    """What a step produced (host numpy arrays), one row per scheduled sequence. Row i holds
    num_tokens[i] new tokens (0 for a prompt chunk that does not reach its end); entries past
    that are padding."""

    tokens: Any  # [N, M] int32
    num_tokens: Any  # [N] int32
    logprobs: Any = None  # [N, M] f32: logprob of each token (raw model distribution)
    top_ids: Any = None  # [N, M, L] int32: top-L alternatives per token
    top_logprobs: Any = None  # [N, M, L] f32

    @classmethod
    def single(cls, tokens, samples: list[bool], logprobs=None, top_ids=None,
               top_logprobs=None) -> StepOutput:
        """From one sampled token per row ([N], [N], [N, L], [N, L])."""
        def add(x):
            return None if x is None else x[:, None]

        return cls(tokens=tokens[:, None], num_tokens=np.asarray(samples, np.int32),
                   logprobs=add(logprobs), top_ids=add(top_ids), top_logprobs=add(top_logprobs))
