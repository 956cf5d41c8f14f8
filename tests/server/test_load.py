"""Bounded load: 200 requests from 32 concurrent clients, 20% cancelled at random points, a
queue bound small enough to push back. Every request must end with its hand-computed result,
a client-side cancel, or RESOURCE_EXHAUSTED retried after the hint; nothing may leak."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from jaxserve.client import Client, ClientError
from tests.server.mock_engine import MockEngine, expected_ids
from tests.server.test_server import _scrape, wait_for

NUM_REQUESTS = 200
NUM_CLIENTS = 32
CANCEL_FRACTION = 0.2


def test_bounded_load_with_cancellations(start):
    engine = MockEngine(max_running=8, max_waiting=12, token_delay_s=0.001, retry_after_s=0.01)
    r = start(engine, metrics_port=0)
    rng = random.Random(0)
    plans = []
    for i in range(NUM_REQUESTS):
        prompt = [rng.randrange(1, 250) for _ in range(rng.randrange(1, 12))]
        max_tokens = rng.randrange(1, 24)
        cancel_at = rng.randrange(max_tokens) if rng.random() < CANCEL_FRACTION else None
        plans.append((f"req-{i}", prompt, max_tokens, cancel_at))
    channels = [Client(r.handle.target) for _ in range(4)]  # several connections, shared

    def one(i: int) -> tuple[str, int]:
        request_id, prompt, max_tokens, cancel_at = plans[i]
        client = channels[i % len(channels)]
        rejected = 0
        while True:
            stream = client.generate(prompt_token_ids=prompt, max_tokens=max_tokens,
                                     request_id=request_id, timeout=30)
            ids, last = [], None
            try:
                for k, chunk in enumerate(stream):
                    ids.extend(chunk.token_ids)
                    last = chunk
                    if k == cancel_at:
                        stream.close()
                        return "cancelled", rejected
            except ClientError as e:
                assert e.code is grpc.StatusCode.RESOURCE_EXHAUSTED, e
                assert e.retry_after_s == 0.01
                rejected += 1
                time.sleep(e.retry_after_s)
                continue
            want, reason = expected_ids(prompt, max_tokens)
            assert ids == want and last.finish_reason == reason, request_id
            assert last.usage.completion_tokens == len(want)
            return "done", rejected

    t0 = time.monotonic()
    with ThreadPoolExecutor(NUM_CLIENTS) as pool:
        outcomes = list(pool.map(one, range(NUM_REQUESTS)))
    elapsed = time.monotonic() - t0
    for c in channels:
        c.close()

    num_cancelled = sum(o == "cancelled" for o, _ in outcomes)
    num_rejected = sum(n for _, n in outcomes)
    assert num_cancelled == sum(p[3] is not None for p in plans) > 0
    assert num_rejected > 0, "the queue bound was never hit; the test lost its point"
    # Nothing leaked: every request was freed, every page is back.
    wait_for(lambda: engine.live == [] and not r.handle.server.servicer.in_flight)
    cap = r.client.capacity()
    assert (cap.free_pages, cap.running, cap.waiting) == (cap.total_pages, 0, 0)
    cancelled_ids = {p[0] for p in plans if p[3] is not None}
    assert set(engine.aborted) <= cancelled_ids
    assert set(engine.finished) | set(engine.aborted) >= {p[0] for p in plans}
    # The server saw each request end exactly once: OK, CANCELLED or RESOURCE_EXHAUSTED.
    m = _scrape(r.handle.metrics_port)
    ok = m.get("jaxserve_requests_total{code=OK,method=Generate}", 0)
    cancelled = m.get("jaxserve_requests_total{code=CANCELLED,method=Generate}", 0)
    exhausted = m.get("jaxserve_requests_total{code=RESOURCE_EXHAUSTED,method=Generate}", 0)
    assert ok + cancelled == NUM_REQUESTS and exhausted == num_rejected
    # A cancel that lands after the engine finished the request has nothing left to abort.
    assert len(engine.aborted) <= cancelled <= num_cancelled
    assert elapsed < 30
