"""This daemon as a node of a fleet: its row in ``nodes``, its heartbeat, its peers.

A daemon started with a ``node`` name and a PostgreSQL catalog registers itself (its name,
the URL of its API listener, its devices, what it has loaded) and heartbeats every
``QMGR_HEARTBEAT`` seconds. Each beat also marks gone the nodes silent for longer than
``QMGR_NODE_TIMEOUT``, claims the jobs that are nobody's or a gone node's (``FOR UPDATE SKIP
LOCKED``: one job, one node), and stops the jobs running here that another node has taken
over (this one was thought gone) or that were cancelled from another node.

Times are the database server's (``now()``): the nodes' clocks need not agree.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Blob, BlobCopy, Job, JobState, Node
from qmgr.errors import QmgrError
from qmgr.settings import Settings, knob
from qmgr.work.jobs import JobRunner

log = logging.getLogger(__name__)

UP, GONE = "up", "gone"


def check_fleet(settings: Settings, catalog: Catalog) -> None:
    """A node needs a catalog its peers share: PostgreSQL, not this machine's SQLite file."""
    if catalog.engine.dialect.name != "postgresql":
        raise QmgrError(f"node {settings.node!r}: a fleet's nodes share a PostgreSQL catalog; "
                        "set database_url (QMGR_DATABASE_URL) to postgresql+psycopg://...",
                        code="bad_config")
    if settings.listen and not settings.fleet_key:
        log.warning("node %s: no fleet_key in the configuration: its peers cannot fetch "
                    "blobs from it, nor it from them", settings.node)


def advertised(settings: Settings) -> str | None:
    """The URL peers reach this node's API listener at: ``advertise``, else http://LISTEN
    when it is an address they can dial (not 0.0.0.0 / ::)."""
    if settings.advertise:
        return settings.advertise
    if not settings.listen:
        return None
    from qmgr.settings import format_listen, parse_listen

    host, port = parse_listen(settings.listen)
    if host in ("0.0.0.0", "::", ""):
        log.warning("node %s listens on %s: set `advertise` (QMGR_ADVERTISE) to the URL its "
                    "peers reach it at", settings.node, settings.listen)
        return None
    return f"http://{format_listen(host, port)}"


def db_now(session: Session) -> dt.datetime:
    """The database server's time: one clock for every node."""
    value = session.execute(text("SELECT now()")).scalar_one()
    assert isinstance(value, dt.datetime)
    return value


class FleetNode:
    def __init__(self, catalog: Catalog, settings: Settings, jobs: JobRunner,
                 hardware: Callable[[], dict[str, Any]],
                 loaded: Callable[[], list[dict[str, Any]]]):
        self.catalog = catalog
        self.name = str(settings.node)
        self.address = advertised(settings)
        self.jobs = jobs
        self.hardware = hardware
        self.loaded = loaded
        self.interval = float(knob("QMGR_HEARTBEAT"))
        self.timeout = float(knob("QMGR_NODE_TIMEOUT"))
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.beats = 0

    def register(self) -> int:
        """This node's row, created or taken back (a restart), marked up; its id."""
        hw = self.hardware()
        with self.catalog.writing() as session:
            now = db_now(session)
            node = session.scalar(select(Node).where(Node.name == self.name)
                                  .with_for_update())
            if node is None:
                node = Node(name=self.name)
                session.add(node)
            node.address, node.state, node.hardware, node.loaded = self.address, UP, hw, []
            node.started_at = node.heartbeat_at = now
            session.flush()
            node_id = node.id
        self.catalog.node_id = self.jobs.node_id = node_id
        log.info("fleet node %s (id %d) at %s", self.name, node_id, self.address or "-")
        return node_id

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="qmgr-heartbeat", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
            except Exception:  # the database away for a moment: the next beat tries again
                log.exception("fleet heartbeat failed")

    def beat(self) -> dict[str, Any]:
        """One heartbeat: say this node is up (devices, loaded models), mark silent nodes
        gone, give up jobs taken from here, claim the jobs left to anyone."""
        self.beats += 1
        hw = self.hardware()
        loaded = self.loaded()
        with self.catalog.writing() as session:
            now = db_now(session)
            session.execute(update(Node).where(Node.id == self.catalog.node_id).values(
                heartbeat_at=now, state=UP, hardware=hw, loaded=loaded,
                address=self.address))
            cutoff = now - dt.timedelta(seconds=self.timeout)
            gone = list(session.scalars(select(Node.name).where(
                Node.state == UP, Node.heartbeat_at < cutoff, Node.id != self.catalog.node_id)
                .with_for_update(skip_locked=True)))
            if gone:
                session.execute(update(Node).where(Node.name.in_(gone)).values(state=GONE))
                log.warning("fleet nodes gone (no heartbeat for %.0f s): %s", self.timeout,
                            ", ".join(gone))
        stopped = self.jobs.follow_rows()
        claimed = self.jobs.claim()
        return {"gone": gone, "stopped": stopped, "claimed": claimed}

    def stop(self) -> None:
        """A clean stop: the node says it is gone at once, so that its unfinished jobs (left
        queued or running for the next start) are taken over now rather than after the
        timeout."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(5)
        try:
            with self.catalog.writing() as session:
                session.execute(update(Node).where(Node.id == self.catalog.node_id)
                                .values(state=GONE, loaded=[]))
        except Exception:
            log.exception("could not mark node %s gone", self.name)


def fleet_view(session: Session) -> list[dict[str, Any]]:
    """Every node: its state, address, devices, free memory, loaded models, blobs held, and
    how long ago it last heartbeat (by the database's clock)."""
    now = db_now(session)
    held: dict[int, tuple[int, int]] = {}
    for node_id, count, size in session.execute(
            select(BlobCopy.node_id, func.count(), func.coalesce(func.sum(Blob.size), 0))
            .join(Blob, BlobCopy.blob_id == Blob.id).group_by(BlobCopy.node_id)):
        held[node_id] = (int(count), int(size))
    running: dict[int, int] = {}
    for owner, count in session.execute(
            select(Job.node_id, func.count()).where(Job.state == JobState.RUNNING)
            .group_by(Job.node_id)):
        if owner is not None:
            running[owner] = int(count)
    out = []
    for node in session.scalars(select(Node).order_by(Node.name)):
        blobs, size = held.get(node.id, (0, 0))
        out.append({
            "name": node.name, "state": node.state, "address": node.address,
            "devices": (node.hardware or {}).get("devices", []),
            "hardware_source": (node.hardware or {}).get("source"),
            "loaded": node.loaded or [], "blobs": blobs, "blob_bytes": size,
            "running_jobs": running.get(node.id, 0),
            "heartbeat_age": (now - node.heartbeat_at).total_seconds(),
            "started_at": node.started_at.isoformat()})
    return out
