"""Prometheus metrics of one server: a registry per instance, so servers (and tests) never share
counters. Engine gauges are read at scrape time through the server's event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
SCRAPE_TIMEOUT_S = 1.0
# engine.stats() entries exported as counters of their own (the engine counts tokens, as vLLM).
COUNTER_STATS = {
    "prefix_cache_hits": "Prompt tokens found in the prefix cache (engine.stats()).",
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache (engine.stats()).",
    "spec_steps": "Steps that verified speculative drafts (engine.stats()).",
    "spec_proposed": "Speculative drafts verified (engine.stats()).",
    "spec_accepted": "Speculative drafts the model accepted (engine.stats()).",
}


class _EngineCollector(Collector):
    """Queue depth, running requests and KV pages from `engine.capacity()`, plus every numeric
    entry of the optional `engine.stats() -> dict[str, number]` hook: COUNTER_STATS as
    counters, the rest as `jaxserve_engine_stat{name=...}` gauges."""

    def __init__(self, read: Callable[[], tuple[Any, dict[str, float]]]):
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            capacity, stats = self._read()
        except Exception:  # a scrape must never fail because the engine is busy or gone
            return
        if capacity is not None:
            for name, doc, value in (
                ("jaxserve_num_requests_waiting", "Requests waiting in the engine queue.",
                 capacity.waiting),
                ("jaxserve_num_requests_running", "Requests the engine is running.",
                 capacity.running),
                ("jaxserve_kv_pages_used", "KV-cache pages in use.",
                 capacity.total_pages - capacity.free_pages),
                ("jaxserve_kv_pages_total", "KV-cache pages in all.", capacity.total_pages),
            ):
                yield GaugeMetricFamily(name, doc, value=value)
        for key, doc in COUNTER_STATS.items():
            if key in stats:
                yield CounterMetricFamily(f"jaxserve_{key}", doc, value=stats[key])
        other = GaugeMetricFamily("jaxserve_engine_stat", "Numeric entries of engine.stats().",
                                  labels=["name"])
        for key, value in sorted(stats.items()):
            if key not in COUNTER_STATS:
                other.add_metric([key], value)
        yield other


class ServerMetrics:
    """Request-level metrics (recorded by the servicer) and engine gauges (read at scrape)."""

    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("jaxserve_requests", "Finished RPCs by method and status code.",
                                ["method", "code"], registry=r)
        self.errors = Counter("jaxserve_request_errors", "Failed RPCs by method and status code.",
                              ["method", "code"], registry=r)
        self.in_flight = Gauge("jaxserve_generate_in_flight", "Generate streams open now.",
                               registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens of finished "
                                     "requests.", registry=r)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "Tokens generated "
                                         "(streamed to clients).", registry=r)
        self.cached_prompt_tokens = Counter("jaxserve_cached_prompt_tokens", "Prompt tokens "
                                            "served from the prefix cache.", registry=r)
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds", "RPC start to first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("jaxserve_inter_token_latency_seconds", "Time between "
                                     "consecutive streamed tokens.", buckets=ITL_BUCKETS,
                                     registry=r)
        self.e2e = Histogram("jaxserve_e2e_request_latency_seconds", "RPC start to last "
                             "response of successful requests.", buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("jaxserve_queue_time_seconds", "Engine arrival to first "
                                    "scheduled (engine-reported).", buckets=TTFT_BUCKETS,
                                    registry=r)
        self._engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: tuple[Any, dict[str, float]] = (None, {})
        r.register(_EngineCollector(self._read_engine))
        self._http = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Engine reads are scheduled on `loop` (the engine's own) rather than the scrape
        thread, so an engine need not be thread-safe."""
        self._loop = loop

    def _snapshot(self) -> tuple[Any, dict[str, float]]:
        stats_fn = getattr(self._engine, "stats", None)
        stats = stats_fn() if callable(stats_fn) else {}
        numeric = {k: float(v) for k, v in (stats or {}).items()
                   if isinstance(v, int | float) and not isinstance(v, bool)
                   and math.isfinite(v)}
        return self._engine.capacity(), numeric

    async def _snapshot_async(self) -> tuple[Any, dict[str, float]]:
        return self._snapshot()

    def _read_engine(self) -> tuple[Any, dict[str, float]]:
        loop = self._loop
        if loop is None or loop.is_closed():
            return self._last
        try:
            fut = asyncio.run_coroutine_threadsafe(self._snapshot_async(), loop)
            self._last = fut.result(timeout=SCRAPE_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # loop busy or stopping: report the last values
        return self._last

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: any free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
