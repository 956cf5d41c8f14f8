"""What `pip install .` ships: every package in pyproject.toml's hand-kept list, configs/ as
package data, and a wheel that runs `jaxserve generate` with the default model from outside the
source tree (configs read from the installed copy, weights from $JAXSERVE_CHECKPOINTS)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "data" / "golden_smollm2.json").read_text())
FRANCE = GOLDEN["generate"][0]  # "The capital of France is", greedy: " Paris." first
TIMEOUT_S = 300


def _pyproject_packages() -> tuple[set[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools["package-dir"]


def test_pyproject_lists_every_package_and_maps_configs():
    listed, package_dir = _pyproject_packages()
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for top in ("jaxserve", "pallas_kernels") for p in (ROOT / top).rglob("__init__.py")}
    assert listed == on_disk | {"jaxserve.configs"}
    assert package_dir == {"jaxserve.configs": "configs"}


def _copy_sources(dst: Path) -> None:
    """The checkout's files as git sees them (tracked, and untracked but not ignored), so the
    build never writes build/ or *.egg-info into the checkout, and stale build/ output from an
    earlier build cannot leak into the wheel."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", "checkpoints"))
        return
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_wheel_runs_generate_outside_the_source_tree(tmp_path, real_gguf_path):
    src = tmp_path / "src"
    _copy_sources(src)
    # The build backend from this environment when it has one (offline); else pip's isolated
    # build, which fetches setuptools from the index.
    isolation = (["--no-build-isolation"] if importlib.util.find_spec("setuptools") else [])
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *isolation,
          "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist")])
    (wheel,) = (tmp_path / "dist").glob("jaxserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    shipped = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.json")}
    assert {f"jaxserve/configs/{n}" for n in shipped} <= names
    sources = {str(p.relative_to(ROOT)) for top in ("jaxserve", "pallas_kernels")
               for p in (ROOT / top).rglob("*.py")}
    assert sources <= names, sorted(sources - names)

    # The venv sees the system site-packages (jax and the other dependencies, and possibly an
    # editable jaxserve: setuptools' editable finder is appended to sys.meta_path, so it only
    # answers for what the venv's own site-packages, earlier on sys.path, does not hold).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    _run([str(venv / "bin" / "pip"), "install", "--no-deps", "--force-reinstall",
          "--disable-pip-version-check", "-q", str(wheel)])

    elsewhere = tmp_path / "elsewhere"  # cwd outside the checkout: nothing importable from it
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "JAXSERVE_CONFIGS", "PYTHONSAFEPATH")}
    env.update(JAX_PLATFORMS="cpu", JAXSERVE_CHECKPOINTS=str(real_gguf_path.parent.parent),
               HOME=str(tmp_path / "home"))  # no user cache to fall back on
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import json, jaxserve.cli, jaxserve.config as c, jaxserve.loading.fetch as f;"
                  "print(json.dumps([jaxserve.cli.__file__, str(c.CONFIGS_DIR), c.SOURCE_ROOT,"
                  " str(f.default_cache_dir())]))"], cwd=elsewhere, env=env)
    cli_file, configs_dir, source_root, cache_dir = json.loads(where.stdout)
    site = venv.resolve()
    assert Path(cli_file).resolve().is_relative_to(site), cli_file
    assert Path(configs_dir).resolve().is_relative_to(site), configs_dir
    assert source_root is None
    assert Path(cache_dir) == real_gguf_path.parent.parent

    proc = _run([str(venv / "bin" / "jaxserve"), "generate", "--prompt", FRANCE["prompt"],
                 "--max_tokens", "2"], cwd=elsewhere, env=env)
    assert proc.stdout.strip() == "Paris.", proc.stdout  # FRANCE's first two greedy tokens
    assert "[2 tokens, finish_reason=length" in proc.stderr, proc.stderr
    assert not (tmp_path / "home" / ".cache" / "jaxserve" / "checkpoints").exists()
