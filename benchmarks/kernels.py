"""Kernel benchmarks: achieved GB/s and FLOP/s next to ceilings measured in the same run.

    python benchmarks/kernels.py [--quick] [--impl auto|reference|gpu|tpu] [--out DIR]

Decode attention: batch 1-128 x context 512-8192 for SmolLM2-135M (9 q / 3 kv heads, Dh 64) and a
Llama-3-8B layer (32 / 8, Dh 128). Quantised matmuls: the projection shapes of both models at
decode and prefill M. On GPU, jax's shipped Pallas ops (ops.gpu.paged_attention,
ops.gpu.decode_attention) are timed as peers. On CPU, impl "auto" measures the reference (XLA)
path. Results go to benchmarks/results/ as JSON with the machine described.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import paged_attention as pa  # noqa: E402
from pallas_kernels import quant_matmul as qm  # noqa: E402

MODELS = {
    "smollm2-135m": dict(hidden=576, ffn=1536, hq=9, hkv=3, dh=64, vocab=49152),
    "llama3-8b": dict(hidden=4096, ffn=14336, hq=32, hkv=8, dh=128, vocab=128256),
}
PAGE_SIZE = 16


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    return dict(cpu_model=cpu, cpu_cores=os.cpu_count(), python=platform.python_version(),
                jax=jax.__version__, backend=jax.default_backend(), device=dev.device_kind,
                num_devices=jax.device_count(), platform=platform.platform())


def timeit(fn, *args, iters: int) -> float:
    """Median wall seconds of a jitted call (compile and one warm-up excluded)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ceilings(quick: bool, iters: int) -> dict:
    """Bandwidth: a large elementwise pass (read + write). Compute: a large square matmul in the
    dtype the kernels use on this backend."""
    n = (64 if quick else 256) * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    t = timeit(jax.jit(lambda a: a * 1.0001), x, iters=iters)
    dt = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    m = 1024 if quick or jax.default_backend() == "cpu" else 8192
    a = jnp.ones((m, m), dt)
    tm = timeit(jax.jit(lambda p: p @ p), a, iters=iters)
    return dict(copy_bytes=2 * x.nbytes, copy_gb_s=2 * x.nbytes / t / 1e9,
                matmul_dtype=jnp.dtype(dt).name, matmul_n=m,
                matmul_tflop_s=2 * m**3 / tm / 1e12)


def decode_cases(quick: bool):
    batches = [1, 8] if quick else [1, 8, 32, 128]
    contexts = [512, 2048] if quick else [512, 2048, 8192]
    for model in MODELS:
        for b in batches:
            for ctx in contexts:
                yield model, b, ctx


def bench_decode(model, B, ctx, dtype, impl, iters, budget_bytes, rng):
    cfg = MODELS[model]
    Hq, Hkv, D, S = cfg["hq"], cfg["hkv"], cfg["dh"], PAGE_SIZE
    W = ctx // S
    kv_bytes = 2 * B * ctx * Hkv * D * jnp.dtype(dtype).itemsize
    row = dict(model=model, batch=B, context=ctx, dtype=jnp.dtype(dtype).name, impl=impl,
               kv_bytes=kv_bytes)
    if kv_bytes > budget_bytes:
        return row | dict(skipped=f"KV {kv_bytes / 2**30:.1f} GiB over this run's budget")
    P = B * W + 1
    k = jnp.asarray(rng.standard_normal((1, P, S, Hkv, D), np.float32), dtype)
    v = jnp.asarray(rng.standard_normal((1, P, S, Hkv, D), np.float32), dtype)
    pt = jnp.asarray(1 + rng.permutation(B * W).reshape(B, W), jnp.int32)
    lens = jnp.full((B,), ctx, jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, Hq, D), np.float32), dtype)
    fn = jax.jit(lambda q, k, v, lens, pt: pa.paged_decode_attention(
        q, k, v, jnp.int32(0), lens, pt, sm_scale=D**-0.5, impl=impl))
    t = timeit(fn, q, k, v, lens, pt, iters=iters)
    row |= dict(seconds=t, gb_s=kv_bytes / t / 1e9, tflop_s=4 * B * Hq * ctx * D / t / 1e12)
    if jax.default_backend() == "gpu":
        row["peers"] = gpu_peers(q, k, v, lens, pt, D, iters, kv_bytes)
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


def bench_matmul(model, name, K, N, M, dtype, impl, iters, budget_bytes, rng):
    row = dict(model=model, op=name, M=M, K=K, N=N, dtype=jnp.dtype(dtype).name, impl=impl)
    if K * N * 4 > budget_bytes:
        return row | dict(skipped="f32 weight over this run's budget")
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
        t = timeit(fn, *args, iters=iters)
        row[key] = dict(seconds=t, gb_s=(wbytes + io) / t / 1e9,
                        tflop_s=2 * M * K * N / t / 1e12)
    return row


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few small shapes (CPU smoke run)")
    ap.add_argument("--impl", default="auto", choices=pa.IMPLS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    iters = 3 if args.quick else 20
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    budget = (256 if on_cpu else 16 * 1024) * 2**20
    rng = np.random.default_rng(0)
    impl = args.impl
    if impl == "auto":
        impl = pa.default_impl()

    result = dict(machine=machine(), quick=args.quick, impl=impl,
                  date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  notes="gb_s counts K+V bytes read (attention) or weight + x + out bytes "
                        "(matmul); pct_* compare with the ceilings measured in this run.")
    result["ceilings"] = ceil = ceilings(args.quick, iters)
    print(f"ceilings: copy {ceil['copy_gb_s']:.1f} GB/s, matmul {ceil['matmul_tflop_s']:.3f} "
          f"TFLOP/s ({ceil['matmul_dtype']})")

    rows = []
    for model, B, ctx in decode_cases(args.quick):
        row = bench_decode(model, B, ctx, dtype, impl, iters, budget, rng)
        if "gb_s" in row:
            row["pct_bandwidth"] = 100 * row["gb_s"] / ceil["copy_gb_s"]
            print(f"decode {model:13s} B={B:3d} ctx={ctx:5d}: {row['gb_s']:8.2f} GB/s "
                  f"({row['pct_bandwidth']:5.1f}% of copy)  {row['seconds'] * 1e3:8.3f} ms")
        else:
            print(f"decode {model:13s} B={B:3d} ctx={ctx:5d}: {row['skipped']}")
        rows.append(row)
    result["decode_attention"] = rows

    rows = []
    ms = [1, 16] if args.quick else [1, 16, 128, 1024]
    for model in MODELS:
        for name, (K, N) in matmul_shapes(model).items():
            if args.quick and (model == "llama3-8b" and name != "o"):
                continue
            for M in ms:
                row = bench_matmul(model, name, K, N, M, dtype, impl, iters, budget, rng)
                for key, val in row.items():
                    if isinstance(val, dict) and "gb_s" in val:
                        val["pct_bandwidth"] = 100 * val["gb_s"] / ceil["copy_gb_s"]
                        val["pct_flops"] = 100 * val["tflop_s"] / ceil["matmul_tflop_s"]
                        print(f"matmul {model:13s} {name:8s} M={M:4d} {key:9s}: "
                              f"{val['gb_s']:8.2f} GB/s {val['tflop_s'] * 1e3:9.2f} GFLOP/s")
                rows.append(row)
    result["matmul"] = rows

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = result["machine"]
    path = out_dir / (f"kernels-{m['backend']}-{m['device'].replace(' ', '_')}"
                      f"{'-quick' if args.quick else ''}.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
