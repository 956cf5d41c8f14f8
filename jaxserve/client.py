"""Python client of the jaxserve gRPC API (`jaxserve.v1.Inference` + health).

    with Client("127.0.0.1:50051") as c:
        for chunk in c.generate("Hello", max_tokens=32, temperature=0):
            print(chunk.text, end="", flush=True)
        print(c.complete(messages=[{"role": "user", "content": "Hi"}]).text)

Blocking (grpc's synchronous channel); no jax import. Failed calls raise `ClientError` with the
gRPC status code, the server's message and, for RESOURCE_EXHAUSTED, `retry_after_s`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve.engine.protocol import Capacity, ModelInfo, Usage
from jaxserve.errors import JaxserveError
from jaxserve.server import inference_pb2 as pb
from jaxserve.server import inference_pb2_grpc as pb_grpc

RETRY_AFTER_KEY = "retry-after-ms"
SAMPLING_FIELDS = frozenset(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)


class ClientError(JaxserveError, RuntimeError):
    """A failed RPC: `code` (grpc.StatusCode), `details` (the server's message) and, when the
    server sent one, `retry_after_s`."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> ClientError:
        retry = None
        trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
        for key, value in trailers or ():
            if key == RETRY_AFTER_KEY:
                retry = int(value) / 1000
        return cls(e.code(), e.details() or "", retry)


@dataclasses.dataclass(frozen=True)
class Timings:
    queue_time_s: float
    time_to_first_token_s: float
    total_time_s: float


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One streamed response: the text and token ids new since the previous one."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    # Per token: (logprob, {token_id: logprob} of the top alternatives), when requested.
    logprobs: tuple[tuple[float, dict[int, float]], ...] | None
    finish_reason: str | None  # on the last chunk
    usage: Usage | None  # on the last chunk
    timings: Timings | None  # on the last chunk


@dataclasses.dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]]] | None
    finish_reason: str
    usage: Usage
    timings: Timings


def _chunk(resp: pb.GenerateResponse) -> Chunk:
    logprobs = None
    if len(resp.logprobs):
        logprobs = tuple((lp.logprob, {t.token_id: t.logprob for t in lp.top_logprobs})
                         for lp in resp.logprobs)
    last = bool(resp.finish_reason)
    usage = timings = None
    if resp.HasField("usage"):
        u = resp.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens,
                      u.spec_proposed_tokens, u.spec_accepted_tokens)
    if resp.HasField("timings"):
        t = resp.timings
        timings = Timings(t.queue_time_s, t.time_to_first_token_s, t.total_time_s)
    return Chunk(request_id=resp.request_id, text=resp.text, token_ids=tuple(resp.token_ids),
                 logprobs=logprobs, finish_reason=resp.finish_reason if last else None,
                 usage=usage, timings=timings)


def _chat(messages: Sequence[Mapping[str, str]]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


def build_request(prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                  messages: Sequence[Mapping[str, str]] | None = None, request_id: str = "",
                  **sampling: Any) -> pb.GenerateRequest:
    """A GenerateRequest; sampling keywords are SamplingParams fields (None: server default)."""
    unknown = sorted(set(sampling) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; known: "
                        f"{sorted(SAMPLING_FIELDS)}")
    fields = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    req = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**fields))
    if prompt is not None:
        req.prompt = prompt
    if prompt_token_ids is not None:
        req.prompt_token_ids.extend(prompt_token_ids)
    if messages is not None:
        req.messages.extend(_chat(messages))
    return req


class Client:
    """Blocking client for one server (`target` like "127.0.0.1:50051")."""

    def __init__(self, target: str, *, timeout: float | None = None,
                 channel: grpc.Channel | None = None):
        self.target = target
        self.timeout = timeout  # default per-call deadline in seconds; None: no deadline
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self._timeout(timeout))
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e) from None

    def generate(self, prompt: str | None = None, *,
                 prompt_token_ids: Sequence[int] | None = None,
                 messages: Sequence[Mapping[str, str]] | None = None, request_id: str = "",
                 timeout: float | None = None, **sampling: Any) -> Iterator[Chunk]:
        """Stream one request's chunks. Exactly one of prompt / prompt_token_ids / messages.
        Sampling keywords are SamplingParams fields. Closing the iterator early (or breaking
        out of the loop and dropping it) cancels the call, which aborts the request."""
        req = build_request(prompt, prompt_token_ids=prompt_token_ids, messages=messages,
                            request_id=request_id, **sampling)
        return self._stream(req, self._timeout(timeout))

    def _stream(self, req: pb.GenerateRequest, timeout: float | None) -> Iterator[Chunk]:
        call = self._stub.Generate(req, timeout=timeout)
        try:
            for resp in call:
                yield _chunk(resp)
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e) from None
        finally:
            call.cancel()  # no-op when the stream already ended

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """`generate` gathered into one result (same arguments)."""
        text, ids, logprobs, last = [], [], [], None
        for chunk in self.generate(prompt, **kwargs):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            if chunk.logprobs is not None:
                logprobs.extend(chunk.logprobs)
            last = chunk
        if last is None or last.finish_reason is None:
            raise ClientError(grpc.StatusCode.INTERNAL, "the stream ended without a "
                              "finish_reason")
        return Completion(request_id=last.request_id, text="".join(text), token_ids=ids,
                          logprobs=logprobs or None, finish_reason=last.finish_reason,
                          usage=last.usage, timings=last.timings)

    def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Abort a request by id; False if the server had no such request in flight."""
        return self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id),
                           timeout).found

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        m = self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return ModelInfo(name=m.name, vocab_size=m.vocab_size, max_model_len=m.max_model_len,
                         dtype=m.dtype, page_size=m.page_size,
                         eos_token_ids=tuple(m.eos_token_ids), extra=dict(m.extra))

    def tokenize(self, text: str | None = None, *,
                 messages: Sequence[Mapping[str, str]] | None = None,
                 timeout: float | None = None) -> list[int]:
        """Token ids of `text`, or of `messages` rendered with the chat template."""
        req = pb.TokenizeRequest()
        if text is not None:
            req.text = text
        if messages is not None:
            req.messages.extend(_chat(messages))
        return list(self._unary(self._stub.Tokenize, req, timeout).token_ids)

    def capacity(self, *, timeout: float | None = None) -> Capacity:
        c = self._unary(self._stub.GetCapacity, pb.GetCapacityRequest(), timeout)
        return Capacity(free_pages=c.free_pages, total_pages=c.total_pages, running=c.running,
                        waiting=c.waiting)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... of `service` ("": the whole server)."""
        resp = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                           timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
