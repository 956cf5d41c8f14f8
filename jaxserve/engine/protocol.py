"""The narrow interface the server depends on (and nothing else of the engine).

`jaxserve.server` talks to any `EngineClient`: the real asynchronous engine, or a mock whose
outputs can be computed by hand. Pure Python; no jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any, Protocol

from jaxserve.errors import JaxserveError


class QueueFullError(JaxserveError, RuntimeError):
    """The waiting queue is at its bound; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStepError(JaxserveError, RuntimeError):
    """A model step failed; the requests in that step end with this error, the engine goes on."""


class EngineDrainingError(JaxserveError, RuntimeError):
    """The engine is draining for shutdown and takes no new requests."""


class RequestAbortedError(JaxserveError, RuntimeError):
    """The request was aborted (by the client, a cancellation or its deadline)."""


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from the prefix cache
    spec_proposed_tokens: int = 0  # speculative drafts verified for this request
    spec_accepted_tokens: int = 0  # of which the model accepted


@dataclasses.dataclass(frozen=True)
class Timings:
    queue_s: float  # arrival -> first scheduled
    ttft_s: float  # arrival -> first token


@dataclasses.dataclass(frozen=True)
class StreamDelta:
    """What one request produced since its previous delta."""

    token_ids: tuple[int, ...]
    text: str  # UTF-8 safe: never half a character, never a held-back stop-string prefix
    # Per token in token_ids, when the request asked for logprobs: (logprob, {id: logprob}).
    logprobs: tuple[tuple[float, dict[int, float]], ...] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    usage: Usage | None = None  # on the last delta
    timings: Timings | None = None  # on the last delta


@dataclasses.dataclass(frozen=True)
class Capacity:
    free_pages: int  # pages held only by the prefix cache count as free
    total_pages: int
    running: int
    waiting: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab_size: int
    max_model_len: int
    dtype: str
    page_size: int
    eos_token_ids: tuple[int, ...]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class EngineClient(Protocol):
    def model_info(self) -> ModelInfo: ...

    def tokenize(self, text: str) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat template applied with add_generation_prompt=True; InvalidRequestError on a bad
        role or content."""
        ...

    def generate(self, request_id: str, prompt_ids: list[int], params: Any,
                 deadline: float | None = None) -> AsyncIterator[StreamDelta]:
        """Stream a request's deltas. Raises InvalidRequestError (bad input), QueueFullError,
        EngineDrainingError before the first delta; EngineStepError or RequestAbortedError
        after. Closing the iterator early (client gone) aborts the request. `deadline` is a
        time.monotonic() instant."""
        ...

    def abort(self, request_id: str) -> bool:
        """Abort a queued or running request, freeing its pages now. False if unknown."""
        ...

    def capacity(self) -> Capacity: ...
