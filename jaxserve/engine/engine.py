"""The host-side loop: admit requests, schedule each step, run it, apply stop rules. Plain Python;
the device work is one `ModelRunner.run` call per step.

Scheduling, "continuous" (the default): mixed steps under one token budget, decodes first.
  - Every step first gives each running sequence its decode token (one token each), then fills
    what is left of `max_num_batched_tokens` with prompt chunks of waiting sequences, in
    (priority, arrival) order: lower priority value first, FCFS among equals. A prompt that
    does not fit is prefilled in chunks over several steps. Prompts are taken while there is
    budget, room (at most `max_num_seqs` running) and free pages for their chunk; the first
    that does not get pages ends the step (no overtaking), so a big request is not starved by
    small ones behind it.
  - The runner executes such a step as one flat ragged batch (runner.mixed_step): each token
    costs one row of matmul whatever its sequence, so decodes and prompt chunks share a step
    without padding to a common length. Running sequences therefore get a token every step
    (arrivals never stall them for a whole prefill step), and a waiting prompt gets its next
    chunk in every step that has budget left after the decodes.
  - The budget counts real tokens, one per decode included (no padding: the flat row is
    padded to a bucket by the runner, outside the budget).
  - A new sequence first reuses the longest run of its full pages found in the prefix cache
    (never the page holding its last token: that token must be computed to get logits) and
    prefills from there.
  - When a decode needs a page and none is free, the lowest-priority, newest running
    sequence is preempted by recompute (and that step takes no prompt chunks, as in vLLM, so
    the freed pages go to the decodes rather than straight back to a prefill): its pages are
    released (they stay in the prefix cache until evicted, so the recompute is often mostly a
    cache hit) and it goes back to the queue in its original place. Recompute rather than
    swapping pages out to host memory: on CPU and TPU hosts, copying a sequence's K/V out and
    back costs about as much as recomputing a short prompt, and recompute needs no second pool
    or copy machinery. Its sampling key depends only on (seed, tokens generated so far), so it
    later produces the same tokens, up to the float rounding differences between the program
    that recomputes it and those that decoded it (~1e-6 in log-probs: greedy output is
    unaffected barring exact ties).

Scheduling, "static": the benchmark baseline. A batch of up to `max_num_seqs` waiting requests
is formed when the previous batch has entirely finished; it is prefilled (prefill-only steps
within the token budget), then decoded until its last member finishes. Nothing joins
mid-batch.

Requests end early on `abort` or their deadline (finish_reason "abort"), or when the step they
are in raises (finish_reason "error"): only that step's sequences fail, the loop goes on. Either
way their pages are released at once.

Threads: `lock` guards the bookkeeping and is not held while the device step runs, so another
thread can queue or abort requests (freeing pages immediately) during a step; steps themselves
are serialised.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import random
import threading
import time
from typing import TYPE_CHECKING

from jaxserve.config import EngineConfig
from jaxserve.engine.block_manager import BlockManager, hash_page
from jaxserve.engine.protocol import EngineStepError, RequestAbortedError
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.sequence import Sequence, SequenceStatus
from jaxserve.engine.stopping import StopChecker
from jaxserve.errors import InvalidRequestError
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:  # the scheduler stays jax-free; only the runner it drives touches devices
    from jaxserve.engine.runner import ModelRunner

SCHEDULERS = ("continuous", "static")


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    # Per generated token: logprob of the token and {token_id: logprob} of the top-n (raw model
    # distribution), when SamplingParams.logprobs was set.
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    error: str | None = None  # why an "abort" / "error" finish happened


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, ecfg: EngineConfig, *,
                 scheduler: str = "continuous", enable_prefix_caching: bool | None = None):
        """enable_prefix_caching: None takes `ecfg.enable_prefix_caching` if the config has
        that field, else on."""
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if enable_prefix_caching is None:
            enable_prefix_caching = getattr(ecfg, "enable_prefix_caching", True)
        self.runner = runner
        self.tokenizer = tokenizer
        self.ecfg = ecfg
        self.cfg = runner.cfg
        self.scheduler = scheduler
        self.block_manager = BlockManager(ecfg.num_pages, ecfg.page_size, enable_prefix_caching)
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        self.lock = threading.RLock()
        self._step_lock = threading.Lock()
        self._ids = itertools.count()
        self._rng = random.Random()
        self._static_batch: set[int] = set()  # seq_ids of the batch in flight ("static")
        self._finished_between_steps: list[Sequence] = []  # aborted outside step()
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_prefill_steps = 0
        self.num_decode_steps = 0
        self.num_mixed_steps = 0  # decodes and prompt chunks in one step
        self.num_failed_steps = 0
        self.num_aborted = 0

    # -- requests ---------------------------------------------------------------------------

    def make_sequence(self, prompt_ids: list[int], params: SamplingParams, *,
                      request_id: str | None = None, priority: int = 0,
                      deadline: float | None = None, strict_length: bool = False) -> Sequence:
        """Validate one request and build its Sequence without queueing it (no engine state is
        touched, so any thread may call this). Raises InvalidRequestError.

        strict_length: also reject prompt + max_tokens beyond the context length (the server's
        rule) instead of cutting generation short at the limit (the offline API's)."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got "
                                      f"{type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError(f"priority must be an int, got {priority!r}")
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.cfg.vocab_size
        bad = [t for t in prompt_ids
               if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token id(s) {bad[:5]} outside [0, {vocab})")
        max_len = self.ecfg.max_model_len
        if len(prompt_ids) >= max_len:
            raise InvalidRequestError(f"prompt has {len(prompt_ids)} tokens; the context length "
                                      f"is {max_len}, leaving no room to generate")
        if strict_length and params.max_tokens is not None and \
                len(prompt_ids) + params.max_tokens > max_len:
            raise InvalidRequestError(f"prompt has {len(prompt_ids)} tokens and max_tokens is "
                                      f"{params.max_tokens}: {len(prompt_ids) + params.max_tokens}"
                                      f" exceeds the context length {max_len}")
        bm = self.block_manager
        if bm.pages_needed([], len(prompt_ids) + 1) > bm.num_usable_pages:
            raise InvalidRequestError(f"prompt of {len(prompt_ids)} tokens does not fit in the KV "
                                      f"cache ({bm.num_usable_pages} pages)")
        seed = params.seed if params.seed is not None else self._rng.randrange(2**63)
        if params.max_tokens is not None:
            max_len = min(max_len, len(prompt_ids) + params.max_tokens)
        seq = Sequence(seq_id=next(self._ids), prompt_ids=prompt_ids, params=params, seed=seed,
                       max_len=max_len, request_id=request_id, priority=priority,
                       deadline=deadline, arrival_time=time.monotonic())
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
        seq.stop_checker = StopChecker(params, self.tokenizer.eos_token_ids)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a sequence built by `make_sequence`."""
        with self.lock:
            bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *,
                    request_id: str | None = None, priority: int = 0,
                    deadline: float | None = None) -> Sequence:
        """Validate and queue one request. Raises InvalidRequestError, leaving state unchanged.
        priority: lower runs first. deadline: a time.monotonic() instant."""
        seq = self.make_sequence(prompt_ids, params, request_id=request_id, priority=priority,
                                 deadline=deadline)
        self.add_sequence(seq)
        return seq

    def set_scheduler(self, scheduler: str) -> None:
        """Switch between "continuous" and "static" (only while idle)."""
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        with self.lock:
            if scheduler != self.scheduler and self.has_unfinished():
                raise RuntimeError("cannot switch the scheduler while requests are in flight")
            self.scheduler = scheduler
            self._static_batch.clear()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, key: int | str | Sequence) -> Sequence | None:
        """An unfinished sequence by seq_id (int), request_id (str) or itself."""
        with self.lock:
            for seq in itertools.chain(self.running, self.waiting):
                if seq is key or (isinstance(key, str) and seq.request_id == key) or \
                        (isinstance(key, int) and not isinstance(key, bool) and seq.seq_id == key):
                    return seq
        return None

    def abort(self, key: int | str | Sequence) -> bool:
        """Finish a queued, prefilling or decoding sequence now (finish_reason "abort") and
        release its pages. Safe to call while another thread runs a step. False if unknown or
        already finished."""
        with self.lock:
            seq = self.find(key)
            if seq is None:
                return False
            self._finish(seq, "abort", RequestAbortedError("aborted"))
            self._finished_between_steps.append(seq)
            return True

    # -- scheduling -------------------------------------------------------------------------

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

    def _register_pages(self, seq: Sequence) -> None:
        """Offer the sequence's pages that are now full of computed K/V to the prefix cache."""
        bm = self.block_manager
        num_full = seq.num_computed // bm.page_size
        if not bm.enable_prefix_caching or num_full <= seq.num_registered_pages:
            return
        hashes = self._hash_pages(seq, num_full)
        for i in range(seq.num_registered_pages, num_full):
            bm.register(seq.block_table[i], hashes[i])
        seq.num_registered_pages = num_full

    def _schedule_prefill(self, candidates: list[Sequence], budget: int
                          ) -> tuple[list[Sequence], list[int]]:
        """Prompt chunks of `candidates`, in order, within `budget` tokens in all."""
        bm = self.block_manager
        seqs, chunks = [], []
        room = self.ecfg.max_num_seqs - len(self.running)
        for seq in candidates:
            if len(seqs) >= room or budget <= 0:
                break
            fresh = not seq.block_table  # first chunk: new, or re-admitted after preemption
            reuse = self._match_prefix(seq) if fresh else []
            start = len(reuse) * bm.page_size if fresh else seq.num_computed
            n = min(seq.num_tokens - start, budget)
            if not bm.can_allocate(seq.block_table, start + n, reuse):
                if seqs or not self._reclaim_partial_prefills(seq, start + n, reuse):
                    break
            bm.allocate(seq.block_table, start + n, reuse)
            if fresh:
                seq.num_computed = start
                seq.num_registered_pages = len(reuse)
                if seq.num_cached_tokens is None:  # first admission: count it once
                    seq.num_cached_tokens = start
                    bm.record_query(seq.num_tokens, start)
            seqs.append(seq)
            chunks.append(n)
            budget -= n
        return seqs, chunks

    def _reclaim_partial_prefills(self, seq: Sequence, num_tokens: int, reuse) -> bool:
        """Release the pages of half-prefilled sequences queued behind `seq` (newest first)
        until `seq` fits: prompts prefilled in chunks side by side could otherwise each hold
        part of the pool with none able to finish."""
        bm = self.block_manager
        partial = [s for s in self.waiting
                   if s is not seq and s.block_table and s.sort_key > seq.sort_key]
        while partial and not bm.can_allocate(seq.block_table, num_tokens, reuse):
            self._release(partial.pop())
        return bm.can_allocate(seq.block_table, num_tokens, reuse)

    def _release(self, seq: Sequence) -> None:
        """Drop a sequence's pages and computed state; it stays or goes back in the queue."""
        self.block_manager.free(seq.block_table)
        seq.num_computed = 0
        seq.num_registered_pages = 0
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            seq.status = SequenceStatus.WAITING
            bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)
        self.num_preemptions += 1

    def _schedule_decode(self) -> list[Sequence]:
        bm = self.block_manager
        for seq in list(self.running):
            if seq not in self.running:  # preempted below for an earlier sequence
                continue
            while not bm.can_allocate(seq.block_table, seq.num_tokens):
                victim = max(self.running, key=lambda s: s.sort_key)
                self._release(victim)
                if victim is seq:
                    break
            if seq in self.running:
                bm.allocate(seq.block_table, seq.num_tokens)
        return list(self.running)

    def _schedule(self) -> tuple[list[Sequence], list[int]]:
        """(sequences, chunk lengths) of the next step, running decodes first; empty when
        nothing fits."""
        budget = self.ecfg.max_num_batched_tokens
        if self.scheduler == "static":
            if not self.running and not any(s.seq_id in self._static_batch
                                            for s in self.waiting):
                # The previous batch has finished: the next one is the head of the queue.
                self._static_batch = {s.seq_id for s in self.waiting[: self.ecfg.max_num_seqs]}
            seqs, chunks = self._schedule_prefill(
                [s for s in self.waiting if s.seq_id in self._static_batch], budget)
            if seqs:
                return seqs, chunks
            seqs = self._schedule_decode()
            return seqs, [1] * len(seqs)

        preemptions = self.num_preemptions
        seqs = self._schedule_decode()
        chunks = [1] * len(seqs)
        if self.waiting and (self.num_preemptions == preemptions or not seqs):
            prefills, prefill_chunks = self._schedule_prefill(self.waiting, budget - len(seqs))
            seqs += prefills
            chunks += prefill_chunks
        return seqs, chunks

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Run one step (decodes and/or prompt chunks). Returns the sequences that received a
        token or finished (including by abort, deadline or a failed step) since the previous
        step."""
        with self._step_lock:
            with self.lock:
                done = self._expire_deadlines()
                seqs, chunks = self._schedule()
                if not seqs:
                    if self.waiting and not self.running:
                        # Even an empty pool cannot hold it (it grew past the pool by
                        # generating, then was preempted): fail it rather than stall.
                        seq = self.waiting[0]
                        bm = self.block_manager
                        self._finish(seq, "error", EngineStepError(
                            f"request needs {bm.pages_needed([], seq.num_tokens)} KV pages; the "
                            f"cache has {bm.num_usable_pages}"))
                        done.append(seq)
                    return done + self._take_finished_between_steps()
                now = time.monotonic()
                for seq in seqs:
                    if seq.first_scheduled_time is None:
                        seq.first_scheduled_time = now
                self.num_steps += 1
                num_decodes = sum(s.status == SequenceStatus.RUNNING for s in seqs)
                if num_decodes == len(seqs):
                    self.num_decode_steps += 1
                elif num_decodes == 0:
                    self.num_prefill_steps += 1
                else:
                    self.num_mixed_steps += 1
            # Unlocked: abort() may finish (and free) any of `seqs` while the device runs; the
            # freed pages are handed out only by a later step's scheduling, after this one.
            try:
                out = self.runner.run(seqs, chunks)
            except Exception as e:  # isolate the failure to this step's requests
                with self.lock:
                    self.num_failed_steps += 1
                    error = EngineStepError(f"model step failed: {type(e).__name__}: {e}")
                    error.__cause__ = e
                    for seq in seqs:
                        if not seq.is_finished:
                            self._finish(seq, "error", error)
                            done.append(seq)
                    self._recover_kv()
                    return done + self._take_finished_between_steps()
            with self.lock:
                for i, (seq, n) in enumerate(zip(seqs, chunks, strict=True)):
                    if seq.is_finished:  # aborted while the step ran
                        continue
                    seq.num_computed += n
                    self._register_pages(seq)
                    if seq.num_pending > 0:  # prompt chunk; more to prefill before sampling
                        continue
                    if seq.status == SequenceStatus.WAITING:
                        self.waiting.remove(seq)
                        self.running.append(seq)
                        seq.status = SequenceStatus.RUNNING
                    try:
                        self._append_token(seq, out, i)
                    except Exception as e:  # e.g. a detokenizer failure
                        error = EngineStepError(f"processing the output failed: "
                                                f"{type(e).__name__}: {e}")
                        self._finish(seq, "error", error)
                    done.append(seq)
                return done + self._take_finished_between_steps()

    def _recover_kv(self) -> None:
        """After a failed step the runner may have lost its KV arrays (a failure inside a
        program that had taken the donated cache). A runner that can tell re-creates them in its
        optional `recover()` hook and returns True; then no page holds what the bookkeeping
        says, so every sequence with pages starts over (recompute) and the prefix cache is
        forgotten."""
        recover = getattr(self.runner, "recover", None)
        if recover is None or not recover():
            return
        for seq in list(self.running) + [s for s in self.waiting if s.block_table]:
            self._release(seq)
        self.block_manager.reset_prefix_cache()

    def _expire_deadlines(self) -> list[Sequence]:
        now = time.monotonic()
        expired = [s for s in itertools.chain(self.running, self.waiting)
                   if s.deadline is not None and now >= s.deadline]
        for seq in expired:
            self._finish(seq, "abort", RequestAbortedError("deadline exceeded"))
        return expired

    def _take_finished_between_steps(self) -> list[Sequence]:
        done, self._finished_between_steps = self._finished_between_steps, []
        return done

    def _append_token(self, seq: Sequence, out: dict, i: int) -> None:
        token = int(out["tokens"][i])
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if seq.params.logprobs is not None:
            top = {}
            if "top_ids" in out:
                k = seq.params.logprobs
                top = {int(t): float(lp) for t, lp in
                       zip(out["top_ids"][i][:k], out["top_logprobs"][i][:k], strict=True)}
            seq.output_logprobs.append((float(out["logprobs"][i]), top))
        seq.text += seq.detokenizer.add(token)
        result = seq.stop_checker.check(token, len(seq.output_ids), seq.text,
                                        at_length_limit=seq.num_tokens >= seq.max_len)
        if result is not None:
            if result.truncate_text_at is not None:
                seq.text = seq.text[: result.truncate_text_at]
            else:  # flush characters the detokenizer held back waiting for more bytes
                seq.text += seq.detokenizer.finish()
            self._finish(seq, result.finish_reason)

    def _finish(self, seq: Sequence, reason: str, error: Exception | None = None) -> None:
        seq.finish_reason = reason
        seq.error = error
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq.block_table)
        self._static_batch.discard(seq.seq_id)
        if reason == "abort":
            self.num_aborted += 1

    # -- reporting --------------------------------------------------------------------------

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id, prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids), text=seq.text, finish_reason=seq.finish_reason,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens or 0,
            error=str(seq.error) if seq.error is not None else None)

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache (needed if the KV arrays are overwritten behind its back)."""
        with self.lock:
            self.block_manager.reset_prefix_cache()

    def stats(self) -> dict[str, float]:
        with self.lock:
            return {
                **self.block_manager.stats(),
                "steps": self.num_steps,
                "prefill_steps": self.num_prefill_steps,
                "decode_steps": self.num_decode_steps,
                "mixed_steps": self.num_mixed_steps,
                "failed_steps": self.num_failed_steps,
                "preemptions": self.num_preemptions,
                "aborted": self.num_aborted,
                "running": len(self.running),
                "waiting": len(self.waiting),
            }
