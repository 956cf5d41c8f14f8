"""The gRPC server end to end over a real localhost channel, with the hand-computable
MockEngine (see mock_engine.py for the rules the expected values below follow)."""

from __future__ import annotations

import dataclasses
import math
import time
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.client import Client, ClientError
from jaxserve.engine.sampling import SamplingParams
from jaxserve.server import inference_pb2 as pb
from jaxserve.server.server import SERVICE_NAME, WARMUP_REQUEST_ID, State, sampling_params
from tests.server.mock_engine import EOS, FAIL_TOKEN, PAGE_SIZE, MockEngine, decode

S = grpc.StatusCode


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def status(fn) -> ClientError:
    with pytest.raises(ClientError) as info:
        fn()
    return info.value


# -- the happy path ---------------------------------------------------------------------------


def test_stream_equals_hand_computation(server):
    chunks = list(server.client.generate("abc", max_tokens=5, request_id="r1"))
    # prompt "abc" = [97, 98, 99]; token k = prompt[k % 3] + 1, one per chunk.
    assert [c.token_ids for c in chunks] == [(98,), (99,), (100,), (98,), (99,)]
    assert "".join(c.text for c in chunks) == "bcdbc"
    assert [c.finish_reason for c in chunks] == [None] * 4 + ["length"]
    assert all(c.request_id == "r1" for c in chunks)
    assert all(c.usage is None and c.timings is None for c in chunks[:-1])
    last = chunks[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens,
            last.usage.cached_prompt_tokens) == (3, 5, 0)
    t = last.timings
    assert 0 <= t.queue_time_s <= t.time_to_first_token_s <= t.total_time_s < 5
    assert t.total_time_s > 0
    assert server.engine.live == [] and server.engine.finished[-1] == "r1"


def test_three_kinds_of_input(server):
    c = server.client
    by_ids = c.complete(prompt_token_ids=[10, 20], max_tokens=3)
    assert by_ids.token_ids == [11, 21, 11] and by_ids.finish_reason == "length"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = list(b"<system>:be brief\n<user>:hi\n<assistant>:")
    assert c.tokenize(messages=messages) == rendered
    chat = c.complete(messages=messages, max_tokens=4)
    assert chat.token_ids == [t + 1 for t in rendered[:4]]
    assert chat.text == decode(chat.token_ids) == "=tzt"  # "<sys" + 1
    assert chat.usage.prompt_tokens == len(rendered)
    # A prompt seen before reports its full pages (all but the last token) as cached.
    again = c.complete(messages=messages, max_tokens=1)
    assert again.usage.cached_prompt_tokens == (len(rendered) - 1) // PAGE_SIZE * PAGE_SIZE


def test_stop_rules_and_logprobs(server):
    c = server.client
    eos = c.complete(prompt_token_ids=[EOS - 1, 5], max_tokens=8)
    assert (eos.token_ids, eos.finish_reason) == ([EOS], "stop")
    ignored = c.complete(prompt_token_ids=[EOS - 1, 5], max_tokens=3, ignore_eos=True)
    assert (ignored.token_ids, ignored.finish_reason) == ([EOS, 6, EOS], "length")
    stopped = c.complete(prompt_token_ids=[1, 2, 3], max_tokens=8, stop_token_ids=[3])
    assert (stopped.token_ids, stopped.finish_reason) == ([2, 3], "stop")
    lp = c.complete("ab", max_tokens=2, logprobs=2)
    assert lp.logprobs == [(-0.25, {98: -0.25, 99: -1.25}), (-0.25, {99: -0.25, 100: -1.25})]
    assert c.complete("ab", max_tokens=2).logprobs is None


def test_unset_sampling_fields_take_the_python_defaults(server):
    assert sampling_params(pb.SamplingParams()) == SamplingParams()
    full = pb.SamplingParams(
        temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, repetition_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=-0.5, seed=3, max_tokens=9, min_tokens=2,
        stop=["x", "yz"], stop_token_ids=[4], ignore_eos=True, logprobs=3,
        include_stop_str_in_output=True, skip_special_tokens=False)
    assert sampling_params(full) == SamplingParams(
        temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, repetition_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=-0.5, seed=3, max_tokens=9, min_tokens=2,
        stop=("x", "yz"), stop_token_ids=(4,), ignore_eos=True, logprobs=3,
        include_stop_str_in_output=True, skip_special_tokens=False)
    # Every Python sampling parameter is in the proto, by the same name.
    proto_fields = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert proto_fields == {f.name for f in dataclasses.fields(SamplingParams)}
    # Unset max_tokens is the Python default (16).
    assert len(server.client.complete("a").token_ids) == 16


def test_unary_rpcs(server):
    c = server.client
    info = c.model_info()
    assert (info.name, info.vocab_size, info.max_model_len, info.page_size,
            info.eos_token_ids, info.extra) == ("mock", 300, 64, PAGE_SIZE, (EOS,),
                                                {"kind": "mock"})
    assert c.tokenize("hé") == [104, 195, 169]
    cap = c.capacity()
    assert (cap.free_pages, cap.total_pages, cap.running, cap.waiting) == (4096, 4096, 0, 0)
    assert c.abort("nobody") is False


def test_capacity_counts_a_running_request():
    engine = MockEngine(token_delay_s=0.05)
    with _server(engine) as (handle, c):
        stream = c.generate("abcdefg", max_tokens=40)
        next(stream)  # 7 prompt + 1 generated tokens = 2 pages
        cap = c.capacity()
        assert (cap.running, cap.waiting) == (1, 0)
        assert cap.total_pages - cap.free_pages in (2, 3)
        stream.close()
        wait_for(lambda: c.capacity().free_pages == cap.total_pages)


class _server:
    """A server outside the fixture, for tests that shape the engine first."""

    def __init__(self, engine: MockEngine, **kwargs):
        from jaxserve.server.server import serve

        kwargs.setdefault("grace_s", 5.0)
        self.handle = serve(engine, "127.0.0.1", 0, **kwargs)

    def __enter__(self):
        self.handle.wait_ready(timeout=20)
        self.client = Client(self.handle.target)
        return self.handle, self.client

    def __exit__(self, *exc):
        self.client.close()
        self.handle.stop()
        assert self.handle.wait(timeout=10)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, names", [
    (dict(prompt="a", top_p=1.5), ["top_p", "(0, 1]"]),
    (dict(prompt="a", temperature=-1.0), ["temperature", ">= 0"]),
    (dict(prompt="a", top_k=-2), ["top_k"]),
    (dict(prompt="a", min_p=2.0), ["min_p", "[0, 1]"]),
    (dict(prompt="a", repetition_penalty=0.0), ["repetition_penalty", "> 0"]),
    (dict(prompt="a", presence_penalty=3.0), ["presence_penalty", "[-2, 2]"]),
    (dict(prompt="a", frequency_penalty=-3.0), ["frequency_penalty", "[-2, 2]"]),
    (dict(prompt="a", seed=2**63), ["seed", "2**63"]),
    (dict(prompt="a", max_tokens=0), ["max_tokens", ">= 1"]),
    (dict(prompt="a", max_tokens=2, min_tokens=3), ["min_tokens", "max_tokens"]),
    (dict(prompt="a", logprobs=21), ["logprobs", "20"]),
    (dict(prompt="a", stop=[""]), ["stop", "non-empty"]),
    (dict(), ["exactly one input", "got none"]),
    (dict(prompt=""), ["prompt is empty"]),
    (dict(prompt="a", prompt_token_ids=[1]), ["exactly one input", "prompt and prompt_token_ids"]),
    (dict(prompt="a", messages=[{"role": "user", "content": "x"}]), ["prompt and messages"]),
    (dict(prompt_token_ids=[1, 300]), ["prompt_token_ids[1]", "300"]),
    (dict(messages=[{"role": "robot", "content": "x"}]), ["messages[0].role", "robot"]),
    (dict(prompt="x" * 10, max_tokens=55), ["max_tokens (55)", "max_model_len", "64",
                                             "max_tokens <= 54"]),
    (dict(prompt="x" * 64), ["64 tokens", "max_model_len", "64"]),
])
def test_invalid_argument_names_the_field_and_limit(server, kwargs, names):
    e = status(lambda: server.client.complete(**kwargs))
    assert e.code is S.INVALID_ARGUMENT
    for name in names:
        assert name in e.details, (name, e.details)
    assert server.engine.started == ["warmup-internal", WARMUP_REQUEST_ID]  # none reached it
    e = status(lambda: server.client.tokenize())
    assert e.code is S.INVALID_ARGUMENT and "exactly one of text or messages" in e.details


def test_queue_bound_gives_resource_exhausted_with_retry_hint():
    engine = MockEngine(max_running=1, max_waiting=1, token_delay_s=0.02, retry_after_s=0.25)
    with _server(engine) as (handle, c):
        running = c.generate("a", max_tokens=60)
        next(running)
        waiting = c.generate("b", max_tokens=2, request_id="waiting")
        # The waiting request yields nothing until the first finishes; start it on a thread.
        import threading

        result = {}
        t = threading.Thread(target=lambda: result.update(out=list(waiting)))
        t.start()
        wait_for(lambda: c.capacity().waiting == 1)
        e = status(lambda: c.complete("c", max_tokens=1))
        assert e.code is S.RESOURCE_EXHAUSTED
        assert "max_waiting=1" in e.details and "retry after 250 ms" in e.details
        assert e.retry_after_s == 0.25
        running.close()  # frees the slot: the waiting request runs to completion
        t.join(10)
        assert [ch.token_ids for ch in result["out"]] == [(99,), (99,)]
        wait_for(lambda: engine.live == [])


def test_client_cancel_aborts_the_request_in_the_engine():
    engine = MockEngine(token_delay_s=0.02)
    with _server(engine) as (handle, c):
        stream = c.generate("abc", max_tokens=50, request_id="gone")
        assert next(stream).token_ids == (98,)
        next(stream)
        stream.close()  # cancels the RPC
        wait_for(lambda: "gone" in engine.abort_calls and engine.live == [])
        assert engine.aborted == ["gone"]
        assert c.capacity().free_pages == c.capacity().total_pages
        assert c.complete("abc", max_tokens=2).token_ids == [98, 99]  # the server goes on


def test_deadline_exceeded_aborts_the_request_in_the_engine():
    # The mock ignores the deadline it is given, so only the server's abort can end it.
    engine = MockEngine(token_delay_s=0.02, honour_deadline=False)
    with _server(engine) as (handle, c):
        e = status(lambda: c.complete("abc", max_tokens=60, request_id="slow", timeout=0.3))
        assert e.code is S.DEADLINE_EXCEEDED
        wait_for(lambda: "slow" in engine.abort_calls and engine.live == [])
        assert engine.aborted == ["slow"]


def test_engine_side_deadline_maps_to_deadline_exceeded():
    engine = MockEngine(token_delay_s=0.02)
    with _server(engine) as (handle, c):
        e = status(lambda: c.complete("abc", max_tokens=60, timeout=0.3))
        assert e.code is S.DEADLINE_EXCEEDED
        wait_for(lambda: engine.live == [])


def test_abort_rpc_ends_the_stream_with_cancelled():
    engine = MockEngine(token_delay_s=0.02)
    with _server(engine) as (handle, c):
        stream = c.generate("abc", max_tokens=60, request_id="victim")
        next(stream)
        assert c.abort("victim") is True
        e = status(lambda: list(stream))
        assert e.code is S.CANCELLED and "victim" in e.details
        assert engine.live == [] and engine.aborted == ["victim"]
        assert c.abort("victim") is False


def test_duplicate_request_id_is_already_exists():
    engine = MockEngine(token_delay_s=0.02)
    with _server(engine) as (handle, c):
        stream = c.generate("abc", max_tokens=60, request_id="dup")
        next(stream)
        e = status(lambda: c.complete("abc", request_id="dup"))
        assert e.code is S.ALREADY_EXISTS and "dup" in e.details
        stream.close()


def test_draining_engine_is_unavailable(server):
    server.engine.draining = True
    e = status(lambda: server.client.complete("abc"))
    assert e.code is S.UNAVAILABLE and "engine is draining" in e.details


def test_failed_step_is_internal_and_the_server_goes_on(server):
    c = server.client
    stream = c.generate(prompt_token_ids=[FAIL_TOKEN, 1], max_tokens=5)
    assert next(stream).token_ids == (FAIL_TOKEN + 1,)
    e = status(lambda: list(stream))
    assert e.code is S.INTERNAL and "step failed" in e.details
    assert c.complete("abc", max_tokens=3).text == "bcd"
    assert server.engine.live == []


def test_unexpected_engine_exception_is_internal(server, monkeypatch):
    monkeypatch.setattr(server.engine, "tokenize", lambda text: 1 / 0)
    e = status(lambda: server.client.complete("abc"))
    assert e.code is S.INTERNAL and "ZeroDivisionError" in e.details
    assert server.client.complete(prompt_token_ids=[1], max_tokens=1).token_ids == [2]


# -- health, drain, reflection, metrics ------------------------------------------------------


def test_health_follows_warmup_and_drain(start):
    engine = MockEngine(hold_warmup=True, token_delay_s=0.02)
    r = start(engine, ready=False)
    c = r.client
    assert c.health() == c.health(SERVICE_NAME) == "NOT_SERVING"
    e = status(lambda: c.complete("abc"))
    assert e.code is S.UNAVAILABLE and "starting" in e.details
    r.handle._loop.call_soon_threadsafe(engine.warmup_release.set)
    r.handle.wait_ready(timeout=10)
    assert engine.warmed_up and WARMUP_REQUEST_ID in engine.finished
    assert c.health() == c.health(SERVICE_NAME) == "SERVING"

    stream = c.generate("abc", max_tokens=40)  # in flight across the drain
    next(stream)
    r.handle.drain(grace_s=10, wait=False)
    wait_for(lambda: r.handle.state is State.DRAINING)
    assert c.health() == c.health(SERVICE_NAME) == "NOT_SERVING"
    e = status(lambda: c.complete("abc"))
    assert e.code is S.UNAVAILABLE and "draining" in e.details
    rest = list(stream)  # the in-flight request finishes normally
    assert 1 + len(rest) == 40 and rest[-1].finish_reason == "length"
    assert r.handle.wait(timeout=10)
    assert engine.draining and engine.live == []


def test_drain_grace_over_aborts_in_flight_requests(start):
    engine = MockEngine(token_delay_s=0.02)
    r = start(engine)
    stream = r.client.generate("abc", max_tokens=60, request_id="late")
    next(stream)
    t0 = time.monotonic()
    r.handle.drain(grace_s=0.2, wait=False)
    e = status(lambda: list(stream))
    assert e.code is S.UNAVAILABLE and "grace period" in e.details
    assert r.handle.wait(timeout=10) and time.monotonic() - t0 < 3
    assert engine.aborted == ["late"] and engine.live == []


def test_failed_warmup_never_serves(start):
    engine = MockEngine()

    async def broken():
        raise RuntimeError("no device")

    engine.warmup = broken
    r = start(engine, ready=False)
    with pytest.raises(RuntimeError, match="warmup failed"):
        r.handle.wait_ready(timeout=10)
    assert r.client.health() == "NOT_SERVING"


def test_reflection_lists_and_resolves_the_service(server):
    with grpc.insecure_channel(server.handle.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert "jaxserve.v1.Inference" in services and "grpc.health.v1.Health" in services
        pool = descriptor_pool.DescriptorPool(db)
        generate = pool.FindServiceByName("jaxserve.v1.Inference").FindMethodByName("Generate")
        assert generate.input_type.full_name == "jaxserve.v1.GenerateRequest"
        assert generate.output_type.full_name == "jaxserve.v1.GenerateResponse"
        assert generate.server_streaming and not generate.client_streaming
        sampling = pool.FindMessageTypeByName("jaxserve.v1.SamplingParams")
        assert "temperature" in sampling.fields_by_name


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_metrics_endpoint(start):
    r = start(MockEngine(), metrics_port=0)
    other = start(MockEngine(), metrics_port=0)  # its own registry: no collision
    c = r.client
    c.complete("abcd", max_tokens=3)
    c.complete("abcd", max_tokens=2)  # same prompt: a prefix-cache hit
    status(lambda: c.complete("a", top_p=2.0))
    m = _scrape(r.handle.metrics_port)
    assert m["jaxserve_requests_total{code=OK,method=Generate}"] == 2
    assert m["jaxserve_requests_total{code=INVALID_ARGUMENT,method=Generate}"] == 1
    assert m["jaxserve_request_errors_total{code=INVALID_ARGUMENT,method=Generate}"] == 1
    assert m["jaxserve_prompt_tokens_total"] == 8
    assert m["jaxserve_generation_tokens_total"] == 5
    assert m["jaxserve_cached_prompt_tokens_total"] == 0 + 0  # 4-token prompt: no full page
    assert m["jaxserve_prefix_cache_hits_total"] == 0  # (len - 1) // 4 full pages = 0
    assert m["jaxserve_time_to_first_token_seconds_count"] == 2
    assert m["jaxserve_inter_token_latency_seconds_count"] == 3
    assert m["jaxserve_e2e_request_latency_seconds_count"] == 2
    assert m["jaxserve_queue_time_seconds_count"] == 2
    for name in ("jaxserve_num_requests_waiting", "jaxserve_num_requests_running",
                 "jaxserve_kv_pages_used", "jaxserve_generate_in_flight"):
        assert m[name] == 0
    assert m["jaxserve_kv_pages_total"] == 4096
    c.complete("abcdefghij", max_tokens=1)
    c.complete("abcdefghij", max_tokens=1)
    m = _scrape(r.handle.metrics_port)
    assert m["jaxserve_prefix_cache_hits_total"] == 1
    assert m["jaxserve_cached_prompt_tokens_total"] == 8
    assert m["jaxserve_engine_stat{name=num_preemptions}"] == 0
    assert _scrape(other.handle.metrics_port).get(
        "jaxserve_requests_total{code=OK,method=Generate}", 0) == 0
    assert math.isfinite(m["jaxserve_time_to_first_token_seconds_sum"])
