"""Engine setup, sessions and migrations.

SQLite is the default. Everything SQLite-specific lives in :func:`make_engine`: WAL journal,
``synchronous=FULL`` (a committed row survives power loss), foreign keys, a busy timeout, and
``BEGIN IMMEDIATE`` for write transactions, so a write that first reads holds the write lock
from its first statement and never fails half-way with "database is locked".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

import qmgr

# The newest migration. Start-up compares the database's revision with it and imports alembic
# only when they differ (alembic costs ~0.5 s to import). tests/test_catalog.py checks that
# this matches the head of migrations/versions.
SCHEMA_HEAD = "0004"

BUSY_TIMEOUT_MS = 10_000
# PostgreSQL advisory lock taken while migrating (any constant of qmgr's own: "qmgr" in ASCII).
MIGRATE_LOCK = 0x716D6772


def migrations_dir() -> Path:
    """Where the alembic scripts are: inside the wheel, or at the top of a source checkout."""
    package = Path(qmgr.__file__).resolve().parent
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(f"qmgr's migrations are missing (looked in {package}): reinstall qmgr")


def make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN is ours to emit.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get("qmgr_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class Catalog:
    """The daemon's handle on the database: read and write sessions."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(
            self.engine.execution_options(qmgr_write=True), expire_on_commit=False
        )
        # Bumped after every write transaction. On SQLite all writes go through this daemon,
        # so an unchanged generation means unchanged data: answers can be cached against it
        # (``exclusive``). A PostgreSQL catalog is shared: other daemons write it too.
        self.generation = 0
        self.exclusive = self.engine.dialect.name == "sqlite"
        # In a fleet (``node`` set): this daemon's row in ``nodes``. Sessions carry it
        # (``session.info["node_id"]``): which copy of a blob is this node's.
        self.node_id: int | None = None

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            session.info["node_id"] = self.node_id
            yield session

    @contextlib.contextmanager
    def writing(self) -> Iterator[Session]:
        """A transaction that holds the write lock from BEGIN and commits on success."""
        try:
            with self._write() as session, session.begin():
                session.info["node_id"] = self.node_id
                yield session
        finally:
            self.generation += 1

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            try:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except Exception:  # no table yet: a new database
                conn.rollback()
                return None

    def migrate(self) -> bool:
        """Bring the schema to head. Returns whether anything was applied."""
        if self.revision() == SCHEMA_HEAD:
            return False
        from alembic import command
        from sqlalchemy import inspect

        # Daemons sharing the catalog that start at once: one migrates, the others wait for
        # its commit (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), then find the
        # schema at head.
        with self.engine.execution_options(qmgr_write=True).begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK})
            if inspect(conn).has_table("alembic_version") and conn.execute(
                    text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_HEAD:
                return False
            command.upgrade(alembic_config(conn), "head")
        return True

    def close(self) -> None:
        self.engine.dispose()


def alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg
