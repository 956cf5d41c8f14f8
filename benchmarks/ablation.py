"""The serving stack one layer at a time, on one workload: what each layer buys.

    python benchmarks/ablation.py [--requests 32] [--rounds 2] [--max_num_seqs 16]

Rows, each adding one thing to the row above:
  1. one request at a time   (max_num_seqs=1, no prefix cache, f32 weights, no speculation)
  2. + continuous batching   (max_num_seqs requests share every step, joining as others finish)
  3. + prefix caching        (the shared system prompt's pages are reused across requests)
  4. + quantised weights     (int8, group 32: GGUF Q8_0's scheme)
  5. + speculative decoding  (n-gram prompt lookup, adaptive K)

Workload: --requests chat requests arriving together (a burst) with one shared system prompt
(a support desk's instructions and a product sheet, ~300 tokens) and an input-grounded user
turn each (rewrite, extract, summarise a given text: benchmarks/speculative.py's task set), unique
per request and round (a request number leads the user turn, so only the system prompt can come
from the prefix cache). Output lengths are seeded draws between 16 and 96 tokens, with
ignore_eos so every row generates exactly the same tokens. Every row runs in one process on its
own LLM; rows are interleaved per round (rotated order) so a shared machine's drift hits all
alike, after an untimed warm-up round that compiles every program the workload reaches.

Per row, the median over rounds of: requests/s and output tok/s (over the burst's makespan),
and per request end-to-end latency and TTFT from the burst's start (queueing included: that is
what row 1 costs its users), P50 and P99. Writes JSON to benchmarks/results/ and, with
matplotlib, a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxserve
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import ReadBandwidth, loadavg  # noqa: E402
from speculative import TASKS  # noqa: E402

from jaxserve.machine import describe_machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"

SYSTEM = (
    "You are the support assistant of Larkspur Outdoor, a shop for hiking and camping gear. "
    "Answer in plain English, briefly and accurately, and only from the information given. "
    "If the customer asks for something the shop does not sell, say so politely. Never invent "
    "prices, stock levels or delivery dates.\n\n"
    "Product sheet - Ridgeline 2 tent: two-person, three-season, 1.9 kg packed, 210 x 130 cm "
    "floor, two doors and two vestibules, aluminium poles, 3000 mm hydrostatic head fly, "
    "price 289 euros, five-year warranty. Trailhead 45 backpack: 45 litres, 1.3 kg, adjustable "
    "back length 42-52 cm, rain cover included, price 139 euros. Summit down sleeping bag: "
    "comfort limit -2 C, 850 g, 90% duck down, price 219 euros. Delivery: 2-4 working days in "
    "the EU, free above 100 euros; returns within 30 days, unused, in the original packing. "
    "Opening hours of the Bergen store: Monday to Friday 9-18, Saturday 10-16, closed Sunday.")

# (name, LLM keyword arguments): each row adds one thing to the one before.
ROWS = [
    ("one request at a time", dict(max_num_seqs=1, enable_prefix_caching=False)),
    ("+ continuous batching", dict(enable_prefix_caching=False)),
    ("+ prefix caching", dict(enable_prefix_caching=True)),
    ("+ int8 weights (g32)", dict(enable_prefix_caching=True, quantization="int8",
                                  quant_group_size=32)),
    ("+ speculative (n-gram)", dict(enable_prefix_caching=True, quantization="int8",
                                    quant_group_size=32, speculative_method="ngram")),
]
PERCENTILES = (50, 99)


def workload(llm, n: int, round_: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """n prompts (token ids) and output lengths; the user turns are unique per round."""
    rng = np.random.default_rng(seed)
    tasks = TASKS["grounded"] + TASKS["chat"]
    lengths = np.clip(np.round(rng.lognormal(np.log(40), 0.5, n)), 16, 96).astype(int)
    prompts = []
    for i in range(n):
        user = f"Request {round_}-{i}. {tasks[i % len(tasks)]}"
        prompts.append(llm.encode_chat([{"role": "system", "content": SYSTEM},
                                        {"role": "user", "content": user}]))
    return prompts, lengths.tolist()


def run_burst(llm, prompts: list[list[int]], lengths: list[int]) -> dict:
    """All requests queued at once, then engine steps until done; per request: TTFT and
    end-to-end latency from the burst's start."""
    from jaxserve import SamplingParams

    eng = llm.engine
    before = dict(eng.stats())
    t0 = time.perf_counter()
    seqs = [eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
            for p, m in zip(prompts, lengths, strict=True)]
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    while eng.has_unfinished():
        for s in eng.step():
            now = time.perf_counter() - t0
            if s.output_ids and s.seq_id not in first:
                first[s.seq_id] = now
            if s.is_finished:
                done[s.seq_id] = now
    wall = time.perf_counter() - t0
    outs = [eng.output(s) for s in seqs]
    bad = [(o.finish_reason, o.error) for o in outs if o.finish_reason != "length"]
    if bad:
        raise RuntimeError(f"requests did not finish normally: {bad}")
    after = eng.stats()
    e2e = [done[s.seq_id] for s in seqs]
    ttft = [first[s.seq_id] for s in seqs]
    tokens = sum(len(o.token_ids) for o in outs)
    res = {"wall_s": wall, "requests_per_s": len(seqs) / wall, "output_tok_s": tokens / wall,
           "tokens": tokens, "steps": after.get("steps", 0) - before.get("steps", 0),
           "cached_prompt_tokens": sum(o.num_cached_tokens for o in outs),
           "prompt_tokens": sum(len(p) for p in prompts),
           "spec_accepted": after.get("spec_accepted", 0) - before.get("spec_accepted", 0)}
    for p in PERCENTILES:
        res[f"e2e_p{p}_s"] = float(np.percentile(e2e, p))
        res[f"ttft_p{p}_s"] = float(np.percentile(ttft, p))
    return res, [o.token_ids for o in outs]


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    out = []
    base = None
    for name, _ in ROWS:
        rs = runs[name]
        row = {"row": name}
        for k in rs[0]:
            row[k] = statistics.median(r[k] for r in rs)
        if base is None:
            base = row
        row["speedup_vs_first"] = row["requests_per_s"] / base["requests_per_s"]
        out.append(row)
    return out


def table(summary: list[dict]) -> str:
    lines = ["| configuration | req/s | output tok/s | vs row 1 | latency P50 / P99 (s) | "
             "TTFT P50 / P99 (s) | prompt tokens from cache |", "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(
            f"| {r['row']} | {r['requests_per_s']:.2f} | {r['output_tok_s']:.1f} | "
            f"{r['speedup_vs_first']:.2f}x | {r['e2e_p50_s']:.1f} / {r['e2e_p99_s']:.1f} | "
            f"{r['ttft_p50_s']:.1f} / {r['ttft_p99_s']:.1f} | "
            f"{r['cached_prompt_tokens'] / max(r['prompt_tokens'], 1):.0%} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["row"] for r in summary]
    y = np.arange(len(names))[::-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    a.barh(y, [r["requests_per_s"] for r in summary], color="tab:blue")
    a.set_yticks(y, names)
    a.set_xlabel("requests / s")
    for yy, r in zip(y, summary, strict=True):
        a.text(r["requests_per_s"], yy, f" {r['requests_per_s']:.2f}", va="center")
    b.barh(y + 0.2, [r["e2e_p50_s"] for r in summary], 0.4, label="P50")
    b.barh(y - 0.2, [r["e2e_p99_s"] for r in summary], 0.4, label="P99")
    b.set_xlabel("end-to-end latency from the burst's start (s)")
    b.legend()
    fig.suptitle("jaxserve serving stack, one layer at a time (SmolLM2-135M, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (after a warm-up)")
    ap.add_argument("--max_num_seqs", type=int, default=16, help="rows 2-5")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from jaxserve import LLM
    from jaxserve.loading.fetch import fetch_model

    path = a.model or fetch_model(progress=False)
    info = {"machine": describe_machine(), "date": datetime.date.today().isoformat(),
            "model": str(a.model or "default (SmolLM2-135M-Instruct Q4_1, float32 compute)"),
            "argv": sys.argv[1:] if argv is None else list(argv), "requests": a.requests,
            "max_num_seqs": a.max_num_seqs, "rows": {n: kw for n, kw in ROWS}}
    print(json.dumps(info["machine"]), flush=True)
    out = Path(a.out) if a.out else RESULTS / (
        f"ablation-{info['machine']['backend']}-{info['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    llms = {}
    for name, kw in ROWS:
        kw = {"max_num_seqs": a.max_num_seqs, **kw}
        llms[name] = LLM(path, dtype="float32", max_model_len=1024, num_pages=1024, **kw)
    bw = ReadBandwidth()
    info["bandwidth_GBps"] = [round(bw.measure(), 1)]
    names = [n for n, _ in ROWS]
    for name in names:  # warm-up: compiles (a round of its own, so the cache starts cold-ish)
        run_burst(llms[name], *workload(llms[name], a.requests, round_=-1))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    info["loadavg"] = []
    greedy_equal = {}
    for r in range(a.rounds):
        info["loadavg"].append(loadavg())
        toks = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            res, toks[name] = run_burst(llms[name], *workload(llms[name], a.requests, r))
            runs[name].append(res)
            print(f"round {r} {name}: {res['requests_per_s']:.2f} req/s, "
                  f"{res['output_tok_s']:.1f} tok/s, P50 {res['e2e_p50_s']:.1f} s, "
                  f"P99 {res['e2e_p99_s']:.1f} s", flush=True)
        # Rows 1-3 compute the same f32 greedy tokens; 4-5 the same int8 ones.
        greedy_equal[r] = {"rows 1-3": toks[names[0]] == toks[names[1]] == toks[names[2]],
                           "rows 4-5": toks[names[3]] == toks[names[4]]}
        info["runs"], info["greedy_equal"] = runs, greedy_equal
        out.write_text(json.dumps(info, indent=1) + "\n")
    info["bandwidth_GBps"].append(round(bw.measure(), 1))
    info["summary"] = summarize(runs)
    info["definitions"] = {
        "requests_per_s": "requests / makespan of the burst (all queued at t=0)",
        "latency": "per request, from the burst's start to its last token (queueing included)",
        "ttft": "per request, from the burst's start to its first token",
        "median": "each figure is the median over timed rounds"}
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(table(info["summary"]))
    if plot(info["summary"], out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
