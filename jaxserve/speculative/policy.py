"""Adaptive K: how many drafts each sequence gets in the next step. Host-side, no jax.

Model: a sequence whose drafts the target accepts with probability `alpha` per position emits
E(k) = 1 + alpha + ... + alpha^k tokens from a step that verifies k drafts (the geometric model
of Leviathan et al.). A plain step over T tokens costs 1 + T / cost_tokens in units of a
one-token step, a speculative one with K drafting rounds
c(T, K) = step_overhead + T / cost_tokens + K * draft_cost. step_overhead is what the fused
step costs beyond a plain one (the flat ragged program against the padded decode, which also
runs several steps per program; the proposer): 1.35 on the 2-core CPU (engine/runner.py says
what was measured). draft_cost is one
batched draft decode step (0 for n-gram lookup); cost_tokens is where the step time doubles,
measured per backend: a decode step reads every weight once, so on a GPU hundreds of tokens ride
almost free, while on a CPU the matmuls become compute-bound after a few dozen. For each K in
the compiled set the policy takes sequences in order of acceptance while adding one raises
tokens per unit cost, and keeps the K with the best ratio; at high load no sequence pays for
itself and the step is plain.

Each sequence's alpha is an exponentially weighted count of accepted / verified drafts, starting
from a prior; a sequence that is not speculating drifts back toward the prior, so it is probed
again later instead of being written off forever.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SpecStats:
    """Per-sequence acceptance state and counters (kept on the Sequence)."""

    accepted: float  # decayed accepted drafts
    verified: float  # decayed verified draft positions
    num_proposed: int = 0  # drafts verified in all (usage reporting)
    num_accepted: int = 0

    @property
    def alpha(self) -> float:
        return self.accepted / self.verified


def draft_counts(max_k: int) -> tuple[int, ...]:
    """The draft counts K a step may use (each a compiled program): powers of two below max_k,
    and max_k."""
    return tuple(sorted({k for k in (1, 2, 4, 8) if k < max_k} | {max_k}))


@dataclasses.dataclass(frozen=True)
class SpecPolicy:
    max_k: int  # upper bound (EngineConfig.num_speculative_tokens)
    k_set: tuple[int, ...]  # compiled draft counts, 0 < k <= max_k
    cost_tokens: float  # tokens at which a step's cost doubles
    draft_cost: float = 0.0  # one drafting round (a draft decode step), in target steps
    step_overhead: float = 1.0  # a speculative step's fixed cost, in plain one-token steps
    adaptive: bool = True  # False: always max_k (capped per sequence)
    prior: float = 0.6
    decay: float = 0.8  # weight of the past in the acceptance estimate
    # Drift toward the prior per step spent not speculating: a sequence that stopped paying is
    # tried again about every 1 / recover steps (at 0.05 the real model's chat replies, ~4%
    # n-gram acceptance, were re-tried every other step: 0.70x off at batch 1).
    recover: float = 0.02

    @classmethod
    def make(cls, max_k: int, cost_tokens: float, adaptive: bool = True,
             draft_cost: float = 0.0, step_overhead: float = 1.0) -> SpecPolicy:
        return cls(max_k=max_k, k_set=draft_counts(max_k), cost_tokens=cost_tokens,
                   adaptive=adaptive, draft_cost=draft_cost, step_overhead=step_overhead)

    def new_stats(self) -> SpecStats:
        return SpecStats(accepted=self.prior * 4, verified=4.0)

    def choose(self, stats: list[SpecStats], caps: list[int]) -> tuple[int, list[int]]:
        """stats/caps: the decoding sequences that may speculate (caps[i] >= 1: the most drafts
        sequence i can take: request limit, context room). -> (K, drafts per sequence), K = 0:
        no speculation.

        The step's prompt chunks are left out of the comparison: they are computed in some step
        either way, and a draft costs its own token whichever step it rides in. (Counting them
        as part of the step's fixed cost made drafts look free beside a 500-token chunk: at
        batch 16 the n-gram policy then verified 43 drafts a step at 45% acceptance, and the
        drafts displaced prompt tokens from the budget: 0.57x the requests/s of no speculation.)"""
        n = len(stats)
        if n == 0:
            return 0, []
        if not self.adaptive:
            K = self.max_k
            return K, [min(K, c) for c in caps]
        base_tokens = n
        best = (float(n) / (1 + base_tokens / self.cost_tokens), 0, [0] * n)
        order = sorted(range(n), key=lambda i: -stats[i].alpha)
        for K in self.k_set:
            ks = [0] * n
            gain, tokens = float(n), base_tokens
            fixed = self.step_overhead + K * self.draft_cost
            ratio = gain / (fixed + tokens / self.cost_tokens)
            for i in order:
                k = min(K, caps[i])
                a = stats[i].alpha
                g = sum(a ** j for j in range(1, k + 1))
                r = (gain + g) / (fixed + (tokens + k) / self.cost_tokens)
                if r <= ratio:
                    break
                ks[i], gain, tokens, ratio = k, gain + g, tokens + k, r
            if ratio > best[0] * 1.03:  # a clear gain, else plain steps (fewer programs)
                best = (ratio, K, ks)
        _, K, ks = best
        return K, ks

    def draft_share(self, K: int, tokens: int) -> float:
        """The cost model's share of drafting in a step that drafts K rounds and runs the
        target over `tokens` tokens: K draft_cost / c(tokens, K)."""
        d = K * self.draft_cost
        return d / (self.step_overhead + tokens / self.cost_tokens + d)

    def update(self, s: SpecStats, num_draft: int, num_accepted: int) -> None:
        """After a step that verified num_draft drafts and accepted the first num_accepted."""
        if num_draft == 0:
            s.accepted += (self.prior * s.verified - s.accepted) * self.recover
            return
        tested = min(num_accepted + 1, num_draft)  # positions up to the first rejection
        s.accepted = s.accepted * self.decay + num_accepted
        s.verified = s.verified * self.decay + tested
        s.num_proposed += num_draft
        s.num_accepted += num_accepted
