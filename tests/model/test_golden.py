"""The real model against Hugging Face transformers (fp32, same GGUF): tests/data/make_golden.py
wrote the reference; these tests need no torch."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams

GOLDEN = json.loads((Path(__file__).parent.parent / "data" / "golden_smollm2.json").read_text())
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(real_gguf_path):
    return LLM(real_gguf_path, dtype="float32", num_pages=256)


def test_golden_file_matches_the_weights(real_gguf_path):
    from jaxserve.loading.fetch import sha256_file

    assert GOLDEN["meta"]["gguf_sha256"] == sha256_file(real_gguf_path)


def test_greedy_tokens_equal_transformers_in_one_batch(llm):
    cases = GOLDEN["generate"]
    params = SamplingParams(temperature=0.0, max_tokens=GOLDEN["meta"]["max_new_tokens"])
    outs = llm.generate([c["prompt_ids"] for c in cases], params)
    for c, out in zip(cases, outs, strict=True):
        assert out.token_ids == c["output_ids"], c["prompt"] or c["messages"]
        assert out.finish_reason == ("stop" if c["stopped_on_eos"] else "length")


def test_prompts_encode_like_transformers(llm):
    for c in GOLDEN["generate"]:
        if c["kind"] == "raw":
            assert llm.tokenizer.encode(c["prompt"]) == c["prompt_ids"]
        else:
            assert llm.encode_chat(c["messages"]) == c["prompt_ids"]


def test_teacher_forced_logprobs_equal_transformers(llm):
    cases = GOLDEN["generate"]
    got = llm.score([c["prompt_ids"] + c["output_ids"] for c in cases])
    worst = 0.0
    for c, lp in zip(cases, got, strict=True):
        ref = np.asarray(c["logprobs"], np.float32)
        assert lp.shape == ref.shape
        worst = max(worst, float(np.abs(lp - ref).max()))
    assert worst <= 1e-3, worst


def test_sampled_logprobs_match_scoring(llm):
    """Logprobs reported during generation (decode path) equal teacher-forced scoring of the
    same tokens (prefill path), and top-1 alternative is the greedy token."""
    c = GOLDEN["generate"][1]
    out = llm.generate([c["prompt_ids"]], SamplingParams(temperature=0.0, max_tokens=8,
                                                         logprobs=3))[0]
    scored = llm.score([c["prompt_ids"] + out.token_ids])[0][-len(out.token_ids):]
    for (lp, top), tok, ref in zip(out.logprobs, out.token_ids, scored, strict=True):
        assert abs(lp - ref) <= 1e-4
        assert max(top, key=top.get) == tok and len(top) == 3
