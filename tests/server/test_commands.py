"""The CLI command functions (serve / client / chat) against the MockEngine."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time

import pytest

from jaxserve.client import Client, ClientError
from jaxserve.server.commands import run_chat, run_client, run_serve
from tests.server.mock_engine import MockEngine, decode, expected_ids


def test_client_streams_text_and_a_summary(server):
    out, err = io.StringIO(), io.StringIO()
    assert run_client(server.handle.target, prompt="abc", sampling={"max_tokens": 4},
                      out=out, err=err) == 0
    assert out.getvalue() == "bcdb\n"
    assert "finish_reason=length" in err.getvalue() and "3 prompt + 4 tokens" in err.getvalue()


def test_client_json_and_chat(server):
    out = io.StringIO()
    run_client(server.handle.target, prompt="hi", chat=True, system="s",
               sampling={"max_tokens": 3, "logprobs": 1}, json_output=True, out=out)
    r = json.loads(out.getvalue())
    rendered = list(b"<system>:s\n<user>:hi\n<assistant>:")
    assert r["token_ids"] == [t + 1 for t in rendered[:3]]
    assert r["finish_reason"] == "length" and r["usage"]["prompt_tokens"] == len(rendered)
    assert r["logprobs"][0] == [-0.25, {str(rendered[0] + 1): -0.25}]
    assert set(r["timings"]) == {"queue_time_s", "time_to_first_token_s", "total_time_s"}


def test_client_error_is_raised_with_the_status(server):
    with pytest.raises(ClientError, match="INVALID_ARGUMENT: SamplingParams.top_p"):
        run_client(server.handle.target, prompt="abc", sampling={"top_p": 0.0},
                   out=io.StringIO(), err=io.StringIO())


def test_chat_keeps_the_conversation(server):
    lines = iter(["hi", "", "/reset", "yo", "/exit"])
    out = io.StringIO()
    assert run_chat(server.handle.target, sampling={"max_tokens": 2},
                    input_fn=lambda prompt: next(lines), out=out) == 0
    text = out.getvalue()
    # "<user>:hi\n<assistant>:" -> first two tokens "<u" + 1 = "=v"
    assert text.count("assistant> =v\n") == 2 and "[conversation reset]" in text
    assert len(server.engine.finished) == 2 + 2  # two warmup requests, two turns


def test_chat_reports_errors_and_goes_on(server):
    lines = iter(["hi", "again"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    assert run_chat(server.handle.target, sampling={"temperature": -1.0}, input_fn=read,
                    out=out) == 0
    assert out.getvalue().count("[error: INVALID_ARGUMENT: SamplingParams.temperature") == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_drains_on_sigterm():
    engine = MockEngine(token_delay_s=0.01)
    port = _free_port()
    err = io.StringIO()
    result: dict[str, object] = {}

    def poke():
        with Client(f"127.0.0.1:{port}") as c:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if c.health(timeout=1) == "SERVING":
                        break
                except ClientError:
                    pass
                time.sleep(0.02)
            stream = c.generate("abc", max_tokens=30)
            next(stream)
            os.kill(os.getpid(), signal.SIGTERM)
            result["rest"] = list(stream)  # finishes within the grace period

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=poke)
    t.start()
    rc = run_serve(engine=engine, port=port, grace_s=5.0, err=err)
    t.join(10)
    assert rc == 0
    assert len(result["rest"]) == 29 and result["rest"][-1].finish_reason == "length"
    assert "serving on" in err.getvalue() and "stopped" in err.getvalue()
    assert signal.getsignal(signal.SIGTERM) is before
    assert engine.live == [] and engine.draining


def test_serve_answers_a_sample_request_then_keeps_serving(capsys):
    """`jaxserve serve --sample_prompt` (the README's main command): once healthy, the prompt
    goes through a real gRPC client as a chat request and its answer is printed."""
    engine = MockEngine(max_model_len=256)
    err = io.StringIO()

    def stop_when_served():
        deadline = time.monotonic() + 20
        while "serving until" not in err.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=stop_when_served)
    t.start()
    rc = run_serve(engine=engine, port=_free_port(), grace_s=1.0, sample_prompt="hi", err=err)
    t.join(10)
    assert rc == 0
    prompt = engine.render_chat([{"role": "user", "content": "hi"}])
    ids, reason = expected_ids(prompt, 64)
    assert capsys.readouterr().out == decode(ids) + "\n", err.getvalue()
    assert f"finish_reason={reason}" in err.getvalue()


def test_a_taken_grpc_port_fails_fast_and_typed(server):
    """A second server on a port another listens on: AddressInUseError before any model loads
    (run_serve would load one: `engine` is None here), and from serve() itself too (gRPC's
    SO_REUSEPORT would otherwise let both listen and split the requests between them)."""
    from jaxserve.errors import AddressInUseError
    from jaxserve.server.server import serve

    taken = server.handle.port
    with pytest.raises(AddressInUseError, match=f"127.0.0.1:{taken} \\(gRPC\\)"):
        run_serve("no-such-model-is-loaded", port=taken, err=io.StringIO())
    with pytest.raises(AddressInUseError, match=f"127.0.0.1:{taken} \\(gRPC\\)"):
        serve(MockEngine(), "127.0.0.1", taken)
    # The first server is unaffected.
    chunks = list(Client(server.handle.target).generate("ab", max_tokens=2))
    assert sum(len(c.token_ids) for c in chunks) == 2


def test_a_taken_metrics_port_fails_fast_and_typed():
    from jaxserve.errors import AddressInUseError
    from jaxserve.server.server import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(AddressInUseError, match=f"127.0.0.1:{port} \\(metrics\\)"):
            run_serve("no-such-model-is-loaded", port=0, metrics_port=port, err=io.StringIO())
        with pytest.raises(AddressInUseError, match=f"127.0.0.1:{port} \\(metrics\\)"):
            serve(MockEngine(), "127.0.0.1", 0, metrics_port=port, warmup=False)
