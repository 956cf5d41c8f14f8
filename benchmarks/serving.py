"""Serving benchmark: a seeded gRPC load generator that compares schedulers on the same load.

    python benchmarks/serving.py --launch --quick             # both schedulers, default model, CPU
    python benchmarks/serving.py --launch --concurrency 4,16,32 --num-requests 128
    python benchmarks/serving.py --target host:port [--target host:port ...] --rate 2,4

It talks to servers only through the `jaxserve.v1.Inference` gRPC API, so any address works
(`--target`, repeatable; each is labelled with the scheduler its GetModelInfo reports). With
`--launch` it starts one server per scheduler ("static": fixed batches run to completion, then
"continuous") in a subprocess with the default model, waits for health SERVING, sends untimed
warm-up requests (so compiles are not timed), then the same seeded request list to each.

Load: fixed concurrency (N clients, each sending its next request when the previous finishes)
or Poisson arrivals at a rate (requests/s). Prompt and output lengths are lognormal (long tail),
clipped; prompts are random token ids clear of special tokens (content does not change the cost)
and `ignore_eos` makes every request generate exactly its drawn output length.

Per request, measured on the client: TTFT (send -> first token), ITL (gaps between responses
that carry tokens), TPOT ((e2e - TTFT) / (n - 1)), end-to-end latency. Per run: p50/p90/p99 of
each, requests/s, output tokens/s, and goodput (requests/s meeting the SLO; the default SLO is
scaled for a CPU). Writes JSON to benchmarks/results/ and, when matplotlib is installed, a PNG
of latency against throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

# This checkout's jaxserve, whichever is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxserve.client import build_request
from jaxserve.machine import describe_machine
from jaxserve.server import inference_pb2 as pb
from jaxserve.server import inference_pb2_grpc as pb_grpc

RESULTS = Path(__file__).parent / "results"
SCHEDULERS = ("static", "continuous")
# Prompt token ids are drawn from this range: clear of the special tokens of the default model
# (ids < 17) and of the mock engine's EOS / failure tokens (257, 259).
TOKEN_RANGE = (32, 256)
PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class Workload:
    """How request lengths are drawn: lognormal with this median and sigma, then clipped."""

    num_requests: int = 64
    seed: int = 0
    prompt_median: float = 100.0
    prompt_sigma: float = 1.0
    prompt_min: int = 8
    prompt_max: int = 1024
    output_median: float = 64.0
    output_sigma: float = 0.8
    output_min: int = 4
    output_max: int = 512


QUICK = Workload(num_requests=32, prompt_median=48.0, prompt_max=256, output_median=24.0,
                 output_min=2, output_max=128)


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


@dataclasses.dataclass
class RequestResult:
    index: int
    prompt_tokens: int
    max_tokens: int
    start_s: float = 0.0  # perf_counter at send
    end_s: float = 0.0  # perf_counter at the stream's end
    token_times: list[float] = dataclasses.field(default_factory=list)  # per token-carrying resp
    num_tokens: int = 0
    error: str | None = None  # gRPC status code name

    @property
    def ok(self) -> bool:
        return self.error is None and self.num_tokens > 0

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.start_s

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        if self.num_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        return list(np.diff(self.token_times))


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.2

    def met(self, r: RequestResult) -> bool:
        tpot = r.tpot_s
        return r.ok and r.ttft_s <= self.ttft_s and (tpot is None or tpot <= self.tpot_s)


# -- workload ------------------------------------------------------------------------------------


def _lognormal(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int,
               hi: int) -> np.ndarray:
    x = rng.lognormal(mean=np.log(median), sigma=sigma, size=n)
    return np.clip(np.rint(x), lo, hi).astype(int)


def make_requests(w: Workload, max_model_len: int | None = None,
                  token_range: tuple[int, int] = TOKEN_RANGE) -> list[RequestSpec]:
    """The seeded request list. prompt + output is kept below max_model_len by shortening the
    prompt (never below prompt_min)."""
    rng = np.random.default_rng(w.seed)
    prompts = _lognormal(rng, w.num_requests, w.prompt_median, w.prompt_sigma, w.prompt_min,
                         w.prompt_max)
    outputs = _lognormal(rng, w.num_requests, w.output_median, w.output_sigma, w.output_min,
                         w.output_max)
    specs = []
    for i, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        if max_model_len is not None:
            o = min(o, max_model_len - w.prompt_min)
            p = max(min(p, max_model_len - o), 1)
        ids = rng.integers(token_range[0], token_range[1], size=int(p))
        specs.append(RequestSpec(i, tuple(int(t) for t in ids), int(o)))
    return specs


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s from the start) of a Poisson process with `rate` requests/s."""
    rng = np.random.default_rng([seed, 1])
    return list(np.cumsum(rng.exponential(1.0 / rate, size=n)))


# -- load generation -----------------------------------------------------------------------------


async def _send(stub: pb_grpc.InferenceStub, spec: RequestSpec, timeout_s: float | None,
                label: str) -> RequestResult:
    r = RequestResult(spec.index, len(spec.prompt_token_ids), spec.max_tokens)
    req = build_request(prompt_token_ids=spec.prompt_token_ids, max_tokens=spec.max_tokens,
                        ignore_eos=True, temperature=0.0,
                        request_id=f"bench-{label}-{spec.index}")
    r.start_s = time.perf_counter()
    try:
        async for resp in stub.Generate(req, timeout=timeout_s):
            if resp.token_ids:
                r.token_times.append(time.perf_counter())
                r.num_tokens += len(resp.token_ids)
    except grpc.aio.AioRpcError as e:
        r.error = e.code().name
    r.end_s = time.perf_counter()
    return r


async def run_load(target: str, specs: Sequence[RequestSpec], *, concurrency: int | None = None,
                   rate: float | None = None, seed: int = 0, timeout_s: float | None = 600.0,
                   label: str = "run") -> tuple[list[RequestResult], float]:
    """Send `specs` to `target` at a fixed concurrency or as Poisson arrivals at `rate`/s.
    Returns the per-request results (in spec order) and the run's wall time in seconds."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        t0 = time.perf_counter()
        if concurrency is not None:
            queue = list(reversed(specs))
            results: list[RequestResult] = []

            async def client() -> None:
                while queue:
                    results.append(await _send(stub, queue.pop(), timeout_s, label))

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            async def arrive(spec: RequestSpec, at: float) -> RequestResult:
                await asyncio.sleep(max(t0 + at - time.perf_counter(), 0.0))
                return await _send(stub, spec, timeout_s, label)

            offsets = poisson_offsets(len(specs), rate, seed)
            results = list(await asyncio.gather(
                *(arrive(s, at) for s, at in zip(specs, offsets, strict=True))))
        wall_s = time.perf_counter() - t0
    return sorted(results, key=lambda r: r.index), wall_s


def _stats(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """Mean and percentiles of values * scale (default: seconds -> ms)."""
    if not len(values):
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    x = np.asarray(values, dtype=float) * scale
    return {"mean": float(x.mean()),
            **{f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES}}


def summarize(results: Sequence[RequestResult], wall_s: float, slo: Slo) -> dict[str, Any]:
    """Latencies in ms (mean, p50/p90/p99) and throughputs over the run's wall time."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "NO_TOKENS"] = errors.get(r.error or "NO_TOKENS", 0) + 1
    out_tokens = sum(r.num_tokens for r in ok)
    return {
        "num_requests": len(results), "completed": len(ok), "errors": errors,
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s,
        "output_tokens_per_s": out_tokens / wall_s,
        "total_tokens_per_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / wall_s,
        "goodput_requests_per_s": sum(slo.met(r) for r in results) / wall_s,
        "slo_attainment": sum(slo.met(r) for r in results) / max(len(results), 1),
        "output_tokens": out_tokens,
        "ttft_ms": _stats([r.ttft_s for r in ok]),
        "tpot_ms": _stats([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": _stats([g for r in ok for g in r.itls_s]),
        "e2e_ms": _stats([r.e2e_s for r in ok]),
    }


def per_request(r: RequestResult, t0: float) -> dict[str, Any]:
    """One request's measurements in ms (start: since the run's first send), kept in the JSON so
    that a run can be re-analysed."""
    ok = r.ok
    return {"index": r.index, "prompt_tokens": r.prompt_tokens, "output_tokens": r.num_tokens,
            "start_ms": (r.start_s - t0) * 1000.0, "ttft_ms": r.ttft_s * 1000.0 if ok else None,
            "e2e_ms": r.e2e_s * 1000.0, "error": r.error}


# -- servers -------------------------------------------------------------------------------------


def model_info(target: str, timeout_s: float = 10.0) -> dict[str, Any]:
    with grpc.insecure_channel(target) as ch:
        m = pb_grpc.InferenceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s)
    return {"name": m.name, "vocab_size": m.vocab_size, "max_model_len": m.max_model_len,
            "dtype": m.dtype, "page_size": m.page_size, "extra": dict(m.extra)}


def wait_serving(target: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll grpc.health.v1 until SERVING; RuntimeError if `proc` exits first."""
    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server process exited with {proc.returncode}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{target} not SERVING after {timeout_s} s")
            time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedServer:
    """`serve_worker` in a subprocess: one server with one scheduler, stopped with SIGTERM."""

    def __init__(self, scheduler: str, *, model: str | None, dtype: str | None,
                 overrides: dict[str, Any], ready_timeout_s: float):
        self.port = _free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"serving-{scheduler}-",
                                               suffix=".log", delete=False)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-worker", scheduler,
               "--port", str(self.port), "--engine-overrides", json.dumps(overrides)]
        if model:
            cmd += ["--model", model]
        if dtype:
            cmd += ["--dtype", dtype]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_serving(self.target, ready_timeout_s, self.proc)
        except BaseException:
            self.stop()
            raise RuntimeError(f"{scheduler} server did not start; log:\n{self.tail()}") from None

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def serve_worker(scheduler: str, port: int, model: str | None, dtype: str | None,
                 overrides: dict[str, Any]) -> int:
    """The launched server: the model behind AsyncEngine with `scheduler`, served until SIGTERM.
    (`jaxserve serve` does not take a scheduler, so the benchmark wires it here.)"""
    from jaxserve import LLM
    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.server.commands import run_serve

    llm = LLM(model, dtype=dtype, **overrides)
    engine = AsyncEngine.from_llm(llm, scheduler=scheduler)
    try:
        return run_serve(engine=engine, host="127.0.0.1", port=port, grace_s=5.0)
    finally:
        engine.shutdown()


# -- report --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """This (client) machine, without starting jax here; with --launch the servers run here
    too. The load average says how busy the shared host was."""
    return {**describe_machine(devices=False), "loadavg_1m_at_start": os.getloadavg()[0]}


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """continuous vs static at each load: throughput ratio and p50 e2e latency ratio, against
    the target (>= 3x throughput at equal or lower p50 latency)."""
    out = []
    by = {(r["scheduler"], json.dumps(r["load"], sort_keys=True)): r["metrics"] for r in runs}
    for (sched, load), cont in by.items():
        stat = by.get(("static", load))
        if sched != "continuous" or stat is None:
            continue
        tput = cont["output_tokens_per_s"] / stat["output_tokens_per_s"]
        p50 = cont["e2e_ms"]["p50"] / stat["e2e_ms"]["p50"]
        entry = {"load": json.loads(load), "throughput_ratio": tput, "p50_e2e_ratio": p50,
                 "goodput_ratio": (cont["goodput_requests_per_s"]
                                   / stat["goodput_requests_per_s"]
                                   if stat["goodput_requests_per_s"] else None),
                 "meets_target": tput >= 3.0 and p50 <= 1.0}
        if "rate" in entry["load"]:
            entry["note"] = ("open loop: neither scheduler can exceed the offered rate, so below "
                             "saturation compare goodput and latency, not throughput")
        out.append(entry)
    return out


def print_run(label: str, load: dict[str, Any], m: dict[str, Any]) -> None:
    def row(name: str) -> str:
        s = m[name]
        if s["p50"] is None:
            return f"{name[:-3]:>5} -"
        return (f"{name[:-3]:>5} p50 {s['p50']:8.1f}  p90 {s['p90']:8.1f}  "
                f"p99 {s['p99']:8.1f} ms")

    print(f"\n[{label}] {load}: {m['completed']}/{m['num_requests']} ok in {m['wall_s']:.1f} s"
          + (f", errors {m['errors']}" if m["errors"] else ""))
    print(f"  {m['requests_per_s']:.2f} req/s, {m['output_tokens_per_s']:.1f} output tok/s, "
          f"{m['total_tokens_per_s']:.1f} total tok/s, goodput {m['goodput_requests_per_s']:.2f}"
          f" req/s ({m['slo_attainment']:.0%} within SLO)")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        print("  " + row(name))


def plot(result: dict[str, Any], path: Path) -> bool:
    """p50 and p99 end-to-end latency against output tokens/s, one line per scheduler.
    False (with a notice) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed; no PNG written (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in result["runs"]):
        rs = sorted((r for r in result["runs"] if r["label"] == label),
                    key=lambda r: r["metrics"]["output_tokens_per_s"])
        x = [r["metrics"]["output_tokens_per_s"] for r in rs]
        line, = ax.plot(x, [r["metrics"]["e2e_ms"]["p50"] / 1000 for r in rs], "o-",
                        label=f"{label} p50")
        ax.plot(x, [r["metrics"]["e2e_ms"]["p99"] / 1000 for r in rs], "x--",
                color=line.get_color(), label=f"{label} p99")
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title(f"jaxserve serving, {result['machine']['cpu']} ({result['machine']['cores']} "
                 "cores)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- main ----------------------------------------------------------------------------------------


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _workload(args: argparse.Namespace) -> Workload:
    base = QUICK if args.quick else Workload()
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)
              if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **fields)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", action="append", default=[],
                       help="host:port of a running server (repeatable)")
    where.add_argument("--launch", action="store_true",
                       help="start one server per --schedulers entry with the default model")
    p.add_argument("--schedulers", default=",".join(SCHEDULERS),
                   help="with --launch: schedulers to compare, in order")
    p.add_argument("--model", default=None, help="with --launch: model (default: the default)")
    p.add_argument("--dtype", default=None, help="with --launch: compute dtype")
    p.add_argument("--engine-overrides", default="{}",
                   help='with --launch: EngineConfig overrides as JSON, e.g. {"max_num_seqs": 16}')
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default=None,
                      help="fixed concurrency, comma-separated levels (default 16)")
    load.add_argument("--rate", default=None, help="Poisson arrivals, requests/s, comma list")
    p.add_argument("--quick", action="store_true", help="few, short requests (~1-2 min on CPU)")
    for f in dataclasses.fields(Workload):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                       help=f"workload {f.name} (default {f.default}; quick "
                            f"{getattr(QUICK, f.name)})")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="untimed requests (same distribution, another seed) before each "
                        "server's runs, so that compiles are not timed (default: as many as "
                        "--num-requests)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0,
                   help="goodput SLO on TTFT (default scaled for a CPU)")
    p.add_argument("--slo-tpot-ms", type=float, default=200.0,
                   help="goodput SLO on TPOT (default scaled for a CPU)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request deadline")
    p.add_argument("--ready-timeout-s", type=float, default=900.0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                   "serving-cpu-DATE.json); the PNG goes beside it")
    p.add_argument("--plot", metavar="JSON", default=None,
                   help="only draw the PNG of a saved result (needs matplotlib)")
    p.add_argument("--serve-worker", choices=SCHEDULERS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.serve_worker and not args.plot and not args.launch and not args.target:
        p.error("give --target host:port or --launch")
    return args


def _loads(args: argparse.Namespace) -> list[dict[str, float]]:
    if args.rate is not None:
        return [{"rate": r} for r in _floats(args.rate)]
    levels = _floats(args.concurrency) if args.concurrency else [16]
    return [{"concurrency": int(c)} for c in levels]


def benchmark(targets: dict[str, str], specs: list[RequestSpec], warmup: list[RequestSpec],
              loads: list[dict[str, float]], slo: Slo, seed: int, timeout_s: float,
              warmup_concurrency: int) -> list[dict[str, Any]]:
    """Every load against every target (label -> host:port), the same request list each time,
    after untimed `warmup` requests per target."""
    runs = []
    for label, target in targets.items():
        if warmup:
            t = time.perf_counter()
            asyncio.run(run_load(target, warmup, concurrency=warmup_concurrency,
                                 timeout_s=timeout_s, label=f"{label}-warmup"))
            print(f"[{label}] warm-up: {len(warmup)} requests in {time.perf_counter() - t:.1f} s")
        for load in loads:
            results, wall_s = asyncio.run(run_load(
                target, specs, concurrency=load.get("concurrency"), rate=load.get("rate"),
                seed=seed, timeout_s=timeout_s, label=label))
            m = summarize(results, wall_s, slo)
            print_run(label, load, m)
            t0 = min(r.start_s for r in results)
            # The 1-minute load average after the run: other work on a shared host shows here.
            runs.append({"label": label, "target": target, "load": load, "metrics": m,
                         "loadavg_1m_after": os.getloadavg()[0],
                         "requests": [per_request(r, t0) for r in results]})
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = json.loads(args.engine_overrides)
    if args.serve_worker:
        return serve_worker(args.serve_worker, args.port, args.model, args.dtype, overrides)
    if args.plot:
        saved = Path(args.plot)
        return 0 if plot(json.loads(saved.read_text()), saved.with_suffix(".png")) else 1

    host = machine()
    w = _workload(args)
    loads = _loads(args)
    slo = Slo(ttft_s=args.slo_ttft_ms / 1000, tpot_s=args.slo_tpot_ms / 1000)
    n_warm = args.warmup_requests
    if n_warm is None:
        n_warm = w.num_requests
    warm_conc = int(max(load.get("concurrency", 8) for load in loads))
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else RESULTS / f"serving-cpu-{date}.json"

    servers: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    labels = args.schedulers.split(",") if args.launch else []
    targets = list(args.target)
    for i in range(len(labels) if args.launch else len(targets)):
        launched = None
        if args.launch:
            t = time.perf_counter()
            launched = LaunchedServer(labels[i], model=args.model, dtype=args.dtype,
                                      overrides=overrides, ready_timeout_s=args.ready_timeout_s)
            target = launched.target
            print(f"[{labels[i]}] server SERVING on {target} after "
                  f"{time.perf_counter() - t:.1f} s")
        else:
            target = targets[i]
        try:
            info = model_info(target)
            label = info["extra"].get("scheduler") or target
            if args.launch:
                label = labels[i]
            elif label in servers:
                label = f"{label}@{target}"
            specs = make_requests(w, info["max_model_len"])
            warm = make_requests(dataclasses.replace(w, seed=w.seed + 1, num_requests=n_warm),
                                 info["max_model_len"])
            servers[label] = {"target": target, **info}
            for run in benchmark({label: target}, specs, warm, loads, slo, w.seed,
                                 args.timeout_s, warm_conc):
                runs.append({"scheduler": info["extra"].get("scheduler", label), **run})
        finally:
            if launched is not None:
                launched.stop()

    specs = make_requests(w)
    result = {
        "benchmark": "serving", "date": date, "machine": host,
        "servers": servers, "launched": bool(args.launch),
        "workload": {**dataclasses.asdict(w), "quick": args.quick,
                     "prompt_tokens": _stats([len(s.prompt_token_ids) for s in specs], 1.0),
                     "output_tokens": _stats([s.max_tokens for s in specs], 1.0),
                     "note": "token counts before clipping to the server's max_model_len; "
                             "random prompt token ids, ignore_eos, greedy"},
        "warmup_requests": n_warm,
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms,
                "note": "scaled for a CPU host"},
        "runs": runs,
        "comparison": compare(runs),
    }
    for c in result["comparison"]:
        verdict = "meets" if c["meets_target"] else "MISSES"
        print(f"\ncontinuous / static at {c['load']}: {c['throughput_ratio']:.2f}x output tok/s, "
              f"p50 e2e x{c['p50_e2e_ratio']:.2f} -> {verdict} the target (>= 3x throughput at "
              "equal or lower p50 latency)" + (f"; {c['note']}" if "note" in c else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    png = out.with_suffix(".png")
    if runs and plot(result, png):
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
