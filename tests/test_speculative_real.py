"""Speculative decoding on the real model: for every proposer (n-gram; int8 quantised
self-draft; the model cut to its first layers), raw and chat prompts (one input-grounded),
greedy and seeded sampling give exactly the tokens and text of plain decoding, and the drafts
are really used (n-gram and the int8 draft: mostly accepted on the input-grounded prompt).
Medusa and EAGLE heads, trained briefly on the model's own continuations, likewise."""

import pytest

from jaxserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

PASSAGE = ("The river rises in the northern hills, flows south past the old mill and the two "
           "villages, and joins the sea at the harbour town, where the fishing boats come in "
           "every morning before dawn.")
# The self-drafts verify a fixed K (speculative_adaptive=False): on this CPU a draft round
# costs 0.25-0.47 of a target step, so the adaptive policy rightly declines them (measured below
# 1x, README), and these tests are about exactness with drafts really verified.
METHODS = {
    "ngram": {"speculative_method": "ngram"},
    "int8_self_draft": {"speculative_method": "draft_model", "speculative_quantization": "int8",
                        "speculative_adaptive": False},
    "cut_self_draft": {"speculative_method": "draft_model", "speculative_num_layers": 10,
                       "speculative_adaptive": False},
}


def make(path, **kw):
    return LLM(path, dtype="float32", num_pages=96, max_model_len=512, **kw)


@pytest.fixture(scope="module")
def plain(real_gguf_path):
    return make(real_gguf_path)


@pytest.fixture(scope="module")
def prompts(plain):
    chat = [
        [{"role": "user", "content": "Copy this sentence exactly:\n\n" + PASSAGE}],
        [{"role": "user", "content": "Give me three tips for a job interview."}],
    ]
    return [plain.encode_chat(m) for m in chat] + [
        "The history of the printing press begins", "def fibonacci(n):\n    "]


@pytest.mark.parametrize("method", list(METHODS))
def test_speculative_output_equals_plain(real_gguf_path, plain, prompts, method):
    llm = make(real_gguf_path, **METHODS[method])
    for params in (SamplingParams(temperature=0.0, max_tokens=48),
                   SamplingParams(temperature=0.7, top_p=0.95, seed=11, max_tokens=40)):
        want = plain.generate(prompts, params)
        got = llm.generate(prompts, params)
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert b.token_ids == a.token_ids, f"{method} prompt {i} {params}"
            assert (b.text, b.finish_reason) == (a.text, a.finish_reason)
    grounded = llm.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=48))[0]
    assert llm.engine.stats()["spec_steps"] > 0 and grounded.num_spec_proposed > 0
    if method != "cut_self_draft":  # an untrained layer cut rarely agrees (the policy backs off)
        assert grounded.num_spec_accepted > 0.5 * grounded.num_spec_proposed
        assert llm.engine.stats()["spec_accepted_at_1"] > 0


@pytest.fixture(scope="module")
def quick_heads(plain, prompts, tmp_path_factory):
    """Medusa and EAGLE heads trained briefly on the real model's own greedy continuations of
    the test prompts (seconds of training: enough to be right sometimes, which is what the
    equality check needs to exercise accepted and rejected drafts)."""
    from jaxserve.speculative import train
    from jaxserve.speculative.checkpoint import save_heads, target_identity

    ids = [p if isinstance(p, list) else plain.tokenizer.encode(p) for p in prompts]
    seqs = train.continuations(plain.generate, ids, 48, sampled=False)
    cfg, target = plain.model_config, plain.runner.params
    ds = train.build_dataset(cfg, target, seqs)
    out = {}
    for method in ("medusa", "eagle"):
        tcfg = train.TrainConfig(method=method, steps=40, lr=2e-3, num_heads=4,
                                 batch_positions=64, batch_seqs=2)
        params, _ = train.train_heads(tcfg, cfg, target, ds, log=lambda _: None)
        out[method] = save_heads(tmp_path_factory.mktemp(method), method,
                                 {"num_heads": 4} if method == "medusa" else {}, params,
                                 target_identity(cfg, target, plain.model_path.name))
    return out


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_draft_heads_output_equals_plain(real_gguf_path, plain, prompts, quick_heads, method):
    llm = make(real_gguf_path, speculative_method=method,
               speculative_model=str(quick_heads[method]), speculative_adaptive=False)
    for params in (SamplingParams(temperature=0.0, max_tokens=48),
                   SamplingParams(temperature=0.7, top_p=0.95, seed=11, max_tokens=40)):
        want = plain.generate(prompts, params)
        got = llm.generate(prompts, params)
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert b.token_ids == a.token_ids, f"{method} prompt {i} {params}"
            assert (b.text, b.finish_reason) == (a.text, a.finish_reason)
    stats = llm.engine.stats()
    assert stats["spec_steps"] > 0 and 0 < stats["spec_accepted"] < stats["spec_proposed"]
