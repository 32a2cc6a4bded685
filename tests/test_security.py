"""Who may talk to the daemon: real Unix users, real permission checks by the kernel.

The socket is 0660 in a 0700 directory (a user's daemon) or a 0750 one whose group is the
service's group (the system service). These tests make throwaway system users, run a small
stdlib-only Python snippet as them, and let the kernel decide whether ``connect()`` succeeds.
They need root (to create users and switch to them) and remove every user they create.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Env

TOOLS = ("useradd", "userdel", "groupadd", "groupdel", "setpriv")

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: creates throwaway users and switches to them"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason=f"needs {', '.join(TOOLS)} (util-linux, passwd/shadow-utils)"),
]

# Runs as another user; prints EACCES (or another errno name), or CONNECTED and the status line.
CONNECT = r"""
import errno, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
    raise SystemExit(0)
s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: qmgrd\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print("CONNECTED", data.split(b"\r\n", 1)[0].decode())
"""


class Users:
    """Creates throwaway system users and groups; ``remove()`` deletes them all."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.groups: list[str] = []
        self.python: str | None = None

    def group(self) -> str:
        name = f"qmt-g{uuid.uuid4().hex[:8]}"
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        self.groups.append(name)
        return name

    def user(self, *groups: str) -> str:
        name = f"qmt-u{uuid.uuid4().hex[:8]}"
        cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        if groups:
            cmd += ["--groups", ",".join(groups)]
        subprocess.run([*cmd, name], check=True, capture_output=True)
        self.users.append(name)
        return name

    def run_as(self, user: str, code: str, *args: str) -> str:
        """Run ``code`` with ``user``'s uid, gid and groups (and no others)."""
        python = self._python(user)
        r = subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                            python, "-c", code, *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def _python(self, user: str) -> str:
        # This venv's interpreter may live where other users cannot reach (/root/.pyenv).
        if self.python is None:
            for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
                r = subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}",
                                    "--init-groups", candidate, "-c", "pass"],
                                   capture_output=True)
                if r.returncode == 0:
                    self.python = candidate
                    break
            else:
                pytest.skip("no Python interpreter that a throwaway user may run")
        return self.python

    def remove(self) -> None:
        for name in self.users:
            subprocess.run(["userdel", name], capture_output=True)
        for name in self.groups:
            subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def users() -> Iterator[Users]:
    made = Users()
    try:
        yield made
    finally:
        made.remove()


def connect_as_owner(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: qmgrd\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0].decode()


def chown_socket(env: Env, owner: str | int, group: str | int, dir_mode: int) -> None:
    for path in (env.socket.parent, env.socket):
        shutil.chown(path, owner, group)
    os.chmod(env.socket.parent, dir_mode)


def test_a_user_outside_the_group_cannot_connect_and_the_owner_can(daemon: Env,
                                                                   users: Users) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660
    os.chmod(daemon.root, 0o755)  # the test's own temp root: let others reach run/
    outsider = users.user()

    assert users.run_as(outsider, CONNECT, str(daemon.socket)) == "EACCES"
    assert connect_as_owner(daemon.socket) == "HTTP/1.1 200 OK"

    # The socket's own mode is the second lock: with the directory opened up, still refused.
    os.chmod(daemon.socket.parent, 0o755)
    assert users.run_as(outsider, CONNECT, str(daemon.socket)) == "EACCES"

    # The same snippet does connect once the kernel says yes: here, as the socket's owner
    # (root, running these tests, would pass any check and show nothing). The daemon then
    # asks who it is (SO_PEERCRED): a per-user daemon of root's answers root only.
    owner = users.user()
    chown_socket(daemon, owner, 0, 0o700)
    assert users.run_as(owner, CONNECT, str(daemon.socket)) == "CONNECTED HTTP/1.1 403 Forbidden"
    assert users.run_as(outsider, CONNECT, str(daemon.socket)) == "EACCES"


def test_the_services_group_admits_its_members_only(qenv: Env, users: Users) -> None:
    # The system service's layout: socket dir 0750 and socket 0660, both in the qmgr group.
    qenv.env["QMGR_SYSTEM"] = "1"
    daemon = qenv
    daemon.start()
    os.chmod(daemon.root, 0o755)
    group = users.group()
    member, outsider = users.user(group), users.user()
    chown_socket(daemon, 0, group, 0o750)
    assert users.run_as(member, CONNECT, str(daemon.socket)) == "CONNECTED HTTP/1.1 200 OK"
    assert users.run_as(outsider, CONNECT, str(daemon.socket)) == "EACCES"


def start_and_see(env: Env, socket_dir: Path) -> int | None:
    """Start the daemon; return its exit code, or None if it came up and serves."""
    proc = env.start(wait=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc.returncode
        if (socket_dir / env.socket.name).exists():
            return None
        time.sleep(0.05)
    raise AssertionError("the daemon neither exited nor served:\n" + env.daemon_log())


@pytest.mark.parametrize("kind", ["symlink", "foreign-owner"])
def test_the_daemon_refuses_a_socket_directory_it_does_not_control(qenv: Env, users: Users,
                                                                   kind: str) -> None:
    target = qenv.root / "elsewhere"
    target.mkdir(mode=0o755)
    if kind == "symlink":
        qenv.socket.parent.symlink_to(target)
        socket_dir = target
    else:
        # Made in advance by someone else, world-writable, as in a shared /tmp.
        socket_dir = qenv.socket.parent
        socket_dir.mkdir()
        shutil.chown(socket_dir, users.user())
        os.chmod(socket_dir, 0o777)
    mode_before = stat.S_IMODE(os.stat(target).st_mode)
    code = start_and_see(qenv, socket_dir)
    assert stat.S_IMODE(os.stat(target).st_mode) == mode_before, "it changed a foreign dir"
    assert code == 1, "the daemon served from a directory it does not control"
    assert str(qenv.socket.parent) in qenv.daemon_log(), "and says which directory"
