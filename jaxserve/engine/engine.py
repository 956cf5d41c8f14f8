"""The host-side loop. Plain Python; the device work is one `ModelRunner.run` call per step.

`LLMEngine.step()` is schedule -> run -> postprocess:
  - `Scheduler.schedule()` (engine/scheduler.py: queues, pages, the continuous and static
    policies) returns a `Schedule`: per sequence the tokens to compute, lookahead tokens whose
    pages are reserved, whether it samples, and how many decode steps the program runs;
  - `runner.run(schedule)` returns a `StepOutput`: per sequence a variable number of new tokens
    (one for a plain step; up to `num_decode_steps` for a multi-step decode);
  - `postprocess` appends them one at a time through the stop checker, so a stop string, stop
    id, EOS or length limit inside a multi-token emission ends the sequence at the right token
    and drops the rest; then `Scheduler.commit` gives back the pages of uncommitted lookahead and
    registers pages full of committed tokens in the prefix cache.
Request validation happens before a request is queued (`make_sequence`); aborts and deadlines are
applied between steps.

Requests end early on `abort` or their deadline (finish_reason "abort"), or when the step they
are in raises (finish_reason "error"): only that step's sequences fail, the loop goes on. Either
way their pages are released at once.

Threads: `lock` guards the bookkeeping and is not held while the device step runs, so another
thread can queue or abort requests (freeing pages immediately) during a step; steps themselves
are serialised.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import threading
import time
from typing import TYPE_CHECKING

from jaxserve.config import EngineConfig
from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.protocol import EngineStepError, RequestAbortedError
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.scheduler import POLICIES, Schedule, Scheduler, StepOutput
from jaxserve.engine.sequence import Sequence, SequenceStatus
from jaxserve.engine.stopping import StopChecker
from jaxserve.errors import InvalidRequestError
from jaxserve.speculative.policy import SpecPolicy
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:  # the scheduler stays jax-free; only the runner it drives touches devices
    from jaxserve.engine.runner import ModelRunner

SCHEDULERS = POLICIES
# stats() counters: steps by kind ("mixed": decodes and prompt chunks together; multi-decode:
# several tokens per sequence in one program), failed steps, aborted requests.
STEP_COUNTERS = ("steps", "prefill_steps", "decode_steps", "mixed_steps", "multi_decode_steps",
                 "spec_steps", "spec_rows", "spec_proposed", "spec_accepted", "failed_steps",
                 "aborted")


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
    num_spec_proposed: int = 0  # speculative drafts verified for this request
    num_spec_accepted: int = 0  # of which the target accepted


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, ecfg: EngineConfig, *,
                 scheduler: str = "continuous", enable_prefix_caching: bool | None = None):
        """enable_prefix_caching: None takes `ecfg.enable_prefix_caching`."""
        if enable_prefix_caching is None:
            enable_prefix_caching = ecfg.enable_prefix_caching
        if ecfg.max_num_batched_tokens is None:  # the runner's backend default
            ecfg = dataclasses.replace(
                ecfg, max_num_batched_tokens=runner.ecfg.max_num_batched_tokens)
        self.runner = runner
        self.tokenizer = tokenizer
        self.ecfg = ecfg
        self.cfg = runner.cfg
        self.scheduler = Scheduler(ecfg, scheduler, enable_prefix_caching)
        # Decode steps per program when only decodes are running (runner: per-backend default).
        self.num_decode_steps = ecfg.num_decode_steps or getattr(runner, "num_decode_steps", 1)
        self.spec_policy = None
        if getattr(runner, "proposer", None) is not None:
            self.spec_policy = SpecPolicy.make(
                ecfg.num_speculative_tokens, runner.spec_cost_tokens, ecfg.speculative_adaptive,
                getattr(runner, "spec_draft_cost", 0.0),
                getattr(runner, "spec_step_overhead", 1.0))
            if runner.proposer.stateful:
                self.num_decode_steps = 1
        # Accepted drafts per position (index j: steps whose j-th draft was accepted).
        self.spec_accepted_at = [0] * ecfg.num_speculative_tokens
        self.spec_draft_share_sum = 0.0  # over speculative steps, from the policy's cost model
        self.lock = threading.RLock()
        self._step_lock = threading.Lock()
        self._ids = itertools.count()
        self._rng = random.Random()
        self._finished_between_steps: list[Sequence] = []  # aborted outside step()
        self.counts: collections.Counter[str] = collections.Counter()  # see STEP_COUNTERS

    @property
    def waiting(self) -> list[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def block_manager(self) -> BlockManager:
        return self.scheduler.block_manager

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

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
        if self.spec_policy is not None:
            seq.spec_stats = self.spec_policy.new_stats()
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a sequence built by `make_sequence`."""
        with self.lock:
            self.scheduler.add(seq)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *,
                    request_id: str | None = None, priority: int = 0,
                    deadline: float | None = None) -> Sequence:
        """Validate and queue one request. Raises InvalidRequestError, leaving state unchanged.
        priority: lower runs first. deadline: a time.monotonic() instant."""
        seq = self.make_sequence(prompt_ids, params, request_id=request_id, priority=priority,
                                 deadline=deadline)
        self.add_sequence(seq)
        return seq

    def set_scheduler(self, policy: str) -> None:
        """Switch between the "continuous" and "static" policies (only while idle)."""
        with self.lock:
            if policy != self.scheduler.policy and self.has_unfinished():
                raise RuntimeError("cannot switch the scheduler while requests are in flight")
            self.scheduler = Scheduler(self.ecfg, policy, self.block_manager.enable_prefix_caching)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

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

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Run one step: schedule -> run -> postprocess. Returns the sequences that received
        tokens or finished (including by abort, deadline or a failed step) since the previous
        step."""
        with self._step_lock:
            with self.lock:
                done = self._expire_deadlines()
                sched = self.scheduler.schedule(self.num_decode_steps, self.spec_policy)
                if not sched.seqs:
                    return done + self._fail_unschedulable() + self._take_finished_between_steps()
                self._count(sched)
            # Unlocked: abort() may finish (and free) any of the scheduled sequences while the
            # device runs; the freed pages are handed out only by a later step's scheduling.
            try:
                out = self.runner.run(sched)
            except Exception as e:  # isolate the failure to this step's requests
                with self.lock:
                    return done + self._fail_step(sched, e) + self._take_finished_between_steps()
            with self.lock:
                return done + self._postprocess(sched, out) + self._take_finished_between_steps()

    def _postprocess(self, sched: Schedule, out: StepOutput) -> list[Sequence]:
        """Apply a step's output: commit computed tokens, append sampled ones through the stop
        checker (a multi-token emission is cut at the first stop), return pages of uncommitted
        lookahead, register full pages of committed tokens in the prefix cache."""
        done = []
        for i, seq in enumerate(sched.seqs):
            if seq.is_finished:  # aborted while the step ran
                continue
            if not sched.samples[i]:  # a prompt chunk with more to prefill before sampling
                seq.num_computed += sched.num_tokens[i]
                self.scheduler.commit(seq)
                continue
            if self.spec_policy is not None and seq.status == SequenceStatus.RUNNING:
                self._count_speculation(seq, sched.lookahead[i] if sched.num_spec else 0,
                                        int(out.num_tokens[i]) - 1)
            self.scheduler.start_running(seq)
            try:
                for j in range(int(out.num_tokens[i])):
                    self._append_token(seq, out, i, j)
                    if seq.is_finished:
                        break
            except Exception as e:  # e.g. a detokenizer failure
                self._finish(seq, "error", EngineStepError(
                    f"processing the output failed: {type(e).__name__}: {e}"))
            if not seq.is_finished:
                # K/V is in the cache for every token but the newest (the next step's input).
                seq.num_computed = seq.num_tokens - 1
                self.scheduler.commit(seq)
            done.append(seq)
        return done

    def _count_speculation(self, seq: Sequence, num_draft: int, num_accepted: int) -> None:
        """A decode step of seq verified num_draft drafts and accepted num_accepted of them
        (counted before stop rules cut the emission: they measure the drafts)."""
        self.spec_policy.update(seq.spec_stats, num_draft, num_accepted)
        if num_draft:
            self.counts["spec_rows"] += 1
            self.counts["spec_proposed"] += num_draft
            self.counts["spec_accepted"] += num_accepted
            for j in range(num_accepted):
                self.spec_accepted_at[j] += 1

    def _count(self, sched: Schedule) -> None:
        now = time.monotonic()
        for seq in sched.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        self.counts["steps"] += 1
        self.counts[f"{sched.kind}_steps"] += 1
        if sched.num_steps > 1:
            self.counts["multi_decode_steps"] += 1
        if sched.num_spec:
            self.counts["spec_steps"] += 1
            self.spec_draft_share_sum += self.spec_policy.draft_share(
                sched.num_spec, sum(sched.num_tokens) + sum(sched.lookahead))

    def _fail_unschedulable(self) -> list[Sequence]:
        """Nothing fits although nothing runs: the head of the queue grew past the pool by
        generating, then was preempted. Fail it rather than stall."""
        if not self.waiting or self.running:
            return []
        seq = self.waiting[0]
        bm = self.block_manager
        self._finish(seq, "error", EngineStepError(
            f"request needs {bm.pages_needed([], seq.num_tokens)} KV pages; the cache has "
            f"{bm.num_usable_pages}"))
        return [seq]

    def _fail_step(self, sched: Schedule, e: Exception) -> list[Sequence]:
        self.counts["failed_steps"] += 1
        error = EngineStepError(f"model step failed: {type(e).__name__}: {e}")
        error.__cause__ = e
        done = []
        for seq in sched.seqs:
            if not seq.is_finished:
                self._finish(seq, "error", error)
                done.append(seq)
        self._recover_kv()
        return done

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
            self.scheduler.release(seq)
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

    def _append_token(self, seq: Sequence, out: StepOutput, i: int, j: int) -> None:
        """Append token j of row i and check the stop rules after it."""
        token = int(out.tokens[i, j])
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if seq.params.logprobs is not None:
            top = {}
            if out.top_ids is not None:
                k = seq.params.logprobs
                top = {int(t): float(lp) for t, lp in
                       zip(out.top_ids[i, j][:k], out.top_logprobs[i, j][:k], strict=True)}
            seq.output_logprobs.append((float(out.logprobs[i, j]), top))
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
        self.scheduler.finish(seq)
        if reason == "abort":
            self.counts["aborted"] += 1

    # -- reporting --------------------------------------------------------------------------

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id, prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids), text=seq.text, finish_reason=seq.finish_reason,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens or 0,
            error=str(seq.error) if seq.error is not None else None,
            num_spec_proposed=seq.spec_stats.num_proposed if seq.spec_stats else 0,
            num_spec_accepted=seq.spec_stats.num_accepted if seq.spec_stats else 0)

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache (needed if the KV arrays are overwritten behind its back)."""
        with self.lock:
            self.block_manager.reset_prefix_cache()

    def _spec_stats(self) -> dict[str, float]:
        """Speculation: mean drafts accepted per verifying sequence-step, how often the j-th
        draft was accepted (acceptance per position), and drafting's share of a speculative
        step's time as the policy's cost model puts it (benchmarks/speculative.py measures it)."""
        if self.spec_policy is None:
            return {}
        rows = self.counts["spec_rows"]
        steps = self.counts["spec_steps"]
        out = {"spec_mean_accepted": self.counts["spec_accepted"] / rows if rows else 0.0,
               "spec_draft_share": self.spec_draft_share_sum / steps if steps else 0.0}
        for j, n in enumerate(self.spec_accepted_at):
            out[f"spec_accepted_at_{j + 1}"] = n
        return out

    def stats(self) -> dict[str, float]:
        with self.lock:
            return {
                **self.block_manager.stats(),
                **{k: self.counts[k] for k in STEP_COUNTERS},
                **self._spec_stats(),
                "preemptions": self.num_preemptions,
                "running": len(self.running),
                "waiting": len(self.waiting),
            }
