"""Kernel benchmarks: achieved GB/s and FLOP/s next to ceilings measured in the same run.

    python benchmarks/kernels.py [--quick | --smoke] [--impl auto|reference|xla|gpu|tpu]
                                 [--out DIR] [--time_budget_s S]

Decode attention: batch 1-128 x context 512-8192 for SmolLM2-135M (9 q / 3 kv heads, Dh 64) and a
Llama-3-8B layer (32 / 8, Dh 128). Ragged attention: mixed batches (decode tokens beside a
prefill chunk). Quantised matmuls: the projection shapes of both models at decode and prefill M.
On GPU, jax's shipped Pallas ops (ops.gpu.paged_attention, ops.gpu.decode_attention) are timed
as peers. impl "auto" lets each wrapper choose as the engine does (CPU: the kernels' "xla"
paths, i.e. blocked decode and ragged attention and the column-blocked quant matmuls; each row
records what ran); on CPU the attention rows also time the jnp references those paths replace,
as "reference". Bandwidth figures are against a read ceiling (a large
reduction) measured in the same run: every kernel here mostly reads. Shapes over this run's
memory/compute budget are listed as skipped, with the reason, and so are the cases left when
--time_budget_s has run out (the sections run in order: decode, ragged, matmul). Results go to
benchmarks/results/ as JSON with the machine described.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxserve.machine import describe_machine  # noqa: E402
from pallas_kernels import paged_attention as pa  # noqa: E402
from pallas_kernels import quant_matmul as qm  # noqa: E402
from pallas_kernels import ragged_paged_attention as rpa  # noqa: E402

MODELS = {
    "smollm2-135m": dict(hidden=576, ffn=1536, hq=9, hkv=3, dh=64, vocab=49152),
    "llama3-8b": dict(hidden=4096, ffn=14336, hq=32, hkv=8, dh=128, vocab=128256),
}
PAGE_SIZE = 16


def machine() -> dict:
    """describe_machine(), plus the names earlier kernel results files used for the CPU."""
    m = describe_machine()
    return {**m, "cpu_model": m["cpu"], "cpu_cores": m["cores"]}


def timeit(fn, *args, iters: int, max_seconds: float = 2.0) -> float:
    """Median wall seconds of a jitted call (compile and one warm-up excluded): `iters` calls,
    fewer (at least 3) for calls so slow that they would take over max_seconds."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    times = []
    for _ in range(max(3, min(iters, int(max_seconds / max(first, 1e-9))))):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_row(fn, args, iters: int, nbytes: int, flops: int) -> dict:
    """seconds, GB/s and TFLOP/s of one timed call moving `nbytes` and doing `flops`."""
    t = timeit(fn, *args, iters=iters)
    return dict(seconds=t, gb_s=nbytes / t / 1e9, tflop_s=flops / t / 1e12)


def ceilings(quick: bool, iters: int) -> dict:
    """Bandwidth: a large reduction (read) and a large elementwise pass (read + write), over
    arrays far larger than any cache. Compute: a large square matmul in the dtype the kernels
    use on this backend."""
    on_cpu = jax.default_backend() == "cpu"
    n = (256 if quick else 1024 if on_cpu else 4096) * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    t_read = timeit(jax.jit(jnp.sum), x, iters=iters)
    t_copy = timeit(jax.jit(lambda a: a * 1.0001), x, iters=iters)
    dt = jnp.float32 if on_cpu else jnp.bfloat16
    m = 1024 if quick or on_cpu else 8192
    a = jnp.ones((m, m), dt)
    tm = timeit(jax.jit(lambda p: p @ p), a, iters=iters)
    return dict(read_bytes=x.nbytes, read_gb_s=x.nbytes / t_read / 1e9,
                copy_bytes=2 * x.nbytes, copy_gb_s=2 * x.nbytes / t_copy / 1e9,
                matmul_dtype=jnp.dtype(dt).name, matmul_n=m,
                matmul_tflop_s=2 * m**3 / tm / 1e12)


def decode_cases(quick: bool, smoke: bool = False):
    if smoke:
        yield "smollm2-135m", 1, 512
        return
    batches = [1, 8] if quick else [1, 8, 32, 64, 128]
    contexts = [512, 2048] if quick else [512, 2048, 8192]
    for model in MODELS:
        for b in batches:
            for ctx in contexts:
                yield model, b, ctx


def attention_impl(impl: str, D: int) -> str:
    """What the attention wrappers run for `impl` (mirrors their "auto" choice)."""
    if impl != "auto":
        return impl
    impl = pa.default_impl()
    return "reference" if impl == "gpu" and not pa._gpu_supported(
        jax.ShapeDtypeStruct((1, 1, PAGE_SIZE, 1, D), jnp.float32)) else impl


def paged_cache(rng, pages: int, Hkv: int, D: int, dtype):
    shape = (1, pages, PAGE_SIZE, Hkv, D)
    k = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    v = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    return k, v


def bench_decode(model, B, ctx, dtype, impl, iters, budget_bytes, rng):
    cfg = MODELS[model]
    Hq, Hkv, D, S = cfg["hq"], cfg["hkv"], cfg["dh"], PAGE_SIZE
    W = ctx // S
    kv_bytes = 2 * B * ctx * Hkv * D * jnp.dtype(dtype).itemsize
    row = dict(model=model, batch=B, context=ctx, dtype=jnp.dtype(dtype).name,
               impl=attention_impl(impl, D), kv_bytes=kv_bytes)
    if kv_bytes > budget_bytes:
        return row | dict(skipped=f"KV {kv_bytes / 2**30:.1f} GiB over this run's budget")
    k, v = paged_cache(rng, B * W + 1, Hkv, D, dtype)
    pt = jnp.asarray(1 + rng.permutation(B * W).reshape(B, W), jnp.int32)
    lens = jnp.full((B,), ctx, jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, Hq, D), np.float32), dtype)
    fn = jax.jit(lambda q, k, v, lens, pt: pa.paged_decode_attention(
        q, k, v, jnp.int32(0), lens, pt, sm_scale=D**-0.5, impl=impl))
    flops = 4 * B * Hq * ctx * D

    def timed(fn, *args):
        return time_row(fn, args, iters, kv_bytes, flops)

    row |= timed(fn, q, k, v, lens, pt)
    if jax.default_backend() == "gpu":
        row["peers"] = gpu_peers(q, k, v, lens, pt, D, iters, kv_bytes)
    if jax.default_backend() == "cpu" and impl == "auto":
        # The reference the CPU ("xla") path replaces, for comparison.
        row["reference"] = timed(jax.jit(lambda q, k, v, lens, pt: pa.paged_decode_attention(
            q, k, v, jnp.int32(0), lens, pt, sm_scale=D**-0.5, impl="reference")),
            q, k, v, lens, pt)
    return row


def ragged_cases(quick: bool, smoke: bool = False):
    """(decode tokens, their context, prefill chunk, the chunk's context after the step)."""
    cases = [(8, 1024, 256, 256)] if quick or smoke else [
        (8, 1024, 256, 256), (32, 2048, 512, 1024), (64, 2048, 1024, 2048)]
    for model in (["smollm2-135m"] if smoke else MODELS):
        for case in cases:
            yield model, *case


def bench_ragged(model, n_dec, dec_ctx, chunk, chunk_ctx, dtype, impl, iters, budget_bytes,
                 rng):
    """One mixed step: n_dec decode tokens at dec_ctx and one prompt chunk of `chunk` tokens
    ending at chunk_ctx, as the engine's flat ragged batch. Bytes: every sequence's K/V once
    (what an ideal kernel reads); FLOPs: causal, only the keys each query sees."""
    cfg = MODELS[model]
    Hq, Hkv, D, S = cfg["hq"], cfg["hkv"], cfg["dh"], PAGE_SIZE
    itemsize = jnp.dtype(dtype).itemsize
    kv_tokens = n_dec * dec_ctx + chunk_ctx
    kv_bytes = 2 * kv_tokens * Hkv * D * itemsize
    row = dict(model=model, decodes=n_dec, decode_context=dec_ctx, chunk=chunk,
               chunk_context=chunk_ctx, dtype=jnp.dtype(dtype).name,
               impl=attention_impl(impl, D), kv_bytes=kv_bytes)
    # The CPU reference gathers every query row's pages: bound that copy, not just the cache.
    gathered = kv_bytes if jax.default_backend() != "cpu" else 2 * itemsize * Hkv * D * (
        n_dec * dec_ctx + chunk * chunk_ctx)
    if max(kv_bytes, gathered) > budget_bytes:
        return row | dict(skipped=f"{max(kv_bytes, gathered) / 2**30:.1f} GiB over this run's "
                                  "budget")
    W = max(dec_ctx, chunk_ctx) // S
    N = n_dec + 1
    k, v = paged_cache(rng, N * W + 1, Hkv, D, dtype)
    pt = jnp.asarray(1 + rng.permutation(N * W).reshape(N, W), jnp.int32)
    lens = jnp.asarray([dec_ctx] * n_dec + [chunk_ctx], jnp.int32)
    cu = jnp.asarray(np.concatenate([np.arange(n_dec + 1), [n_dec + chunk]]), jnp.int32)
    T = n_dec + chunk
    q = jnp.asarray(rng.standard_normal((T, Hq, D), np.float32), dtype)
    fn = jax.jit(lambda q, k, v, lens, pt, cu: rpa.ragged_paged_attention(
        q, k, v, jnp.int32(0), lens, pt, cu, jnp.int32(N), sm_scale=D**-0.5, impl=impl))
    keys_seen = n_dec * dec_ctx + sum(chunk_ctx - chunk + i + 1 for i in range(chunk))

    def timed(fn, *args):
        return time_row(fn, args, iters, kv_bytes, 4 * Hq * D * keys_seen)

    row |= timed(fn, q, k, v, lens, pt, cu)
    if jax.default_backend() == "cpu" and impl == "auto":
        # The reference the CPU ("xla") path replaces, for comparison.
        row["reference"] = timed(jax.jit(lambda q, k, v, lens, pt, cu: rpa.ragged_paged_attention(
            q, k, v, jnp.int32(0), lens, pt, cu, jnp.int32(N), sm_scale=D**-0.5,
            impl="reference")), q, k, v, lens, pt, cu)
    return row


def gpu_peers(q, k, v, lens, pt, D, iters, kv_bytes) -> dict:
    """jax's shipped Pallas GPU ops on the same data ([Hkv, P, S, Dh] pages; dense [B, T, ...])."""
    from jax.experimental.pallas.ops.gpu import decode_attention, paged_attention

    out = {}
    kp, vp = (jnp.moveaxis(x[0], 2, 0) for x in (k, v))  # [Hkv, P, S, Dh]
    try:
        f = jax.jit(lambda q, kp, vp, pt, lens: paged_attention.paged_attention(
            q, kp, vp, pt, lens, pages_per_compute_block=8, k_splits=8))
        t = timeit(f, q, kp, vp, pt, lens, iters=iters)
        out["jax_ops_gpu_paged_attention"] = dict(seconds=t, gb_s=kv_bytes / t / 1e9)
    except Exception as e:  # a peer failing must not lose our own numbers
        out["jax_ops_gpu_paged_attention"] = dict(error=f"{type(e).__name__}: {e}"[:300])
    try:
        B, W = pt.shape
        kd = k[0][pt].reshape(B, -1, *k.shape[3:])  # dense copies, outside the timed call
        vd = v[0][pt].reshape(B, -1, *v.shape[3:])
        f = jax.jit(lambda q, kd, vd, lens: decode_attention.gqa(q, kd, vd, kv_seq_len=lens,
                                                                 sm_scale=D**-0.5))
        t = timeit(f, q, kd, vd, lens, iters=iters)
        out["jax_ops_gpu_decode_attention_dense"] = dict(seconds=t, gb_s=kv_bytes / t / 1e9)
    except Exception as e:
        out["jax_ops_gpu_decode_attention_dense"] = dict(error=f"{type(e).__name__}: {e}"[:300])
    return out


def matmul_shapes(model):
    c = MODELS[model]
    h, f, d = c["hidden"], c["ffn"], c["dh"]
    return {"qkv": (h, (c["hq"] + 2 * c["hkv"]) * d), "o": (c["hq"] * d, h),
            "gate_up": (h, 2 * f), "down": (f, h), "lm_head": (h, c["vocab"])}


def bench_matmul(model, name, K, N, M, dtype, impl, iters, budget_bytes, budget_flop, rng):
    row = dict(model=model, op=name, M=M, K=K, N=N, dtype=jnp.dtype(dtype).name,
               impl=qm._resolve(impl, N, K))
    if K * N * 4 > budget_bytes:
        return row | dict(skipped="f32 weight over this run's budget")
    if 2 * M * K * N > budget_flop:
        return row | dict(skipped=f"{2 * M * K * N / 1e9:.0f} GFLOP per call over this run's "
                                  "budget")
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.02)
    x = jnp.asarray(rng.standard_normal((M, K), np.float32), dtype)
    g = 128 if K % 128 == 0 else 64
    w_q, s = qm.quantize_int8(w)
    packed, sc, mn = qm.quantize_int4(w, g)
    wd = w.astype(dtype)
    variants = {
        "dense": (jax.jit(lambda x, w: x @ w), (x, wd), wd.nbytes),
        "int8": (jax.jit(lambda x, w, s: qm.int8_matmul(x, w, s, impl=impl)), (x, w_q, s),
                 w_q.nbytes + s.nbytes),
        f"int4_g{g}": (jax.jit(lambda x, p, s, m: qm.int4_matmul(x, p, s, m, impl=impl)),
                       (x, packed, sc, mn), packed.nbytes + sc.nbytes + mn.nbytes),
        "w8a8": (jax.jit(lambda x, w, s: qm.w8a8_matmul(x, w, s, impl=impl)), (x, w_q, s),
                 w_q.nbytes + s.nbytes),
    }
    io = x.nbytes + M * N * jnp.dtype(dtype).itemsize
    for key, (fn, args, wbytes) in variants.items():
        row[key] = time_row(fn, args, iters, wbytes + io, 2 * M * K * N)
    return row


def report(kind: str, label: str, row: dict, ceil: dict) -> dict:
    """Adds pct_* (against this run's ceilings) to each timed entry of row, prints it."""
    timed = {row["impl"]: row} if "gb_s" in row or "skipped" in row else {}
    timed |= {k: v for k, v in row.items() if isinstance(v, dict) and "gb_s" in v}
    for peers in [row.get("peers", {})]:
        timed |= {k: v for k, v in peers.items() if "gb_s" in v}
    for key, val in timed.items():
        if "skipped" in val:
            print(f"{kind} {label}: skipped ({val['skipped']})")
            continue
        val["pct_bandwidth"] = 100 * val["gb_s"] / ceil["read_gb_s"]
        line = (f"{kind} {label} {key:9s}: {val['gb_s']:8.2f} GB/s ({val['pct_bandwidth']:5.1f}% "
                f"of read) {val['seconds'] * 1e3:9.3f} ms")
        if "tflop_s" in val:
            val["pct_flops"] = 100 * val["tflop_s"] / ceil["matmul_tflop_s"]
            line += f" {val['tflop_s'] * 1e3:9.2f} GFLOP/s"
        print(line)
    return row


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="few small shapes (CPU smoke run)")
    size.add_argument("--smoke", action="store_true",
                      help="one shape per section, 2 iterations (checks the code paths)")
    ap.add_argument("--impl", default="auto", choices=pa.IMPLS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--time_budget_s", type=float, default=None,
                    help="stop timing new cases after this many seconds (they are listed as "
                         "skipped), so a run with a hard limit still writes its results")
    args = ap.parse_args(argv)
    deadline = None if args.time_budget_s is None else time.monotonic() + args.time_budget_s
    out_of_time = "over this run's time budget (--time_budget_s)"

    def in_budget() -> bool:
        return deadline is None or time.monotonic() < deadline

    on_cpu = jax.default_backend() == "cpu"
    quick = args.quick or args.smoke
    iters = 2 if args.smoke else 3 if args.quick else 20
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    budget = (1024 if on_cpu else 16 * 1024) * 2**20
    budget_flop = 1.3e11 if on_cpu else float("inf")  # ~1 s per call at this CPU's matmul rate
    rng = np.random.default_rng(0)
    impl = args.impl

    result = dict(machine=machine(), quick=args.quick, smoke=args.smoke, impl=impl,
                  time_budget_s=args.time_budget_s,
                  date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  notes="gb_s counts K+V bytes read once (attention) or weight + x + out bytes "
                        "(matmul); pct_* compare with the ceilings measured in this run; each "
                        "row's impl is what ran. Small matmul weights fit in cache, so their "
                        "pct_bandwidth can exceed 100.")
    result["ceilings"] = ceil = ceilings(quick, iters)
    print(f"ceilings: read {ceil['read_gb_s']:.1f} GB/s, copy {ceil['copy_gb_s']:.1f} GB/s, "
          f"matmul {ceil['matmul_tflop_s']:.3f} TFLOP/s ({ceil['matmul_dtype']})")

    result["decode_attention"] = [
        report("decode", f"{model:13s} B={B:3d} ctx={ctx:5d}",
               bench_decode(model, B, ctx, dtype, impl, iters, budget, rng) if in_budget() else
               dict(model=model, batch=B, context=ctx, impl=attention_impl(
                   impl, MODELS[model]["dh"]), skipped=out_of_time), ceil)
        for model, B, ctx in decode_cases(args.quick, args.smoke)]
    result["ragged_attention"] = [
        report("ragged", f"{model:13s} {nd:3d} decodes@{dc:5d} + chunk {ch:4d}@{cc:5d}",
               bench_ragged(model, nd, dc, ch, cc, dtype, impl, iters, budget, rng)
               if in_budget() else
               dict(model=model, decodes=nd, decode_context=dc, chunk=ch, chunk_context=cc,
                    impl=attention_impl(impl, MODELS[model]["dh"]), skipped=out_of_time), ceil)
        for model, nd, dc, ch, cc in ragged_cases(args.quick, args.smoke)]

    rows = []
    ms = [1] if args.smoke else [1, 16] if args.quick else [1, 16, 128, 1024]
    for model in MODELS:
        for name, (K, N) in matmul_shapes(model).items():
            if args.smoke and (model, name) != ("smollm2-135m", "o"):
                continue
            if args.quick and (model == "llama3-8b" and name != "o"):
                continue
            for M in ms:
                row = (bench_matmul(model, name, K, N, M, dtype, impl, iters, budget,
                                    budget_flop, rng) if in_budget() else
                       dict(model=model, op=name, M=M, K=K, N=N, impl=qm._resolve(impl, N, K),
                            skipped=out_of_time))
                rows.append(report("matmul", f"{model:13s} {name:8s} M={M:4d}", row, ceil))
    result["matmul"] = rows

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = result["machine"]
    path = out_dir / (f"kernels-{m['backend']}-{m['device'].replace(' ', '_')}"
                      f"{'-quick' if args.quick else '-smoke' if args.smoke else ''}.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
