"""`python -m jaxserve.cli` in subprocesses, against the real model.

The slow invocations (each imports jax and loads the model) are started together by one module
fixture, so they overlap instead of queueing; each test then waits for the one it checks."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.cli import COMMAND_FLAGS, COMMANDS
from jaxserve.config import EngineConfig

pytestmark = pytest.mark.slow

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_smollm2.json").read_text())
FRANCE = GOLDEN["generate"][0]  # raw prompt "The capital of France is", greedy
CHAT = GOLDEN["generate"][3]  # one user message, greedy, ends on end-of-turn
assert FRANCE["prompt"] == "The capital of France is" and len(FRANCE["output_ids"]) > 8
assert CHAT["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
TIMEOUT_S = 300


def start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "jaxserve.cli", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """Wait for proc; (returncode, stdout, stderr), the same again if asked twice."""
    if not hasattr(proc, "result"):
        out, err = proc.communicate(timeout=TIMEOUT_S)
        proc.result = (proc.returncode, out, err)
    return proc.result


def cli(*args: str) -> tuple[int, str, str]:
    return finish(start(*args))


@pytest.fixture(scope="module")
def runs(real_gguf_path, tmp_path_factory):
    model = str(real_gguf_path)
    orbax_dir = tmp_path_factory.mktemp("cli") / "orbax"
    procs = {
        "json": start(
            "generate",
            "--model",
            model,
            "--prompt",
            FRANCE["prompt"],
            "--max_tokens",
            "8",
            "--json",
        ),
        "chat": start(
            "generate",
            "--model",
            model,
            "--chat",
            "--prompt",
            CHAT["messages"][0]["content"],
            "--max_tokens",
            "20",
            "--json",
        ),
        "plain": start("generate", "--model", model, "--prompt", FRANCE["prompt"],
                       "--max_tokens", "8"),
        "too_long": start("generate", "--model", model, "--prompt", "hi",
                          "--max_tokens", "100000"),
        "convert": start("convert", model, str(orbax_dir)),
        "convert_int8": start("convert", model, str(orbax_dir) + "-int8", "--quantization",
                              "int8"),
    }
    yield {name: (p, orbax_dir) for name, p in procs.items()}
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_generate_json_equals_the_python_api(runs, real_gguf_path):
    rc, out, err = finish(runs["json"][0])
    assert rc == 0, err
    result = json.loads(out)
    assert result["token_ids"] == FRANCE["output_ids"][:8]
    assert result["finish_reason"] == "length"
    assert result["prompt_tokens"] == len(FRANCE["prompt_ids"])
    llm = LLM(real_gguf_path, dtype="float32", num_pages=64, max_model_len=256)
    ref = llm.generate(FRANCE["prompt"], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert result["token_ids"] == ref.token_ids
    assert result["text"] == ref.text


def test_generate_plain_streams_the_same_text_and_says_what_loads(runs):
    rc, out, err = finish(runs["plain"][0])
    rc_json, out_json, _ = finish(runs["json"][0])
    assert rc == 0 == rc_json, err
    assert out == json.loads(out_json)["text"] + "\n"
    assert err.startswith("loading ") and "[8 tokens, finish_reason=length" in err


def test_generate_rejects_max_tokens_past_the_context_as_the_server_does(runs):
    rc, out, err = finish(runs["too_long"][0])
    assert rc == 2 and out == ""
    assert "InvalidRequestError" in err and "exceeds the context length" in err
    assert "Traceback" not in err


def test_generate_chat_uses_the_chat_template(runs):
    rc, out, err = finish(runs["chat"][0])
    assert rc == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == len(CHAT["prompt_ids"])
    assert result["token_ids"] == CHAT["output_ids"]
    assert result["finish_reason"] == "stop"


def test_convert_writes_an_orbax_checkpoint_with_the_same_greedy_tokens(runs):
    proc, orbax_dir = runs["convert"]
    rc, out, err = finish(proc)
    assert rc == 0, err
    assert str(orbax_dir) in out
    llm = LLM(orbax_dir, dtype="float32", num_pages=64, max_model_len=256)
    prompts = [FRANCE["prompt_ids"], CHAT["prompt_ids"]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    assert outs[0].token_ids == FRANCE["output_ids"][:8]
    assert outs[1].token_ids == CHAT["output_ids"][:8]
    assert llm.encode_chat(CHAT["messages"]) == CHAT["prompt_ids"]  # tokenizer saved too


def test_convert_quantization_int8_saves_the_quantised_tree_as_loaded(runs, real_gguf_path):
    """`convert --quantization int8` stores what load_checkpoint(quantization="int8") gives; it
    loads back as stored (no re-quantisation) and refuses another mode."""
    from jaxserve.errors import ConfigError
    from jaxserve.loading import load_checkpoint
    from jaxserve.model import quant

    proc, orbax_dir = runs["convert_int8"]
    rc, out, err = finish(proc)
    assert rc == 0, err
    d = Path(str(orbax_dir) + "-int8")
    assert str(d) in out and "int8" in out
    _, got = load_checkpoint(d)
    _, want = load_checkpoint(real_gguf_path, quantization="int8")
    assert quant.tree_mode(got) == "int8"
    flat_got, flat_want = dict(_flat(got)), dict(_flat(want))
    assert flat_got.keys() == flat_want.keys()
    for k, w in flat_want.items():
        assert flat_got[k].dtype == w.dtype, k
        assert np.array_equal(flat_got[k].view(np.uint8), w.view(np.uint8)), k
    with pytest.raises(ConfigError, match="already quantised"):
        load_checkpoint(d, quantization="int4")


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def test_fetch_prints_the_cached_path(real_gguf_path):
    rc, out, err = cli("fetch")
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == str(real_gguf_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "--prompt", "hi", "--top_p", "1.5"], "top_p"),
        (["generate", "--prompt", "hi", "--max_tokens", "0"], "max_tokens"),
        (["generate", "--max_tokens", "4"], "--prompt"),
        (["generate", "--prompt", ""], "--prompt"),
        (["frobnicate"], "unknown or missing command"),
        ([], "unknown or missing command"),
        (["convert", "only-one-arg"], "SRC DST"),
        (["generate", "--prompt", "hi", "--kv_cache_dtype", "fp8"], "kv_cache_dtype"),
        (["generate", "--prompt", "hi", "--quantization", "int3"], "--quantization"),
        (["serve", "--quant_group_size", "48"], "--quant_group_size"),
        (["convert", "a.gguf", "b", "--quantization", "fp4"], "--quantization"),
        (["serve", "--preset", "nope"], "ConfigError: no serving preset"),
        (["train-draft", "--out", "heads"], "--method"),
        (["generate", "--prompt", "hi", "--speculative_method", "eagle"],
         "ConfigError: speculative_method 'eagle' needs speculative_model"),
        (["generate", "--prompt", "hi", "--port", "5"], "generate does not take --port"),
        (["client", "--prompt", "hi", "--quantization", "int8", "--host", "h"],
         "client does not take --host, --quantization"),
    ],
    ids=[
        "temperature",
        "top_p",
        "max_tokens",
        "no-prompt",
        "empty-prompt",
        "unknown-command",
        "no-command",
        "convert-args",
        "kv-cache-dtype",
        "quantization",
        "quant-group-size",
        "convert-quantization",
        "unknown-preset",
        "train-draft-method",
        "eagle-without-heads",
        "foreign-flag",
        "foreign-flags",
    ],
)
def test_bad_usage_fails_with_a_clear_message(args, message):
    rc, out, err = cli(*args)
    assert rc != 0
    assert message in err
    assert "Traceback" not in err
    assert out == ""


def test_usage_errors_exit_1_without_a_flag_dump():
    rc, out, err = cli("serve", "--prompt", "hi")
    assert rc == 1 and out == ""
    assert err.strip() == "usage error: serve does not take --prompt (see jaxserve serve --help)"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_lists_only_the_commands_own_flags_and_exits_0(command):
    rc, out, err = cli(*([command] if command else []), "--help")
    assert rc == 0 and "Traceback" not in err
    if command is None:
        assert all(f"jaxserve {c}" in out for c in COMMANDS)
        return
    listed = set(re.findall(r"^  --(\w+):", out, flags=re.M))
    assert listed == set(COMMAND_FLAGS[command])
    assert out.startswith(f"usage:\n  jaxserve {command}")


def test_every_flag_belongs_to_a_command_and_every_listed_flag_exists():
    from absl import flags

    import jaxserve.cli as cli_module

    ours = {f.name for f in flags.FLAGS.get_flags_for_module(cli_module.__name__)}
    listed = {n for names in COMMAND_FLAGS.values() for n in names}
    assert listed <= ours and ours <= listed, (listed ^ ours)


def test_unknown_model_path_exits_2_naming_it(tmp_path):
    missing = tmp_path / "missing-model.gguf"
    rc, out, err = cli("generate", "--prompt", "hi", "--model", str(missing))
    assert rc == 2
    assert str(missing) in err and "CheckpointError" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_kv_cache_dtype_flag_reaches_the_engine_config(command, monkeypatch):
    """In process, with the model load replaced: the flag arrives as an LLM (EngineConfig)
    override."""
    from absl.testing import flagsaver

    import jaxserve
    from jaxserve import cli

    got = {}

    class Loaded(Exception):
        pass

    def fake_llm(*args, **kwargs):
        got.update(kwargs)
        raise Loaded

    monkeypatch.setattr(jaxserve, "LLM", fake_llm)  # both commands load through jaxserve.LLM
    try:
        with flagsaver.flagsaver():
            cli.FLAGS(["jaxserve", "--prompt", "hi", "--kv_cache_dtype", "int8"])
            with pytest.raises(Loaded):
                cli.COMMANDS[command]([])
    finally:
        cli.FLAGS.unparse_flags()
    assert got["kv_cache_dtype"] == "int8"


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize(
    ("flags", "want"),
    [
        # No --quant_group_size: None, i.e. the mode's default (int4 128, int8 per channel).
        ([], (None, None)),
        (["--quantization", "none"], (None, None)),
        (["--quantization", ""], (None, None)),
        (["--quantization", "int4", "--quant_group_size", "64"], ("int4", 64)),
        (["--quantization", "int8"], ("int8", None)),
        (["--quantization", "int8", "--quant_group_size", "32"], ("int8", 32)),
        (["--quantization", "gguf"], ("gguf", None)),
        (["--quantization", "w8a8", "--kv_cache_dtype", "int8"], ("w8a8", None)),
        (["--quantization", "int4", "--quant_method", "awq", "--quant_calibration", "c.txt"],
         ("int4", None, "awq", "c.txt")),
    ],
    ids=["default", "none", "empty", "int4-g64", "int8", "int8-g32", "gguf", "w8a8", "awq"],
)
def test_quantization_flags_reach_the_engine_config(command, flags, want, monkeypatch):
    from absl.testing import flagsaver

    import jaxserve
    from jaxserve import cli

    got = {}

    class Loaded(Exception):
        pass

    def fake_llm(*args, **kwargs):
        got.update(kwargs)
        raise Loaded

    monkeypatch.setattr(jaxserve, "LLM", fake_llm)
    try:
        with flagsaver.flagsaver():
            cli.FLAGS(["jaxserve", "--prompt", "hi", *flags])
            with pytest.raises(Loaded):
                cli.COMMANDS[command]([])
    finally:
        cli.FLAGS.unparse_flags()
    assert (got.pop("dtype"), got.pop("preset")) == (None, None)
    # Only the flags given are passed; the rest keep the EngineConfig defaults (or a preset's).
    assert set(got) == {f.lstrip("-") for f in flags if f.startswith("--")}
    ecfg = dataclasses.replace(EngineConfig(), **got)
    assert (ecfg.quantization, ecfg.quant_group_size) == want[:2]
    assert (ecfg.quant_method, ecfg.quant_calibration) == (want[2:] or ("rtn", None))
    assert ecfg.kv_cache_dtype == ("int8" if "--kv_cache_dtype" in flags else "auto")


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_preset_flag_reaches_llm_and_only_given_flags_override_it(command, monkeypatch):
    from absl.testing import flagsaver

    import jaxserve
    from jaxserve import cli

    got = {}

    class Loaded(Exception):
        pass

    def fake_llm(*args, **kwargs):
        got.update(kwargs)
        raise Loaded

    monkeypatch.setattr(jaxserve, "LLM", fake_llm)
    try:
        with flagsaver.flagsaver():
            cli.FLAGS(["jaxserve", "--prompt", "hi", "--preset", "cpu-small", "--dtype",
                       "bfloat16", "--quant_group_size", "64"])
            with pytest.raises(Loaded):
                cli.COMMANDS[command]([])
    finally:
        cli.FLAGS.unparse_flags()
    assert got == {"preset": "cpu-small", "dtype": "bfloat16", "quant_group_size": 64}
