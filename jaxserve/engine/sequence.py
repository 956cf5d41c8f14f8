"""Per-request state the engine keeps on the host. Pure Python."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
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
    finish_reason: str | None = None
    text: str = ""
    detokenizer: Any = None
    stop_checker: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to be written into the cache before the next sample."""
        return self.num_tokens - self.num_computed

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
