"""Integrity under concurrency: one download per file, whoever asks for it.

A real daemon, the project's misbehaving mirror on 127.0.0.1, real clients in parallel.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from badmirror import BadMirror, sha256_of
from conftest import QMGR, Env
from ggufmake import make_tiny_gguf


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    d = tmp_path / "mirror" / "test" / "tiny"
    d.mkdir(parents=True)
    make_tiny_gguf(d / "tiny-F16.gguf", ftype="F16", n_vocab=20000)
    return tmp_path / "mirror"


@pytest.fixture
def mirror(repo: Path) -> Iterator[BadMirror]:
    server = BadMirror(repo)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def env(mirror: BadMirror) -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="qm-", dir="/tmp"))
    e = Env(root)
    e.env.update(QMGR_HF_ENDPOINT=mirror.url, QMGR_STALL_TIMEOUT="5",
                 QMGR_RETRY_BACKOFF="0.05", QMGR_RETRIES="2")
    try:
        e.start()
        yield e
    finally:
        e.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_eight_clients_pulling_one_variant_share_one_download(env: Env, mirror: BadMirror,
                                                              repo: Path) -> None:
    src = repo / "test" / "tiny" / "tiny-F16.gguf"
    mirror.behavior["rate"] = 4e6  # slow enough that all eight overlap
    procs = [subprocess.Popen([QMGR, "pull", "hf.co/test/tiny:F16"], env=env.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert all(code == 0 for code, _out, _err in results), results
    assert {out.strip() for _code, out, _err in results} == {"tiny:F16"}
    rows = env.json("list")
    assert [r["ref"] for r in rows] == ["tiny:F16"]
    assert sha256_of(Path(rows[0]["paths"][0])) == sha256_of(src) == rows[0]["sha256"]
    # One body's worth of bytes left the server (the header reads of `pull` are small).
    assert mirror.bytes_sent < 1.5 * src.stat().st_size, mirror.bytes_sent
    assert not list((env.home / "store" / "partial").iterdir())
