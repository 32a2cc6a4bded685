"""Shared fixtures: a real qmgrd subprocess on a short temporary socket, and the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ggufmake import make_tiny_gguf  # noqa: E402
from pgserver import PgServer, pg_bin  # noqa: E402

# TEST_CATALOG_DB=postgresql runs every test's daemon on a catalog in the session's PostgreSQL
# server (a database each) instead of its own SQLite file: the whole suite on PostgreSQL.
TEST_DB = os.environ.get("TEST_CATALOG_DB", "sqlite")
_PG: list[PgServer] = []


def pg_server() -> PgServer:
    """The session's PostgreSQL server, started on first use (stopped at the session's end)."""
    if not _PG:
        if pg_bin() is None:
            pytest.skip("PostgreSQL 15+ is not installed (Debian: apt-get install postgresql; "
                        ".ci/run installs it)")
        _PG.append(PgServer())
    return _PG[0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    while _PG:
        _PG.pop().stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty catalog's URL: an SQLite file, and a database on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'c.db'}"
    return pg_server().database()

BIN = Path(sys.executable).parent
QMGR = str(BIN / "qmgr")
QMGRD = str(BIN / "qmgrd")


class Env:
    """A private qmgr world: data home, socket, environment; and a daemon in it if started."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.socket = root / "run" / "qmgr.sock"
        self.env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("QMGR_", "XDG_", "NOTIFY_SOCKET", "LISTEN_"))
        }
        self.env.update(
            QMGR_HOME=str(self.home),
            QMGR_SOCKET=str(self.socket),
            QMGR_PLUGINS="",  # keep whatever happens to be installed out of the tests
            QMGR_CONFIG=str(root / "config.toml"),
            QMGR_WATCH_SETTLE="0.5",
            XDG_DATA_HOME=str(root / "data"),
            XDG_RUNTIME_DIR=str(root / "xdg-run"),
        )
        if TEST_DB == "postgresql":
            self.env["QMGR_DATABASE_URL"] = pg_server().database()
        self.proc: subprocess.Popen[bytes] | None = None
        # How start() runs the daemon: this environment's qmgrd, unless a test needs another
        # interpreter's (tests/test_sensitive_plugin.py: a throwaway venv with a plugin).
        self.qmgrd = [QMGRD]

    def catalog_url(self) -> str:
        return self.env.get("QMGR_DATABASE_URL") or f"sqlite:///{self.home / 'catalog.db'}"

    def catalog_rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` read straight from this world's catalog (SQLite or PostgreSQL),
        beside the daemon; on SQLite the file's integrity is checked first."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.catalog_url())
        try:
            with engine.connect() as conn:
                if engine.dialect.name == "sqlite":
                    check = conn.execute(text("PRAGMA integrity_check")).fetchone()
                    assert check is not None and tuple(check) == ("ok",), check
                return [tuple(row) for row in conn.execute(text(sql))]
        finally:
            engine.dispose()

    def qmgr(self, *args: str, check: bool = True, input: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([QMGR, *args], env=self.env, capture_output=True, text=True,
                           input=input, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"qmgr {' '.join(args)} failed ({r.returncode}):\n"
                                 f"{r.stdout}\n{r.stderr}")
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.qmgr(*args, "--json").stdout)

    def start(self, *extra: str, wait: bool = True) -> subprocess.Popen[bytes]:
        self.log = open(self.root / "qmgrd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([*self.qmgrd, *extra], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self.proc

    def wait_ready(self, timeout: float = 30) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is None or self.proc.poll() is None, self.daemon_log()
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("daemon did not come up:\n" + self.daemon_log())

    def daemon_log(self) -> str:
        text = ""
        for p in (self.root / "qmgrd.log", self.home / "qmgrd.log"):
            if p.exists():
                text += p.read_text(errors="replace")
        return text

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.log.close()

    def kill_autostarted(self) -> None:
        """Stop a daemon the client started (it is not our child)."""
        pid = _socket_owner_pid(self)
        if pid:
            os.kill(pid, signal.SIGTERM)
            for _ in range(300):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)


def _socket_owner_pid(env: Env) -> int | None:
    if not env.socket.exists():
        return None
    from qmgr import settings
    from qmgr.client import Client

    s = settings.load(env=env.env, autostart=False)
    try:
        return int(Client(s, timeout=5).get("/v1/status")["pid"])
    except Exception:
        return None


def running_daemon(**env: str) -> Iterator[Env]:
    """A private world with a daemon started in it (``env`` added to its environment first,
    then the client's); removed afterwards. For ``yield from`` in fixtures."""
    root = Path(tempfile.mkdtemp(prefix="qm-", dir="/tmp"))
    world = Env(root)
    for hub in ("HF_ENDPOINT", "HF_TOKEN"):  # never the real Hub, never a real token
        world.env.pop(hub, None)
    world.env.update(env)
    try:
        world.start()
        yield world
    finally:
        world.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mirror(repo: Path) -> Iterator[Any]:
    """The project's misbehaving mirror (tests/badmirror.py) serving the module's ``repo``."""
    from badmirror import BadMirror

    server = BadMirror(repo)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def qenv() -> Iterator[Env]:
    # AF_UNIX paths are limited to 108 bytes: keep the root short, not under pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="qm-", dir="/tmp"))
    env = Env(root)
    try:
        yield env
    finally:
        env.stop()
        env.kill_autostarted()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon(qenv: Env) -> Env:
    """A running daemon (started by hand, as systemd would)."""
    qenv.start()
    return qenv


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_tiny_gguf(tmp_path / "tiny-Q8_0.gguf", ftype="Q8_0")


def registered_by(module: Any, hook: str) -> list[Any]:
    """What one built-in plugin module registers through ``hook``, loaded alone."""
    from qmgr.plugins import PluginSet

    plugins = PluginSet(env={"QMGR_PLUGINS": ""}, load_builtins=False)
    name = module.__name__.rsplit(".", 1)[-1]
    plugins.register(module, name=name)
    try:
        return plugins.registered(hook)
    finally:
        plugins.unregister(name)


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    """``check()``'s first true value, asked every 0.1 s; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def ladder_mirror(tmp_path: Path) -> Iterator[Any]:
    """The test mirror serving Llama-3-8B's real quant ladder: true headers, sparse data."""
    import hashlib

    from badmirror import BadMirror
    from ladder import ladder_types_small, make_ladder_repo

    repo = make_ladder_repo(tmp_path / "m", types=ladder_types_small)
    for f in repo.glob("*.gguf"):
        # Digests beside the files: fit reads headers only, and hashing 33 GB of holes would
        # take minutes. (Nothing here is downloaded; a download would be verified for real.)
        f.with_name(f.name + ".sha256").write_text(
            hashlib.sha256(f.name.encode()).hexdigest() + "\n")

    server = BadMirror(tmp_path / "m")
    try:
        yield server
    finally:
        server.stop()
