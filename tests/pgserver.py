"""A real PostgreSQL server for the tests, started in a temporary directory (Debian's
``postgresql`` package: ``initdb`` + ``pg_ctl``), listening on a Unix socket only.

One server per test session; each test that wants a catalog on it gets a database of its own
(:meth:`PgServer.database`). PostgreSQL refuses to run as root: as root the server runs as the
``postgres`` user (``runuser``), in a directory given to it. Durability settings are off
(``fsync``...): the tests check what the catalog does, not the disk.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (15 or later), if any."""
    for d in BIN_DIRS:
        if (d / "initdb").exists() and d.parent.name.isdigit() and int(d.parent.name) >= 15:
            return d
    return None


class PgServer:
    def __init__(self) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL 15+ is not installed (Debian: apt-get install "
                               "postgresql)")
        self.bin = bin_dir
        # A short path: a Unix socket's path is at most 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="qpg-", dir="/tmp"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.root, self.user)
        self._count = itertools.count(1)
        self._run("initdb", "-D", str(self.data), "-U", "qmgr", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        self.start()

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.root / "log"), "start",
                  "-o", f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off "
                  "-c synchronous_commit=off -c full_page_writes=off -c timezone=UTC "
                  "-c max_connections=200")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def psql(self, sql: str, database: str = "postgres") -> str:
        command = [str(self.bin / "psql"), "-h", str(self.socket_dir), "-U", "qmgr", "-d",
                   database, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]
        return subprocess.run(command, check=True, capture_output=True, text=True,
                              timeout=60).stdout

    def database(self) -> str:
        """A new empty database; its SQLAlchemy URL (psycopg 3, over the Unix socket)."""
        name = f"qmgr_{os.getpid()}_{next(self._count)}"
        self.psql(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://qmgr@/{name}?host={self.socket_dir}"

    def pause(self) -> None:
        """Stop the server, keeping its data (:meth:`start` brings it back)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
