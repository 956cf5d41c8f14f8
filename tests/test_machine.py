"""One machine description (jaxserve/machine.py) behind every results file: each benchmark
still writes every machine field its committed results files have, and describing the host
without devices does not import jax."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.machine import describe_machine

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _writer(name: str):
    if name.startswith("kernels-"):
        from benchmarks import kernels

        return kernels.machine
    if name.startswith("serving-"):
        from benchmarks import serving

        return serving.machine
    if name.startswith(("ablation-", "decode-", "quality-", "speculative-", "train-draft-")):
        return describe_machine
    raise AssertionError(f"no known benchmark writes {name}")


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_results_files_keep_their_machine_fields(path):
    saved = json.loads(path.read_text())["machine"]
    now = _writer(path.name)()
    assert set(saved) <= set(now), sorted(set(saved) - set(now))
    for key in ("cpu", "cores", "cpu_model", "cpu_cores", "backend", "jax", "python"):
        if key in saved:
            assert type(now[key]) is type(saved[key]), key


def test_host_only_description_does_not_import_jax():
    code = ("import sys, json; from jaxserve.machine import describe_machine; "
            "m = describe_machine(devices=False); assert 'jax' not in sys.modules; "
            "print(json.dumps(m))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["cores"] >= 1 and m["cpu"] and "backend" not in m
    assert m["date"].endswith("Z")
