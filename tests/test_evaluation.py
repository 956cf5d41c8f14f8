"""Quality evaluation (jaxserve/evaluation.py): the llama-perplexity metrics on synthetic
log-probs against direct numpy, `LLM.next_token_logprobs` on the real model, an end-to-end run
on the Brown corpus, and `jaxserve eval`'s mode check. The corpus itself is tested in
tests/loading (test_corpus.py: detagging; test_fetch.py: fetching)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxserve import evaluation as ev
from jaxserve.errors import ConfigError, InvalidRequestError

# ---------------------------------------------------------------------------------- metrics


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_window_stats_identical_distributions():
    lp = _log_softmax(np.random.default_rng(0).normal(size=(7, 50)) * 3).astype(np.float32)
    t = np.arange(7) * 3
    s = ev.window_stats(lp, lp, t)
    np.testing.assert_allclose(s["kl"], 0.0, atol=1e-7)
    assert s["same_top"].all()
    np.testing.assert_array_equal(s["dp"], 0.0)
    np.testing.assert_allclose(s["nll_model"], -lp[np.arange(7), t], rtol=1e-6)
    m = ev.summarize(s["nll_model"], s["nll_base"], s["kl"], s["same_top"], s["dp"])
    assert m["vs_base"]["top1_agreement_pct"] == 100.0
    assert abs(m["vs_base"]["kl_mean"]) < 1e-7 and m["vs_base"]["ln_ppl_ratio"] == 0.0


def test_window_stats_hand_computed():
    base = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], np.float32))
    model = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]], np.float32))
    s = ev.window_stats(base, model, np.array([0, 2]))
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.25)
    np.testing.assert_allclose(s["kl"], [kl0, 0.0], atol=1e-6)
    assert s["same_top"].tolist() == [False, True]
    np.testing.assert_allclose(s["dp"], [0.25 - 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(s["nll_base"], [math.log(2), -math.log(0.7)], rtol=1e-6)
    m = ev.summarize(s["nll_model"], s["nll_base"], s["kl"], s["same_top"], s["dp"])
    assert m["ppl"] == pytest.approx(math.exp((math.log(4) - math.log(0.7)) / 2))
    assert m["vs_base"]["top1_agreement_pct"] == 50.0
    assert m["vs_base"]["kl_mean"] == pytest.approx(kl0 / 2, abs=1e-6)
    assert m["vs_base"]["dp"]["mean"] == pytest.approx(-0.125, abs=1e-6)


def test_window_stats_random_against_numpy():
    rng = np.random.default_rng(1)
    base = _log_softmax(rng.normal(size=(40, 300)) * 2)
    model = _log_softmax(np.log(np.exp(base)) + rng.normal(size=base.shape) * 0.3)
    t = rng.integers(0, 300, size=40)
    s = ev.window_stats(base.astype(np.float32), model.astype(np.float32), t)
    pb = np.exp(base)
    np.testing.assert_allclose(s["kl"], (pb * (base - model)).sum(-1), rtol=1e-4, atol=1e-6)
    assert (s["kl"] > 0).all()
    r = np.arange(40)
    np.testing.assert_array_equal(s["same_top"], base.argmax(-1) == model.argmax(-1))
    dp = np.exp(model[r, t]) - np.exp(base[r, t])
    np.testing.assert_allclose(s["dp"], dp, atol=1e-6)
    m = ev.summarize(s["nll_model"], s["nll_base"], s["kl"], s["same_top"], s["dp"])
    for q in (1, 5, 50, 95, 99):
        assert m["vs_base"]["dp"][f"p{q}"] == pytest.approx(np.percentile(dp, q), abs=1e-6)
    assert m["ppl"] == pytest.approx(np.exp(-model[r, t].mean()), rel=1e-5)


class FakeLLM:
    """next_token_logprobs from a fixed function of the context (depends on the last token and
    the position), optionally perturbed: enough to check evaluate's windowing and streaming."""

    def __init__(self, noise: float = 0.0, V: int = 37):
        self.noise, self.V, self.calls = noise, V, []

    def next_token_logprobs(self, ids, start=0):
        self.calls.append((list(ids), start))
        ids = np.asarray(ids)
        logits = np.sin(np.outer(ids[:-1] + np.arange(len(ids) - 1), np.arange(self.V)) * 0.37)
        logits = logits * 4 + self.noise * np.cos(np.outer(ids[:-1], np.arange(self.V)))
        return _log_softmax(logits)[start:].astype(np.float32)


def test_evaluate_windows_and_metrics_match_direct_computation():
    tokens = list(np.random.default_rng(2).integers(0, 37, size=100))
    llms = {"base": FakeLLM(), "same": FakeLLM(), "noisy": FakeLLM(noise=0.5)}
    r = ev.evaluate(llms, "base", tokens, window=32, max_windows=2, bos_id=0)
    json.dumps(r)  # JSON-serialisable
    assert (r["windows"], r["score_from"], r["stride"]) == (2, 16, 32)
    assert r["tokens_scored"] == 2 * (32 - 1 - 16)  # llama-perplexity: positions 16..30
    assert [c[1] for c in llms["noisy"].calls] == [16, 16]
    assert [c[0][0] for c in llms["base"].calls] == [0, 0]  # BOS replaced the first token
    assert llms["base"].calls[1][0][1:] == [int(t) for t in tokens[33:64]]
    same = r["models"]["same"]["vs_base"]
    assert same["kl_mean"] == 0.0 and same["top1_agreement_pct"] == 100.0
    # Direct: full distributions of both windows, second half, numpy.
    kl, nll_b, nll_n, top = [], [], [], []
    for s in (0, 32):
        ids = [0] + [int(t) for t in tokens[s + 1 : s + 32]]
        b = FakeLLM().next_token_logprobs(ids)[16:]
        n = FakeLLM(noise=0.5).next_token_logprobs(ids)[16:]
        tg = np.asarray(ids[17:])
        r_ = np.arange(len(tg))
        kl.append((np.exp(b) * (b - n)).sum(-1))
        nll_b.append(-b[r_, tg])
        nll_n.append(-n[r_, tg])
        top.append(b.argmax(-1) == n.argmax(-1))
    noisy = r["models"]["noisy"]
    assert noisy["vs_base"]["kl_mean"] == pytest.approx(np.concatenate(kl).mean(), rel=1e-4)
    assert r["models"]["base"]["ppl"] == pytest.approx(np.exp(np.concatenate(nll_b).mean()),
                                                       rel=1e-5)
    assert noisy["ppl"] == pytest.approx(np.exp(np.concatenate(nll_n).mean()), rel=1e-5)
    assert noisy["vs_base"]["top1_agreement_pct"] == pytest.approx(
        100 * np.concatenate(top).mean())
    assert "vs_base" not in r["models"]["base"]
    table = ev.format_table(r)
    lines = table.splitlines()
    assert lines[2].startswith("| mode | PPL |") and lines[3].startswith("|---|")
    assert lines[4].startswith("| base (base) |") and lines[6].startswith("| noisy |")
    assert len({line.count("|") for line in lines[2:]}) == 1  # every row has every column
    with pytest.raises(InvalidRequestError, match="window"):
        ev.evaluate(llms, "base", tokens[:20], window=32)
    with pytest.raises(InvalidRequestError, match="base"):
        ev.evaluate(llms, "nope", tokens, window=32)


def test_parse_modes():
    assert ev.parse_modes("bf16, int8") == ["f32", "bf16", "int8"]
    assert ev.parse_modes(ev.DEFAULT_MODES) == list(ev.MODES)
    assert ev.MODES["int4-g32"] == {"quantization": "int4", "quant_group_size": 32}
    with pytest.raises(ConfigError, match=r"unknown quality mode\(s\) \['int3'\]"):
        ev.parse_modes("f32,int3")
    with pytest.raises(ConfigError, match="more than once"):
        ev.parse_modes("bf16,bf16")


def test_cli_eval_rejects_unknown_mode():
    proc = subprocess.run([sys.executable, "-m", "jaxserve.cli", "eval", "--modes", "f32,fp7"],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "unknown quality mode(s) ['fp7']" in proc.stderr and "int4-g128" in proc.stderr
    assert "loaded" not in proc.stderr  # failed before loading any model


# ------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_next_token_logprobs_matches_score(real_gguf_path):
    from jaxserve import LLM

    llm = LLM(real_gguf_path, num_pages=64, max_model_len=512)
    text = "The jury said it did find that many of Georgia's registration and election laws "
    ids = llm.tokenizer.encode(text * 8)[:100]
    assert len(ids) == 100
    lp = llm.next_token_logprobs(ids)
    assert lp.shape == (99, llm.model_config.vocab_size) and lp.dtype == np.float32
    score = llm.score([ids])[0]
    np.testing.assert_allclose(lp[np.arange(99), ids[1:]], score, atol=1e-5)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(llm.next_token_logprobs(ids, start=60), lp[60:], atol=1e-5)
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    with pytest.raises(InvalidRequestError, match="start"):
        llm.next_token_logprobs(ids, start=99)
    # Chunked prefill (3 chunks of <= 40), rows wanted from the middle of the second chunk.
    small = LLM(real_gguf_path, num_pages=64, max_model_len=512, max_num_batched_tokens=40)
    np.testing.assert_allclose(small.next_token_logprobs(ids, start=50), lp[50:], atol=1e-4)


@pytest.mark.slow
def test_evaluate_end_to_end_on_brown(real_gguf_path, brown_corpus_text):
    from jaxserve import LLM

    assert brown_corpus_text.startswith("The Fulton County Grand Jury said Friday")
    opts = dict(num_pages=16, max_model_len=128)
    llms = {"f32": LLM(real_gguf_path, dtype="float32", **opts),
            "f32-again": LLM(real_gguf_path, dtype="float32", **opts),
            "bf16": LLM(real_gguf_path, dtype="bfloat16", **opts)}
    tokens = llms["f32"].tokenizer.encode(brown_corpus_text[:2000])
    r = ev.evaluate(llms, "f32", tokens, window=128, max_windows=1)
    assert r["tokens_scored"] == 63
    same, bf16 = r["models"]["f32-again"]["vs_base"], r["models"]["bf16"]["vs_base"]
    assert abs(same["kl_mean"]) < 1e-6 and same["top1_agreement_pct"] == 100.0
    assert r["models"]["f32-again"]["ppl"] == pytest.approx(r["models"]["f32"]["ppl"], rel=1e-5)
    assert 0 < bf16["kl_mean"] < 0.1 and bf16["top1_agreement_pct"] > 80
    assert 5 < r["models"]["f32"]["ppl"] < 200  # news text: a 135M model is no oracle
    print(ev.format_table(r))
