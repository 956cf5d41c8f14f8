"""Stop conditions, checked on host after each sampled token (plain Python, no jax).

Rules, in order of precedence for one new token:
  eos (unless ``ignore_eos``) and ``stop_token_ids`` -> "stop", but not before ``min_tokens``;
  a stop string in the newly detokenised text       -> "stop", text truncated at the match;
  ``max_tokens`` output tokens or the context limit -> "length".
Stop strings are searched only where a new match can be: the latest delta plus the
``max(len(stop)) - 1`` characters before it, so each check costs O(delta + longest stop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sampling.py imports jax; host bookkeeping must not
    from jaxserve.engine.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class StopResult:
    """Why a sequence finished. ``truncate_text_at`` is the length the output text must be cut
    to (a stop string matched), else None. ``stop_reason`` is the matched stop string or stop
    token id (vLLM's ``stop_reason``); None for eos and length."""

    finish_reason: str  # "stop" | "length"
    truncate_text_at: int | None = None
    stop_reason: str | int | None = None


def find_stop_string(
    text: str, stop: tuple[str, ...], new_chars: int, include_stop_str: bool
) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last ``new_chars`` characters of ``text``.

    Returns (length to truncate the text to, the stop string) or None. The search starts
    ``max(len(stop)) - 1`` characters before the new region so a match spanning deltas is found,
    and no earlier, so a match already checked on a previous call is not found again.
    """
    if not stop or new_chars <= 0:
        return None
    best: tuple[int, str] | None = None
    for s in stop:
        # A match ends in the new region iff it starts at or after this offset.
        at = text.find(s, max(len(text) - new_chars - len(s) + 1, 0))
        if at != -1 and (best is None or at < best[0]):
            best = (at, s)
    if best is None:
        return None
    at, s = best
    return (at + len(s) if include_stop_str else at), s


def held_back_chars(text: str, stop: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string and so must not
    be streamed yet: the longest suffix that is a proper prefix of some stop string (at most
    ``max(len(stop)) - 1``)."""
    if not stop:
        return 0
    longest = min(max(len(s) for s in stop) - 1, len(text))
    for n in range(longest, 0, -1):
        tail = text[-n:]
        if any(len(s) > n and s.startswith(tail) for s in stop):
            return n
    return 0


def check_stop(
    params: SamplingParams,
    eos_token_ids: Iterable[int],
    token_id: int,
    num_output_tokens: int,
    text: str,
    new_chars: int,
    *,
    at_length_limit: bool = False,
) -> StopResult | None:
    """Decide whether the sequence finishes after ``token_id`` (already appended: it is output
    token number ``num_output_tokens``, and its text is the last ``new_chars`` characters of
    ``text``). ``at_length_limit``: the sequence has reached the context limit."""
    if num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token_id in eos_token_ids:
            return StopResult("stop")
        if token_id in params.stop_token_ids:
            return StopResult("stop", stop_reason=token_id)
        found = find_stop_string(text, params.stop, new_chars, params.include_stop_str_in_output)
        if found is not None:
            return StopResult("stop", truncate_text_at=found[0], stop_reason=found[1])
    if params.max_tokens is not None and num_output_tokens >= params.max_tokens:
        return StopResult("length")
    if at_length_limit:
        return StopResult("length")
    return None


class StopChecker:
    """Per-sequence stop state: remembers how much text it has already searched, so callers
    pass the whole growing text each step."""

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int] = ()):
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self._checked_len = 0

    def check(
        self, token_id: int, num_output_tokens: int, text: str, *, at_length_limit: bool = False
    ) -> StopResult | None:
        """``text``: all output text so far, including this token's. See ``check_stop``."""
        new_chars = len(text) - self._checked_len
        self._checked_len = len(text)
        return check_stop(
            self.params,
            self.eos_token_ids,
            token_id,
            num_output_tokens,
            text,
            new_chars,
            at_length_limit=at_length_limit,
        )

    def emittable_len(self, text: str, finished: bool = False) -> int:
        """How many leading characters of ``text`` are safe to stream now: all when finished
        (the text is already truncated), else all but a tail that may begin a stop string."""
        if finished:
            return len(text)
        return len(text) - held_back_chars(text, self.params.stop)
