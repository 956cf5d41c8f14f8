"""`AsyncEngine`: the `EngineClient` the server talks to, over one `LLMEngine`.

One background thread owns the stepping: it runs `LLMEngine.step()` while any request is
unfinished and sleeps on a condition otherwise. The asyncio side never waits for a step:
`generate` validates and queues a request (the engine's lock is held by a step only while it
schedules or applies results, never while the device runs), and each step's results are handed
to the request's own `asyncio.Queue` through `loop.call_soon_threadsafe`. `abort` frees the
request's pages before it returns, even in the middle of a step.

Streamed text is UTF-8 safe (the detokenizer holds back incomplete characters) and holds back a
tail that could begin a stop string (`StopChecker.emittable_len`), so concatenated deltas equal
the offline output's text and never show a stop string the final text does not contain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from jaxserve.engine.engine import LLMEngine
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
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.sequence import Sequence
from jaxserve.errors import InvalidRequestError

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Request:
    request_id: str
    seq: Sequence
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # StreamDelta items, then the final delta or an exception
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    done: bool = False  # its last item is queued; no more will be


class AsyncEngine:
    """Streams requests through an `LLMEngine` stepped by a background thread.

    Build with `from_llm`. The `LLMEngine` stays usable synchronously (`LLM.generate`) while no
    asynchronous request is in flight."""

    def __init__(self, engine: LLMEngine, *, model_name: str, max_waiting: int = 256,
                 extra_info: dict[str, Any] | None = None):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_waiting = max_waiting
        self._model_name = model_name
        self._extra_info = dict(extra_info or {})
        self._lock = threading.Lock()  # guards _requests / _by_seq
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[int, _Request] = {}
        self._wakeup = threading.Condition()
        self._draining = False
        self._stopped = False
        self._warmup_ids = itertools.count()
        self._last_finish: float | None = None
        self._finish_interval_s: float | None = None  # EWMA of time between request finishes
        self.num_requests = 0
        self.num_rejected_queue_full = 0
        self._thread = threading.Thread(target=self._loop, name="jaxserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_llm(cls, llm, *, max_waiting: int = 256, scheduler: str = "continuous"
                 ) -> AsyncEngine:
        """Serve `llm` (a `jaxserve.LLM`): its engine, runner and tokenizer are shared, not
        copied. scheduler: "continuous" or "static" (the benchmark baseline)."""
        llm.engine.set_scheduler(scheduler)
        path = llm.model_path
        name = path.stem if path.is_file() else path.name
        from jaxserve.model import quant

        ecfg = llm.engine_config
        # What the weights are, not only what was asked: a quantised Orbax checkpoint loads
        # quantised with quantization=None.
        layers = llm.runner.params["layers"]
        if isinstance(layers, list):  # unstacked (EngineConfig.unroll_layers)
            layers = layers[0] if layers else {}
        weights = ecfg.quantization or quant.tree_mode({"layers": layers}) or "none"
        extra = {"model_path": str(path), "quantization": weights,
                 "kv_cache_dtype": ecfg.kv_cache_dtype}
        if ecfg.quantization == "int4":
            extra["quant_group_size"] = ecfg.quant_group_size or quant.DEFAULT_INT4_GROUP
        elif ecfg.quantization == "int8" and ecfg.quant_group_size is not None:
            extra["quant_group_size"] = ecfg.quant_group_size
        return cls(llm.engine, model_name=name, max_waiting=max_waiting, extra_info=extra)

    # -- EngineClient ---------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        e = self.engine
        return ModelInfo(
            name=self._model_name, vocab_size=e.cfg.vocab_size,
            max_model_len=e.ecfg.max_model_len, dtype=e.ecfg.dtype, page_size=e.ecfg.page_size,
            eos_token_ids=tuple(self.tokenizer.eos_token_ids),
            extra={**self._extra_info, "scheduler": e.scheduler.policy,
                   "prefix_caching": e.block_manager.enable_prefix_caching,
                   "max_num_seqs": e.ecfg.max_num_seqs, "max_waiting": self.max_waiting,
                   "num_pages": e.block_manager.num_usable_pages})

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except InvalidRequestError:
            raise
        except (TypeError, ValueError, KeyError) as e:
            raise InvalidRequestError(f"messages: {e}") from e

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       deadline: float | None = None, *, priority: int = 0
                       ) -> AsyncIterator[StreamDelta]:
        """Stream one request's deltas; the last carries finish_reason, usage and timings.

        Raises, before the first delta: InvalidRequestError (bad input, prompt + max_tokens
        over the context length, a request_id already in flight), QueueFullError,
        EngineDrainingError. After: EngineStepError, RequestAbortedError (abort() or the
        deadline, a time.monotonic() instant). Closing the iterator early aborts the request.
        priority: lower runs first (extension; FCFS among equals)."""
        req = self._admit(request_id, prompt_ids, params, deadline, priority)
        try:
            while True:
                if deadline is None:
                    item = await req.queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(req.queue.get(),
                                                      deadline - time.monotonic())
                    except TimeoutError:
                        self._abort(req, RequestAbortedError("deadline exceeded"), notify=False)
                        raise RequestAbortedError("deadline exceeded") from None
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not req.done:  # the consumer left early (closed, cancelled, or raised)
                self._abort(req, RequestAbortedError("the client went away"), notify=False)

    def abort(self, request_id: str) -> bool:
        """Abort a queued or running request, freeing its pages now. False if unknown."""
        with self._lock:
            req = self._requests.get(request_id)
        if req is None:
            return False
        self._abort(req, RequestAbortedError(f"request {request_id!r} was aborted"))
        return True

    def capacity(self) -> Capacity:
        e, bm = self.engine, self.engine.block_manager
        return Capacity(free_pages=bm.num_free_pages, total_pages=bm.num_usable_pages,
                        running=len(e.running), waiting=len(e.waiting))

    # -- lifecycle and reporting --------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Numeric counters: prefix-cache queries/hits (tokens), preemptions, steps, ..."""
        with self._lock:
            in_flight = len(self._requests)
        return {**self.engine.stats(), "requests": self.num_requests,
                "requests_in_flight": in_flight,
                "rejected_queue_full": self.num_rejected_queue_full,
                "draining": float(self._draining)}

    async def warmup(self) -> None:
        """Generate two tokens from a short prompt through the same path requests take (one
        prefill and one decode program compiled and run); raises if that fails."""
        ids = self.tokenize("Hello") or [0]
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        request_id = f"jaxserve-engine-warmup-{next(self._warmup_ids)}"
        n = 0
        async for delta in self.generate(request_id, ids, params):
            n += len(delta.token_ids)
        if n != 2:
            raise RuntimeError(f"warmup generated {n} tokens, expected 2")

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests (EngineDrainingError) and wait for those in flight to finish.
        True if they all did within `timeout` seconds."""
        self._draining = True
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._requests:
                    return True
            if end is not None and time.monotonic() >= end:
                return False
            await asyncio.sleep(0.01)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort whatever is in flight (RequestAbortedError to its consumers) and stop the
        stepping thread. The LLMEngine stays usable synchronously."""
        self._draining = True
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify_all()
        with self._lock:
            reqs = list(self._requests.values())
        for req in reqs:
            self._abort(req, RequestAbortedError("the engine shut down"))
        self._thread.join(timeout)

    # -- internals ----------------------------------------------------------------------------

    def _admit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               deadline: float | None, priority: int) -> _Request:
        if self._draining:
            raise EngineDrainingError("the engine is draining and takes no new requests")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got "
                                      f"{request_id!r}")
        if deadline is not None and not isinstance(deadline, int | float):
            raise InvalidRequestError(f"deadline must be a time.monotonic() instant, got "
                                      f"{deadline!r}")
        with self._lock:
            if request_id in self._requests:
                raise InvalidRequestError(f"request_id {request_id!r} is already in flight")
        seq = self.engine.make_sequence(prompt_ids, params, request_id=request_id,
                                        priority=priority, deadline=deadline,
                                        strict_length=True)
        req = _Request(request_id, seq, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._requests:
                raise InvalidRequestError(f"request_id {request_id!r} is already in flight")
            if len(self.engine.waiting) >= self.max_waiting:
                self.num_rejected_queue_full += 1
                retry = self._finish_interval_s or 1.0
                raise QueueFullError(f"{len(self.engine.waiting)} requests are waiting (the "
                                     f"bound is {self.max_waiting})",
                                     retry_after_s=min(max(retry, 0.05), 30.0))
            self._requests[request_id] = req
            self._by_seq[seq.seq_id] = req
            self.num_requests += 1
        self.engine.add_sequence(seq)
        with self._wakeup:
            self._wakeup.notify()
        return req

    def _forget(self, req: _Request) -> bool:
        """Mark req done and drop it; False if it already was."""
        with self._lock:
            if req.done:
                return False
            req.done = True
            self._requests.pop(req.request_id, None)
            self._by_seq.pop(req.seq.seq_id, None)
        now = time.monotonic()
        if self._last_finish is not None:
            dt = now - self._last_finish
            prev = self._finish_interval_s
            self._finish_interval_s = dt if prev is None else 0.8 * prev + 0.2 * dt
        self._last_finish = now
        return True

    def _abort(self, req: _Request, error: Exception, notify: bool = True) -> None:
        if not self.engine.abort(req.seq) and req.seq.is_finished and not self._stopped:
            return  # it finished in the step that just ran: its last delta is on the way
        if self._forget(req) and notify:
            self._put(req, error)

    def _put(self, req: _Request, item: StreamDelta | Exception) -> None:
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening
            self.engine.abort(req.seq)

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopped and not self.engine.has_unfinished():
                    self._wakeup.wait()
                if self._stopped:
                    return
            try:
                changed = self.engine.step()
            except Exception as e:  # a bug in the bookkeeping: fail what is in flight, go on
                log.exception("engine step failed outside the model run")
                with self._lock:
                    reqs = list(self._requests.values())
                for req in reqs:
                    self._abort(req, EngineStepError(f"engine step failed: "
                                                     f"{type(e).__name__}: {e}"))
                continue
            self._publish(changed)

    def _publish(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            with self._lock:
                req = self._by_seq.get(seq.seq_id)
            if req is None or req.done:
                continue  # not ours (LLM.generate) or already ended
            with self.engine.lock:
                item = self._delta(req, seq)
            if seq.is_finished and not self._forget(req):
                continue
            self._put(req, item)

    def _delta(self, req: _Request, seq: Sequence) -> StreamDelta | Exception:
        if seq.finish_reason in ("abort", "error"):
            err = seq.error or EngineStepError(f"request ended: {seq.finish_reason}")
            fresh = type(err)(str(err))  # one exception object per consumer
            fresh.__cause__ = err.__cause__
            return fresh
        finished = seq.is_finished
        start = req.num_sent_tokens
        ids = tuple(seq.output_ids[start:])
        req.num_sent_tokens = len(seq.output_ids)
        end = len(seq.text) if finished else seq.stop_checker.emittable_len(seq.text)
        text = seq.text[req.num_sent_chars : end] if end > req.num_sent_chars else ""
        req.num_sent_chars = max(req.num_sent_chars, end)
        logprobs = (tuple(seq.output_logprobs[start:]) if seq.params.logprobs is not None
                    else None)
        if not finished:
            return StreamDelta(token_ids=ids, text=text, logprobs=logprobs)
        arrival = seq.arrival_time
        scheduled = seq.first_scheduled_time or arrival
        first_token = seq.first_token_time or scheduled
        return StreamDelta(
            token_ids=ids, text=text, logprobs=logprobs, finish_reason=seq.finish_reason,
            usage=Usage(prompt_tokens=len(seq.prompt_ids),
                        completion_tokens=len(seq.output_ids),
                        cached_prompt_tokens=seq.num_cached_tokens or 0,
                        spec_proposed_tokens=seq.spec_stats.num_proposed if seq.spec_stats else 0,
                        spec_accepted_tokens=seq.spec_stats.num_accepted if seq.spec_stats else 0),
            timings=Timings(queue_s=scheduled - arrival, ttft_s=first_token - arrival))
