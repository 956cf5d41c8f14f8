"""`python -m jaxserve.cli` in subprocesses, against the real model.

The slow invocations (each imports jax and loads the model) are started together by one module
fixture, so they overlap instead of queueing; each test then waits for the one it checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve import LLM, SamplingParams

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
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, out, err


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
        "convert": start("convert", model, str(orbax_dir)),
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
    ],
)
def test_bad_usage_fails_with_a_clear_message(args, message):
    rc, out, err = cli(*args)
    assert rc != 0
    assert message in err
    assert "Traceback" not in err
    assert out == ""


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
