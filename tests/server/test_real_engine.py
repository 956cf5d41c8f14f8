"""End to end on the real model: LLM -> AsyncEngine -> gRPC server -> Client."""

from __future__ import annotations

import pytest

from jaxserve.client import Client, ClientError
from jaxserve.engine import async_engine
from jaxserve.server.server import serve
from tests.server.test_server import wait_for

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def llm(real_gguf_path):
    from jaxserve import LLM

    return LLM(real_gguf_path, dtype="float32", num_pages=64, max_model_len=MAX_MODEL_LEN)


def test_real_model_over_grpc(llm):
    from jaxserve import SamplingParams

    prompt = "The capital of France is"
    want = llm.generate(prompt, SamplingParams.greedy(max_tokens=8, ignore_eos=True))[0]
    engine = async_engine.AsyncEngine.from_llm(llm)
    handle = serve(engine, "127.0.0.1", 0, grace_s=10)
    try:
        with Client(handle.target) as c:
            handle.wait_ready(timeout=300)  # a real one-token generation happened
            assert c.health() == "SERVING"
            info = c.model_info()
            assert info.max_model_len == MAX_MODEL_LEN
            assert c.tokenize(prompt) == llm.tokenizer.encode(prompt)

            got = c.complete(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
            assert got.token_ids == want.token_ids and got.text == want.text
            assert (got.finish_reason, got.usage.prompt_tokens, got.usage.completion_tokens) == (
                "length", len(want.prompt_token_ids), 8)
            assert got.timings.time_to_first_token_s > 0

            chat = c.complete(messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                              temperature=0.0)
            assert chat.usage.prompt_tokens == len(llm.encode_chat(
                [{"role": "user", "content": "Hi"}]))

            with pytest.raises(ClientError) as info:
                c.complete(prompt, max_tokens=MAX_MODEL_LEN)
            assert info.value.code.name == "INVALID_ARGUMENT"
            assert "max_tokens" in info.value.details

            # A cancelled stream gives its pages back.
            total = c.capacity().total_pages
            stream = c.generate(prompt, max_tokens=200, ignore_eos=True, temperature=0.0)
            next(stream)
            stream.close()
            wait_for(lambda: (c.capacity().running, c.capacity().waiting) == (0, 0), 60)
            assert c.capacity().free_pages == total
    finally:
        handle.stop()
        assert handle.wait(timeout=60)
        engine.shutdown()


def test_serve_command_on_real_model(real_gguf_path):
    """`run_serve` (what `jaxserve serve` runs) loads the model, serves, drains on SIGTERM."""
    import io
    import os
    import signal
    import threading
    import time

    from jaxserve.server.commands import run_serve
    from tests.server.test_commands import _free_port

    port = _free_port()
    result: dict[str, object] = {}

    def poke():
        with Client(f"127.0.0.1:{port}") as c:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if c.health(timeout=1) == "SERVING":
                        break
                except ClientError:
                    pass
                time.sleep(0.1)
            result["reply"] = c.complete(messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=4, temperature=0.0)
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=poke)
    t.start()
    err = io.StringIO()
    rc = run_serve(str(real_gguf_path), dtype="float32", port=port, grace_s=10, err=err,
                   engine_overrides={"num_pages": 64, "max_model_len": MAX_MODEL_LEN})
    t.join(60)
    assert rc == 0, err.getvalue()
    assert result["reply"].usage.completion_tokens == 4
    assert "serving on" in err.getvalue() and "stopped" in err.getvalue()


def test_concurrent_load_with_cancellations_on_real_model(llm):
    """Bounded load through the real engine: 40 requests from 8 client threads, a quarter
    cancelled mid-stream and some with deadlines that may expire. Every request ends with its
    full greedy output (equal to the offline API's) or the status its client caused, and the
    KV pool is entirely free afterwards."""
    import random
    import threading

    from jaxserve import SamplingParams

    rng = random.Random(0)
    words = "the cat sat on a mat while many birds sang in old green trees".split()
    prompts = [" ".join(rng.choices(words, k=rng.randint(2, 40))) for _ in range(40)]
    lengths = [rng.randint(1, 8) for _ in prompts]
    mode = [rng.choice(["full", "full", "cancel", "deadline"]) for _ in prompts]
    want = [o.token_ids for o in llm.generate(
        prompts, [SamplingParams.greedy(max_tokens=n, ignore_eos=True) for n in lengths])]

    engine = async_engine.AsyncEngine.from_llm(llm)
    handle = serve(engine, "127.0.0.1", 0, grace_s=10)
    results: dict[int, object] = {}
    try:
        handle.wait_ready(timeout=300)

        def worker(ids):
            with Client(handle.target) as c:
                for i in ids:
                    kw = dict(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)
                    try:
                        if mode[i] == "cancel":
                            stream = c.generate(prompts[i], **kw)
                            next(stream)
                            stream.close()
                            results[i] = "cancelled"
                        elif mode[i] == "deadline":
                            with Client(handle.target, timeout=0.05) as fast:
                                results[i] = fast.complete(prompts[i], **kw).token_ids
                        else:
                            results[i] = c.complete(prompts[i], **kw).token_ids
                    except ClientError as e:
                        results[i] = e.code.name

        threads = [threading.Thread(target=worker, args=(range(k, 40, 8),)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(results) == 40
        for i, r in results.items():
            if mode[i] == "full":
                assert r == want[i], i
            elif mode[i] == "cancel":
                assert r == "cancelled", (i, r)
            else:
                assert r == want[i] or r == "DEADLINE_EXCEEDED", (i, r)
        with Client(handle.target) as c:
            wait_for(lambda: (c.capacity().running, c.capacity().waiting) == (0, 0), 60)
            cap = c.capacity()
            assert cap.free_pages == cap.total_pages
    finally:
        handle.stop()
        assert handle.wait(timeout=60)
        engine.shutdown()
