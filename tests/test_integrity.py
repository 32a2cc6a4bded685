"""Integrity under concurrency: one download per file, whoever asks for it.

A real daemon, the project's misbehaving mirror on 127.0.0.1, real clients in parallel.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from badmirror import BadMirror, sha256_of
from conftest import QMGR, Env, running_daemon
from ggufmake import make_tiny_gguf

pytestmark = pytest.mark.reliability  # the reliability suite: docs/operations.md


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    d = tmp_path / "mirror" / "test" / "tiny"
    d.mkdir(parents=True)
    make_tiny_gguf(d / "tiny-F16.gguf", ftype="F16", n_vocab=20000)
    return tmp_path / "mirror"


@pytest.fixture
def env(mirror: BadMirror) -> Iterator[Env]:
    yield from running_daemon(QMGR_HF_ENDPOINT=mirror.url, QMGR_STALL_TIMEOUT="5",
                              QMGR_RETRY_BACKOFF="0.05", QMGR_RETRIES="2")


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


def test_a_file_that_changes_between_attempts_is_never_stitched(env: Env, mirror: BadMirror,
                                                                repo: Path) -> None:
    """A URL pull without a digest: the first attempt gets half the file, then the file is
    replaced. The resumed request carries If-Range with the first answer's ETag; the server's
    answer is of another version, so the download starts over and catalogs the new file whole
    (marked unverified: no digest was known before)."""
    src = repo / "test" / "tiny" / "tiny-F16.gguf"
    old = src.read_bytes()
    new = make_tiny_gguf(repo / "new.gguf", ftype="F16", n_vocab=20000, seed=7).read_bytes()
    assert len(new) == len(old) and new != old
    mirror.behavior.update(mode="drop_then_change", times=1, replacement=new)
    url = f"{mirror.url}/test/tiny/resolve/main/tiny-F16.gguf"
    env.qmgr("pull", "--insecure", url)
    [row] = env.json("list")
    import hashlib

    assert row["sha256"] == hashlib.sha256(new).hexdigest() != hashlib.sha256(old).hexdigest()
    assert sha256_of(Path(row["paths"][0])) == row["sha256"]
    assert row["verified"] is False and row["state"] == "ready"
    assert "unverified" in env.qmgr("list").stdout
    gets = [r for r in mirror.behavior["log"] if r["method"] == "GET"]
    assert any(r["headers"].get("If-Range") for r in gets), gets
    # Pinned with --sha256, the same URL is verified.
    env.qmgr("rm", row["ref"])
    env.qmgr("pull", "--insecure", "--sha256", row["sha256"], url)
    assert [r["verified"] for r in env.json("list")] == [True]


def _job_when(env: Env, phase: str) -> dict:
    import time

    for _ in range(300):
        jobs = env.json("jobs")
        if jobs and (jobs[0]["progress"] or {}).get("phase") == phase:
            return jobs[0]
        time.sleep(0.05)
    raise AssertionError(f"no job reached {phase}: {env.json('jobs')}")


def test_cancel_ends_a_job_stuck_on_a_trickling_listing(env: Env, mirror: BadMirror) -> None:
    import time

    mirror.behavior["trickle_listing"] = True  # a byte every 0.2 s: never a stall
    env.qmgr("pull", "--detach", "hf.co/test/tiny:F16")
    job = _job_when(env, "listing")
    env.qmgr("cancel", str(job["id"]))
    for _ in range(100):
        state = next(j for j in env.json("jobs") if j["id"] == job["id"])["state"]
        if state != "running":
            break
        time.sleep(0.05)
    # Cancelled while the listing still trickles: the cancel did not wait for it to end.
    assert state == "cancelled" and mirror.behavior["trickling"] > 0


def test_sigterm_ends_a_daemon_whose_job_is_stuck_in_a_body(env: Env, mirror: BadMirror) -> None:
    import signal
    import time

    mirror.behavior.update(mode="trickle", every_s=0.5)
    env.qmgr("pull", "--detach", "hf.co/test/tiny:F16")
    _job_when(env, "downloading")
    time.sleep(0.5)
    assert env.proc is not None
    assert env.stop(signal.SIGTERM) == 0
    # It stopped long before the body could have ended (2 bytes a second of 2.6 MB).
    assert mirror.bytes_sent < 1000


def test_a_trickling_body_is_too_slow_and_fails_clearly(mirror: BadMirror) -> None:
    mirror.behavior.update(mode="trickle", every_s=0.1)  # 10 bytes/s: never stalls
    for e in running_daemon(QMGR_HF_ENDPOINT=mirror.url, QMGR_STALL_TIMEOUT="1",
                            QMGR_RETRY_BACKOFF="0.05", QMGR_RETRIES="1"):
        r = e.qmgr("pull", "hf.co/test/tiny:F16", check=False, timeout=60)
        assert r.returncode == 1 and "too slow" in r.stderr, r.stderr
        assert e.json("list") == []


def test_a_plain_http_endpoint_redirecting_elsewhere_needs_insecure(env: Env, mirror: BadMirror,
                                                                    repo: Path) -> None:
    """The user's plain-http endpoint (a mirror on the LAN) may be spoken to in http; a
    redirect from it to plain http at another host is followed only with --insecure."""
    other = BadMirror(repo)  # another host:port, serving the same files
    try:
        mirror.behavior["redirect_to"] = other.url
        r = env.qmgr("pull", "hf.co/test/tiny:F16", check=False)
        assert r.returncode == 1 and "another host" in r.stderr and "--insecure" in r.stderr
        assert other.bytes_sent == 0
        env.qmgr("pull", "--insecure", "hf.co/test/tiny:F16")
        assert other.bytes_sent > 0 and [v["state"] for v in env.json("list")] == ["ready"]
    finally:
        other.stop()


def test_recovery_rehashes_a_store_blob_written_since_it_was_verified(env: Env) -> None:
    import os

    env.qmgr("pull", "hf.co/test/tiny:F16")
    [row] = env.json("list")
    blob = Path(row["paths"][0])
    env.stop()
    os.utime(blob, ns=(blob.stat().st_atime_ns, blob.stat().st_mtime_ns + 10**9))  # touched
    env.start()
    assert env.json("status")["recovery"]["rehashed"] == 1
    assert env.json("list")[0]["state"] == "ready"
    env.stop()
    with blob.open("r+b") as f:  # the same size, one byte changed
        f.seek(blob.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    env.start()
    recovery = env.json("status")["recovery"]
    assert recovery["rehashed"] == 1 and len(recovery["quarantined"]) == 1
    assert env.json("list")[0]["state"] == "missing" and not blob.exists()
    env.qmgr("pull", "hf.co/test/tiny:F16")  # fetched again, verified
    assert env.json("list")[0]["state"] == "ready" and sha256_of(blob) == row["sha256"]


def test_an_honest_pull_and_a_lying_one_at_once(env: Env, mirror: BadMirror,
                                                repo: Path) -> None:
    """A URL pull pinned to the same sha256 as a Hub pull, from a server that sends wrong
    bytes, at the same moment: whatever the order, every ready variant's blob hashes to its
    digest, and the lie ends in a mismatch (or finds the honest bytes already there)."""
    src = repo / "test" / "tiny" / "tiny-F16.gguf"
    digest = sha256_of(src)
    liar = BadMirror(repo)
    try:
        liar.behavior.update(mode="wrong_bytes")
        mirror.behavior["rate"] = 4e6
        honest = subprocess.Popen([QMGR, "pull", "hf.co/test/tiny:F16"], env=env.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lying = subprocess.Popen([QMGR, "pull", "--insecure", "--sha256", digest,
                                  f"{liar.url}/test/tiny/resolve/main/tiny-F16.gguf"],
                                 env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        assert honest.wait(120) == 0, honest.communicate()
        code = lying.wait(120)
        err = lying.communicate()[1]
        assert code == 0 or "sha256 mismatch" in err, err
    finally:
        liar.stop()
    rows = env.json("list")
    assert rows and all(r["state"] == "ready" for r in rows)
    for r in rows:
        assert r["sha256"] == digest and sha256_of(Path(r["paths"][0])) == digest
    assert not list((env.home / "store" / "partial").iterdir())


def test_a_client_that_goes_away_is_no_traceback(env: Env, mirror: BadMirror) -> None:
    """A client killed while it follows a pull's events: the pull goes on and ends, and the
    daemon's log has no traceback for the stream it lost."""
    import signal
    import time

    mirror.behavior["rate"] = 2e6
    proc = subprocess.Popen([QMGR, "pull", "hf.co/test/tiny:F16"], env=env.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _job_when(env, "downloading")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for _ in range(200):
        if env.json("jobs")[0]["state"] != "running":
            break
        time.sleep(0.1)
    assert env.json("jobs")[0]["state"] == "succeeded"
    assert "Traceback" not in env.daemon_log()
