"""Session fixture: the tiny random model of tests/engine/helpers.py."""

from __future__ import annotations

import jax
import pytest

from jaxserve.config import ModelConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.runner import ModelRunner
from jaxserve.model.params import init_params
from jaxserve.tokenizer import load_tokenizer
from tests.engine.helpers import ECFG, VOCAB, Tiny


@pytest.fixture(scope="session")
def tiny(real_gguf_path) -> Tiny:
    tokenizer = load_tokenizer(real_gguf_path)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        eos_token_ids=tokenizer.eos_token_ids,
    )
    runner = ModelRunner(cfg, init_params(cfg, jax.random.key(0)), ECFG, tokenizer.eos_token_ids)
    shapes = []
    pack = runner._pack

    def recording_pack(seqs, chunk_lens, B, T):
        tokens, meta = pack(seqs, chunk_lens, B, T)
        shapes.append((T == 1, B, T, meta.page_tables.shape[1]))
        return tokens, meta

    pack_flat = runner._pack_flat

    def recording_pack_flat(seqs, chunk_lens, N, T):
        tokens, meta, logits_index = pack_flat(seqs, chunk_lens, N, T)
        shapes.append((False, N, T, meta.page_tables.shape[1]))
        return tokens, meta, logits_index

    runner._pack = recording_pack
    runner._pack_flat = recording_pack_flat
    return Tiny(runner, LLMEngine(runner, tokenizer, ECFG), tokenizer, shapes)


