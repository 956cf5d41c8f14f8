"""The offline `LLM` API on the real SmolLM2 model: bad input fails with a typed, named error and
leaves the engine as it was; seeds, stop rules, chunked prefill and scoring behave as promised."""

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import EngineConfig
from jaxserve.errors import CheckpointError, ConfigError, InvalidRequestError

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
FRANCE = "The capital of France is"
VILLAGE = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def llm(real_gguf_path):
    return LLM(real_gguf_path, dtype="float32", num_pages=64, max_model_len=MAX_MODEL_LEN)


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.waiting and not engine.running
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages, "pages leaked"


@pytest.fixture(autouse=True)
def engine_left_idle(request):
    yield
    if "llm" in request.fixturenames:
        assert_idle(request.getfixturevalue("llm"))


def long_prompt(llm: LLM, n: int) -> list[int]:
    """n real-text token ids."""
    text = " ".join(f"Item {i} of the list is a number." for i in range(200))
    ids = llm.tokenizer.encode(text)
    assert len(ids) >= n
    return ids[:n]


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "prompt is empty"),
        ([[]], "prompt is empty"),
        ([], "no prompts"),
        ([1, 2, 49152], r"\[49152\] outside \[0, 49152\)"),
        ([-1, 2], r"\[-1\] outside \[0, 49152\)"),
        ([3.5], "a prompt must be"),
    ],
)
def test_bad_prompt_is_rejected(llm, prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate(prompt, GREEDY)


def test_prompt_must_leave_room_in_the_context(llm):
    with pytest.raises(InvalidRequestError, match=r"256 tokens; the context length is 256"):
        llm.generate([long_prompt(llm, MAX_MODEL_LEN)], GREEDY)
    with pytest.raises(InvalidRequestError, match="context length is 256"):
        llm.generate([long_prompt(llm, 300)], GREEDY)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("logprobs", 21),
        ("logprobs", -1),
        ("max_tokens", 0),
        ("seed", -1),
        ("max_tokens", 2.0),
    ],
)
def test_bad_sampling_param_names_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "params",
    [{"temperature": 0.0}, 0.5, [GREEDY, "greedy"]],
    ids=["dict", "float", "list-with-str"],
)
def test_sampling_params_of_the_wrong_type_are_rejected(llm, params):
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        llm.generate([FRANCE, VILLAGE], params)


def test_one_sampling_params_per_prompt(llm):
    with pytest.raises(InvalidRequestError, match="1 sampling params for 2 prompts"):
        llm.generate([FRANCE, VILLAGE], [GREEDY])


@pytest.mark.parametrize("bad", ["", [7, 49152], "too long"], ids=["empty", "vocab", "long"])
def test_batch_with_one_bad_request_is_rejected_whole_and_nothing_runs(llm, monkeypatch, bad):
    if bad == "too long":
        bad = long_prompt(llm, 300)
    reference = llm.generate(FRANCE, GREEDY)[0].token_ids

    def must_not_run(*args):
        raise AssertionError("a step ran for a batch that was rejected")

    with monkeypatch.context() as m:
        m.setattr(llm.runner, "run", must_not_run)
        with pytest.raises(InvalidRequestError):
            llm.generate([VILLAGE, FRANCE, bad, FRANCE], GREEDY)
    assert_idle(llm)
    assert llm.generate(FRANCE, GREEDY)[0].token_ids == reference


def test_unknown_model_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(CheckpointError, match="no-such-model.gguf"):
        LLM(missing)


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"this is not a gguf file\x00\xff" * 64)
    with pytest.raises(CheckpointError, match="x.gguf"):
        LLM(bad)


def test_unknown_llm_option_is_a_type_error(real_gguf_path):
    with pytest.raises(TypeError, match="max_model_length"):
        LLM(real_gguf_path, max_model_length=256)


def test_preset_supplies_defaults_that_arguments_override(real_gguf_path):
    """configs/serve/gpu.json: bfloat16, 16384 pages, 128 sequences, 8192 tokens a step."""
    llm = LLM(real_gguf_path, "float32", preset="gpu", num_pages=64, max_model_len=256)
    ecfg = llm.engine_config
    assert (ecfg.max_num_seqs, ecfg.max_num_batched_tokens) == (128, 8192)  # from the preset
    assert (ecfg.dtype, ecfg.num_pages, ecfg.max_model_len) == ("float32", 64, 256)  # explicit
    assert ecfg.kv_cache_dtype == "auto" and not ecfg.unroll_layers  # neither sets these


def test_unknown_preset_is_a_config_error_listing_the_known_ones(real_gguf_path):
    with pytest.raises(ConfigError, match=r"no serving preset .*typo.json; known: \['cpu-small', "
                       r"'gpu'\]"):
        LLM(real_gguf_path, preset="typo")
    with pytest.raises(ConfigError, match="not both"):
        LLM(real_gguf_path, preset="gpu", engine_config=EngineConfig())


# -- behaviour --------------------------------------------------------------------------------


def test_same_seed_same_tokens_alone_or_batched(llm):
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=12)
    alone = llm.generate(VILLAGE, sampled)[0].token_ids
    batch = llm.generate(
        [FRANCE, VILLAGE, VILLAGE],
        [GREEDY, sampled, SamplingParams(temperature=0.8, top_p=0.9, seed=99, max_tokens=12)],
    )
    assert batch[1].token_ids == alone
    assert batch[2].token_ids != alone  # another seed draws another continuation


def test_max_tokens_gives_exactly_that_many_tokens(llm):
    full = llm.generate(FRANCE, SamplingParams(temperature=0.0, max_tokens=16))[0]
    short = llm.generate(FRANCE, SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert full.finish_reason == short.finish_reason == "length"
    assert len(full.token_ids) == 16
    assert short.token_ids == full.token_ids[:5]
    assert short.text == llm.tokenizer.decode(short.token_ids)


def test_stop_string_truncates_the_text(llm):
    full = llm.generate(FRANCE, SamplingParams(temperature=0.0, max_tokens=16))[0]
    i = len(full.text) // 2
    stop = full.text[i : i + 3]
    expected = full.text[: full.text.index(stop)]
    out = llm.generate(FRANCE, SamplingParams(temperature=0.0, max_tokens=16, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == expected
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(full.token_ids)


def test_ignore_eos_runs_to_max_tokens(llm):
    prompt = llm.encode_chat(
        [
            {"role": "system", "content": "You are a terse assistant. Answer in one word."},
            {"role": "user", "content": "Name a primary colour."},
        ]
    )
    stopped = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20))[0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 20
    assert stopped.token_ids[-1] in llm.tokenizer.eos_token_ids
    n = len(stopped.token_ids) + 4
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == n
    assert out.token_ids[: len(stopped.token_ids)] == stopped.token_ids


def test_string_prompt_equals_its_token_ids(llm):
    from_text = llm.generate(VILLAGE, GREEDY)[0]
    from_ids = llm.generate([llm.tokenizer.encode(VILLAGE)], GREEDY)[0]
    assert from_text.prompt_token_ids == from_ids.prompt_token_ids
    assert from_text.token_ids == from_ids.token_ids
    assert from_text.text == from_ids.text


def test_score_equals_logprobs_reported_while_generating(llm):
    prompt = llm.tokenizer.encode(VILLAGE)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, logprobs=0))[0]
    assert len(out.logprobs) == len(out.token_ids) == 8
    assert all(top == {} for _, top in out.logprobs)
    scored = llm.score([prompt + out.token_ids])[0]
    assert scored.shape == (len(prompt) + 7,)
    reported = np.array([lp for lp, _ in out.logprobs], np.float32)
    np.testing.assert_allclose(scored[-8:], reported, atol=1e-4, rtol=0)


def test_results_come_back_in_prompt_order(llm):
    prompts = [
        long_prompt(llm, 230),
        [llm.tokenizer.encode(FRANCE)[0]],
        long_prompt(llm, 200)[-200:],
        llm.tokenizer.encode(VILLAGE),
    ]
    prompts[2] = prompts[2][::-1]  # a different long prompt
    batched = llm.generate(prompts, GREEDY)
    for i, p in enumerate(prompts):
        assert batched[i].prompt_token_ids == p
        assert batched[i].token_ids == llm.generate([p], GREEDY)[0].token_ids, i


def test_mixed_steps_equal_each_alone(llm):
    """Requests arriving while another decodes are prefilled in the same steps as its decodes
    (mixed steps); every request's greedy tokens equal its tokens generated alone."""
    prompts = [llm.tokenizer.encode(FRANCE), long_prompt(llm, 150),
               llm.tokenizer.encode(VILLAGE), long_prompt(llm, 40)[::-1]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    engine = llm.engine
    steps, engine.num_decode_steps = engine.num_decode_steps, 1  # one token per decode step
    try:
        first = engine.add_request(prompts[0], params)
        engine.step()
        engine.step()
        assert len(first.output_ids) == 2
        mixed_before = engine.stats()["mixed_steps"]
        rest = []
        for p in prompts[1:]:  # one arrival per step, each joining the running ones
            rest.append(engine.add_request(p, params))
            engine.step()
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.num_decode_steps = steps
    assert engine.stats()["mixed_steps"] - mixed_before == 3
    assert [engine.output(s).token_ids for s in [first, *rest]] == alone


def test_chunked_prefill_equals_one_shot(llm, real_gguf_path):
    prompt = long_prompt(llm, 200)
    reference = llm.generate([prompt], GREEDY)[0].token_ids
    chunked = LLM(
        real_gguf_path,
        dtype="float32",
        num_pages=64,
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=64,
    )
    steps = []
    run = chunked.runner.run

    def recording_run(sched):
        steps.append(list(sched.num_tokens))
        return run(sched)

    chunked.runner.run = recording_run
    assert chunked.generate([prompt], GREEDY)[0].token_ids == reference
    assert steps[:4] == [[64], [64], [64], [8]]
    assert_idle(chunked)
