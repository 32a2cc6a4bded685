"""The API refuses what it should: callers by their peer uid, paths they could not read,
bodies and ids no row can have, a full disk as `no_space`.

Real daemons on temporary sockets; callers of other uids are real processes that drop to
that uid before they connect (the tests run as root, as CI does; they skip otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Env, running_daemon
from ggufmake import make_tiny_gguf

pytestmark = pytest.mark.reliability  # the reliability suite: docs/operations.md
needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="switching to other uids needs root (CI runs as root)")
STRANGER = 65533  # a uid with no account: no group of the daemon's

CALL = r"""
import json, os, socket, sys
uid, gid, groups, path, method, target, body = json.loads(sys.argv[1])
os.setgroups(groups); os.setgid(gid); os.setuid(uid)
s = socket.socket(socket.AF_UNIX)
s.connect(path)
payload = body.encode()
s.sendall(f"{method} {target} HTTP/1.1\r\nHost: qmgrd\r\nConnection: close\r\n"
          f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
          + payload)
data = b""
while chunk := s.recv(65536):
    data += chunk
head, _, rest = data.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "body": rest.decode(errors="replace")}))
"""


def call_as(uid: int, gid: int, sock: Path, method: str, target: str, body: object = None,
            groups: list[int] | None = None) -> tuple[int, dict]:
    """A request from a process of another uid."""
    arg = json.dumps([uid, gid, groups or [], str(sock), method, target,
                      "" if body is None else json.dumps(body)])
    r = subprocess.run([sys.executable, "-c", CALL, arg], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    text = out["body"]
    if "\r\n" in text and not text.lstrip().startswith("{"):  # chunked: one chunk
        text = text.split("\r\n", 1)[1].rsplit("\r\n0\r\n", 1)[0]
    return out["status"], json.loads(text)


def _open_up(env: Env) -> None:
    """The socket's directory and socket opened to everyone, as by a mistaken chmod: the peer
    check must hold alone."""
    os.chmod(env.root, 0o755)
    os.chmod(env.socket.parent, 0o777)
    os.chmod(env.socket, 0o777)


@needs_root
def test_a_per_user_daemon_answers_its_user_and_root_only(daemon: Env) -> None:
    """The daemon runs as root here (as CI does): a per-user daemon of root's answers root
    only, whoever else can reach its socket."""
    _open_up(daemon)
    status, body = call_as(STRANGER, STRANGER, daemon.socket, "GET", "/v1/variants")
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert f"not uid {STRANGER}" in body["error"]["message"]
    status, body = call_as(STRANGER, 0, daemon.socket, "GET", "/v1/variants")  # root's group
    assert status == 403, "a per-user daemon does not serve its group"
    status, _ = call_as(0, 0, daemon.socket, "GET", "/v1/variants")
    assert status == 200


@pytest.fixture
def system_daemon(tmp_path: Path) -> Iterator[Env]:
    """A daemon in system mode, running as root (its group: root's, gid 0)."""
    yield from running_daemon(QMGR_SYSTEM="1")


@needs_root
def test_the_system_service_reads_only_what_its_caller_could(system_daemon: Env) -> None:
    _open_up(system_daemon)
    tmp_path = system_daemon.root / "files"  # under /tmp, every folder open to searching
    tmp_path.mkdir(mode=0o755)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = make_tiny_gguf(private / "secret-Q8_0.gguf", ftype="Q8_0")
    shadow_like = tmp_path / "shadow"
    shadow_like.write_text("root:$6$secrethash:19000:0:99999:7:::\n")
    os.chmod(shadow_like, 0o600)
    public = make_tiny_gguf(tmp_path / "public-Q8_0.gguf", ftype="Q8_0")
    os.chmod(public, 0o644)
    member = dict(uid=STRANGER, gid=0)  # in the daemon's group: may use it

    status, body = call_as(**member, sock=system_daemon.socket, method="POST",
                           target="/v1/imports",
                           body={"paths": [str(secret), str(shadow_like), str(public),
                                           str(tmp_path / "nothing-here")]})
    assert status == 200, body
    secret_r, shadow_r, public_r, missing_r = body["results"]
    for r in (secret_r, shadow_r, missing_r):
        assert r["error"]["code"] == "forbidden", r
    assert "root:" not in json.dumps(body)  # not a byte of the file in any message
    # A path that does not exist answers as one the caller may not read: nothing is revealed.
    assert missing_r["error"]["message"].split(":")[1:] == \
        secret_r["error"]["message"].split(":")[1:]
    assert public_r.get("created") is True, public_r
    status, body = call_as(**member, sock=system_daemon.socket, method="POST",
                           target="/v1/watches", body={"path": str(private)})
    assert status == 403
    # Root itself may read anything.
    status, body = call_as(0, 0, system_daemon.socket, "POST", "/v1/imports",
                           {"paths": [str(secret)]})
    assert status == 200 and body["results"][0]["created"] is True
    # Not in the group: not served at all.
    status, body = call_as(STRANGER, STRANGER, system_daemon.socket, "GET", "/v1/variants")
    assert status == 403


@pytest.mark.parametrize("method,target,body,status", [
    ("GET", f"/v1/jobs/{2**70}", None, 404),
    ("POST", f"/v1/jobs/{2**70}/cancel", None, 404),
    ("GET", "/v1/variants/" + "x" * 5000, None, 400),
    ("GET", "/v1/variants/%ED%A0%80", None, 404),  # a lone surrogate: replaced, not found
    ("POST", "/v1/imports", "[" * 100_000 + "]" * 100_000, 400),  # nested too deep
    ("POST", "/v1/pulls", {"ref": "x" * 10_000}, 400),
    ("POST", "/v1/imports", {"paths": ["\udc80"]}, 400),
])
def test_edge_cases_answer_4xx_never_500(daemon: Env, method: str, target: str, body: object,
                                         status: int) -> None:
    import socket as socketmod

    payload = (body if isinstance(body, str) else json.dumps(body)) if body is not None else ""
    raw = payload.encode("utf-8", "surrogatepass")
    with socketmod.socket(socketmod.AF_UNIX) as s:
        s.connect(str(daemon.socket))
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: qmgrd\r\nConnection: close\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
                  .encode() + raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    got = int(data.split()[1])
    assert got == status, data[:400]
    assert "Traceback" not in daemon.daemon_log()


def test_a_body_too_large_is_refused_before_it_is_read(daemon: Env) -> None:
    import socket as socketmod

    with socketmod.socket(socketmod.AF_UNIX) as s:
        s.connect(str(daemon.socket))
        s.sendall(b"POST /v1/imports HTTP/1.1\r\nHost: qmgrd\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{")
        data = s.recv(65536)
    assert int(data.split()[1]) == 413


@needs_root
def test_a_full_disk_is_no_space_and_loses_nothing(tmp_path: Path) -> None:
    """QMGR_HOME on a 6 MiB tmpfs; `import --copy` of an 8 MB model runs out of space while
    copying: a clear `no_space` error, no partial file left, the catalog still answers."""
    home_fs = tmp_path / "fs"
    home_fs.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(home_fs)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    root = Path(tempfile.mkdtemp(prefix="qm-", dir="/tmp"))
    env = Env(root)
    env.env["QMGR_HOME"] = str(home_fs / "home")
    env.home = home_fs / "home"
    try:
        env.start()
        big = make_tiny_gguf(tmp_path / "big-F16.gguf", ftype="F16", n_vocab=60000)
        assert big.stat().st_size > 7 << 20
        r = env.qmgr("import", "--copy", str(big), check=False)
        assert r.returncode == 1 and "no space left" in r.stderr, r.stderr
        assert "internal" not in r.stderr
        assert env.json("list") == []
        assert not list((env.home / "store" / "partial").iterdir())
        small = make_tiny_gguf(tmp_path / "small-Q8_0.gguf", ftype="Q8_0")
        env.qmgr("import", "--copy", str(small))  # space is back: it works
        assert [v["state"] for v in env.json("list")] == ["ready"]
    finally:
        env.stop()
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["umount", str(home_fs)], capture_output=True)
