"""benchmarks/device_check.sh --dry-run on CPU: every part a device session runs (native kernel
tests, kernels, multi-step and plain decode, serving) at its smallest size on a 2-layer stand-in
of the default model, with the script's own validation of the outputs; then the result files
are read back here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def one(out: Path, pattern: str) -> Path:
    files = sorted(out.glob(pattern))
    assert len(files) == 1, (pattern, [p.name for p in out.iterdir()])
    return files[0]


@pytest.mark.slow
def test_dry_run_writes_every_result(tmp_path, real_gguf_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]

    summary = (out / "summary.log").read_text()
    for part in ("preflight", "kernel-tests", "decode-steps", "kernels", "serving", "decode"):
        assert f"PART {part} ok" in summary, summary
    assert "CHECK outputs ok" in summary and "FAILED" not in summary, summary
    assert (out / "device-check.log").stat().st_size > 0
    assert len(list(out.iterdir())) <= 8  # what a device call brings back

    suite = ET.parse(out / "kernel-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0

    kernels = json.loads(one(out, "kernels-cpu-*-smoke.json").read_text())
    assert kernels["smoke"] and kernels["ceilings"]["read_gb_s"] > 0
    assert all("gb_s" in r or "skipped" in r for r in kernels["decode_attention"])

    steps = json.loads(one(out, "decode-cpu-*-multistep.json").read_text())
    (res,) = steps["multistep"]
    assert res["complete"] and res["mode"] == "bfloat16"
    assert {(r["batch"], r["num_decode_steps"]) for r in res["rows"]} == {(1, 1), (1, 2)}
    for r in res["rows"]:
        assert r["tok_s"] > 0 and r["host_us_per_token"] >= 0 and r["pct_of_roofline"] > 0
    assert res["recompiles_during_rounds"] == 0

    plain = [p for p in out.glob("decode-cpu-*.json") if not p.name.endswith("-multistep.json")]
    assert len(plain) == 1
    dec = json.loads(plain[0].read_text())
    assert dec["results"][0]["decode"][0]["tok_s"] > 0 and dec["startup"]["warm"]["total_s"] > 0

    serving = json.loads(one(out, "serving-cpu-*-quick.json").read_text())
    assert {r["scheduler"] for r in serving["runs"]} == {"static", "continuous"}
    assert all(r["metrics"]["completed"] == r["metrics"]["num_requests"]
               for r in serving["runs"])


def test_unknown_option_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 64 and "usage" in proc.stderr
