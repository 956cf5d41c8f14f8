"""A deterministic `EngineClient` whose outputs can be computed by hand.

Tokenizer: one token per UTF-8 byte (`tokenize("abc") == [97, 98, 99]`); token ids below 128
decode to that ASCII character, others to `<id>`.

Generation: output token k of a request is `prompt_ids[k % len(prompt_ids)] + 1`, one token per
delta, so prompt "abc" with max_tokens=5 streams "b", "c", "d", "b", "c". A request stops with
"stop" on an EOS token (`EOS`, unless ignore_eos) or a stop_token_id, else with "length" after
max_tokens. With logprobs=n the sampled token has logprob -0.25 and the top alternatives are
`{t + j: -0.25 - j for j in range(n)}`. Stop strings are not implemented.

Chat: `render_chat` emits "<role>:content\\n" per message, then "assistant:", tokenized.

Capacity: at most `max_running` requests run at once, the others wait; more than `max_waiting`
waiting raises QueueFullError. A running request holds ceil((prompt + generated) / PAGE_SIZE)
pages. A prompt holding `FAIL_TOKEN` fails with EngineStepError after its first token. A prompt
seen before reports its full pages (but the last token) as cached.

Every request is tracked from `generate` until it is freed; `live` lists the ones not freed,
`aborted` the ids freed by `abort` or by the consumer closing the stream early, `abort_calls`
every id `abort` was called with.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

from jaxserve.engine.protocol import (
    Capacity,
    EngineDrainingError,
    EngineStepError,
    ModelInfo,
    QueueFullError,
    RequestAbortedError,
    StreamDelta,
    Timings,
    Usage,
)
from jaxserve.errors import InvalidRequestError

VOCAB_SIZE = 300
EOS = 257
FAIL_TOKEN = 259
PAGE_SIZE = 4
ROLES = ("system", "user", "assistant")


def decode(ids: list[int] | tuple[int, ...]) -> str:
    return "".join(chr(t) if t < 128 else f"<{t}>" for t in ids)


def expected_ids(prompt_ids: list[int], max_tokens: int, *, stop_token_ids=(),
                 ignore_eos: bool = False) -> tuple[list[int], str]:
    """The mock's output for a prompt (the hand computation, written once)."""
    out = []
    for k in range(max_tokens):
        t = prompt_ids[k % len(prompt_ids)] + 1
        out.append(t)
        if (t == EOS and not ignore_eos) or t in stop_token_ids:
            return out, "stop"
    return out, "length"


class _Request:
    def __init__(self, request_id: str, prompt_ids: list[int]):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.num_generated = 0
        self.running = False
        self.aborted = asyncio.Event()

    @property
    def num_pages(self) -> int:
        if not self.running:
            return 0
        return math.ceil((len(self.prompt_ids) + self.num_generated) / PAGE_SIZE)


class MockEngine:
    def __init__(self, *, max_running: int = 64, max_waiting: int = 256, total_pages: int = 4096,
                 max_model_len: int = 64, token_delay_s: float = 0.0,
                 first_token_delay_s: float = 0.0, retry_after_s: float = 0.25,
                 hold_warmup: bool = False, honour_deadline: bool = True):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.total_pages = total_pages
        self.max_model_len = max_model_len
        self.token_delay_s = token_delay_s
        self.first_token_delay_s = first_token_delay_s
        self.retry_after_s = retry_after_s
        self.honour_deadline = honour_deadline  # False: only the server's abort ends a request
        self.requests: dict[str, _Request] = {}
        self.aborted: list[str] = []
        self.abort_calls: list[str] = []
        self.finished: list[str] = []
        self.started: list[str] = []
        self.draining = False
        self.warmed_up = False
        self.warmup_release = asyncio.Event()
        if not hold_warmup:
            self.warmup_release.set()
        self.prefix_cache_hits = 0
        self._seen_prompts: set[tuple[int, ...]] = set()
        self._slots: asyncio.Semaphore | None = None

    # -- EngineClient ------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        return ModelInfo(name="mock", vocab_size=VOCAB_SIZE, max_model_len=self.max_model_len,
                         dtype="float32", page_size=PAGE_SIZE, eos_token_ids=(EOS,),
                         extra={"kind": "mock"})

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise InvalidRequestError(f"messages[{i}].role must be one of {list(ROLES)}, "
                                          f"got {m['role']!r}")
        text = "".join(f"<{m['role']}>:{m['content']}\n" for m in messages) + "<assistant>:"
        return self.tokenize(text)

    def capacity(self) -> Capacity:
        used = sum(r.num_pages for r in self.requests.values())
        running = sum(r.running for r in self.requests.values())
        return Capacity(free_pages=self.total_pages - used, total_pages=self.total_pages,
                        running=running, waiting=len(self.requests) - running)

    def stats(self) -> dict[str, float]:
        return {"prefix_cache_hits": self.prefix_cache_hits, "num_preemptions": 0}

    def abort(self, request_id: str) -> bool:
        self.abort_calls.append(request_id)
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.aborted.set()
        self._free(req, aborted=True)
        return True

    async def generate(self, request_id: str, prompt_ids: list[int], params,
                       deadline: float | None = None) -> AsyncIterator[StreamDelta]:
        if self.draining:
            raise EngineDrainingError("the engine is draining")
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in flight")
        waiting = self.capacity().waiting
        if waiting >= self.max_waiting:
            raise QueueFullError(f"{waiting} requests waiting (max_waiting={self.max_waiting})",
                                 retry_after_s=self.retry_after_s)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)
        arrival = time.monotonic()
        req = _Request(request_id, list(prompt_ids))
        self.requests[request_id] = req
        self.started.append(request_id)
        key = tuple(prompt_ids)
        cached = (len(key) - 1) // PAGE_SIZE * PAGE_SIZE if key in self._seen_prompts else 0
        self._seen_prompts.add(key)
        self.prefix_cache_hits += cached > 0
        acquire = asyncio.ensure_future(self._slots.acquire())
        try:
            await self._wait(acquire, req, deadline)
            req.running = True
            queue_s = time.monotonic() - arrival
            await self._sleep(self.first_token_delay_s, req, deadline)
            max_tokens = params.max_tokens
            ids, reason = expected_ids(prompt_ids, max_tokens, stop_token_ids=params.stop_token_ids,
                                       ignore_eos=params.ignore_eos)
            ttft_s = 0.0
            for k, t in enumerate(ids):
                if k:
                    await self._sleep(self.token_delay_s, req, deadline)
                if k == 1 and FAIL_TOKEN in prompt_ids:
                    raise EngineStepError(f"model step failed for request {request_id!r} "
                                          "(mock FAIL_TOKEN)")
                req.num_generated += 1
                if k == 0:
                    ttft_s = time.monotonic() - arrival
                last = k == len(ids) - 1
                logprobs = None
                if params.logprobs is not None:
                    logprobs = ((-0.25, {t + j: -0.25 - j for j in range(params.logprobs)}),)
                delta = StreamDelta(
                    token_ids=(t,), text=decode([t]), logprobs=logprobs,
                    finish_reason=reason if last else None,
                    usage=Usage(len(prompt_ids), len(ids), cached) if last else None,
                    timings=Timings(queue_s=queue_s, ttft_s=ttft_s) if last else None)
                if last:
                    self._free(req)
                    self.finished.append(request_id)
                yield delta
        finally:
            if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
                self._slots.release()
            if self.requests.get(request_id) is req:  # stream closed early: abort
                self._free(req, aborted=True)

    # -- optional hooks the server reads with getattr --------------------------------------

    async def warmup(self) -> None:
        await self.warmup_release.wait()
        params = _Params(max_tokens=1)
        async for _ in self.generate("warmup-internal", [1], params):
            pass
        self.warmed_up = True

    def drain(self) -> None:
        self.draining = True

    # -- helpers -----------------------------------------------------------------------------

    @property
    def live(self) -> list[str]:
        return list(self.requests)

    def _free(self, req: _Request, *, aborted: bool = False) -> None:
        if self.requests.pop(req.request_id, None) is not None and aborted:
            self.aborted.append(req.request_id)

    async def _sleep(self, seconds: float, req: _Request, deadline: float | None) -> None:
        await self._wait(asyncio.sleep(seconds), req, deadline)

    async def _wait(self, aw, req: _Request, deadline: float | None) -> None:
        """Await `aw` unless the request is aborted or its deadline passes first."""
        task = asyncio.ensure_future(aw)
        aborted = asyncio.ensure_future(req.aborted.wait())
        timeout = None
        if deadline is not None and self.honour_deadline:
            timeout = max(deadline - time.monotonic(), 0.0)
        try:
            await asyncio.wait({task, aborted}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborted.cancel()
            if not task.done():
                task.cancel()
        if req.aborted.is_set():
            raise RequestAbortedError(f"request {req.request_id!r} was aborted")
        if not task.done():
            self.abort(req.request_id)
            raise RequestAbortedError(f"request {req.request_id!r} passed its deadline")
        task.result()


class _Params:
    """The SamplingParams fields the mock reads, for its own warmup request."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.stop_token_ids = ()
        self.ignore_eos = False
        self.logprobs = None
