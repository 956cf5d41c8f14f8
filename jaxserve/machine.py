"""The machine a benchmark or evaluation ran on, as recorded in its results file (benchmarks/,
`jaxserve eval`). jax is imported only when devices are asked for, so a load generator can
describe its host without starting a backend."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

VERSIONED = ("jax", "jaxlib", "grpcio")


def cpu_model() -> str:
    """The first "model name" of /proc/cpuinfo (platform.processor() where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def describe_machine(devices: bool = True) -> dict[str, Any]:
    """cpu (model name), cores, python, platform, the installed versions of jax, jaxlib and
    grpcio (package metadata), date (UTC, to the second); with `devices` (imports jax) also the
    default backend, the first device's kind and the device count."""
    out: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                           "python": platform.python_version(), "platform": platform.platform()}
    for pkg in VERSIONED:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    if devices:
        import jax

        dev = jax.devices()[0]
        out.update(backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)),
                   num_devices=jax.device_count())
    out["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return out
