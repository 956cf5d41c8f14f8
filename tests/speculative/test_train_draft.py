"""`train_draft` end to end on a tiny random model saved as an Orbax checkpoint with the real
tokenizer (the recipe's wiring: prompts, self-distillation through the engine, cached data,
training, checkpoint, the engine's acceptance on held-out prompts, output == plain)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve import LLM
from jaxserve.config import ModelConfig
from jaxserve.loading.orbax_ckpt import save_orbax
from jaxserve.model.params import init_params
from jaxserve.speculative import train
from jaxserve.speculative.checkpoint import read_heads_config
from jaxserve.tokenizer import load_tokenizer


def test_prompt_set_mixes_kinds_and_holds_out_its_own():
    tr, ho = train.load_prompts("train"), train.load_prompts("heldout")
    assert {k for k, _ in tr[:3]} == set(train.KINDS) and {k for k, _ in ho[:3]} == set(
        train.KINDS)
    assert not {t for _, t in tr} & {t for _, t in ho}
    assert len(tr) >= 80 and len(ho) >= 12


@pytest.mark.slow  # two engines over a 49152-token vocabulary: ~a minute
@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_train_draft_writes_heads_the_engine_uses(tmp_path, monkeypatch, real_gguf_path,
                                                  method):
    monkeypatch.setenv("JAXSERVE_CHECKPOINTS", str(tmp_path / "cache"))
    tok = load_tokenizer(real_gguf_path)
    cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_ids=tok.eos_token_ids)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    model = save_orbax(tmp_path / "tiny", cfg, params, tokenizer=tok)
    logs = []
    result = train.train_draft(method, tmp_path / "heads", model=str(model), steps=6,
                               num_prompts=6, max_tokens=12, num_heads=2,
                               num_speculative_tokens=2, log=logs.append)
    assert read_heads_config(tmp_path / "heads")["method"] == method
    assert len(list((tmp_path / "cache" / "draft-data").glob("*.json"))) == 1
    a = result["acceptance"]
    assert a["equals_plain"] and a["spec_proposed"] > 0 and a["tokens"] > 0
    assert result["data"]["sequences"] == 12  # greedy + sampled per prompt
    assert [p["step"] for p in result["loss_curve"]] == [6]
    llm = LLM(str(model), speculative_method=method, speculative_model=str(tmp_path / "heads"),
              num_speculative_tokens=2)
    assert llm.runner.proposer.name == method


@pytest.mark.parametrize("length", [16, 64])
def test_corpus_sequences_are_the_corpus_tokens_in_order(monkeypatch, real_gguf_path, length):
    from jaxserve.loading import corpus

    text = "The press reported that the committee met on Tuesday. " * 40
    monkeypatch.setattr(corpus, "load_corpus_text", lambda: text)
    tok = load_tokenizer(real_gguf_path)
    seqs = train.corpus_sequences(tok, 200, length=length)
    ids = tok.encode(text[:1600])[:200]
    assert [s for s, _ in seqs] == [ids[i:i + length] for i in range(0, 200 - length + 1,
                                                                     length)]
    assert {start for _, start in seqs} == {1}  # trained from the first position
