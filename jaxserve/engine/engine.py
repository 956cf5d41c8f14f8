"""The host-side loop: admit requests, schedule each step, run it, apply stop rules.

Scheduling (per step, vLLM-style): if requests are waiting and there is room in the running set,
run a prefill step over as many of them as the token budget allows (long prompts are prefilled in
chunks across steps); otherwise run one decode step over every running sequence. When a decode
step needs a page and none is free, the newest running sequence is preempted by recompute: its
pages are freed and it goes back to the front of the queue. Its sampling key depends only on
(seed, tokens generated so far), so it later produces the same tokens, up to the float rounding
differences between the prefill program that recomputes it and the decode program (~1e-6 in
log-probs: greedy output is unaffected barring exact ties).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random

from jaxserve.config import EngineConfig
from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.runner import ModelRunner, bucket
from jaxserve.engine.sampling import SamplingParams
from jaxserve.engine.sequence import Sequence, SequenceStatus
from jaxserve.engine.stopping import StopChecker
from jaxserve.errors import InvalidRequestError
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | None while running
    # Per generated token: logprob of the token and {token_id: logprob} of the top-n (raw model
    # distribution), when SamplingParams.logprobs was set.
    logprobs: list[tuple[float, dict[int, float]]] | None = None


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, ecfg: EngineConfig):
        self.runner = runner
        self.tokenizer = tokenizer
        self.ecfg = ecfg
        self.cfg = runner.cfg
        self.block_manager = BlockManager(ecfg.num_pages, ecfg.page_size)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self._rng = random.Random()
        self.num_preemptions = 0

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Validate and queue one request. Raises InvalidRequestError, leaving state unchanged."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got "
                                      f"{type(params).__name__}")
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.cfg.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token id(s) {bad[:5]} outside [0, {vocab})")
        max_len = self.ecfg.max_model_len
        if len(prompt_ids) >= max_len:
            raise InvalidRequestError(f"prompt has {len(prompt_ids)} tokens; the context length "
                                      f"is {max_len}, leaving no room to generate")
        if self.block_manager.pages_needed([], len(prompt_ids) + 1) > \
                self.block_manager.num_usable_pages:
            raise InvalidRequestError(f"prompt of {len(prompt_ids)} tokens does not fit in the KV "
                                      f"cache ({self.block_manager.num_usable_pages} pages)")
        seed = params.seed if params.seed is not None else self._rng.randrange(2**63)
        if params.max_tokens is not None:
            max_len = min(max_len, len(prompt_ids) + params.max_tokens)
        seq = Sequence(seq_id=next(self._ids), prompt_ids=prompt_ids, params=params, seed=seed,
                       max_len=max_len)
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
        seq.stop_checker = StopChecker(params, self.tokenizer.eos_token_ids)
        self.waiting.append(seq)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------

    def _schedule_prefill(self) -> tuple[list[Sequence], list[int]]:
        seqs, chunks = [], []
        budget = self.ecfg.max_prefill_tokens
        room = self.ecfg.max_num_seqs - len(self.running)
        for seq in self.waiting:
            if len(seqs) == room:
                break
            n = min(seq.num_pending, budget)
            # Padded cost of the batch with this row added must stay within the budget; the
            # first row is always admitted (its chunk is capped at the budget).
            if seqs:
                padded = bucket(len(seqs) + 1, self.ecfg.batch_buckets) * bucket(
                    max(max(chunks), n), self.runner.prefill_buckets)
                if padded > self.ecfg.max_prefill_tokens:
                    break
            if not self.block_manager.can_allocate(seq.block_table, seq.num_computed + n):
                break
            self.block_manager.allocate(seq.block_table, seq.num_computed + n)
            seqs.append(seq)
            chunks.append(n)
        return seqs, chunks

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _schedule_decode(self) -> list[Sequence]:
        for seq in list(self.running):
            if seq not in self.running:  # preempted below by an earlier sequence
                continue
            while not self.block_manager.can_allocate(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self.block_manager.allocate(seq.block_table, seq.num_tokens)
        return list(self.running)

    def step(self) -> list[Sequence]:
        """Run one prefill or decode step; return the sequences that received a token."""
        seqs, chunks = [], []
        if self.waiting and len(self.running) < self.ecfg.max_num_seqs:
            seqs, chunks = self._schedule_prefill()
        if not seqs:
            seqs = self._schedule_decode()
            chunks = [1] * len(seqs)
        if not seqs:
            if self.waiting:  # nothing running yet nothing fits: cannot happen for valid input
                raise RuntimeError("scheduler stalled: waiting requests but no pages")
            return []
        out = self.runner.run(seqs, chunks)
        updated = []
        for i, (seq, n) in enumerate(zip(seqs, chunks, strict=True)):
            seq.num_computed += n
            if seq.num_pending > 0:  # prompt chunk; more to prefill before sampling
                continue
            if seq.status == SequenceStatus.WAITING:
                self.waiting.remove(seq)
                self.running.append(seq)
                seq.status = SequenceStatus.RUNNING
            self._append_token(seq, out, i)
            updated.append(seq)
        return updated

    def _append_token(self, seq: Sequence, out: dict, i: int) -> None:
        token = int(out["tokens"][i])
        seq.output_ids.append(token)
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

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq.block_table)

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id, prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids), text=seq.text, finish_reason=seq.finish_reason,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None)
