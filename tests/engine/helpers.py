"""Shared by the engine tests: a tiny random Llama (real tokenizer, vocab 49152).

One ModelRunner for the whole session: the jit entry points cache their programs by config and
shapes, so every test that uses this runner (or an engine over it) reuses what the others
compiled. Engines are cheap: a test makes its own over the shared runner. Several engines
writing one runner's KV arrays would see each other's pages as stale prefix-cache entries, so
an engine is used within one test only, and the shared one's prefix cache is reset after each
test."""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.runner import ModelRunner
from jaxserve.engine.sampling import SamplingParams
from jaxserve.engine.scheduler import StepOutput

VOCAB = 49152
# Few buckets keep the number of programs (and the tests' compile time) small.
ECFG = EngineConfig(
    dtype="float32",
    page_size=16,
    num_pages=160,
    max_model_len=512,
    max_num_seqs=16,
    prefill_buckets=(64, 320),
    batch_buckets=(4, 16),
    max_num_batched_tokens=320,
    compilation_cache_dir="",
    num_decode_steps=1,  # one token per program unless a test asks for more
)


@dataclasses.dataclass
class Tiny:
    runner: ModelRunner
    engine: LLMEngine
    tokenizer: object
    # (decode?, B, T, W) of every step the runner has packed, in order (flat steps: B is the
    # padded number of sequences, T the padded number of tokens).
    shapes: list[tuple[bool, int, int, int]]

    def new_engine(self, **kwargs) -> LLMEngine:
        """A fresh engine over the shared runner; EngineConfig fields and LLMEngine options."""
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        ecfg = dataclasses.replace(ECFG, **{k: v for k, v in kwargs.items() if k in fields})
        opts = {k: v for k, v in kwargs.items() if k not in fields}
        return LLMEngine(self.runner, self.tokenizer, ecfg, **opts)


def assert_idle(engine: LLMEngine) -> None:
    """Nothing queued or running, every page free (cache-only pages count as free), no page
    referenced."""
    bm = engine.block_manager
    assert not engine.waiting and not engine.running
    assert bm.num_free_pages == bm.num_usable_pages, "pages leaked"
    assert bm.num_held_pages == 0, "a page is still referenced"


def run_all(engine: LLMEngine, prompts, params, *, check_length: bool = True) -> list[list[int]]:
    """Submit every request at once, step until all finish; token ids in submission order."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    while engine.has_unfinished():
        engine.step()
    assert_idle(engine)
    outs = [engine.output(s) for s in seqs]
    if check_length:
        for out, sp in zip(outs, params, strict=True):
            assert out.finish_reason == "length" and len(out.token_ids) == sp.max_tokens
    return [o.token_ids for o in outs]


def random_prompts(rng: random.Random, lengths) -> list[list[int]]:
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def greedy(rng: random.Random, n: int, max_tokens: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(1, max_tokens), ignore_eos=True)
        for _ in range(n)
    ]


# -- a model-free runner, for scheduling tests that need no numerics ------------------------------


class FakeTokenizer:
    """Token id i decodes to one letter; no special tokens."""

    eos_token_ids = (0,)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@dataclasses.dataclass(frozen=True)
class FakeModelConfig:
    vocab_size: int = 1000


class FakeRunner:
    """Stands in for ModelRunner: the next token is a hash of the whole context, so it depends on
    every token the step was given. Records each step and checks the pages it would write: they
    cover the chunk (and the lookahead), and none is held by another live sequence or registered
    in the prefix cache (whose pages must never be written again). `fail_if(seqs)` True makes
    the step raise. A multi-token step emits, per sampling row, the next hash tokens one after
    the other: all 1 + lookahead of them, or `num_emitted(seq, limit)` of them (a variable
    accept length, as speculative verification gives)."""

    num_decode_steps = 1

    def __init__(self, ecfg: EngineConfig, fail_if=None, num_emitted=None):
        self.cfg = FakeModelConfig()
        self.prefill_buckets = tuple(b for b in ecfg.prefill_buckets if b < ecfg.max_model_len)
        self.prefill_buckets += (ecfg.max_model_len,)
        self.page_size = ecfg.page_size
        self.fail_if = fail_if
        self.num_emitted = num_emitted
        self.engine: LLMEngine | None = None
        self.steps: list[list[tuple[int, int]]] = []  # per step: (seq_id, chunk_len)

    def run(self, sched):
        seqs = sched.seqs
        self.steps.append([(s.seq_id, n) for s, n in zip(seqs, sched.num_tokens, strict=True)])
        if self.fail_if is not None and self.fail_if(seqs):
            raise RuntimeError("injected step failure")
        S = self.page_size
        bm = self.engine.block_manager
        live = [s for s in self.engine.running + self.engine.waiting]
        M = 1 + max(sched.lookahead)
        tokens = np.zeros((len(seqs), M), np.int32)
        num_tokens = np.zeros((len(seqs),), np.int32)
        for i, (seq, n, extra) in enumerate(zip(seqs, sched.num_tokens, sched.lookahead,
                                                strict=True)):
            start = seq.num_computed
            assert len(seq.block_table) * S >= start + n + extra
            written = seq.block_table[start // S : (start + n + extra - 1) // S + 1]
            for other in live:
                if other is not seq:
                    assert not set(written) & set(other.block_table), "writes a shared page"
            assert not set(written) & set(bm.cached_page_ids()), "writes a cached page"
            if not sched.samples[i]:
                continue
            limit = 1 + extra
            num_tokens[i] = limit if self.num_emitted is None else self.num_emitted(seq, limit)
            context = list(seq.tokens(0, start + n))
            for j in range(num_tokens[i]):
                tokens[i, j] = hash(tuple(context)) % 997 + 1
                context.append(int(tokens[i, j]))
        return StepOutput(tokens=tokens, num_tokens=num_tokens,
                          logprobs=np.zeros(tokens.shape, np.float32))


@dataclasses.dataclass(frozen=True)
class FakeProposer:
    """Makes the engine plan speculative steps over a FakeRunner (which emits what it likes)."""

    stateful: bool = False


def fake_engine(fail_if=None, runner_cls=FakeRunner, num_emitted=None, speculative=False,
                **kwargs) -> tuple[LLMEngine, FakeRunner]:
    """An LLMEngine over a FakeRunner; EngineConfig fields and LLMEngine options as kwargs
    (num_decode_steps also sets the steps per program the engine asks for). speculative: the
    engine plans draft lookahead for its decodes (a cost model that always finds it worth it)."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    ecfg = dataclasses.replace(ECFG, **{k: v for k, v in kwargs.items() if k in fields})
    runner = runner_cls(ecfg, fail_if, num_emitted)
    runner.num_decode_steps = ecfg.num_decode_steps or 1
    if speculative:
        runner.proposer, runner.spec_cost_tokens = FakeProposer(), 1e9
    engine = LLMEngine(runner, FakeTokenizer(), ecfg,
                       **{k: v for k, v in kwargs.items() if k not in fields})
    runner.engine = engine
    return engine, runner
