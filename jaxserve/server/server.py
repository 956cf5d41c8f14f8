"""The gRPC server: `jaxserve.v1.Inference` over any `EngineClient`, plus health, reflection
and Prometheus metrics. No model code here: everything model-side goes through the protocol.

Lifecycle: STARTING (health NOT_SERVING, Generate UNAVAILABLE) -> a real one-token generation
succeeds -> SERVING -> drain (SIGTERM/SIGINT or `drain()`): health NOT_SERVING, new Generate
UNAVAILABLE, in-flight streams run to the grace period, the rest are aborted -> STOPPED.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.engine.protocol import (
    EngineClient,
    EngineDrainingError,
    EngineStepError,
    QueueFullError,
    RequestAbortedError,
    StreamDelta,
)
from jaxserve.errors import AddressInUseError, InvalidRequestError
from jaxserve.server import inference_pb2 as pb
from jaxserve.server import inference_pb2_grpc as pb_grpc
from jaxserve.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "jaxserve.v1.Inference"
RETRY_AFTER_KEY = "retry-after-ms"
CHAT_ROLES = ("system", "user", "assistant", "tool")
SAMPLING_FIELDS = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)
WARMUP_REQUEST_ID = "jaxserve-warmup"


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class _RpcError(Exception):
    """Ends an RPC with `code`, `message` and optional trailing metadata."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


def sampling_params(msg: pb.SamplingParams) -> Any:
    """Proto SamplingParams -> jaxserve.SamplingParams; unset fields keep the Python defaults.
    Raises InvalidRequestError naming the field."""
    from jaxserve.engine.sampling import SamplingParams

    kwargs: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        if name in ("stop", "stop_token_ids"):
            values = list(getattr(msg, name))
            if values:
                kwargs[name] = values
        elif msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    return SamplingParams(**kwargs)


def _messages(msgs) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(msgs):
        if m.role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, "
                                      f"got {m.role!r}")
        out.append({"role": m.role, "content": m.content})
    return out


def _response(request_id: str, delta: StreamDelta, total_s: float) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(request_id=request_id, text=delta.text,
                               token_ids=list(delta.token_ids))
    if delta.logprobs is not None:
        for token_id, (logprob, top) in zip(delta.token_ids, delta.logprobs, strict=True):
            entry = resp.logprobs.add(token_id=token_id, logprob=logprob)
            for tid, lp in sorted(top.items(), key=lambda kv: -kv[1]):
                entry.top_logprobs.add(token_id=tid, logprob=lp)
    if delta.finish_reason is not None:
        resp.finish_reason = delta.finish_reason
    if delta.usage is not None:
        resp.usage.prompt_tokens = delta.usage.prompt_tokens
        resp.usage.completion_tokens = delta.usage.completion_tokens
        resp.usage.cached_prompt_tokens = delta.usage.cached_prompt_tokens
        resp.usage.spec_proposed_tokens = delta.usage.spec_proposed_tokens
        resp.usage.spec_accepted_tokens = delta.usage.spec_accepted_tokens
    if delta.timings is not None:
        resp.timings.queue_time_s = delta.timings.queue_s
        resp.timings.time_to_first_token_s = delta.timings.ttft_s
    if delta.finish_reason is not None:
        resp.timings.total_time_s = total_s
    return resp


class InferenceServicer(pb_grpc.InferenceServicer):
    """Translates RPCs to EngineClient calls and engine errors to status codes."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics, server: Server):
        self.engine = engine
        self.metrics = metrics
        self.server = server
        self.in_flight: dict[str, float] = {}  # request_id -> monotonic deadline (inf: none)
        self._idle = asyncio.Event()
        self._idle.set()
        self._shutdown_aborted: set[str] = set()

    # -- Generate ----------------------------------------------------------------------------

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        given = [name for name, present in (
            ("prompt", request.HasField("prompt")),
            ("prompt_token_ids", len(request.prompt_token_ids) > 0),
            ("messages", len(request.messages) > 0)) if present]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise InvalidRequestError("GenerateRequest needs exactly one input (prompt, "
                                      f"prompt_token_ids or messages), got {got}")
        if given[0] == "prompt":
            if not request.prompt:
                raise InvalidRequestError("GenerateRequest.prompt is empty")
            ids = self.engine.tokenize(request.prompt)
        elif given[0] == "messages":
            ids = self.engine.render_chat(_messages(request.messages))
        else:
            ids = list(request.prompt_token_ids)
            vocab = self.engine.model_info().vocab_size
            for i, t in enumerate(ids):
                if not 0 <= t < vocab:
                    raise InvalidRequestError(f"prompt_token_ids[{i}] = {t} is outside the "
                                              f"vocabulary [0, {vocab})")
        if not ids:
            raise InvalidRequestError(f"GenerateRequest.{given[0]} gives no tokens")
        return ids

    def _check_length(self, num_prompt: int, params: Any) -> None:
        max_len = self.engine.model_info().max_model_len
        if num_prompt >= max_len:
            raise InvalidRequestError(f"the prompt has {num_prompt} tokens; the context length "
                                      f"(max_model_len) is {max_len}, leaving no room to "
                                      "generate")
        if params.max_tokens is not None and num_prompt + params.max_tokens > max_len:
            raise InvalidRequestError(
                f"prompt ({num_prompt} tokens) + SamplingParams.max_tokens ({params.max_tokens}) "
                f"= {num_prompt + params.max_tokens} exceeds the context length (max_model_len) "
                f"{max_len}; set max_tokens <= {max_len - num_prompt}")

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        request_id = request.request_id or uuid.uuid4().hex
        registered = finished = False
        try:
            if self.server.state is not State.SERVING:
                raise _RpcError(grpc.StatusCode.UNAVAILABLE,
                                f"the server is {self.server.state.value}; not taking requests")
            if request_id in self.in_flight:
                raise _RpcError(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id {request_id!r} is already in flight")
            prompt_ids = self._prompt_ids(request)
            params = sampling_params(request.sampling)
            self._check_length(len(prompt_ids), params)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            self.in_flight[request_id] = math.inf if deadline is None else deadline
            self._idle.clear()
            registered = True
            self.metrics.in_flight.inc()
            last = None
            stream = self.engine.generate(request_id, prompt_ids, params, deadline=deadline)
            try:
                async for delta in stream:
                    now = time.perf_counter()
                    n = len(delta.token_ids)
                    if n:
                        if last is None:
                            self.metrics.ttft.observe(now - start)
                        else:  # n tokens arriving together share the gap
                            for _ in range(n):
                                self.metrics.inter_token.observe((now - last) / n)
                        last = now
                        self.metrics.generation_tokens.inc(n)
                    if delta.finish_reason is not None:
                        finished = True
                        self._record_finish(delta)
                    yield _response(request_id, delta, now - start)
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
        except _RpcError as e:
            code = e.code
            await context.abort(e.code, e.message, e.trailers)
        except InvalidRequestError as e:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(e))
        except QueueFullError as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            ms = max(int(math.ceil(e.retry_after_s * 1000)), 1)
            await context.abort(code, f"{e}; retry after {ms} ms", ((RETRY_AFTER_KEY, str(ms)),))
        except EngineDrainingError as e:
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"the engine is draining for shutdown: {e}")
        except EngineStepError as e:
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"engine step failed: {e}")
        except RequestAbortedError as e:
            code, message = self._aborted_status(request_id, e)
            await context.abort(code, message)
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away or the deadline passed; gRPC already answers the call. (A
            # cancel that arrives while a response is being sent closes this generator instead
            # of cancelling its task.)
            remaining = context.time_remaining()
            code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                    else grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:
            log.exception("Generate %s failed", request_id)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"internal error: {type(e).__name__}: {e}")
        finally:
            if registered:
                if not finished:
                    self.engine.abort(request_id)  # frees its pages now; False if already gone
                self.in_flight.pop(request_id, None)
                self._shutdown_aborted.discard(request_id)
                self.metrics.in_flight.dec()
                if not self.in_flight:
                    self._idle.set()
            self._count("Generate", code)
            if code is grpc.StatusCode.OK:
                self.metrics.e2e.observe(time.perf_counter() - start)

    def _record_finish(self, delta: StreamDelta) -> None:
        if delta.usage is not None:
            self.metrics.prompt_tokens.inc(delta.usage.prompt_tokens)
            self.metrics.cached_prompt_tokens.inc(delta.usage.cached_prompt_tokens)
        if delta.timings is not None:
            self.metrics.queue_time.observe(delta.timings.queue_s)

    def _aborted_status(self, request_id: str, e: Exception) -> tuple[grpc.StatusCode, str]:
        if request_id in self._shutdown_aborted:
            return (grpc.StatusCode.UNAVAILABLE,
                    f"the server shut down before request {request_id!r} finished (drain grace "
                    "period over)")
        if time.monotonic() >= self.in_flight.get(request_id, math.inf):
            return grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded: {e}"
        return grpc.StatusCode.CANCELLED, f"request {request_id!r} was aborted: {e}"

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.requests.labels(method, code.name).inc()
        if code is not grpc.StatusCode.OK:
            self.metrics.errors.labels(method, code.name).inc()

    async def abort_all(self) -> None:
        """Abort every in-flight request (end of the drain grace period)."""
        for request_id in list(self.in_flight):
            self._shutdown_aborted.add(request_id)
            self.engine.abort(request_id)

    async def wait_idle(self, timeout: float) -> bool:
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # -- unary RPCs --------------------------------------------------------------------------

    async def _unary(self, method: str, context: grpc.aio.ServicerContext, fn):
        code = grpc.StatusCode.OK
        try:
            return fn()
        except InvalidRequestError as e:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(e))
        except Exception as e:
            log.exception("%s failed", method)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"internal error: {type(e).__name__}: {e}")
        finally:
            self._count(method, code)

    async def Abort(self, request, context):
        def run():
            if not request.request_id:
                raise InvalidRequestError("AbortRequest.request_id is empty")
            return pb.AbortResponse(found=self.engine.abort(request.request_id))

        return await self._unary("Abort", context, run)

    async def GetModelInfo(self, request, context):
        def run():
            info = self.engine.model_info()
            return pb.ModelInfo(name=info.name, vocab_size=info.vocab_size,
                                max_model_len=info.max_model_len, dtype=info.dtype,
                                page_size=info.page_size, eos_token_ids=list(info.eos_token_ids),
                                extra={str(k): str(v) for k, v in info.extra.items()})

        return await self._unary("GetModelInfo", context, run)

    async def Tokenize(self, request, context):
        def run():
            has_text, has_messages = request.HasField("text"), len(request.messages) > 0
            if has_text == has_messages:
                raise InvalidRequestError("TokenizeRequest needs exactly one of text or "
                                          f"messages, got {'both' if has_text else 'none'}")
            if has_text:
                ids = self.engine.tokenize(request.text)
            else:
                ids = self.engine.render_chat(_messages(request.messages))
            return pb.TokenizeResponse(token_ids=ids)

        return await self._unary("Tokenize", context, run)

    async def GetCapacity(self, request, context):
        def run():
            c = self.engine.capacity()
            return pb.Capacity(free_pages=c.free_pages, total_pages=c.total_pages,
                               running=c.running, waiting=c.waiting)

        return await self._unary("GetCapacity", context, run)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Server:
    """One running gRPC server on the current asyncio loop. Create with `start_server`."""

    def __init__(self, engine: EngineClient, *, grace_s: float):
        self.engine = engine
        self.grace_s = grace_s
        self.state = State.STARTING
        self.metrics = ServerMetrics(engine)
        self.servicer = InferenceServicer(engine, self.metrics, self)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self.warmup_error: BaseException | None = None
        self._grpc: grpc.aio.Server | None = None
        self.ready = threading.Event()  # set once SERVING; waitable from any thread
        self._stopped = asyncio.Event()
        self._warmup_task: asyncio.Task | None = None
        self._drain_task: asyncio.Task | None = None

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _start(self, host: str, port: int, metrics_port: int | None, warmup: bool) -> None:
        self.metrics.bind_loop(asyncio.get_running_loop())
        # gRPC sets SO_REUSEPORT by default: a second server on a taken port would start and
        # the kernel would split the connections between the two. Off, the bind fails.
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_InferenceServicer_to_server(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self._grpc)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = self._grpc.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:  # grpc's "Failed to bind to address"
            raise AddressInUseError(f"cannot listen on {host}:{port} (gRPC): {e}") from None
        if self.port == 0:
            raise AddressInUseError(f"cannot listen on {host}:{port} (gRPC): address in use?")
        if metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http(host, metrics_port)
            except OSError as e:
                raise AddressInUseError(f"cannot listen on {host}:{metrics_port} (metrics): "
                                        f"{e.strerror or e}") from None
        await self._grpc.start()
        if warmup:
            self._warmup_task = asyncio.create_task(self._warmup())
        else:
            await self._mark_serving()

    async def _warmup(self) -> None:
        """SERVING only after a real one-token generation: the engine's own warmup when it has
        one, then one token through the same EngineClient path requests take."""
        from jaxserve.engine.sampling import SamplingParams

        try:
            hook = getattr(self.engine, "warmup", None)
            if hook is not None:
                if inspect.iscoroutinefunction(hook):
                    await hook()
                else:
                    await _maybe_await(await asyncio.to_thread(hook))
            ids = self.engine.tokenize("Hello") or [0]
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            n = 0
            async for delta in self.engine.generate(WARMUP_REQUEST_ID, ids, params):
                n += len(delta.token_ids)
            if n != 1:
                raise RuntimeError(f"warmup generation returned {n} tokens, expected 1")
        except Exception as e:
            log.exception("warmup failed; the server stays NOT_SERVING")
            self.warmup_error = e
            return
        if self.state is State.STARTING:
            await self._mark_serving()

    async def _mark_serving(self) -> None:
        self.state = State.SERVING
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()

    def drain(self, grace_s: float | None = None) -> asyncio.Task:
        """Start a graceful drain (idempotent); returns the task that finishes it."""
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(
                self._drain(self.grace_s if grace_s is None else grace_s))
        return self._drain_task

    async def _drain(self, grace_s: float) -> None:
        if self.state is State.STOPPED:
            return
        self.state = State.DRAINING
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._warmup_task is not None and not self._warmup_task.done():
            self._warmup_task.cancel()
        hook = getattr(self.engine, "drain", None)
        hook_task = None
        if hook is not None:
            hook_task = asyncio.ensure_future(_maybe_await(hook()))
        if not await self.servicer.wait_idle(grace_s):
            log.warning("drain grace period (%.1f s) over; aborting %d request(s)", grace_s,
                        len(self.servicer.in_flight))
            await self.servicer.abort_all()
            await self.servicer.wait_idle(1.0)
        if hook_task is not None:
            try:
                await asyncio.wait_for(hook_task, 1.0)
            except Exception:
                log.warning("engine drain() did not finish cleanly", exc_info=True)
        await self._stop()

    async def _stop(self) -> None:
        self.state = State.STOPPED
        if self._grpc is not None:
            await self.health.enter_graceful_shutdown()
            await self._grpc.stop(grace=0.5)
        self.metrics.stop_http()
        self._stopped.set()

    async def stop(self) -> None:
        """Stop now: in-flight requests are aborted, no grace period."""
        await self.drain(0.0)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def start_server(engine: EngineClient, host: str = "127.0.0.1", port: int = 50051, *,
                       metrics_port: int | None = None, grace_s: float = 30.0,
                       warmup: bool = True) -> Server:
    """Start serving `engine` on the running asyncio loop; returns once the port is bound.
    Health turns SERVING after warmup (`await server.wait_ready()`). port 0: any free port
    (`server.port`); metrics_port likewise, None for no metrics endpoint."""
    server = Server(engine, grace_s=grace_s)
    await server._start(host, port, metrics_port, warmup)
    return server


class ServerHandle:
    """A `Server` running on its own event loop in a background thread; what `serve` returns.
    Methods are called from any other thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, server: Server):
        self._loop = loop
        self._thread = thread
        self.server = server

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    @property
    def state(self) -> State:
        return self.server.state

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until health is SERVING. Raises RuntimeError if warmup failed or the server
        stopped first, TimeoutError after `timeout` seconds."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while not self.server.ready.wait(min(0.05, max(deadline - time.monotonic(), 0))):
            if self.server.warmup_error is not None:
                raise RuntimeError("server warmup failed") from self.server.warmup_error
            if not self._thread.is_alive():
                raise RuntimeError("the server stopped before it was ready")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"server not ready after {timeout} s")

    def drain(self, grace_s: float | None = None, wait: bool = True) -> None:
        """Graceful drain: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish
        within grace_s (default: the server's) or are aborted. With wait, block until stopped."""
        async def start() -> None:
            self.server.drain(grace_s)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(start(), self._loop).result()
            except RuntimeError:  # the loop closed meanwhile: already stopped
                pass
        if wait:
            self.wait()

    def stop(self) -> None:
        """Stop now (drain with no grace) and wait for it."""
        self.drain(0.0)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; True if it did within timeout."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            # Short joins keep the main thread responsive to signal handlers.
            self._thread.join(min(0.2, max(deadline - time.monotonic(), 0)))
        return not self._thread.is_alive()

    def install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM/SIGINT: graceful drain; a second one: abort what is left and stop. Main
        thread only. Returns the previous handlers, for `restore_signal_handlers`."""
        count = 0

        def handler(signum, frame):
            nonlocal count
            count += 1
            log.warning("signal %d: %s", signum, "draining" if count == 1 else "stopping now")
            try:
                self._loop.call_soon_threadsafe(self.server.drain if count == 1 else self._force)
            except RuntimeError:  # loop closed: already stopped
                pass

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    def _force(self) -> None:
        self.server.drain()
        asyncio.ensure_future(self.server.servicer.abort_all())


def serve(engine: EngineClient, host: str = "127.0.0.1", port: int = 50051, *,
          metrics_port: int | None = None, grace_s: float = 30.0,
          warmup: bool = True) -> ServerHandle:
    """Serve `engine` from a background thread with its own event loop; returns once the port
    is bound (warmup goes on in the background: `handle.wait_ready()`). Stop with
    `handle.drain()` / `handle.stop()`, or `handle.install_signal_handlers()` and
    `handle.wait()`."""
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    bound = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            try:
                started["server"] = await start_server(
                    engine, host, port, metrics_port=metrics_port, grace_s=grace_s,
                    warmup=warmup)
            except BaseException as e:
                started["error"] = e
                bound.set()
                return
            bound.set()
            await started["server"].wait_stopped()

        try:
            loop.run_until_complete(main())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name="jaxserve-grpc", daemon=True)
    thread.start()
    bound.wait()
    if "error" in started:
        thread.join()
        raise started["error"]
    return ServerHandle(loop, thread, started["server"])
