"""Speculative decoding on the default model: tok/s per method against plain decoding.

    python benchmarks/speculative.py [--methods off,ngram,int8-self,cut10-self]
                                     [--tasks grounded,chat,free] [--batches 1,8,32]
                                     [--temperatures 0,0.7] [--max_tokens 64] [--rounds 1]
    python benchmarks/speculative.py --quick      # a minute or two: bs 1, greedy, two methods

Three task sets: input-grounded (rewrite / extract / summarise a given text or code: the answer
repeats much of the prompt), chat instructions, and free continuation of raw text. For each
(task set, batch size, temperature) cell every method generates the same requests (ignore_eos,
so each emits the same number of tokens) back to back, in an order rotated per cell and round,
so a shared machine's drift hits every method alike; a method's speed-up is the median over
rounds of its tok/s / off's tok/s in the same cell and round.

tok/s: generated tokens / wall time of `LLM.generate` over the cell's requests (prefill
included; at batch 1 the requests run one after another). Per method and cell it also reports,
from the engine's counters: steps, programs launched per step (calls of the runner's jit entry
points), host time per step (wall - time inside those programs), drafts proposed / accepted,
the mean accepted length (accepted drafts per verified row; +1 token comes from the target),
the share of verified rows that accepted at least j drafts for each position j, and, for greedy
cells, how many requests gave exactly the tokens of plain decoding.

Also measured in the same run: the read-bandwidth ceiling, and the step-cost model the adaptive
policy uses (speculative/policy.py): the time of a fused step over T tokens against a one-token
step (cost_tokens: where it doubles) and, per draft model, one draft decode round in target
steps (draft_cost).
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

from decode import ProgramTimer, ReadBandwidth, loadavg  # noqa: E402

from jaxserve.machine import describe_machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"

METHODS = {
    "off": {},
    "ngram": {"speculative_method": "ngram"},
    "int8-self": {"speculative_method": "draft_model", "speculative_quantization": "int8"},
    "int4-self": {"speculative_method": "draft_model", "speculative_quantization": "int4"},
    "cut10-self": {"speculative_method": "draft_model", "speculative_num_layers": 10},
    # Trained heads: `jaxserve train-draft --method medusa|eagle --out checkpoints/heads-...`
    "medusa": {"speculative_method": "medusa", "speculative_model": "checkpoints/heads-medusa"},
    "eagle": {"speculative_method": "eagle", "speculative_model": "checkpoints/heads-eagle"},
    # ... --corpus_tokens 49152 --steps 600 (the prompt set plus 48k tokens of the Brown corpus)
    "eagle-corpus": {"speculative_method": "eagle",
                     "speculative_model": "checkpoints/heads-eagle-corpus"},
}

CODE = '''def moving_average(values, window):
    result = []
    total = 0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''
PROSE = ("The library opened in 1902 with four thousand books donated by the town's mill "
         "owners. In 1935 a fire destroyed the east wing, and the collection was moved to the "
         "old school on Station Road until the new building, designed by Margaret Hale, opened "
         "in 1951. Today it holds more than two hundred thousand volumes and a collection of "
         "local maps.")
EMAIL = ("Hi Tom, the meeting with the suppliers moved from Tuesday to Thursday at 10am in "
         "room 4B. Please bring the March invoices and the new price list. Anna will join by "
         "phone from Leeds. Thanks, Priya")

# Chat messages, or a raw string for free continuation (no chat template).
TASKS: dict[str, list] = {
    "grounded": [
        "Add type hints and a docstring to this Python function. Return the whole function."
        "\n\n" + CODE,
        "Rename the variable `total` to `running_sum` in this code and return the full code."
        "\n\n" + CODE,
        "Copy the following text, correcting nothing, then list the years it mentions.\n\n"
        + PROSE,
        "Rewrite this email as a bulleted list, keeping every detail.\n\n" + EMAIL,
    ],
    "chat": [
        "Give me three tips for a job interview.",
        "Explain how a refrigerator keeps food cold.",
        "Write a short story about a lighthouse keeper.",
        "What are the benefits of learning a second language?",
    ],
    "free": [
        "The history of the printing press begins",
        "In the early morning the market square was",
        "Photosynthesis is the process by which",
        "The old man walked slowly down the road,",
    ],
}


def make_llm(path, method: str, max_model_len: int, num_pages: int, k: int):
    from jaxserve import LLM

    kw = dict(METHODS[method])
    if kw:
        kw["num_speculative_tokens"] = k
    return LLM(path, dtype="float32", max_model_len=max_model_len, num_pages=num_pages, **kw)


def prompts_for(llm, task: str, n: int) -> list:
    items = [TASKS[task][i % len(TASKS[task])] for i in range(n)]
    if task == "free":
        return [llm.tokenizer.encode(s) for s in items]
    return [llm.encode_chat([{"role": "user", "content": s}]) for s in items]


class StepTimer(ProgramTimer):
    NAMES = ProgramTimer.NAMES + ("spec_step",)


def run_cell(llm, prompts: list, batch: int, temperature: float, max_tokens: int) -> dict:
    """Generate `prompts` (batch at a time), timing wall, programs and engine counters."""
    from jaxserve import SamplingParams

    def params(i):
        if temperature == 0:
            return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return SamplingParams(temperature=temperature, top_p=0.95, seed=1000 + i,
                              max_tokens=max_tokens, ignore_eos=True)

    eng = llm.engine
    before = dict(eng.stats())
    outs = []
    with StepTimer() as timer:
        t = time.perf_counter()
        for s in range(0, len(prompts), batch):
            chunk = prompts[s:s + batch]
            outs += llm.generate(chunk, [params(s + i) for i in range(len(chunk))])
        wall = time.perf_counter() - t
    after = eng.stats()
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after
         if isinstance(after.get(k), (int, float)) and not k.startswith("spec_mean")}
    tokens = sum(len(o.token_ids) for o in outs)
    steps = max(d.get("steps", 0), 1)
    rows = d.get("spec_rows", 0)
    res = {
        "tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "steps": d.get("steps", 0),
        "tokens_per_step": tokens / steps,
        "programs_per_step": timer.calls / steps,
        "host_ms_per_step": (wall - timer.seconds) / steps * 1e3,
        "program_ms_per_step": timer.seconds / steps * 1e3,
        "spec_steps": d.get("spec_steps", 0), "spec_rows": rows,
        "proposed": d.get("spec_proposed", 0), "accepted": d.get("spec_accepted", 0),
        "mean_accepted": d.get("spec_accepted", 0) / rows if rows else 0.0,
        "accepted_at": [d.get(f"spec_accepted_at_{j}", 0) / rows if rows else 0.0
                        for j in range(1, 17) if f"spec_accepted_at_{j}" in after],
    }
    return res, [o.token_ids for o in outs]


def step_costs(llm, Ts=(32, 64, 128, 256), reps: int = 5) -> dict:
    """The policy's step-cost model, measured (speculative/policy.py: a step over T tokens costs
    1 + T / cost_tokens one-token steps). The time of a one-sequence prompt step of T fresh
    random tokens (the flat ragged program a fused step runs; T at bucket sizes, so no padding)
    is fitted as t(T) = a + b T; a one-token step's time t1 is a bs=1 decode's per-token time
    (17 tokens minus 1, over 16); cost_tokens = t1 / b, the tokens that add one decode step."""
    from jaxserve import SamplingParams

    rng = np.random.default_rng(0)

    def timed(T, max_tokens):
        ts = []
        for i in range(reps + 1):
            prompt = rng.integers(100, 40000, T).tolist()  # fresh: no prefix-cache hit
            t = time.perf_counter()
            llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                  ignore_eos=True))
            if i:  # the first compiles
                ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    times = {T: timed(T, 1) for T in Ts}
    t1 = (timed(32, 17) - times[32]) / 16
    b, a_ = np.polyfit(list(times), list(times.values()), 1)
    return {"step_s": {str(T): v for T, v in times.items()}, "decode_token_s": t1,
            "fit_a_s": float(a_), "fit_b_s_per_token": float(b),
            "cost_tokens": float(t1 / b) if b > 0 else None}


def summarize(cells: list[dict], methods: list[str]) -> list[dict]:
    """Per (task, batch, temperature, method): median tok/s, median paired speed-up vs off."""
    out = []
    keys = sorted({(c["task"], c["batch"], c["temperature"]) for c in cells},
                  key=lambda k: (list(TASKS).index(k[0]), k[1], k[2]))
    for task, batch, temp in keys:
        rounds = [c for c in cells if (c["task"], c["batch"], c["temperature"]) ==
                  (task, batch, temp)]
        for m in methods:
            runs = [r["methods"][m] for r in rounds if m in r["methods"]]
            row = {"task": task, "batch": batch, "temperature": temp, "method": m,
                   "tok_s": statistics.median(r["tok_s"] for r in runs)}
            if m != "off" and all("off" in r["methods"] for r in rounds):
                row["speedup"] = statistics.median(
                    r["methods"][m]["tok_s"] / r["methods"]["off"]["tok_s"] for r in rounds)
            last = runs[-1]
            for k in ("mean_accepted", "accepted_at", "programs_per_step", "host_ms_per_step",
                      "tokens_per_step", "spec_steps", "steps"):
                row[k] = last[k]
            if "greedy_equal" in last:
                row["greedy_equal"] = last["greedy_equal"]
            out.append(row)
    return out


def table(summary: list[dict]) -> str:
    lines = ["| task | bs | temp | method | tok/s | vs off | mean accepted | P(acc>=1..4) | "
             "programs/step | host ms/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        acc = "/".join(f"{a:.2f}" for a in r["accepted_at"][:4]) or "-"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(f"| {r['task']} | {r['batch']} | {r['temperature']} | {r['method']} | "
                     f"{r['tok_s']:.1f} | {sp} | {r['mean_accepted']:.2f} | {acc} | "
                     f"{r['programs_per_step']:.2f} | {r['host_ms_per_step']:.1f} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed; no PNG written")
        return False
    temps = sorted({r["temperature"] for r in summary})
    tasks = [t for t in TASKS if any(r["task"] == t for r in summary)]
    methods = [m for m in dict.fromkeys(r["method"] for r in summary) if m != "off"]
    fig, axes = plt.subplots(len(temps), len(tasks), figsize=(4 * len(tasks), 3.2 * len(temps)),
                             squeeze=False, sharey=True)
    for i, temp in enumerate(temps):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            rows = [r for r in summary if r["task"] == task and r["temperature"] == temp]
            batches = sorted({r["batch"] for r in rows})
            w = 0.8 / max(len(methods), 1)
            for k, m in enumerate(methods):
                ys = [next((r.get("speedup", 0) for r in rows
                            if r["method"] == m and r["batch"] == b), 0) for b in batches]
                ax.bar(np.arange(len(batches)) + k * w, ys, w, label=m)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(np.arange(len(batches)) + w * (len(methods) - 1) / 2,
                          [f"bs {b}" for b in batches])
            ax.set_title(f"{task}, temperature {temp}", fontsize=9)
            if j == 0:
                ax.set_ylabel("tok/s vs off")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="off,ngram,int8-self,cut10-self")
    ap.add_argument("--tasks", default="grounded,chat,free")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--temperatures", default="0,0.7")
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--bs1_requests", type=int, default=4, help="requests run one at a time "
                    "in each batch-1 cell")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens (the most drafts)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quick", action="store_true", help="bs 1, greedy, off + ngram, "
                    "grounded + chat, 32 tokens, 2 requests: a smoke run")
    ap.add_argument("--no_costs", action="store_true", help="skip the step-cost measurement")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.methods, a.tasks, a.batches, a.temperatures = "off,ngram", "grounded,chat", "1", "0"
        a.max_tokens, a.bs1_requests, a.no_costs = 32, 2, True
    methods = a.methods.split(",")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    if "off" not in methods:
        methods = ["off"] + methods
    tasks = a.tasks.split(",")
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task set {t!r} (known: {', '.join(TASKS)})")
    batches = [int(b) for b in a.batches.split(",")]
    temps = [float(t) for t in a.temperatures.split(",")]

    from jaxserve.loading.fetch import fetch_model

    path = a.model or fetch_model(progress=False)
    info = {"machine": describe_machine(), "date": datetime.date.today().isoformat(),
            "model": str(a.model or "default (SmolLM2-135M-Instruct Q4_1, float32)"),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "num_speculative_tokens": a.k, "max_tokens": a.max_tokens}
    print(json.dumps(info["machine"]), flush=True)
    out = Path(a.out) if a.out else RESULTS / (
        f"speculative-{info['machine']['backend']}-{info['date']}"
        f"{'-quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    max_len = 1024
    num_pages = max(batches) * max_len // 16 + 64
    llms = {m: make_llm(path, m, max_len, num_pages, a.k) for m in methods}
    bw = ReadBandwidth()
    info["bandwidth_GBps"] = []
    info["policy"] = {m: {"cost_tokens": llms[m].runner.spec_cost_tokens,
                          "draft_cost": getattr(llms[m].runner, "spec_draft_cost", 0.0)}
                      for m in methods if m != "off"}
    cells = []
    order = 0
    for r in range(a.rounds):
        info["bandwidth_GBps"].append(round(bw.measure(), 1))
        for task in tasks:
            for batch in batches:
                for temp in temps:
                    n = a.bs1_requests if batch == 1 else batch
                    cell = {"task": task, "batch": batch, "temperature": temp, "round": r,
                            "loadavg": loadavg(), "methods": {}}
                    rot = methods[order % len(methods):] + methods[:order % len(methods)]
                    order += 1
                    toks = {}
                    for m in rot:
                        prompts = prompts_for(llms[m], task, n)
                        if r == 0:  # compile outside the timed run: every draft count K
                            # the policy may pick, at every context width and token bucket
                            # these requests reach, needs its program
                            run_cell(llms[m], prompts, batch, temp, a.max_tokens)
                        res, toks[m] = run_cell(llms[m], prompts, batch, temp, a.max_tokens)
                        cell["methods"][m] = res
                        print(f"round {r} {task} bs{batch} t{temp} {m}: "
                              f"{res['tok_s']:.1f} tok/s, mean accepted "
                              f"{res['mean_accepted']:.2f}, {res['programs_per_step']:.2f} "
                              f"programs/step, host {res['host_ms_per_step']:.1f} ms/step",
                              flush=True)
                    if temp == 0:
                        for m in methods:
                            cell["methods"][m]["greedy_equal"] = sum(
                                a_ == b_ for a_, b_ in zip(toks[m], toks["off"], strict=True))
                    cells.append(cell)
                    info["cells"] = cells
                    out.write_text(json.dumps(info, indent=1) + "\n")
    if not a.no_costs:
        info["step_costs"] = step_costs(llms["off"])
        print(f"step cost: {info['step_costs']}", flush=True)
    info["bandwidth_GBps"].append(round(bw.measure(), 1))
    info["summary"] = summarize(cells, methods)
    info["definitions"] = {
        "tok_s": "generated tokens / wall of LLM.generate over the cell's requests (prefill "
                 "included)",
        "speedup": "median over rounds of tok/s / off's tok/s in the same cell and round",
        "mean_accepted": "accepted drafts per verified row (each row also gets one target "
                         "token)",
        "accepted_at": "share of verified rows that accepted at least j drafts, j = 1..K",
        "programs_per_step": "calls of the runner's jit entry points per engine step",
        "host_ms_per_step": "(wall - time inside those programs) / engine steps",
        "greedy_equal": "requests whose tokens equal plain decoding's (greedy cells)"}
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(table(info["summary"]))
    if plot(info["summary"], out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
