"""qmgr under systemd: the unit files, their sandbox, install, socket activation, sd_notify.

systemd is not PID 1 where these run, so nothing here starts a unit. What is checked instead:
systemd's own tools judge the unit files (``systemd-analyze verify`` and ``security``), the
install writes and enables them in an image root with the real ``systemctl --root``, the daemon
serves a socket handed over by ``systemd-socket-activate``, and a datagram socket standing in
for systemd's ``NOTIFY_SOCKET`` receives what the daemon tells the service manager.
"""

from __future__ import annotations

import array
import fcntl
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from conftest import QMGRD, Env

from qmgr import service
from qmgr.catalog.db import SCHEMA_HEAD

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
MAX_EXPOSURE = 2.0
T = TypeVar("T")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian: apt-get install systemd)")
    return path


def rendered_units(dest: Path, names: list[str], qmgrd: Path = Path(QMGRD)) -> list[Path]:
    """The unit files as `qmgr service install` writes them, with the real qmgrd."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        path = dest / Path(name).name
        path.write_text(service.render((UNITS / name).read_text(), qmgrd))
        out.append(path)
    return out


def verify(paths: list[Path], *, user: bool, tmp: Path) -> str:
    env = dict(os.environ)
    args = [need("systemd-analyze")]
    if user:
        args.append("--user")
        # The user manager that verify simulates needs a runtime directory.
        env["XDG_RUNTIME_DIR"] = str(tmp / "xdg-run")
        Path(env["XDG_RUNTIME_DIR"]).mkdir(exist_ok=True)
    r = subprocess.run([*args, "verify", *map(str, paths)], capture_output=True, text=True,
                       env=env, cwd=tmp, timeout=120)
    output = r.stdout + r.stderr
    assert r.returncode == 0, output
    # verify exits 0 on unknown keys and bad values: it only says so. Lines about other units
    # on this machine are not ours to judge.
    return "\n".join(line for line in output.splitlines() if "qmgr" in line)


# -- the unit files ------------------------------------------------------------------------


def test_system_units_verify(tmp_path: Path) -> None:
    paths = rendered_units(tmp_path / "system",
                           ["qmgr.service", "qmgr.socket", "qmgr-api.socket"])
    assert verify(paths, user=False, tmp=tmp_path) == ""


def test_user_units_verify(tmp_path: Path) -> None:
    paths = rendered_units(tmp_path / "user",
                           ["user/qmgr.service", "user/qmgr.socket", "user/qmgr-api.socket"])
    assert verify(paths, user=True, tmp=tmp_path) == ""


def test_the_api_socket_verifies_at_the_configured_address(tmp_path: Path) -> None:
    [path] = rendered_units(tmp_path / "api", ["qmgr-api.socket"])
    path.write_text(service.render_listen(path.read_text(), "[::1]:8080"))
    paths = [path, *rendered_units(tmp_path / "api", ["qmgr.service", "qmgr.socket"])]
    assert verify(paths, user=False, tmp=tmp_path) == ""
    assert re.findall(r"^ListenStream=.*$", path.read_text(), flags=re.M) == [
        "ListenStream=[::1]:8080"]


def test_render_quotes_a_path_systemd_would_misread(tmp_path: Path) -> None:
    # A space or ; would split the command line, a % would be a specifier, a $ is taken as it
    # is: systemd itself must read back the program we meant.
    odd = tmp_path / "my tools; 100% $HOME" / "qmgrd"
    odd.parent.mkdir()
    odd.write_text("#!/bin/sh\n")
    odd.chmod(0o755)
    paths = rendered_units(tmp_path / "odd", ["qmgr.service", "qmgr.socket"], qmgrd=odd)
    text = paths[0].read_text()
    assert 'ExecStart="' in text and "100%%" in text
    assert verify(paths, user=False, tmp=tmp_path) == ""
    paths[0].write_text(text.replace(service.exec_path(odd), str(odd)))  # unquoted
    with pytest.raises(AssertionError):
        verify(paths, user=False, tmp=tmp_path)
    # Quotes and backslashes systemd refuses in a program's name: a clear error, not a unit
    # that fails at boot.
    from qmgr.errors import QmgrError

    with pytest.raises(QmgrError, match="systemd cannot run a program"):
        service.exec_path(Path('/opt/"q"/bin/qmgrd'))


def test_service_exposure_is_at_most_2() -> None:
    r = subprocess.run([need("systemd-analyze"), "security", "--offline=yes", "--no-pager",
                        str(UNITS / "qmgr.service")], capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for qmgr\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


HARDENING = {
    "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem",
    "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectControlGroups", "RestrictAddressFamilies", "RestrictNamespaces",
    "LockPersonality", "SystemCallFilter", "SystemCallArchitectures", "DevicePolicy",
    "DeviceAllow", "UMask", "RestrictSUIDSGID", "RestrictRealtime", "ProtectClock",
    "ProtectHostname", "ProtectProc", "PrivateMounts", "KeyringMode", "RemoveIPC",
}


# Incompatible with the daemon's work, and a word of the reason the unit gives.
LEFT_OUT = {"MemoryDenyWriteExecute": "JIT", "PrivateUsers": "SO_PEERCRED",
            "ProcSubset": "/proc/meminfo", "PrivateDevices": "GPU"}


@pytest.mark.parametrize("name", ["qmgr.service", "user/qmgr.service"])
def test_every_hardening_line_is_explained(name: str) -> None:
    lines = (UNITS / name).read_text().splitlines()
    seen = set()
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0]
        if key not in HARDENING:
            continue
        seen.add(key)
        # Its comment is right above it, or above the lines of its group.
        j = i - 1
        while j >= 0 and lines[j] and not lines[j].startswith("#"):
            j -= 1
        assert j >= 0 and lines[j].startswith("#"), f"{name}: {line} has no comment"
    if name == "qmgr.service":
        assert seen == HARDENING
    # What is left out on purpose is not set, and the comments say why.
    comments = " ".join(line for line in lines if line.startswith("#"))
    left_out = LEFT_OUT if name == "qmgr.service" else {"MemoryDenyWriteExecute": "JIT"}
    for key, reason in left_out.items():
        assert not any(line.startswith(f"{key}=") for line in lines), key
        assert key in comments and reason in comments, key


def test_gpu_devices_come_through_a_closed_device_policy() -> None:
    text = (UNITS / "qmgr.service").read_text()
    keys = re.findall(r"^(\w+)=(.*)$", text, flags=re.M)
    assert ("DevicePolicy", "closed") in keys
    allowed = {v.split()[0] for k, v in keys if k == "DeviceAllow"}
    gpus = {"char-nvidia", "char-nvidia-frontend", "char-nvidia-uvm", "char-kfd", "char-drm"}
    assert gpus <= allowed
    assert ("PrivateDevices", "yes") not in keys  # it would hide /dev/nvidia* and /dev/kfd


def test_socket_unit_matches_the_paths_the_client_uses() -> None:
    from qmgr import settings

    system = (UNITS / "qmgr.socket").read_text()
    assert f"ListenStream={settings.SYSTEM_SOCKET}" in system
    assert "SocketMode=0660" in system and "SocketGroup=qmgr" in system
    # %t is the user's $XDG_RUNTIME_DIR, where the client looks for its own daemon.
    assert "ListenStream=%t/qmgr/qmgr.sock" in (UNITS / "user/qmgr.socket").read_text()
    tmpfiles = (UNITS / "tmpfiles.d/qmgr.conf").read_text()
    assert re.search(rf"^d\s+{settings.SYSTEM_SOCKET.parent}\s+0750\s+qmgr\s+qmgr", tmpfiles,
                     flags=re.M)


@pytest.mark.parametrize("where", ["", "user/"])
def test_the_api_socket_is_named_for_the_daemon(where: str) -> None:
    from qmgr import settings
    from qmgr.daemon.main import API_FDNAME

    api = (UNITS / f"{where}qmgr-api.socket").read_text()
    assert f"ListenStream={settings.DEFAULT_LISTEN}\n" in api
    assert f"FileDescriptorName={API_FDNAME}\n" in api and "Service=qmgr.service\n" in api
    own = (UNITS / f"{where}qmgr.socket").read_text()
    assert re.findall(r"^FileDescriptorName=(.*)$", own, flags=re.M) == ["qmgr"]


# -- install -------------------------------------------------------------------------------


def test_install_into_an_image_root(qenv: Env) -> None:
    need("systemctl")
    need("systemd-sysusers")
    image = qenv.root / "image"
    r = qenv.qmgr("service", "install", "--system", "--root", str(image))
    units = image / "etc/systemd/system"
    assert f"ExecStart={QMGRD} --system" in (units / "qmgr.service").read_text(), r.stderr
    assert (units / "qmgr.socket").read_text() == (UNITS / "qmgr.socket").read_text()
    assert (units / "sockets.target.wants/qmgr.socket").is_symlink()
    assert (units / "multi-user.target.wants/qmgr.service").is_symlink()
    # The API's socket is there to enable, and is not: the image's config sets no listen.
    assert (units / "qmgr-api.socket").read_text() == (UNITS / "qmgr-api.socket").read_text()
    assert not (units / "sockets.target.wants/qmgr-api.socket").exists()
    assert (image / "etc/tmpfiles.d/qmgr.conf").is_file()
    passwd = (image / "etc/passwd").read_text()
    assert re.search(r"^qmgr:x:\d+:\d+:[^:]*:/var/lib/qmgr:", passwd, flags=re.M), passwd

    qenv.qmgr("service", "uninstall", "--system", "--root", str(image))
    assert not (units / "qmgr.service").exists() and not (units / "qmgr.socket").exists()
    assert not (units / "qmgr-api.socket").exists()
    assert not (units / "sockets.target.wants/qmgr.socket").exists()
    assert not (image / "etc/tmpfiles.d/qmgr.conf").exists()
    assert "qmgr:x:" in (image / "etc/passwd").read_text()  # it owns the data, which stays
    r = qenv.qmgr("service", "uninstall", "--system", "--root", str(image))
    assert "not installed" in r.stderr


def test_an_image_whose_config_listens_gets_the_api_socket_enabled(qenv: Env) -> None:
    need("systemctl")
    need("systemd-sysusers")
    image = qenv.root / "image"
    config = image / "etc/qmgr/config.toml"
    config.parent.mkdir(parents=True)
    # Off loopback without a key the service would not start: refused, nothing written.
    config.write_text('listen = "0.0.0.0:8080"\n')
    r = qenv.qmgr("service", "install", "--system", "--root", str(image), check=False)
    assert r.returncode == 1 and "needs an api_key" in r.stderr and "Traceback" not in r.stderr
    assert not (image / "etc/systemd").exists()
    # localhost is a name systemd cannot listen on: its address is written instead.
    config.write_text('listen = "localhost:8080"\n')
    qenv.qmgr("service", "install", "--system", "--root", str(image))
    units = image / "etc/systemd/system"
    api = (units / "qmgr-api.socket").read_text()
    assert re.findall(r"^ListenStream=.*$", api, flags=re.M) == ["ListenStream=127.0.0.1:8080"]
    assert (units / "sockets.target.wants/qmgr-api.socket").is_symlink()
    assert (units / "sockets.target.wants/qmgr.socket").is_symlink()
    qenv.qmgr("service", "uninstall", "--system", "--root", str(image))
    assert not (units / "sockets.target.wants/qmgr-api.socket").exists()
    assert not (units / "qmgr-api.socket").exists()


FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$SYSTEMCTL_LOG"
if [ -n "$SYSTEMCTL_FAIL" ]; then echo "Failed to connect to bus" >&2; exit 1; fi
"""


def test_user_install_enables_the_units_and_replaces_an_autostarted_daemon(qenv: Env) -> None:
    # No user manager runs here: a stand-in systemctl records what it is asked to do.
    bin_dir = qenv.root / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    log = qenv.root / "systemctl.log"
    qenv.env.update(PATH=f"{bin_dir}:{qenv.env['PATH']}", SYSTEMCTL_LOG=str(log),
                    XDG_CONFIG_HOME=str(qenv.root / "config"))
    # A daemon the client started, on the socket the user's socket unit will take over.
    qenv.socket = Path(qenv.env["XDG_RUNTIME_DIR"]) / "qmgr" / "qmgr.sock"
    qenv.env["QMGR_SOCKET"] = str(qenv.socket)
    proc = qenv.start()

    r = qenv.qmgr("service", "install", "--user")
    assert proc.wait(timeout=30) == 0, "the unmanaged daemon was not stopped"
    assert f"stopped the qmgrd that systemd did not start (pid {proc.pid})" in r.stderr
    # No listen in the configuration: the API's socket is written, stopped and disabled.
    assert log.read_text().splitlines() == [
        "--user daemon-reload",
        "--user stop qmgr-api.socket qmgr.socket qmgr.service",
        "--user disable qmgr-api.socket",
        "--user enable --now qmgr.socket qmgr.service",
    ]
    units = qenv.root / "config/systemd/user"
    assert f"ExecStart={QMGRD}\n" in (units / "qmgr.service").read_text()
    assert (units / "qmgr.socket").read_text() == (UNITS / "user/qmgr.socket").read_text()
    assert (units / "qmgr-api.socket").read_text() == \
        (UNITS / "user/qmgr-api.socket").read_text()

    # With listen in the file the user's service reads (not QMGR_LISTEN, which it would not
    # see), the API's socket listens there and is enabled with the others.
    (qenv.root / "config/qmgr").mkdir()
    (qenv.root / "config/qmgr/config.toml").write_text('listen = "[::1]:8181"\n')
    qenv.env["QMGR_LISTEN"] = "127.0.0.1:9999"
    log.unlink()
    qenv.qmgr("service", "install", "--user")
    del qenv.env["QMGR_LISTEN"]
    assert log.read_text().splitlines() == [
        "--user daemon-reload",
        "--user stop qmgr-api.socket qmgr.socket qmgr.service",
        "--user enable --now qmgr-api.socket qmgr.socket qmgr.service",
    ]
    assert "ListenStream=[::1]:8181\n" in (units / "qmgr-api.socket").read_text()

    log.unlink()
    qenv.env["SYSTEMCTL_FAIL"] = "1"
    r = qenv.qmgr("service", "uninstall", "--user", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "`systemctl --user disable --now qmgr-api.socket qmgr.socket qmgr.service` " \
        "failed (1)" in r.stderr
    assert "Failed to connect to bus" in r.stderr
    del qenv.env["SYSTEMCTL_FAIL"]
    qenv.qmgr("service", "uninstall", "--user")
    assert not any(units.iterdir())
    assert log.read_text().splitlines()[-2:] == [
        "--user disable --now qmgr-api.socket qmgr.socket qmgr.service",
        "--user daemon-reload"]
    # Units an older qmgr installed (no API socket): systemctl is not asked about it.
    for name in ("qmgr.service", "qmgr.socket"):
        (units / name).write_text((UNITS / "user" / name).read_text())
    qenv.qmgr("service", "uninstall", "--user")
    assert log.read_text().splitlines()[-2] == "--user disable --now qmgr.socket qmgr.service"


@pytest.mark.skipif(os.path.isdir("/run/systemd/system") or os.geteuid() != 0,
                    reason="needs root on a machine where systemd is not running: elsewhere "
                           "it would install the service for real")
def test_system_install_without_systemd_changes_nothing(qenv: Env) -> None:
    r = qenv.qmgr("service", "install", "--system", check=False)
    assert r.returncode == 1 and "systemd is not running" in r.stderr
    assert "nothing was installed" in r.stderr and "Traceback" not in r.stderr
    assert not Path("/etc/systemd/system/qmgr.service").exists()
    assert "\nqmgr:" not in "\n" + Path("/etc/passwd").read_text()


def test_system_install_refuses_a_qmgrd_the_sandbox_hides(tmp_path: Path) -> None:
    from qmgr.errors import QmgrError

    with pytest.raises(QmgrError, match="ProtectHome"):
        service.check_visible_to_system_service(Path("/home/someone/.venv/bin/qmgrd"))
    locked = tmp_path / "locked" / "bin"
    locked.mkdir(parents=True)
    (locked / "qmgrd").write_text("")
    locked.parent.chmod(0o700)
    with pytest.raises(QmgrError, match="not searchable by others"):
        service.check_visible_to_system_service(locked / "qmgrd")


# -- socket activation -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def socket_activate(qenv: Env, *listen: str, fdnames: str | None = None
                    ) -> subprocess.Popen[bytes]:
    """qmgrd under systemd-socket-activate, which holds the sockets at ``listen`` and starts
    the daemon on the first connection to any of them, passing them all (named ``fdnames``,
    NAME:NAME..., or unnamed)."""
    activate = need("systemd-socket-activate")
    qenv.socket.parent.mkdir(parents=True, exist_ok=True)
    passed = [f"--setenv={k}={v}" for k, v in qenv.env.items() if k.startswith("QMGR_")]
    names = [f"--fdname={fdnames}"] if fdnames else []
    with open(qenv.root / "qmgrd.log", "wb") as log:
        proc = subprocess.Popen([activate, *(f"--listen={where}" for where in listen), *names,
                                 *passed, QMGRD], env=qenv.env, stdout=log, stderr=log)
    for _ in range(600):
        if qenv.socket.exists():
            return proc
        assert proc.poll() is None, qenv.daemon_log()
        threading.Event().wait(0.05)
    proc.kill()
    raise AssertionError("systemd-socket-activate did not listen:\n" + qenv.daemon_log())


@pytest.fixture
def activated(qenv: Env) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_daemon_serves_the_socket_systemd_passes(
        qenv: Env, activated: list[subprocess.Popen[bytes]]) -> None:
    proc = socket_activate(qenv, str(qenv.socket))
    activated.append(proc)
    # systemd-socket-activate starts qmgrd on the first connection, which it then serves.
    inode = qenv.socket.stat().st_ino
    qenv.env["QMGR_NO_AUTOSTART"] = "1"
    status = qenv.json("status")
    assert status["pid"] == proc.pid  # the activated process, not one the client started
    assert "using the socket passed by systemd" in qenv.daemon_log()
    # It did not bind a socket or take a lock of its own.
    assert qenv.socket.stat().st_ino == inode
    assert not (qenv.socket.parent / "qmgr.sock.lock").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, qenv.daemon_log()
    assert qenv.socket.exists()  # systemd's to remove, not the daemon's


def test_daemon_serves_the_api_on_the_tcp_socket_systemd_passes(
        qenv: Env, activated: list[subprocess.Popen[bytes]]) -> None:
    # As qmgr.socket and qmgr-api.socket pass them (in no particular order); no listen is
    # configured: the passed socket is the API listener.
    port = free_port()
    proc = socket_activate(qenv, f"127.0.0.1:{port}", str(qenv.socket), fdnames="api:qmgr")
    activated.append(proc)
    # The first connection, to the API's port, starts the daemon; it is answered once it runs.
    url = f"http://127.0.0.1:{port}"
    r = httpx.get(url + "/", timeout=60)
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert httpx.get(url + "/api/tags").json() == {"models": []}
    # The loopback rules hold on the passed socket as on one the daemon binds.
    assert httpx.get(url + "/api/tags", headers={"Host": "evil.example"}).status_code == 403
    log = qenv.daemon_log()
    assert "using the API socket passed by systemd" in log
    assert f"serving Ollama's API on http://127.0.0.1:{port}" in log
    # qmgr's own socket is served by the same process, and its API is not on the TCP port.
    qenv.env["QMGR_NO_AUTOSTART"] = "1"
    assert qenv.json("status")["pid"] == proc.pid
    assert httpx.get(url + "/v1/status").status_code == 404
    assert not (qenv.socket.parent / "qmgr.sock.lock").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, qenv.daemon_log()


@pytest.mark.parametrize(("host", "fdnames", "refusal"), [
    # A passed listener obeys the rule a configured one does.
    ("0.0.0.0", "qmgr:api", "serving beyond this machine needs an api_key"),
    # Unnamed, a TCP socket is not taken for qmgr's own (it trusts callers by their uid).
    ("127.0.0.1", None, "qmgr's own API is served on a Unix socket only"),
])
def test_daemon_refuses_a_tcp_socket_it_must_not_serve(
        qenv: Env, activated: list[subprocess.Popen[bytes]], host: str, fdnames: str | None,
        refusal: str) -> None:
    proc = socket_activate(qenv, str(qenv.socket), f"{host}:{free_port()}", fdnames=fdnames)
    activated.append(proc)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(qenv.socket))  # starts the daemon
        assert proc.wait(timeout=60) == 1, qenv.daemon_log()
    assert refusal in qenv.daemon_log()


# -- sd_notify: READY, STATUS, WATCHDOG, STOPPING, RELOADING ---------------------------------

WATCHDOG_USEC = 200_000  # pings every 0.1 s
PIPE_SIZE = 4096  # the smallest a pipe can be: one page


class Notified:
    """qmgrd with a fake NOTIFY_SOCKET (what systemd reads) and its log on a one-page pipe.

    The pipe lets the test block the daemon's event loop with no hook inside the daemon: the
    loop logs each request (debug level), so once the test stops reading the pipe and it
    fills, the loop's next write blocks, as it would behind a stalled log reader.
    """

    def __init__(self, qenv: Env, **env: str):
        self.qenv = qenv
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = qenv.root / "notify.sock"
        self.notify.bind(str(path))
        self.messages: list[str] = []  # all, in order
        self.inbox: deque[str] = deque()  # not yet returned by next()
        self.log = b""
        read_fd, write_fd = os.pipe()
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(read_fd, False)
        self.log_fd = read_fd
        env = {**qenv.env, "NOTIFY_SOCKET": str(path), **env}
        self.proc = subprocess.Popen([QMGRD], env=env, stdout=write_fd, stderr=write_fd)
        os.close(write_fd)

    def read_log(self) -> str:
        """Everything in the pipe now: all the daemon wrote before what we last received."""
        while True:
            try:
                data = os.read(self.log_fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            self.log += data
        return self.log.decode(errors="replace")

    def log_pipe_fill(self) -> int:
        """Bytes written to the log pipe and not read yet."""
        buf = array.array("i", [0])
        fcntl.ioctl(self.log_fd, termios.FIONREAD, buf)
        return buf[0]

    def pump(self, *, drain: bool = True) -> None:
        """Wait a moment for messages; read the log pipe meanwhile unless ``drain`` is False."""
        fds = [self.notify.fileno(), self.log_fd] if drain else [self.notify.fileno()]
        ready, _, _ = select.select(fds, [], [], 0.05)
        if self.log_fd in ready:
            self.read_log()
        if self.notify.fileno() in ready:
            received = self.receive()
            self.messages += received
            self.inbox += received
        elif self.proc.poll() is not None:
            raise AssertionError(f"qmgrd exited ({self.proc.returncode}):\n{self.read_log()}")

    def next(self, wanted: str, *, drain: bool = True, timeout: float = 60) -> str | None:
        """The next message with the line ``wanted`` (skipping others), or None after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            while self.inbox:
                message = self.inbox.popleft()
                if wanted in message.split("\n"):
                    return message
            if time.monotonic() >= deadline:
                return None
            self.pump(drain=drain)

    def meanwhile(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a thread while this one keeps reading the log (the daemon would block
        on a full pipe, waiting for us, while we wait for it)."""
        out: list[T] = []
        errors: list[BaseException] = []

        def call() -> None:
            try:
                out.append(fn())
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=call)
        thread.start()
        while thread.is_alive():
            self.pump()
        if errors:
            raise errors[0]
        return out[0]

    def receive(self) -> list[str]:
        """Messages waiting in the socket."""
        out = []
        self.notify.settimeout(0)
        while True:
            try:
                out.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return out

    def forget(self) -> None:
        """Skip whatever was sent so far."""
        self.messages += self.receive()
        self.inbox.clear()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.read_log()
            self.proc.wait()
        os.close(self.log_fd)
        self.notify.close()


@pytest.fixture
def notified(qenv: Env) -> Iterator[Callable[..., Notified]]:
    started: list[Notified] = []

    def start(**env: str) -> Notified:
        started.append(Notified(qenv, WATCHDOG_USEC=str(WATCHDOG_USEC), **env))
        return started[-1]

    try:
        yield start
    finally:
        for n in started:
            n.close()


def test_ready_after_migrations_then_watchdog_stops_while_the_loop_is_blocked(
        notified: Callable[..., Notified], qenv: Env) -> None:
    n = notified(QMGR_LOG_LEVEL="debug")
    ready = n.next("READY=1")
    assert ready is not None, n.read_log()
    # Everything logged before READY was sent is in the pipe now, and the catalog is at head.
    assert "catalog migrated to the newest schema" in n.read_log()
    assert qenv.catalog_rows("SELECT version_num FROM alembic_version") == [(SCHEMA_HEAD,)]
    assert f"STATUS=serving {qenv.socket}" in ready and f"MAINPID={n.proc.pid}" in ready
    before = n.messages[:n.messages.index(ready)]
    assert any(line.startswith("STATUS=") for m in before for line in m.split("\n")), before
    assert not any("WATCHDOG=1" in m for m in before)
    assert n.meanwhile(lambda: qenv.json("status"))["schema"] == SCHEMA_HEAD  # it serves

    # Healthy: pings keep coming, between requests too.
    for _ in range(5):
        assert n.next("WATCHDOG=1") is not None
        n.meanwhile(lambda: qenv.qmgr("list"))

    # Block the loop: stop reading its log and send requests until one is not answered.
    from qmgr import settings
    from qmgr.client import Client

    client = Client(settings.load(env=qenv.env, autostart=False), timeout=3)
    stuck = threading.Event()

    def request_until_stuck() -> None:
        for _ in range(2000):
            try:
                client.get("/v1/status")
            except TimeoutError:
                # Not answered, and the log pipe is full: the loop is blocked writing to it
                # (rather than slow on a busy machine).
                if n.log_pipe_fill() > PIPE_SIZE - 512:
                    stuck.set()
                    return

    requester = threading.Thread(target=request_until_stuck, daemon=True)
    requester.start()
    assert stuck.wait(timeout=120), "every request was answered: the loop never blocked"
    n.forget()  # pings sent before the loop blocked
    # Twenty watchdog intervals without a ping: systemd would have restarted it by now.
    assert n.next("WATCHDOG=1", drain=False, timeout=20 * WATCHDOG_USEC / 1e6) is None

    # The log reader catches up, the loop runs again, and so do the pings.
    assert n.next("WATCHDOG=1", drain=True) is not None
    requester.join(timeout=60)

    n.proc.send_signal(signal.SIGTERM)
    assert n.next("STOPPING=1") is not None
    assert n.proc.wait(timeout=30) == 0


def test_sighup_reloads_the_config_file(notified: Callable[..., Notified], qenv: Env) -> None:
    n = notified()  # log level info; QMGR_WATCH_SETTLE=0.5 in its environment
    assert n.next("READY=1") is not None, n.read_log()
    n.meanwhile(lambda: qenv.qmgr("list"))
    assert '"GET /v1/variants' not in n.read_log()  # no access log at info level

    Path(qenv.env["QMGR_CONFIG"]).write_text(
        'log_level = "debug"\nwatch_settle = 7.5\ndatabase_url = "sqlite:////elsewhere.db"\n')
    n.proc.send_signal(signal.SIGHUP)
    reloading = n.next("RELOADING=1")
    assert reloading is not None and re.search(r"^MONOTONIC_USEC=\d+$", reloading, flags=re.M)
    assert n.next("READY=1") is not None
    log = n.read_log().split("reloading configuration")[1]
    assert "log_level: info -> debug" in log
    assert "watch_settle" not in log  # the environment still wins over the file
    assert "database_url changed to sqlite:////elsewhere.db: restart qmgrd to use it" in log
    n.meanwhile(lambda: qenv.qmgr("list"))
    assert '"GET /v1/variants HTTP/1.1" 200' in n.read_log()  # debug now: access log on

    # A broken file is reported; the daemon keeps its configuration and keeps serving.
    Path(qenv.env["QMGR_CONFIG"]).write_text("log_level = \n")
    n.proc.send_signal(signal.SIGHUP)
    assert n.next("RELOADING=1") is not None and n.next("READY=1") is not None
    assert "configuration not reloaded, the running one stays" in n.read_log()
    qenv.env["QMGR_CONFIG"] = str(qenv.root / "client.toml")  # the client reads it too
    assert n.meanwhile(lambda: qenv.json("status"))["pid"] == n.proc.pid


# -- the operator guide ----------------------------------------------------------------------


def test_every_setting_is_documented() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    settings_src = (ROOT / "qmgr" / "settings.py").read_text()
    keys = re.findall(r'pick\([^,]+, "(QMGR_\w+)", "(\w+)"\)', settings_src)
    assert {key for _, key in keys} >= {"home", "socket", "database_url", "watch_settle",
                                        "log_level"}
    for var, key in keys:
        assert f"**`{key}`** (`{var}`" in guide, f"config key {key} is not documented"
    env_only = set(re.findall(r'"(QMGR_\w+)"', settings_src)) - {var for var, _ in keys}
    for var in env_only:
        assert f"`{var}`" in guide, f"{var} is not documented"
