#!/usr/bin/env bash
# The first command of a session with a lent GPU: every check that needs the device, in one
# call, under a total time limit, with its results written where the call brings them back.
#
#   bash benchmarks/device_check.sh --stage     # here, before the call: fills .devcarry/
#   bash benchmarks/device_check.sh             # there: run(command=..., carry=[".devcarry"])
#   bash benchmarks/device_check.sh --dry-run   # CPU, ~2 min: the same parts at tiny sizes
#
# Parts, in order of value, each under its own timeout and all under DEVICE_CHECK_BUDGET_S
# (default 480 s); a part that fails or times out is logged and the rest still run:
#   preflight       jax.devices() must hold a GPU (else: reported, exit 2); packages the image
#                   lacks are installed from .devcarry/wheels; the model is the default one if
#                   its GGUF is here, else a stand-in built from .devcarry/skeleton (its config
#                   and tokenizer, random bf16 weights: same bytes and FLOPs, see
#                   benchmarks/standin_model.py; the GGUF is 98 MB, a call carries 64 MiB)
#   kernel-tests    tests/kernels -m gpu: the Pallas kernels natively against their references
#   decode-steps    benchmarks/decode.py --decode_steps 1,4,8 in bf16 (DEFAULT_DECODE_STEPS)
#   kernels         benchmarks/kernels.py with a time budget (peers: jax's shipped GPU ops)
#   serving         benchmarks/serving.py --launch --quick in bf16, both schedulers
#   decode          benchmarks/decode.py in bf16: ceiling, start-up, decode, prefill
# Results in $OUT (default ./device-out), named as in benchmarks/results/, 7 files at most (a
# call brings back 8): summary.log, device-check.log (everything printed), kernel-tests.xml,
# kernels-*.json, decode-*-multistep.json, decode-*.json, serving-*.json. The serving PNG is
# not kept: `python benchmarks/serving.py --plot JSON` draws it from the JSON.
#
# --dry-run runs every part on CPU with the smallest configurations (a 2-layer stand-in of the
# default model, one batch size, N in 1,2, a few requests) and validates the same outputs, so
# that nothing here can rot without CI noticing (tests/test_device_check.py).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=device
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --stage) MODE=stage ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --stage]" >&2; exit 64 ;;
esac
PY="${PYTHON:-python3}"
CARRY="$ROOT/.devcarry"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's jaxserve
export PYTHONUNBUFFERED=1
# jax takes 75% of GPU memory per process by default; decode.py's start-up probes and the
# serving benchmark's servers are second processes on the same GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.3}"

if [[ $MODE == stage ]]; then
  # The device image (KINDS.md, Python 3.12) lacks gguf and the gRPC health / reflection
  # services, and the committed stubs need grpcio and protobuf as new as ours: carry the
  # versions installed here, as cp312 wheels.
  set -e
  rm -rf "$CARRY"
  mkdir -p "$CARRY/wheels"
  "$PY" benchmarks/standin_model.py skeleton "$CARRY/skeleton"
  pins=$("$PY" - <<'EOF'
import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in
               ("gguf", "grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection")))
EOF
)
  plat=""
  for n in 2_28 2_27 2_17 2014 1; do
    [[ $n == 20* || $n == 1 ]] && plat+=" --platform manylinux${n}_x86_64" \
      || plat+=" --platform manylinux_${n}_x86_64"
  done
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $plat -d "$CARRY/wheels" $pins
  ls -la "$CARRY/wheels"
  du -sh "$CARRY"
  echo "staged $CARRY: now run(command=\"bash benchmarks/device_check.sh\", carry=[\".devcarry\"])"
  exit 0
fi

OUT="${OUT:-$ROOT/device-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-480}"
# A dry run's limits only catch hangs: on a loaded 2-core CI machine it runs 3-4x slower.
[[ $MODE == dry ]] && BUDGET_S="${DEVICE_CHECK_BUDGET_S:-1500}"
LOG="$OUT/device-check.log"
SUMMARY="$OUT/summary.log"
: >"$SUMMARY"
FAILED=0
DATE="$(date -u +%F)"

note() { echo "$*" | tee -a "$SUMMARY"; }

# part NAME CAP_S CMD...: run CMD under min(CAP_S, what is left of the budget).
part() {
  local name=$1 cap=$2 left t0 rc
  shift 2
  left=$((BUDGET_S - SECONDS - 5))
  ((cap > left)) && cap=$left
  if ((cap < 20)); then
    note "PART $name SKIPPED (budget: ${left}s left)"
    FAILED=1
    return 1
  fi
  echo "=== $name (timeout ${cap}s): $*"
  t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@"
  rc=$?
  if ((rc == 0)); then
    note "PART $name ok $((SECONDS - t0))s"
  else
    [[ $rc == 124 || $rc == 137 ]] && rc="$rc (timed out after ${cap}s)"
    note "PART $name FAILED rc=$rc after $((SECONDS - t0))s"
    FAILED=1
  fi
}

# check NAME CMD...: a validation of a part's output; failing marks the run failed.
check() {
  local name=$1
  shift
  if "$@" >>"$SUMMARY" 2>&1; then
    note "CHECK $name ok"
  else
    note "CHECK $name FAILED"
    FAILED=1
  fi
}

# Everything below runs in checks(), its output teed into $LOG.
checks() {
WORK="$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
note "device_check $MODE $(date -u +%FT%TZ) host $(hostname) budget ${BUDGET_S}s"
note "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"

# --- preflight ----------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    | sed 's/^/gpu: /' | tee -a "$SUMMARY"
fi
deps_ok() {
  "$PY" -c "import jax, flax, orbax.checkpoint, gguf, tokenizers, grpc, grpc_health.v1, \
grpc_reflection.v1alpha, prometheus_client, pytest; import jaxserve.llm, \
jaxserve.server.inference_pb2_grpc; jaxserve.llm._machine_key()"
}
if ! deps_ok 2>"$WORK/deps.err"; then
  tail -n 3 "$WORK/deps.err"
  if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
    note "preflight: installing $(ls "$CARRY"/wheels | wc -l) carried wheels into $WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$CARRY"/wheels/*.whl
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
  fi
  if ! deps_ok; then
    note "PREFLIGHT FAILED: packages missing (run --stage here and carry .devcarry)"
    exit 3
  fi
fi
# One process: the platform (to the summary) and the backend and the default model's verified
# GGUF, if it is here (to this shell).
"$PY" - "$WORK/env.sh" <<'EOF' | tee -a "$SUMMARY"
import platform, shlex, sys
from pathlib import Path
import jax
from jaxserve.config import DEFAULT_MODEL, load_model_source
from jaxserve.loading.fetch import default_cache_dir, sha256_file
src = load_model_source(DEFAULT_MODEL)
gguf = default_cache_dir() / src.name / Path(src.member).name
ok = gguf.is_file() and sha256_file(gguf) == src.file_sha256
Path(sys.argv[1]).write_text(f"BACKEND={jax.default_backend()}\n"
                             f"GGUF={shlex.quote(str(gguf)) if ok else ''}\n")
print(f"python {platform.python_version()} jax {jax.__version__} backend "
      f"{jax.default_backend()} devices {jax.devices()}")
EOF
BACKEND=unknown GGUF=""
# shellcheck disable=SC1091
source "$WORK/env.sh"
if [[ $MODE == device && $BACKEND != gpu ]]; then
  note "NO GPU: jax.default_backend() is '$BACKEND' (jax.devices() above); is a CUDA jax plugin"
  note "installed (jax-cuda*-plugin) and nvidia-smi working? Nothing else was run."
  exit 2
fi

MODEL_ARGS=()
if [[ $MODE == dry ]]; then
  # The skeleton as --stage makes it, then the stand-in as the device builds it, 2 layers.
  "$PY" benchmarks/standin_model.py skeleton "$WORK/skeleton" || exit 3
  "$PY" benchmarks/standin_model.py build "$WORK/skeleton" "$WORK/standin" --tiny || exit 3
  MODEL_ARGS=(--model "$WORK/standin")
  note "model: tiny stand-in (2 layers, random weights) of the default model"
elif [[ -n $GGUF ]]; then
  note "model: the default model, $GGUF"
elif [[ -f $CARRY/skeleton/model_config.json ]]; then
  "$PY" benchmarks/standin_model.py build "$CARRY/skeleton" "$WORK/standin" --dtype bfloat16 \
    || exit 3
  MODEL_ARGS=(--model "$WORK/standin")
  note "model: stand-in of the default model (its config and tokenizer, random bf16 weights)"
else
  note "model: none (no GGUF in checkpoints/, no .devcarry/skeleton): decode and serving skip"
fi
note "PART preflight ok ${SECONDS}s"

# --- parts --------------------------------------------------------------------------------
if [[ $MODE == dry ]]; then
  K_ARGS=(--smoke --time_budget_s 20)
  STEPS_ARGS=(--modes bfloat16 --decode_steps 1,2 --batches 1 --rounds 2 --context 16
              --segment_tokens 4)
  DEC_ARGS=(--modes bfloat16 --batches 1 --steps 4 --rounds 1 --context 16)
  SERVE_ARGS=(--quick --num-requests 3 --warmup-requests 1 --concurrency 2 --prompt-max 24
              --output-max 4 --ready-timeout-s 60)
  CAPS=(240 240 240 300 300)
else
  K_ARGS=(--time_budget_s 60)
  STEPS_ARGS=(--modes bfloat16 --decode_steps 1,4,8 --batches 1,8,32 --rounds 3
              --segment_tokens 32)
  DEC_ARGS=(--modes bfloat16 --batches 1,8,32 --rounds 2)
  SERVE_ARGS=(--quick --ready-timeout-s 100)
  CAPS=(120 110 80 110 90)
fi
TAG="$BACKEND-$DATE"

part kernel-tests "${CAPS[0]}" "$PY" -m pytest -q -p no:cacheprovider tests/kernels -m gpu \
  --junitxml="$OUT/kernel-tests.xml"
HAVE_MODEL=1
[[ $MODE == device && -z $GGUF && ${#MODEL_ARGS[@]} == 0 ]] && HAVE_MODEL=0
if ((HAVE_MODEL)); then
  part decode-steps "${CAPS[1]}" "$PY" benchmarks/decode.py "${MODEL_ARGS[@]}" \
    "${STEPS_ARGS[@]}" --out "$OUT/decode-$TAG-multistep.json"
fi
part kernels "${CAPS[2]}" "$PY" benchmarks/kernels.py "${K_ARGS[@]}" --out "$OUT"
if ((HAVE_MODEL)); then
  part serving "${CAPS[3]}" "$PY" benchmarks/serving.py --launch --dtype bfloat16 \
    "${MODEL_ARGS[@]}" "${SERVE_ARGS[@]}" --out "$OUT/serving-$TAG-quick.json"
  rm -f "$OUT/serving-$TAG-quick.png"
  part decode "${CAPS[4]}" "$PY" benchmarks/decode.py "${MODEL_ARGS[@]}" "${DEC_ARGS[@]}" \
    --out "$OUT/decode-$TAG.json"
fi

# --- validation ---------------------------------------------------------------------------
check outputs "$PY" - "$OUT" "$MODE" "$HAVE_MODEL" <<'EOF'
"""Every expected file exists, parses, and holds what its benchmark writes."""
import glob, json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, mode, have_model = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
ok = True

def fail(msg):
    global ok
    ok = False
    print("  " + msg)

def load(pattern):
    files = sorted(glob.glob(str(out / pattern)))
    if len(files) != 1:
        fail(f"{pattern}: {len(files)} files")
        return None
    try:
        return json.loads(Path(files[0]).read_text())
    except ValueError as e:
        fail(f"{files[0]}: {e}")

try:
    suite = ET.parse(out / "kernel-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    bad = int(suite.get("failures")) + int(suite.get("errors"))
    print(f"  kernel tests: {n} collected, {skipped} skipped, {bad} failed")
    if n == 0 or bad:
        fail("kernel tests: none collected, or failures")
    if mode == "device" and skipped:
        fail("kernel tests: native GPU tests skipped on the device (has_gpu() false?)")
except (OSError, ET.ParseError, AttributeError, TypeError) as e:
    fail(f"kernel-tests.xml: {e}")

k = load("kernels-*.json")
if k is not None:
    timed = [r for s in ("decode_attention", "ragged_attention", "matmul") for r in k.get(s, [])
             if "skipped" not in r]
    print(f"  kernels: read ceiling {k['ceilings']['read_gb_s']:.1f} GB/s, {len(timed)} rows "
          "timed")
    if not timed or any(r.get("pct_bandwidth") is None and "gb_s" in r for r in timed):
        fail("kernels: no timed rows")

if have_model:
    m = load("decode-*-multistep.json")
    if m is not None:
        for res in m["multistep"]:
            for r in res["rows"]:
                print(f"  decode-steps {res['mode']} bs={r['batch']} N={r['num_decode_steps']}: "
                      f"{r['tok_s']:.1f} tok/s, host {r['host_us_per_token']:.0f} us/token "
                      f"({r['host_pct']:.1f}%), {r['pct_of_roofline']:.1f}% of "
                      f"{res['ceiling_GBps']:.0f} GB/s")
            if not res["rows"] or not res.get("complete"):
                fail("decode-steps: incomplete")
    s = load("serving-*.json")
    if s is not None:
        for c in s["comparison"]:
            print(f"  serving {c['load']}: continuous/static {c['throughput_ratio']:.2f}x "
                  f"output tok/s, p50 e2e x{c['p50_e2e_ratio']:.2f}")
        for r in s["runs"]:
            if r["metrics"]["completed"] != r["metrics"]["num_requests"]:
                fail(f"serving {r['label']}: {r['metrics']['errors']}")
        if len(s["runs"]) != 2:
            fail("serving: expected a static and a continuous run")
    d = [p for p in glob.glob(str(out / "decode-*.json")) if not p.endswith("-multistep.json")]
    if len(d) != 1:
        fail(f"decode-*.json: {len(d)} files")
    else:
        dec = json.loads(Path(d[0]).read_text())
        for r in dec["results"][0]["decode"]:
            print(f"  decode {dec['results'][0]['mode']} bs={r['batch']}: {r['tok_s']:.1f} "
                  f"tok/s, {r['pct_of_roofline']:.1f}% of roofline")
        print(f"  start-up cold {dec['startup']['cold']['total_s']:.1f} s, warm "
              f"{dec['startup']['warm']['total_s']:.1f} s")
files = [p.name for p in out.iterdir()]
print(f"  {len(files)} files in OUT: {sorted(files)}")
if len(files) > 8:
    fail("more than the 8 files a device call brings back")
sys.exit(0 if ok else 1)
EOF

note "device_check $MODE done in ${SECONDS}s: $( ((FAILED)) && echo FAILED || echo ok)"
echo "--- summary ($SUMMARY)"
cat "$SUMMARY"
return $FAILED
}

checks 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
