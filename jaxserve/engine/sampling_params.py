"""`SamplingParams`: one request's sampling knobs, validated on construction.

Plain Python without jax, so the host-side scheduler and server can use it; the device side
(`SamplingTensors`, `sample`) is in sampling.py.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxserve.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_SEED = 2**63
MAX_SPECULATIVE_TOKENS = 16
# Temperatures below this are greedy: dividing logits by a denormal-scale temperature overflows
# and the sampled distribution is a point mass anyway (vLLM uses the same cut-off).
GREEDY_TEMPERATURE = 1e-5


def _bad(field: str, expected: str, value: object) -> InvalidRequestError:
    return InvalidRequestError(f"SamplingParams.{field} must be {expected}, got {value!r}")


def _real(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise _bad(field, "a number", value)
    value = float(value)
    if math.isnan(value):
        raise _bad(field, "a number", value)
    return value


def _integer(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise _bad(field, "an integer", value)
    return int(value)


def _flag(field: str, value: object) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise _bad(field, "a bool", value)
    return bool(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop (vLLM names and semantics).

    Normalised on construction: numbers become float/int, ``top_k=-1`` becomes 0 (off),
    ``stop`` becomes a tuple of str, ``stop_token_ids`` a tuple of int. Frozen and hashable;
    derive variants with ``dataclasses.replace`` (which validates again).
    """

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = off
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # in [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # > 0; prompt + output tokens; 1 = off
    presence_penalty: float = 0.0  # [-2, 2]; output tokens only
    frequency_penalty: float = 0.0  # [-2, 2]; output tokens only
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context limit
    min_tokens: int = 0
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives to report; 0 = only the sampled token
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Drafts verified per step at most when the engine speculates: None = the engine's default
    # (EngineConfig.num_speculative_tokens, adapted to load), 0 = never for this request.
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        temperature = _real("temperature", self.temperature)
        if temperature < 0 or math.isinf(temperature):
            raise _bad("temperature", ">= 0 and finite (0 = greedy)", self.temperature)
        top_p = _real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise _bad("top_p", "in (0, 1]", self.top_p)
        top_k = _integer("top_k", self.top_k)
        if top_k < -1:
            raise _bad("top_k", ">= 1, or 0 / -1 to disable", self.top_k)
        min_p = _real("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise _bad("min_p", "in [0, 1]", self.min_p)
        repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if not 0 < repetition_penalty < math.inf:
            raise _bad("repetition_penalty", "> 0 and finite (1 = off)", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise _bad(name, "in [-2, 2]", getattr(self, name))
            put(name, value)
        if self.seed is not None:
            seed = _integer("seed", self.seed)
            if not 0 <= seed < MAX_SEED:
                raise _bad("seed", "an integer in [0, 2**63) or None", self.seed)
            put("seed", seed)
        if self.max_tokens is not None:
            max_tokens = _integer("max_tokens", self.max_tokens)
            if max_tokens < 1:
                raise _bad("max_tokens", ">= 1 or None", self.max_tokens)
            put("max_tokens", max_tokens)
        min_tokens = _integer("min_tokens", self.min_tokens)
        if min_tokens < 0:
            raise _bad("min_tokens", ">= 0", self.min_tokens)
        if self.max_tokens is not None and min_tokens > self.max_tokens:
            raise _bad("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None:
            logprobs = _integer("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise _bad("logprobs", f"in [0, {MAX_LOGPROBS}] or None", self.logprobs)
            put("logprobs", logprobs)
        if self.num_speculative_tokens is not None:
            k = _integer("num_speculative_tokens", self.num_speculative_tokens)
            if not 0 <= k <= MAX_SPECULATIVE_TOKENS:
                raise _bad("num_speculative_tokens", f"in [0, {MAX_SPECULATIVE_TOKENS}] or None",
                           self.num_speculative_tokens)
            put("num_speculative_tokens", k)

        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list | tuple):
            stop = tuple(stop)
        else:
            raise _bad("stop", "a str, a list of str or None", self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise _bad("stop", "non-empty strings", self.stop)
        stop_token_ids = self.stop_token_ids
        if stop_token_ids is None:
            stop_token_ids = ()
        elif not isinstance(stop_token_ids, list | tuple):
            raise _bad("stop_token_ids", "a list of int or None", self.stop_token_ids)
        stop_token_ids = tuple(_integer("stop_token_ids", i) for i in stop_token_ids)
        if any(i < 0 for i in stop_token_ids):
            raise _bad("stop_token_ids", "non-negative token ids", self.stop_token_ids)

        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            put(name, _flag(name, getattr(self, name)))
        put("temperature", temperature)
        put("top_p", top_p)
        put("top_k", max(top_k, 0))
        put("min_p", min_p)
        put("repetition_penalty", repetition_penalty)
        put("min_tokens", min_tokens)
        put("stop", stop)
        put("stop_token_ids", stop_token_ids)

    @classmethod
    def greedy(cls, **kwargs: object) -> SamplingParams:
        """Greedy decoding (temperature 0); other fields as given."""
        return cls(temperature=0.0, **kwargs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
