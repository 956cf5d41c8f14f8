"""benchmarks/serving.py end to end against MockEngine servers on localhost: the workload is
seeded and within its bounds, every request streams exactly its drawn length, the metrics agree
with the mock's pacing, and the comparison and JSON come out of a two-server run."""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks import serving
from tests.server.mock_engine import MockEngine

WORKLOAD = serving.Workload(num_requests=10, seed=3, prompt_median=12, prompt_min=4,
                            prompt_max=40, output_median=6, output_min=2, output_max=12)
TOKEN_DELAY_S = 0.01


def test_workload_is_seeded_and_bounded():
    a = serving.make_requests(WORKLOAD)
    assert a == serving.make_requests(WORKLOAD)
    assert a != serving.make_requests(serving.Workload(**{**WORKLOAD.__dict__, "seed": 4}))
    for s in a:
        assert WORKLOAD.prompt_min <= len(s.prompt_token_ids) <= WORKLOAD.prompt_max
        assert WORKLOAD.output_min <= s.max_tokens <= WORKLOAD.output_max
        assert all(serving.TOKEN_RANGE[0] <= t < serving.TOKEN_RANGE[1]
                   for t in s.prompt_token_ids)
    short = serving.make_requests(WORKLOAD, max_model_len=16)
    assert all(len(s.prompt_token_ids) + s.max_tokens <= 16 for s in short)
    offsets = serving.poisson_offsets(200, rate=50.0, seed=0)
    assert offsets == sorted(offsets)
    assert 2.0 < offsets[-1] < 6.0  # 200 arrivals at 50/s: ~4 s


@pytest.mark.parametrize("load", [{"concurrency": 4}, {"rate": 40.0}])
def test_run_load_against_mock_server(start, load):
    srv = start(MockEngine(max_model_len=256, token_delay_s=TOKEN_DELAY_S))
    specs = serving.make_requests(WORKLOAD, max_model_len=256)
    results, wall_s = asyncio.run(serving.run_load(
        srv.handle.target, specs, concurrency=load.get("concurrency"), rate=load.get("rate"),
        timeout_s=30))
    assert [r.index for r in results] == list(range(len(specs)))
    for r, s in zip(results, specs, strict=True):
        assert r.ok, r.error
        assert r.num_tokens == s.max_tokens  # ignore_eos: exactly the drawn length
        assert len(r.itls_s) == s.max_tokens - 1  # the mock streams one token per response
        assert r.tpot_s >= TOKEN_DELAY_S * 0.9
        assert 0 < r.ttft_s <= r.e2e_s <= wall_s
    m = serving.summarize(results, wall_s, serving.Slo(ttft_s=10.0, tpot_s=1.0))
    assert m["completed"] == len(specs) and not m["errors"]
    assert m["output_tokens"] == sum(s.max_tokens for s in specs)
    assert m["requests_per_s"] == pytest.approx(len(specs) / wall_s)
    assert m["goodput_requests_per_s"] == pytest.approx(m["requests_per_s"])
    assert m["tpot_ms"]["p50"] >= TOKEN_DELAY_S * 900
    assert m["ttft_ms"]["p50"] <= m["ttft_ms"]["p90"] <= m["ttft_ms"]["p99"]
    strict = serving.summarize(results, wall_s, serving.Slo(ttft_s=10.0, tpot_s=0.001))
    assert strict["goodput_requests_per_s"] == 0.0


def test_errors_are_counted(start):
    srv = start(MockEngine(max_model_len=32))
    specs = [serving.RequestSpec(0, (40,) * 8, 4), serving.RequestSpec(1, (40,) * 30, 8)]
    results, wall_s = asyncio.run(serving.run_load(srv.handle.target, specs, concurrency=2))
    m = serving.summarize(results, wall_s, serving.Slo())
    assert m["completed"] == 1 and m["errors"] == {"INVALID_ARGUMENT": 1}


def test_main_compares_two_targets(start, tmp_path, capsys):
    # A mock "static" server (one request at a time) and a mock "continuous" one (all at once).
    slow = start(MockEngine(max_model_len=256, token_delay_s=TOKEN_DELAY_S, max_running=1))
    fast = start(MockEngine(max_model_len=256, token_delay_s=TOKEN_DELAY_S, max_running=64))
    out = tmp_path / "serving.json"
    argv = ["--target", slow.handle.target, "--target", fast.handle.target,
            "--concurrency", "4", "--warmup-requests", "2", "--out", str(out)]
    for f in ("num_requests", "seed", "prompt_median", "prompt_min", "prompt_max",
              "output_median", "output_min", "output_max"):
        argv += ["--" + f.replace("_", "-"), str(getattr(WORKLOAD, f))]
    assert serving.main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["target"] for r in result["runs"]] == [slow.handle.target, fast.handle.target]
    assert all(r["metrics"]["completed"] == WORKLOAD.num_requests for r in result["runs"])
    slow_m, fast_m = (r["metrics"] for r in result["runs"])
    assert fast_m["output_tokens_per_s"] > 2 * slow_m["output_tokens_per_s"]
    assert result["workload"]["num_requests"] == WORKLOAD.num_requests
    specs = serving.make_requests(WORKLOAD, max_model_len=256)
    for run in result["runs"]:
        assert [q["output_tokens"] for q in run["requests"]] == [s.max_tokens for s in specs]
        assert min(q["start_ms"] for q in run["requests"]) == 0.0
    assert "wrote" in capsys.readouterr().out
    # Re-drawing a saved result: a PNG with matplotlib, else a notice and exit code 1.
    code = serving.main(["--plot", str(out)])
    assert code == (0 if out.with_suffix(".png").exists() else 1)
    # The mock reports no scheduler, so nothing is compared; label the pair and compare.
    runs = [{**r, "scheduler": s} for r, s in zip(result["runs"], ("static", "continuous"),
                                                   strict=True)]
    (c,) = serving.compare(runs)
    assert c["throughput_ratio"] > 2 and c["p50_e2e_ratio"] < 1
