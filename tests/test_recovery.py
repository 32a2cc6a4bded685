"""Crashes and start-up reconciliation: the catalog stays consistent whatever happens."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import Env
from ggufmake import make_tiny_gguf

from qmgr import settings
from qmgr.client import Client
from qmgr.errors import QmgrError

pytestmark = pytest.mark.reliability  # the reliability suite: docs/operations.md


def _client(env: Env) -> Client:
    return Client(settings.load(env=env.env, autostart=False), timeout=30)


def test_sigkill_at_random_moments_keeps_every_committed_row(qenv: Env, tmp_path: Path) -> None:
    files = [make_tiny_gguf(tmp_path / f"m{i}-Q8_0.gguf", ftype="Q8_0", seed=i, n_vocab=64)
             for i in range(60)]
    rng = random.Random(1234)
    committed: set[str] = set()
    pending = list(files)
    for _round in range(6):
        qenv.start()
        client = _client(qenv)
        stop = threading.Event()

        def importer(client: Client = client, stop: threading.Event = stop) -> None:
            while pending and not stop.is_set():
                f = pending[0]
                try:
                    out = client.post("/v1/imports",
                                      {"paths": [str(f)], "copy": rng.random() < 0.5})
                except (OSError, QmgrError):
                    return  # the daemon died under us: this import may or may not be in
                result = out["results"][0]
                assert "error" not in result, result
                committed.add(result["variant"]["sha256"])
                pending.pop(0)

        t = threading.Thread(target=importer)
        t.start()
        time.sleep(rng.uniform(0.1, 1.5))
        assert qenv.proc is not None
        qenv.proc.send_signal(signal.SIGKILL)
        qenv.proc.wait()
        stop.set()
        t.join()
        stored = {row[0] for row in qenv.catalog_rows("SELECT sha256 FROM variants")}
        assert committed <= stored, "a row the client saw committed was lost"
    qenv.start()
    rows = qenv.json("list")
    assert {r["sha256"] for r in rows} >= committed
    assert all(r["state"] == "ready" for r in rows)
    # No half-copied file is left. A blob without a row (killed between publishing the bytes
    # and committing the row) is kept only if its bytes match its name: a later import of the
    # same bytes adopts it.
    import hashlib

    blobs = qenv.home / "store" / "blobs"
    db_paths = {Path(p).name for r in rows for p in r["paths"]}
    for orphan in {p.name for p in blobs.iterdir()} - db_paths:
        digest = hashlib.sha256((blobs / orphan).read_bytes()).hexdigest()
        assert orphan == f"sha256-{digest}", orphan
    assert list((qenv.home / "store" / "partial").iterdir()) == []
    assert len(committed) > 0


def test_reconcile_missing_restored_modified(qenv: Env, tmp_path: Path) -> None:
    a = make_tiny_gguf(tmp_path / "a-Q8_0.gguf", ftype="Q8_0", seed=1)
    b = make_tiny_gguf(tmp_path / "b-Q8_0.gguf", ftype="Q8_0", seed=2)
    qenv.start()
    qenv.qmgr("import", str(a), str(b))
    qenv.stop()
    st = a.stat()
    saved = a.read_bytes()
    a.unlink()
    with b.open("ab") as f:
        f.write(b"\0" * 32)
    qenv.start()
    states = {r["ref"]: r["state"] for r in qenv.json("list")}
    assert states == {"a:Q8_0": "missing", "b:Q8_0": "modified"}
    r = qenv.qmgr("path", "a:Q8_0", check=False)
    assert r.returncode == 1 and "missing" in r.stderr
    qenv.stop()
    a.write_bytes(saved)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    qenv.start()
    states = {r["ref"]: r["state"] for r in qenv.json("list")}
    assert states["a:Q8_0"] == "ready"
    assert qenv.qmgr("path", "a:Q8_0").stdout.strip() == str(a)


def test_orphans_and_partials(qenv: Env, tmp_path: Path) -> None:
    import hashlib

    qenv.start()
    qenv.stop()
    store = qenv.home / "store"
    good = b"some verified bytes"
    good_name = store / "blobs" / f"sha256-{hashlib.sha256(good).hexdigest()}"
    good_name.write_bytes(good)
    liar = store / "blobs" / f"sha256-{'0' * 64}"
    liar.write_bytes(b"not what the name says")
    junk = store / "blobs" / "../blobs/whatever"
    junk.write_bytes(b"x")
    partial = store / "partial" / "abc.partial"
    partial.write_bytes(b"half")
    qenv.start()
    status = qenv.json("status")
    assert status["recovery"]["orphans_kept"] == 1
    assert good_name.exists()
    assert not liar.exists() and (store / "quarantine" / liar.name).exists()
    assert not (store / "blobs" / "whatever").exists()
    assert not partial.exists()
