"""The `Proposer` interface: how a drafting method plugs into the fused speculative step.

A proposer is a frozen, hashable dataclass (it is a static argument of the compiled step, so
its fields are compile-time constants) plus, optionally, device state it owns (a draft model's
weights and KV cache). Each step it is asked, inside the compiled program, for K draft tokens per
sequence; the target then scores all of them in the same program and the verification keeps the
longest prefix the target agrees with (see runner.spec_step).

Adding a method is one file: subclass `Proposer`, implement `propose` (traced) and, if it needs
per-step host data, `host_inputs`; decorate it with `@register("name")`. Nothing else in the
engine or server changes: `LLM(speculative_method="name")` and `--speculative_method name`
find it in `PROPOSERS`.

Draft heads (Medusa, EAGLE) draft from the target's own features (its final-norm hidden state):
such a proposer sets `observes_hidden`, and after the target's forward the step hands it the
features of every token in the row (`observe`), in the same program, so it can store them in
its state (a feature cache on the KV cache's slots). Its weights may read the target's (the
LM head, the embedding): `bind_params` builds what `propose` and `observe` see from both,
sharing the target's arrays instead of copying them.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np
from flax import struct

from jaxserve.engine.sampling import SamplingFlags, SamplingTensors
from jaxserve.model.attention import RaggedMetadata

PROPOSERS: dict[str, type[Proposer]] = {}


def register(name: str):
    def add(cls):
        cls.name = name
        PROPOSERS[name] = cls
        return cls
    return add


@struct.dataclass
class DraftBatch:
    """What a proposer sees of the step: the flat ragged row before drafts are inserted."""

    tokens: jax.Array  # [1, T] int32: each sequence's pending tokens; draft slots are 0
    meta: RaggedMetadata  # the step's metadata, draft slots included (pages are reserved)
    base_index: jax.Array  # [N] int32: flat index of each sequence's last pending token
    num_draft: jax.Array  # [N] int32: drafts wanted per sequence (0: plain row)
    st: SamplingTensors  # the rows' sampling state (a proposer that samples its drafts)


@dataclasses.dataclass(frozen=True)
class Proposer(abc.ABC):
    name: ClassVar[str] = ""
    # True when the proposer's device state must see every token the target computes (a draft
    # model's KV cache): then every engine step runs through the fused step, K = 0 included.
    stateful: ClassVar[bool] = False
    # True when drafts are a deterministic function of the context (one-hot q): verification
    # then samples the target exactly as plain decoding would and accepts matches, so output
    # is token for token that of non-speculative decoding, for any K. Otherwise `propose`
    # returns the distribution q each draft was drawn from and verification is rejection
    # sampling (speculative/rejection.py): the output distribution is the target's, but which
    # tokens a seed gives depends on the drafts and on K.

    # True when the proposer wants the target's final-norm features of the step's row
    # (`observe`); the step then runs the target as forward_hidden + lm_head.
    observes_hidden: ClassVar[bool] = False

    @property
    def deterministic(self) -> bool:
        return True

    def bind_params(self, own: Any, target: Any) -> Any:
        """The params `propose` / `observe` receive, from the proposer's own weights and the
        target's device params (built once, host side). Default: its own weights alone."""
        return own

    def draft_cost(self, own: Any, target: Any) -> float:
        """One drafting round (a draft decode step) in units of a target decode step, for the
        adaptive policy. Decode is memory-bound, so by default the byte ratio of the weights
        read: the proposer's own against the target's (0 with none)."""
        if own is None:
            return 0.0
        return tree_nbytes(own) / tree_nbytes(target)

    def init_state(self, num_pages: int, page_size: int, dtype: Any, kv_cache_dtype: str) -> Any:
        """Device state the proposer updates (a pytree donated to each step, e.g. a draft
        model's KV cache). Default: none. Its read-only weights come separately (`params`)."""
        return {}

    def host_inputs(self, seqs: list, num_rows: int) -> dict[str, np.ndarray]:
        """Per-step host arrays for `propose` (rows padded to num_rows). Default: none."""
        return {}

    @abc.abstractmethod
    def propose(self, params: Any, state: Any, inputs: dict[str, jax.Array],
                batch: DraftBatch, num_spec: int, kernels: str, flags: SamplingFlags,
                ) -> tuple[jax.Array, jax.Array | None, Any]:
        """Traced. -> (drafts [N, num_spec] int32, -1 where there is none; the draft
        distributions q [N, num_spec, V] f32 they were drawn from, or None when `deterministic`;
        new state). With num_spec == 0 a stateful proposer only brings its state up to date."""

    def observe(self, params: Any, state: Any, hidden: jax.Array, batch: DraftBatch,
                kernels: str) -> Any:
        """Traced, after the target's forward over the row (only when `observes_hidden`).
        hidden [1, T, D]: the target's final-norm features of every token of the row, drafts
        included (batch.tokens holds them); -> new state. Features of drafts the target rejects
        sit at slots past the committed tokens, which the next steps overwrite before any read.
        Default: the state unchanged."""
        return state


def tree_nbytes(tree: Any) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))
