"""Per-request state the engine keeps on the host. Pure Python."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, being prefilled, or preempted (then num_computed == 0)
    RUNNING = "running"  # prompt done; one token per decode step
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)  # identity: each request is its own sequence
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: Any  # SamplingParams
    seed: int  # always set: the engine draws one for unseeded requests
    max_len: int  # prompt + output may not exceed this (context limit)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    # Per output token: (logprob of the token, {token_id: logprob} of the top-n) when asked.
    output_logprobs: list[tuple[float, dict[int, float]]] = dataclasses.field(default_factory=list)
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V is in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: Exception | None = None  # why an "abort" / "error" finish happened
    text: str = ""
    detokenizer: Any = None
    stop_checker: Any = None
    request_id: str | None = None  # the caller's name for it (unique among unfinished)
    priority: int = 0  # lower runs first; ties by arrival (seq_id)
    deadline: float | None = None  # time.monotonic() instant after which it is aborted
    # Prefix cache: hash of each full page of tokens (computed as needed), how many leading
    # pages of block_table were offered to the cache, and prompt tokens whose K/V came from it
    # at first admission (None until then).
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)
    num_registered_pages: int = 0
    num_cached_tokens: int | None = None
    # Speculative decoding: acceptance estimate and counters (speculative/policy.SpecStats).
    spec_stats: Any = None
    # time.monotonic() instants.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to be written into the cache before the next sample."""
        return self.num_tokens - self.num_computed

    def tokens(self, start: int, end: int) -> list[int]:
        # Called for every row of every step: slice, never concatenate the whole history.
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def sort_key(self) -> tuple[int, int]:
        """Waiting-queue order: priority, then arrival."""
        return (self.priority, self.seq_id)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
