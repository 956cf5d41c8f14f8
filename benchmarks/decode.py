"""Decode / prefill throughput of the default model against the machine's memory roofline.

    python benchmarks/decode.py [--modes float32,float32+unrolled,int8,int4-g32,w8a8,gguf]
                                [--batches 1,8,32]

Measures, in one run: the memory read bandwidth (the ceiling), cold and warm start-up (a fresh
and a reused persistent compilation cache, each in its own process), and for each mode (a dtype,
optionally with layers unrolled instead of scanned): decode tok/s at each batch size with the
engine's host overhead, and prefill tok/s. bs=1 decode must
read every weight once per token, so its roofline is bandwidth / weight bytes.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.machine import describe_machine

RESULTS = Path(__file__).parent / "results"


def _median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def measure_bandwidth(nbytes: int = 1 << 30) -> dict:
    """Read bandwidth: a jit'd sum over an array much larger than the caches (all threads XLA
    uses), and numpy's single-threaded sum for comparison. The ceiling is the larger."""
    f = jax.jit(jnp.sum)
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f(x).block_until_ready()
    t_jax = min(_median_time(functools.partial(f, x), 5) for _ in range(3))
    xn = np.ones(nbytes // 4, np.float32)
    t_np = _median_time(xn.sum, 5)
    out = {"jax_sum_GBps": nbytes / t_jax / 1e9, "numpy_sum_GBps": nbytes / t_np / 1e9}
    out["ceiling_GBps"] = max(out.values())
    return out


def startup(cache_dir: str, dtype: str) -> dict:
    """Time to a first generated token in a fresh process (load + compile or cache hit)."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "from jaxserve import LLM, SamplingParams\n"
        f"llm = LLM(dtype={dtype!r}, compilation_cache_dir={cache_dir!r})\n"
        "t1 = time.perf_counter()\n"
        "llm.generate('Hello', SamplingParams(temperature=0, max_tokens=2))\n"
        "t2 = time.perf_counter()\n"
        "print(round(t1 - t0, 3), round(t2 - t1, 3))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
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


def bench_mode(mode: str, batches: list[int], ctx: int, steps: int, bw: float) -> dict:
    """mode: see mode_options."""
    from jaxserve import LLM, SamplingParams
    from jaxserve.engine import runner as R

    opts = mode_options(mode)
    dtype = opts.get("dtype", "float32")
    llm = LLM(num_pages=max(batches) * (ctx + steps + 64) // 16 + 64, **opts,
              # Prefill is timed by re-running the same prompts: a prefix-cache hit would skip it.
              enable_prefix_caching=False)
    eng, run, cfg = llm.engine, llm.runner, llm.model_config
    wbytes = weight_bytes(run.params)
    kv_per_tok = run.cache.bytes_per_token  # K and V over all layers (+ int8 scales)
    rng = np.random.default_rng(0)
    res: dict = {"mode": mode, "dtype": dtype, "weight_bytes": wbytes, "decode": [], "prefill": []}
    greedy = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)

    for B in batches:
        prefill_batch(eng, B, ctx, greedy, rng)
        for _ in range(3):  # compile + settle
            eng.step()
        # Up to `steps` steps, but stop after ~15 s: slow configurations still get >= 4 samples.
        n, t = 0, time.perf_counter()
        while n < steps and (n < 4 or time.perf_counter() - t < 15.0):
            eng.step()
            n += 1
        step_s = (time.perf_counter() - t) / n
        dev_s = device_decode_time(run, running_with_next_page(eng), n)
        while eng.has_unfinished():
            eng.step()
        bytes_per_step = wbytes + B * (ctx + steps) * kv_per_tok
        row = {"batch": B, "context": ctx, "steps": n, "step_ms": step_s * 1e3,
               "tok_s": B / step_s,
               "device_step_ms": dev_s * 1e3,
               "host_overhead_pct": max(0.0, 100 * (step_s - dev_s) / step_s),
               "achieved_GBps": bytes_per_step / step_s / 1e9,
               "roofline_tok_s": B * bw * 1e9 / bytes_per_step,
               "pct_of_roofline": 100 * bytes_per_step / step_s / (bw * 1e9)}
        res["decode"].append(row)
        print(f"  decode {mode:17s} bs={B:<3d} {row['tok_s']:8.1f} tok/s  step "
              f"{row['step_ms']:6.1f} ms (device {row['device_step_ms']:6.1f}, host overhead "
              f"{row['host_overhead_pct']:4.1f}%)  {row['achieved_GBps']:5.1f} GB/s = "
              f"{row['pct_of_roofline']:5.1f}% of roofline ({row['roofline_tok_s']:.1f} tok/s)",
              flush=True)

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
                  bw: float) -> list[dict]:
    """Decode step time of every mode, measured in interleaved rounds (mode A, B, C, A, B, C,
    ...) and the best round's median kept: on a shared machine whose speed drifts by 2x over
    minutes, back-to-back per-mode runs compare the drift, not the modes. Device step only
    (the engine's host work is the same for every mode; bench_mode measures it)."""
    from jaxserve import LLM, SamplingParams

    B = max(batches)
    setups = []
    for mode in modes:
        llm = LLM(num_pages=B * (ctx + 64) // 16 + 64, enable_prefix_caching=False,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="float32,float32+unrolled,int8,int4-g128,int4-g32,gguf,"
                    "w8a8,kv-int8", help="dtypes or quantisation modes (see mode_options), "
                    "each optionally +unrolled (layers unrolled, not scanned)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of compare_modes")
    ap.add_argument("--compare_only", action="store_true",
                    help="only the interleaved per-mode decode comparison")
    a = ap.parse_args()
    modes, batches = a.modes.split(","), [int(b) for b in a.batches.split(",")]

    info = {"machine": describe_machine(), "date": datetime.date.today().isoformat()}
    print(json.dumps(info["machine"]))
    info["bandwidth"] = bw = measure_bandwidth()
    print(f"read bandwidth: jax {bw['jax_sum_GBps']:.1f} GB/s, numpy (1 thread) "
          f"{bw['numpy_sum_GBps']:.1f} GB/s -> ceiling {bw['ceiling_GBps']:.1f} GB/s", flush=True)
    print("interleaved decode comparison (device step, best of rounds):", flush=True)
    info["comparison"] = compare_modes(modes, batches, a.context, a.rounds, a.steps,
                                       bw["ceiling_GBps"])
    print(summary_table(info["comparison"]))
    if not a.compare_only:
        with tempfile.TemporaryDirectory() as d:
            info["startup"] = {"cold": startup(d, "float32"), "warm": startup(d, "float32")}
        print(f"start-up to first token (float32): cold "
              f"{info['startup']['cold']['total_s']:.1f} s, warm (compilation cache hit) "
              f"{info['startup']['warm']['total_s']:.1f} s", flush=True)
        info["results"] = [bench_mode(m, batches, a.context, a.steps, bw["ceiling_GBps"])
                           for m in modes]
    suffix = "-compare" if a.compare_only else ""
    name = f"decode-{info['machine']['backend']}-{info['date']}{suffix}.json"
    out = Path(a.out) if a.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
