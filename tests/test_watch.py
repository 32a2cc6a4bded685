"""Watched folders: real daemon, real files appearing and vanishing, real inotify events.

The fixture sets QMGR_WATCH_SETTLE=0.5: a file is cataloged once its size has held for half a
second. Waits poll ``qmgr list --json`` up to a deadline; negative checks ("not cataloged") wait
for a sentinel file written after the one that must be ignored instead of sleeping.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import Env
from ggufmake import make_tiny_gguf

from qmgr import gguf
from qmgr.errors import GGUFError

T = TypeVar("T")

SETTLE = 0.5  # QMGR_WATCH_SETTLE in conftest
DEADLINE = 30.0  # generous: two slow cores, other test files running beside us


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = DEADLINE) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def rows_by_path(env: Env) -> dict[str, dict[str, Any]]:
    return {row["paths"][0]: row for row in env.json("list")}


def wait_cataloged(env: Env, *paths: Path) -> dict[str, dict[str, Any]]:
    wanted = {str(p) for p in paths}

    def probe() -> dict[str, dict[str, Any]] | None:
        rows = rows_by_path(env)
        return rows if wanted <= set(rows) else None

    return wait_for(f"{sorted(wanted)} to be cataloged", probe)


def wait_state(env: Env, path: Path, state: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        row = rows_by_path(env).get(str(path))
        return row if row is not None and row["state"] == state else None

    return wait_for(f"{path.name} to be {state}", probe)


def watch(env: Env, folder: Path) -> None:
    out = env.json("watch", "add", str(folder))
    assert out["path"] == str(folder.resolve())


def refused(env: Env) -> list[dict[str, str]]:
    return env.json("watch", "list")["refused"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder(tmp_path: Path, name: str = "models") -> Path:
    d = tmp_path / name
    d.mkdir()
    return d.resolve()


def test_a_file_written_slowly_is_cataloged_once_it_stops_growing(daemon: Env,
                                                                 tmp_path: Path) -> None:
    models = folder(tmp_path)
    watch(daemon, models)
    assert [f["path"] for f in daemon.json("watch", "list")["folders"]] == [str(models)]
    data = make_tiny_gguf(tmp_path / "src.gguf", ftype="Q8_0").read_bytes()
    target = models / "slow-Q8_0.gguf"
    # Five chunks 0.3 s apart: longer in all than the settle time, each pause longer than the
    # watcher's poll. Cataloging on first sight, or on one unchanged poll, would read a
    # truncated file (refused, or cataloged with the wrong bytes).
    chunks = [data[i:i + len(data) // 5 + 1] for i in range(0, len(data), len(data) // 5 + 1)]
    pauses = []
    with open(target, "wb") as f:
        for i, chunk in enumerate(chunks):
            if i:
                t0 = time.monotonic()
                time.sleep(0.3)
                pauses.append(time.monotonic() - t0)
            f.write(chunk)
            f.flush()
    if max(pauses) >= SETTLE:
        pytest.skip(f"the machine stalled mid-write (pauses {pauses} s, settle {SETTLE} s): "
                    "a pause that long makes the test prove nothing")
    rows = wait_cataloged(daemon, target)
    assert len(rows) == 1, rows
    row = rows[str(target)]
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert row["size"] == len(data) and row["state"] == "ready" and row["origin"] == "imported"
    assert row["ref"] == "slow:Q8_0" and row["quant_type"] == "Q8_0"
    assert target.read_bytes() == data, "cataloged in place, not moved or rewritten"
    assert refused(daemon) == []


def test_files_already_there_are_cataloged_and_hidden_or_other_names_ignored(
        daemon: Env, tmp_path: Path) -> None:
    models = folder(tmp_path)
    a = make_tiny_gguf(models / "alpha-Q8_0.gguf", ftype="Q8_0", seed=1)
    (models / "sub").mkdir()
    b = make_tiny_gguf(models / "sub" / "beta-F16.gguf", ftype="F16", seed=2)
    # Valid GGUF bytes under names a downloader uses while writing: never cataloged.
    hidden = make_tiny_gguf(models / ".gamma-Q8_0.gguf", ftype="Q8_0", seed=3)
    make_tiny_gguf(models / "delta-Q8_0.gguf.part", ftype="Q8_0", seed=4)
    (models / ".cache").mkdir()
    make_tiny_gguf(models / ".cache" / "epsilon-Q8_0.gguf", ftype="Q8_0", seed=5)
    (models / "README.txt").write_text("not a model\n")

    watch(daemon, models)
    rows = wait_cataloged(daemon, a, b)
    # The ignored files were seen in the same scan as a and b: had they counted, they would
    # have been cataloged (or refused) by now.
    assert set(rows) == {str(a), str(b)}
    assert rows[str(b)]["ref"] == "beta:F16" and rows[str(b)]["sha256"] == sha256(b)
    assert refused(daemon) == []

    # The downloader's last step: rename to the final name. Now it counts.
    final = models / "gamma-Q8_0.gguf"
    os.rename(hidden, final)
    rows = wait_cataloged(daemon, final)
    assert set(rows) == {str(a), str(b), str(final)}
    assert rows[str(final)]["ref"] == "gamma:Q8_0"


def test_a_vanished_file_is_missing_and_ready_again_when_it_returns(daemon: Env,
                                                                   tmp_path: Path) -> None:
    models = folder(tmp_path)
    outside = folder(tmp_path, "elsewhere")
    a = make_tiny_gguf(models / "one-Q8_0.gguf", ftype="Q8_0", seed=1)
    b = make_tiny_gguf(models / "two-Q8_0.gguf", ftype="Q8_0", seed=2)
    watch(daemon, models)
    wait_cataloged(daemon, a, b)

    a.unlink()
    os.rename(b, outside / b.name)  # moved away: gone from the folder just the same
    assert wait_state(daemon, a, "missing")["ref"] == "one:Q8_0"
    wait_state(daemon, b, "missing")

    # Moved back with the size and modification time it was verified with: ready again,
    # as the same variant (not a second one).
    os.rename(outside / b.name, b)
    row = wait_state(daemon, b, "ready")
    assert row["ref"] == "two:Q8_0"
    assert sorted(r["ref"] for r in daemon.json("list")) == ["one:Q8_0", "two:Q8_0"]


def test_reading_a_cataloged_file_does_not_make_the_daemon_hash_it_again(
        daemon: Env, tmp_path: Path) -> None:
    # Opening a file raises inotify events too (a backend loading the model, the watcher's
    # own hashing). Counting what the daemon read shows whether those re-queue the file.
    assert daemon.proc is not None
    io = Path(f"/proc/{daemon.proc.pid}/io")
    if not io.exists():
        pytest.skip("no /proc/PID/io here: cannot count the bytes the daemon reads")
    models = folder(tmp_path)
    big = make_tiny_gguf(models / "big-Q8_0.gguf", ftype="Q8_0", n_embd=256, n_ff=512)
    size = big.stat().st_size
    watch(daemon, models)
    wait_cataloged(daemon, big)

    def bytes_read() -> int:
        return int(dict(line.split(": ") for line in io.read_text().splitlines())["rchar"])

    before = bytes_read()
    for _ in range(2):
        with open(big, "rb") as f:
            while f.read(1 << 16):
                pass
    time.sleep(4 * SETTLE)  # long enough for a re-queued file to settle and be hashed twice
    read = bytes_read() - before
    assert read < size, f"the daemon read {read} bytes of a {size}-byte file it had cataloged"


def test_links_out_bad_names_and_invalid_files_are_refused(daemon: Env,
                                                           tmp_path: Path) -> None:
    models = folder(tmp_path)
    outside = folder(tmp_path, "outside")
    watch(daemon, models)

    secret = make_tiny_gguf(outside / "secret-Q8_0.gguf", ftype="Q8_0", seed=1)
    link = models / "link-Q8_0.gguf"
    link.symlink_to(secret)
    newline = models / "two\nlines-Q8_0.gguf"
    make_tiny_gguf(newline, ftype="Q8_0", seed=2)
    truncated = models / "cut-Q8_0.gguf"
    whole = make_tiny_gguf(tmp_path / "whole.gguf", ftype="Q8_0", seed=3).read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    text = models / "notes.gguf"
    text.write_text("hello\n")
    sentinel = make_tiny_gguf(models / "fine-Q8_0.gguf", ftype="Q8_0", seed=4)

    rows = wait_cataloged(daemon, sentinel)
    # The sentinel settled after every bad file was written, so all were judged by now.
    reasons = wait_for("four refusals", lambda: refused(daemon) if len(refused(daemon)) >= 4
                       else None)
    assert set(rows) == {str(sentinel)}, "nothing but the good file is cataloged"
    by_path = {r["path"]: r["reason"] for r in reasons}
    assert len(reasons) == 4, f"one entry per refused file: {reasons}"
    assert f"leads outside {models}" in by_path[str(link)]
    assert str(secret) in by_path[str(link)]
    assert "control characters" in by_path[str(newline)]
    for bad in (truncated, text):
        try:
            gguf.inspect(bad)
        except GGUFError as e:
            assert by_path[str(bad)] == e.message, "the reader's own message reaches the user"
        else:
            raise AssertionError(f"{bad.name} was meant to be invalid")
    assert daemon.proc is not None and daemon.proc.poll() is None

    # A refused file that is fixed is cataloged.
    truncated.write_bytes(whole)
    rows = wait_cataloged(daemon, truncated)
    assert rows[str(truncated)]["sha256"] == hashlib.sha256(whole).hexdigest()


def test_watch_rm_stops_watching(daemon: Env, tmp_path: Path) -> None:
    first, second = folder(tmp_path, "first"), folder(tmp_path, "second")
    watch(daemon, first)
    watch(daemon, second)
    r = daemon.qmgr("watch", "add", str(first), check=False)
    assert r.returncode == 1 and "already watching" in r.stderr
    kept = make_tiny_gguf(first / "kept-Q8_0.gguf", ftype="Q8_0", seed=1)
    wait_cataloged(daemon, kept)

    out = daemon.qmgr("watch", "rm", str(first)).stdout
    assert f"no longer watching {first}" in out
    assert [f["path"] for f in daemon.json("watch", "list")["folders"]] == [str(second)]
    r = daemon.qmgr("watch", "rm", str(first), check=False)
    assert r.returncode == 1 and "not watching" in r.stderr

    late = make_tiny_gguf(first / "late-Q8_0.gguf", ftype="Q8_0", seed=2)
    kept.unlink()
    sentinel = make_tiny_gguf(second / "sentinel-Q8_0.gguf", ftype="Q8_0", seed=3)
    rows = wait_cataloged(daemon, sentinel)
    assert str(late) not in rows
    # Its variants stay, and nobody watches their files any more.
    assert rows[str(kept)]["state"] == "ready"


def test_watched_folders_survive_a_restart(daemon: Env, tmp_path: Path) -> None:
    models = folder(tmp_path)
    watch(daemon, models)
    before = make_tiny_gguf(models / "before-Q8_0.gguf", ftype="Q8_0", seed=1)
    wait_cataloged(daemon, before)

    assert daemon.stop() == 0
    during = make_tiny_gguf(models / "during-Q8_0.gguf", ftype="Q8_0", seed=2)
    before.unlink()
    daemon.start()

    assert [f["path"] for f in daemon.json("watch", "list")["folders"]] == [str(models)]
    rows = wait_cataloged(daemon, during)
    assert rows[str(during)]["state"] == "ready"
    assert rows[str(before)]["state"] == "missing"
    # And the folder is watched live again, not only scanned at start.
    after = make_tiny_gguf(models / "after-Q8_0.gguf", ftype="Q8_0", seed=3)
    rows = wait_cataloged(daemon, after)
    assert sorted(r["ref"] for r in rows.values()) == ["after:Q8_0", "before:Q8_0",
                                                       "during:Q8_0"]
