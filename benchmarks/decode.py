"""Decode / prefill throughput of the default model against the machine's memory roofline.

    python benchmarks/decode.py [--modes float32,float32+unrolled,int8,int4-g32,w8a8,gguf]
                                [--batches 1,8,32] [--model PATH]
    python benchmarks/decode.py --decode_steps 1,4,8 [--modes float32] [--rounds 6]

Measures, in one run: the memory read bandwidth (the ceiling), cold and warm start-up (a fresh
and a reused persistent compilation cache, each in its own process), and for each mode (a dtype,
optionally with layers unrolled instead of scanned): decode tok/s at each batch size with the
engine's host overhead, and prefill tok/s. bs=1 decode must read every weight once per token,
so its roofline is bandwidth / weight bytes.

--decode_steps: instead, the multi-step decode comparison (EngineConfig.num_decode_steps, N
decode steps in one compiled program): for every batch size and N, the engine's own decode
loop in interleaved rounds (each round runs every N back to back on the same sequences, in a
rotated order, so a shared machine's drift hits every N alike).

Host overhead, as measured here: the wall time of the engine's steps minus the time spent inside
its compiled programs, where a program's time runs from the call of the runner's jit entry point
until its outputs are ready (jax's dispatch of the call is counted as program time). What is
left is the host's own work per step: scheduling, packing the inputs, building the sampling
tensors, copying the sampled tokens back and appending them (stop checks, detokenizing).
Reported per generated token (host time of a step / tokens it emitted) and as a share of wall.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# This checkout's jaxserve, whichever is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxserve.machine import describe_machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


class ProgramTimer:
    """Seconds spent inside the engine's compiled step programs: from each call of a runner
    entry point to its outputs being ready. The runner looks its entry points up as module
    globals at every step, so wrapping them there times the real engine loop; the runner turns
    the outputs into numpy right after the call, so waiting for them here changes nothing."""

    NAMES = ("decode_step", "multi_decode_step", "mixed_step")

    def __enter__(self) -> ProgramTimer:
        from jaxserve.engine import runner as R

        self.seconds, self.calls = 0.0, 0
        self._orig = {n: getattr(R, n) for n in self.NAMES}
        for n, f in self._orig.items():
            setattr(R, n, self._wrap(f))
        return self

    def _wrap(self, f):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = jax.block_until_ready(f(*args, **kwargs))
            self.seconds += time.perf_counter() - t
            self.calls += 1
            return out

        timed._cache_size = f._cache_size  # runner.compile_count() still counts them
        return timed

    def __exit__(self, *exc) -> None:
        from jaxserve.engine import runner as R

        for n, f in self._orig.items():
            setattr(R, n, f)


def run_decode(eng, timer: ProgramTimer, num_tokens: int, max_seconds: float | None = None,
               ) -> dict:
    """Engine steps until every running sequence has `num_tokens` more tokens (whole steps:
    the last may emit more), or, given max_seconds, until that has passed and 4 steps ran.
    Returns wall and program seconds, steps, tokens emitted, and the mean context length over
    the segment."""
    seqs = list(eng.running)
    before = [len(s.output_ids) for s in seqs]
    ctx0 = sum(s.num_tokens for s in seqs) / len(seqs)
    prog0, steps = timer.seconds, 0
    t = time.perf_counter()
    while min(len(s.output_ids) - n for s, n in zip(seqs, before, strict=True)) < num_tokens:
        if max_seconds is not None and steps >= 4 and time.perf_counter() - t > max_seconds:
            break
        eng.step()
        steps += 1
    wall = time.perf_counter() - t
    tokens = sum(len(s.output_ids) - n for s, n in zip(seqs, before, strict=True))
    return {"wall_s": wall, "program_s": timer.seconds - prog0, "steps": steps,
            "tokens": tokens, "mean_context": ctx0 + tokens / len(seqs) / 2}


def abort_all(eng) -> None:
    for s in list(eng.running) + list(eng.waiting):
        eng.abort(s)
    eng.step()  # hands back the aborted sequences; nothing is scheduled


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (what `uptime` prints)."""
    return [round(x, 2) for x in os.getloadavg()]


class ReadBandwidth:
    """A jit'd sum over an array much larger than the caches, on every thread XLA uses: the
    read-bandwidth ceiling, re-measurable between rounds on a machine whose speed drifts."""

    def __init__(self, nbytes: int = 1 << 30):
        self.nbytes = nbytes
        self.f = jax.jit(jnp.sum)
        self.x = jnp.ones((nbytes // 4,), jnp.float32)
        self.f(self.x).block_until_ready()

    def measure(self, repeats: int = 3) -> float:
        """GB/s: the best of `repeats` medians of 5 sums."""
        t = min(_median_time(functools.partial(self.f, self.x), 5) for _ in range(repeats))
        return self.nbytes / t / 1e9


def measure_bandwidth(nbytes: int = 1 << 30) -> dict:
    """Read bandwidth: a jit'd sum over an array much larger than the caches (all threads XLA
    uses), and numpy's single-threaded sum for comparison. The ceiling is the larger."""
    jax_GBps = ReadBandwidth(nbytes).measure()
    xn = np.ones(nbytes // 4, np.float32)
    t_np = _median_time(xn.sum, 5)
    out = {"jax_sum_GBps": jax_GBps, "numpy_sum_GBps": nbytes / t_np / 1e9}
    out["ceiling_GBps"] = max(out.values())
    return out


def startup(cache_dir: str, dtype: str, model: str | None = None) -> dict:
    """Time to a first generated token in a fresh process (load + compile or cache hit)."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "from jaxserve import LLM, SamplingParams\n"
        f"llm = LLM({model!r}, dtype={dtype!r}, compilation_cache_dir={cache_dir!r})\n"
        "t1 = time.perf_counter()\n"
        "llm.generate('Hello', SamplingParams(temperature=0, max_tokens=2))\n"
        "t2 = time.perf_counter()\n"
        "print(round(t1 - t0, 3), round(t2 - t1, 3))\n")
    # The child imports the same jaxserve as this process (this checkout, not an installed one).
    paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    load_s, first_s = map(float, out.stdout.split())
    return {"load_s": load_s, "first_generate_s": first_s, "total_s": load_s + first_s}


def weight_bytes(params) -> int:
    """Bytes a decode step reads from the weights: every array once (the tied embedding is read
    in full by the LM head; its row gather is negligible)."""
    return int(sum(x.nbytes for x in jax.tree.leaves(params)))


def prefill_batch(eng, B: int, ctx: int, params, rng) -> None:
    """Add B requests of `ctx` random prompt tokens and step until all are prefilled."""
    for _ in range(B):
        eng.add_request(rng.integers(100, 40000, ctx).tolist(), params)
    while eng.waiting:
        eng.step()


def running_with_next_page(eng) -> list:
    """The running sequences, each with the page its next token may need allocated (the
    scheduler allocates it only when it schedules that token)."""
    seqs = list(eng.running)
    for s in seqs:
        eng.block_manager.allocate(s.block_table, s.num_tokens)
    return seqs


def device_decode_time(run, seqs, reps: int) -> float:
    """The decode step's jit call alone, inputs packed once: no host work between calls. It
    re-writes the same cache slots each call, which does not matter for timing."""
    from jaxserve.engine import runner as R
    from jaxserve.engine.sampling import SamplingTensors

    cfg = run.cfg
    B = R.bucket(len(seqs), run.ecfg.batch_buckets)
    tokens, meta = run._pack(seqs, [1] * len(seqs), B, 1)
    st, flags = SamplingTensors.build([s.params for s in seqs], [s.prompt_ids for s in seqs],
                                      [s.output_ids for s in seqs], cfg.vocab_size, pad_to=B,
                                      seeds=[s.seed for s in seqs])
    tokens, meta = jnp.asarray(tokens[:, 0]), jax.device_put(meta)

    def step():
        out, run.cache = R.decode_step(run.params, run.cache, tokens, meta, st, cfg=cfg,
                                       flags=flags)
        return out.tokens

    return _median_time(step, reps)


def mode_options(mode: str) -> dict:
    """A dtype ("float32", "bfloat16") or a quality mode of jaxserve.evaluation.MODES ("int8",
    "int4-g32", "w8a8", "gguf", "kv-int8", ...), optionally "+unrolled"."""
    from jaxserve.config import DTYPES
    from jaxserve.evaluation import MODES

    name, _, variant = mode.partition("+")
    opts = {"dtype": name} if name in DTYPES else dict(MODES[name])
    return {**opts, "unroll_layers": variant == "unrolled"}


def bench_mode(mode: str, batches: list[int], ctx: int, steps: int, bw: float,
               model: str | None = None) -> dict:
    """mode: see mode_options. Decode runs the engine as configured (its default
    num_decode_steps, so one step may emit several tokens per sequence)."""
    from jaxserve import LLM, SamplingParams
    from jaxserve.engine import runner as R

    opts = mode_options(mode)
    dtype = opts.get("dtype", "float32")
    llm = LLM(model, num_pages=max(batches) * (ctx + steps + 64) // 16 + 64, **opts,
              # Prefill is timed by re-running the same prompts: a prefix-cache hit would skip it.
              enable_prefix_caching=False)
    eng, run, cfg = llm.engine, llm.runner, llm.model_config
    wbytes = weight_bytes(run.params)
    kv_per_tok = run.cache.bytes_per_token  # K and V over all layers (+ int8 scales)
    rng = np.random.default_rng(0)
    N = eng.num_decode_steps
    res: dict = {"mode": mode, "dtype": dtype, "weight_bytes": wbytes, "num_decode_steps": N,
                 "decode": [], "prefill": []}
    greedy = SamplingParams(temperature=0.0, max_tokens=steps + 4 * N, ignore_eos=True)

    for B in batches:
        prefill_batch(eng, B, ctx, greedy, rng)
        with ProgramTimer() as timer:
            run_decode(eng, timer, 2 * N)  # compile + settle
            # Slow configurations stop after ~15 s, with at least 4 steps.
            seg = run_decode(eng, timer, steps, max_seconds=15.0)
        abort_all(eng)
        wall, prog = seg["wall_s"], seg["program_s"]
        iters = seg["tokens"] / B  # decode iterations (tokens per sequence)
        bytes_per_iter = wbytes + B * seg["mean_context"] * kv_per_tok
        row = {"batch": B, "context": ctx, "num_decode_steps": N, "steps": seg["steps"],
               "tokens": seg["tokens"], "step_ms": wall / seg["steps"] * 1e3,
               "tok_s": seg["tokens"] / wall,
               "device_step_ms": prog / seg["steps"] * 1e3,
               "host_overhead_pct": max(0.0, 100 * (wall - prog) / wall),
               "achieved_GBps": iters * bytes_per_iter / wall / 1e9,
               "roofline_tok_s": B * bw * 1e9 / bytes_per_iter,
               "pct_of_roofline": 100 * iters * bytes_per_iter / wall / (bw * 1e9)}
        res["decode"].append(row)
        print(f"  decode {mode:17s} bs={B:<3d} {row['tok_s']:8.1f} tok/s  step "
              f"{row['step_ms']:6.1f} ms x{N} tokens (device {row['device_step_ms']:6.1f}, "
              f"host overhead {row['host_overhead_pct']:4.1f}%)  {row['achieved_GBps']:5.1f} "
              f"GB/s = {row['pct_of_roofline']:5.1f}% of roofline "
              f"({row['roofline_tok_s']:.1f} tok/s)", flush=True)

    for B, T in ((1, 512), (4, 512)):
        prompts = [rng.integers(100, 40000, T).tolist() for _ in range(B)]
        gen = functools.partial(llm.generate, prompts,
                                SamplingParams(temperature=0.0, max_tokens=1))
        gen()  # compile
        t = _median_time(gen, 3)
        # Matmul FLOPs: every non-embedding weight for every token, the LM head for one row each.
        emb = cfg.vocab_size * cfg.hidden_size
        body = cfg.num_params() - emb * (1 if cfg.tie_word_embeddings else 2)
        flops = 2 * body * B * T + 2 * emb * B
        row = {"batch": B, "prompt_len": T, "s": t, "tok_s": B * T / t, "GFLOPs": flops / t / 1e9}
        res["prefill"].append(row)
        print(f"  prefill {mode:17s} {B}x{T}: {row['tok_s']:8.1f} tok/s ({t * 1e3:.0f} ms, "
              f"{row['GFLOPs']:.0f} GFLOP/s of matmul)", flush=True)
    res["compiled_programs"] = R.compile_count()
    return res


def compare_modes(modes: list[str], batches: list[int], ctx: int, rounds: int, reps: int,
                  bw: float, model: str | None = None) -> list[dict]:
    """Decode step time of every mode, measured in interleaved rounds (mode A, B, C, A, B, C,
    ...) and the best round's median kept: on a shared machine whose speed drifts by 2x over
    minutes, back-to-back per-mode runs compare the drift, not the modes. Device step only
    (the engine's host work is the same for every mode; bench_mode measures it)."""
    from jaxserve import LLM, SamplingParams

    B = max(batches)
    setups = []
    for mode in modes:
        llm = LLM(model, num_pages=B * (ctx + 64) // 16 + 64, enable_prefix_caching=False,
                  **mode_options(mode))
        prefill_batch(llm.engine, B, ctx,
                      SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True),
                      np.random.default_rng(0))
        seqs = running_with_next_page(llm.engine)
        setups.append((mode, llm, seqs))
        for b in batches:  # compile
            device_decode_time(llm.runner, seqs[:b], 1)
    best: dict = {}
    for _ in range(rounds):
        for mode, llm, seqs in setups:
            for b in batches:
                t = device_decode_time(llm.runner, seqs[:b], reps)
                best[mode, b] = min(best.get((mode, b), t), t)
    out = []
    for mode, llm, _ in setups:
        wbytes = weight_bytes(llm.runner.params)
        kv = llm.runner.cache.bytes_per_token
        rows = []
        for b in batches:
            t = best[mode, b]
            moved = wbytes + b * ctx * kv
            rows.append({"batch": b, "context": ctx, "device_step_ms": t * 1e3,
                         "tok_s": b / t, "pct_of_roofline": 100 * moved / t / (bw * 1e9)})
        out.append({"mode": mode, "weight_bytes": wbytes, "decode": rows})
        print(f"  {mode:17s} " + "  ".join(f"bs={r['batch']}: {r['tok_s']:7.1f} tok/s"
                                          for r in rows), flush=True)
    return out


def compare_decode_steps(mode: str, batches: list[int], steps_list: list[int], ctx: int,
                         rounds: int, seg_tokens: int, model: str | None = None,
                         on_round=None) -> dict:
    """Multi-step decode: tok/s and host overhead of the engine's decode loop for every batch
    size x num_decode_steps N, in interleaved rounds. A round, per batch size: prefill B
    prompts of `ctx` random tokens, then `seg_tokens` tokens per sequence at each N, back to
    back on the same sequences, the order of the Ns rotated from round to round (so each N
    sees each context offset and each moment of the round alike). The read ceiling is
    re-measured every round. Every program is compiled in an untimed warm-up first.
    on_round(result so far) is called after each round (a run cut short keeps its rounds)."""
    from jaxserve import LLM, SamplingParams
    from jaxserve.engine import runner as R

    B_max = max(batches)
    per_seq = ctx + len(steps_list) * seg_tokens + 4 * max(steps_list)
    llm = LLM(model, num_pages=B_max * (per_seq + 16) // 16 + 64, enable_prefix_caching=False,
              max_num_seqs=max(B_max, 32), **mode_options(mode))
    eng, run = llm.engine, llm.runner
    wbytes, kv_per_tok = weight_bytes(run.params), run.cache.bytes_per_token
    params = SamplingParams(temperature=0.0, max_tokens=per_seq - ctx, ignore_eos=True)
    rng = np.random.default_rng(0)
    rb = ReadBandwidth()
    out: dict = {"mode": mode, "weight_bytes": wbytes, "kv_bytes_per_token": kv_per_tok,
                 "context": ctx, "segment_tokens": seg_tokens, "rounds": [], "loadavg": {}}
    out["loadavg"]["start"] = loadavg()
    with ProgramTimer() as timer:
        t = time.perf_counter()
        for B in batches:  # compile every (B, N) program at the widths the rounds use
            prefill_batch(eng, B, ctx, params, rng)
            for N in steps_list:
                eng.num_decode_steps = N
                run_decode(eng, timer, seg_tokens)
            abort_all(eng)
        out["warmup_s"] = time.perf_counter() - t
        compiled = R.compile_count()
        print(f"  warm-up (compiles) {out['warmup_s']:.1f} s, {compiled} programs", flush=True)
        for r in range(rounds):
            order = steps_list[r % len(steps_list):] + steps_list[: r % len(steps_list)]
            rnd: dict = {"round": r, "order": order, "read_GBps": rb.measure(), "rows": []}
            for B in batches:
                prefill_batch(eng, B, ctx, params, rng)
                for N in order:
                    eng.num_decode_steps = N
                    seg = run_decode(eng, timer, seg_tokens)
                    rnd["rows"].append({"batch": B, "num_decode_steps": N, **seg})
                abort_all(eng)
            rnd["loadavg"] = loadavg()
            out["rounds"].append(rnd)
            out["ceiling_GBps"] = bw = max(x["read_GBps"] for x in out["rounds"])
            out["rows"] = summarize_decode_steps(out["rounds"], wbytes, kv_per_tok, bw)
            out["complete"] = r == rounds - 1
            if on_round is not None:
                on_round(out)
            print(f"  round {r}: read {rnd['read_GBps']:.1f} GB/s, load {rnd['loadavg']}, "
                  + ", ".join(f"bs={x['batch']} N={x['num_decode_steps']} "
                              f"{x['tokens'] / x['wall_s']:.0f}" for x in rnd["rows"])
                  + " tok/s", flush=True)
        out["recompiles_during_rounds"] = R.compile_count() - compiled
    out["loadavg"]["end"] = loadavg()
    return out


def summarize_decode_steps(rounds: list[dict], wbytes: int, kv_per_tok: int,
                           bw: float) -> list[dict]:
    """Per (batch, N): medians over rounds of tok/s, host overhead per generated token and its
    share of wall time, program time per step, % of roofline (ideal bytes per decode
    iteration: every weight once + the batch's K/V at its context; against the best read
    ceiling of the run), and the speed-up over N=1 as the median of per-round ratios (each
    round's Ns ran back to back, so the ratio is what drift disturbs least)."""
    med = statistics.median
    cells: dict = {}
    for rnd in rounds:
        base = {x["batch"]: x for x in rnd["rows"] if x["num_decode_steps"] == 1}
        for x in rnd["rows"]:
            B, N = x["batch"], x["num_decode_steps"]
            wall, host = x["wall_s"], max(x["wall_s"] - x["program_s"], 0.0)
            iters = x["tokens"] / B
            moved = iters * (wbytes + B * x["mean_context"] * kv_per_tok)
            c = cells.setdefault((B, N), {k: [] for k in (
                "tok_s", "host_us_per_token", "host_pct", "program_ms_per_step",
                "wall_ms_per_step", "pct_of_roofline", "program_pct_of_roofline",
                "speedup_vs_N1", "mean_context")})
            c["tok_s"].append(x["tokens"] / wall)
            c["host_us_per_token"].append(1e6 * host / x["tokens"])
            c["host_pct"].append(100 * host / wall)
            c["program_ms_per_step"].append(1e3 * x["program_s"] / x["steps"])
            c["wall_ms_per_step"].append(1e3 * wall / x["steps"])
            c["pct_of_roofline"].append(100 * moved / wall / (bw * 1e9))
            c["program_pct_of_roofline"].append(100 * moved / x["program_s"] / (bw * 1e9))
            c["mean_context"].append(x["mean_context"])
            if B in base:
                b = base[B]
                c["speedup_vs_N1"].append((x["tokens"] / wall) / (b["tokens"] / b["wall_s"]))
    rows = []
    for (B, N), c in sorted(cells.items()):
        rows.append({"batch": B, "num_decode_steps": N, "rounds": len(c["tok_s"]),
                     **{k: med(v) for k, v in c.items() if v},
                     "tok_s_min": min(c["tok_s"]), "tok_s_max": max(c["tok_s"]),
                     "roofline_tok_s": B * bw * 1e9 / (wbytes + B * med(c["mean_context"])
                                                       * kv_per_tok)})
    return rows


def decode_steps_table(res: dict) -> str:
    """Markdown: one row per (batch, N)."""
    lines = [f"read ceiling {res['ceiling_GBps']:.1f} GB/s (best jit'd 1 GiB sum of the run); "
             f"{res['mode']}, context {res['context']}+, medians of {len(res['rounds'])} rounds",
             "", "| batch | N | tok/s | vs N=1 | host µs/token | host % of wall | "
             "program ms/step | % of roofline |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {r['num_decode_steps']} | {r['tok_s']:.1f} | "
                     f"{r.get('speedup_vs_N1', float('nan')):.2f}x | "
                     f"{r['host_us_per_token']:.0f} | {r['host_pct']:.1f}% | "
                     f"{r['program_ms_per_step']:.1f} | {r['pct_of_roofline']:.1f}% |")
    return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
    """Markdown: one row per mode, decode tok/s per batch and speed-up over the first mode."""
    batches = [r["batch"] for r in results[0]["decode"]]
    base = {r["batch"]: r["tok_s"] for r in results[0]["decode"]}
    head = ["mode", "weight MB"] + [f"bs={b} tok/s (x {results[0]['mode']})" for b in batches]
    lines = ["| " + " | ".join(head + ["bs=1 % of roofline"]) + " |",
             "|" + "---|" * (len(head) + 1)]
    for r in results:
        cells = [r["mode"], f"{r['weight_bytes'] / 1e6:.0f}"]
        cells += [f"{d['tok_s']:.1f} ({d['tok_s'] / base[d['batch']]:.2f}x)" for d in r["decode"]]
        cells.append(f"{r['decode'][0]['pct_of_roofline']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=None, help="dtypes or quantisation modes (see "
                    "mode_options), each optionally +unrolled (layers unrolled, not scanned); "
                    "default: float32,float32+unrolled,int8,int4-g128,int4-g32,gguf,w8a8,"
                    "kv-int8, or float32 with --decode_steps")
    ap.add_argument("--model", default=None, help="model name or checkpoint path (default: the "
                    "default model)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=32, help="timed decode tokens per sequence")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, "
                    "or 6 with --decode_steps)")
    ap.add_argument("--compare_only", action="store_true",
                    help="only the interleaved per-mode decode comparison")
    ap.add_argument("--decode_steps", default=None, help="comma list of num_decode_steps "
                    "(e.g. 1,4,8): only the interleaved multi-step decode comparison")
    ap.add_argument("--segment_tokens", type=int, default=32, help="with --decode_steps: "
                    "tokens per sequence timed at each N in each round (a multiple of every N)")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    steps_list = [int(n) for n in a.decode_steps.split(",")] if a.decode_steps else None
    if steps_list and any(a.segment_tokens % n for n in steps_list):
        ap.error(f"--segment_tokens {a.segment_tokens} is not a multiple of every N {steps_list}")
    modes = (a.modes or ("float32" if steps_list else "float32,float32+unrolled,int8,int4-g128,"
                         "int4-g32,gguf,w8a8,kv-int8")).split(",")
    rounds = a.rounds or (6 if steps_list else 3)

    info = {"machine": describe_machine(), "date": datetime.date.today().isoformat(),
            "model": a.model or "default", "argv": sys.argv[1:] if argv is None else list(argv)}
    print(json.dumps(info["machine"]))
    suffix = "-multistep" if steps_list else "-compare" if a.compare_only else ""
    out = Path(a.out) if a.out else RESULTS / (
        f"decode-{info['machine']['backend']}-{info['date']}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        out.write_text(json.dumps(result, indent=1) + "\n")

    if steps_list:
        info["definitions"] = {
            "host_us_per_token": "(wall time of the engine's steps - time inside its compiled "
                                 "programs) / tokens emitted; a program's time runs from the "
                                 "jit call to its outputs being ready",
            "pct_of_roofline": "(every weight once + the batch's K/V at its mean context) per "
                               "decode iteration x iterations/s over wall time, against "
                               "ceiling_GBps (best per-round jit'd 1 GiB sum)",
            "speedup_vs_N1": "median over rounds of tok/s / tok/s at N=1 in the same round"}
        info["multistep"] = []
        for mode in modes:
            print(f"multi-step decode, {mode}, N in {steps_list}, {rounds} interleaved rounds:",
                  flush=True)
            done = list(info["multistep"])
            res = compare_decode_steps(
                mode, batches, steps_list, a.context, rounds, a.segment_tokens, a.model,
                on_round=lambda partial, done=done: save({**info, "multistep": done + [partial]}))
            info["multistep"].append(res)
            print(decode_steps_table(res), flush=True)
    else:
        info["bandwidth"] = bw = measure_bandwidth()
        print(f"read bandwidth: jax {bw['jax_sum_GBps']:.1f} GB/s, numpy (1 thread) "
              f"{bw['numpy_sum_GBps']:.1f} GB/s -> ceiling {bw['ceiling_GBps']:.1f} GB/s",
              flush=True)
        print("interleaved decode comparison (device step, best of rounds):", flush=True)
        info["comparison"] = compare_modes(modes, batches, a.context, rounds, a.steps,
                                           bw["ceiling_GBps"], a.model)
        print(summary_table(info["comparison"]))
        if not a.compare_only:
            dtype = mode_options(modes[0]).get("dtype", "float32")
            with tempfile.TemporaryDirectory() as d:
                info["startup"] = {"dtype": dtype, "cold": startup(d, dtype, a.model),
                                   "warm": startup(d, dtype, a.model)}
            print(f"start-up to first token ({dtype}): cold "
                  f"{info['startup']['cold']['total_s']:.1f} s, warm (compilation cache hit) "
                  f"{info['startup']['warm']['total_s']:.1f} s", flush=True)
            info["results"] = [bench_mode(m, batches, a.context, a.steps, bw["ceiling_GBps"],
                                          a.model) for m in modes]
    save(info)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
