"""Watched folders: GGUF files that appear are cataloged in place once they stop growing.

A file is cataloged when its size has not changed for ``settle`` seconds and its header is
valid; a file that disappears marks its variants missing. Refused: symlinks that lead outside
the watched folder, and names with control characters. Hidden files and names not ending in
``.gguf`` are ignored (downloaders write to such names and rename when done), and so is
everything under a hidden folder.

Only events that can change a file's bytes or presence count: opening and reading a file (the
watcher's own hashing, a backend loading the model) must not queue it again. A file already
cataloged with the size and modification time it was verified with is not hashed again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from sqlalchemy import select

from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Blob, VariantState, WatchedFolder
from qmgr.daemon.importer import BAD_NAME_RE, catalog_file
from qmgr.errors import NotFound, QmgrError
from qmgr.store import Store

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25

# watchdog event types that can change a file's bytes or presence ("opened",
# "closed_no_write" and "attrib" cannot).
CHANGE_EVENTS = frozenset({"created", "modified", "moved", "deleted", "closed"})


class Watcher:
    def __init__(self, catalog: Catalog, store: Store, settle: float):
        from watchdog.observers import Observer

        self.catalog = catalog
        self.store = store
        self.settle = settle
        self.observer = Observer()
        self.watches: dict[str, Any] = {}
        # path -> (size last seen, monotonic time it was first seen at that size)
        self.pending: dict[str, tuple[int, float]] = {}
        self.refused: deque[dict[str, str]] = deque(maxlen=100)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="qmgr-watch", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with self.catalog.reading() as session:
            folders = [f.path for f in queries.watched_folders(session)]
        for folder in folders:
            self._schedule(folder)
        self.observer.start()
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.observer.stop()
        self.observer.join(timeout=5)
        self.thread.join(timeout=5)

    def add(self, folder: str) -> dict[str, Any]:
        path = Path(folder)
        if not path.is_absolute() or not path.is_dir():
            raise QmgrError(f"not a directory: {folder}", code="bad_path")
        real = str(path.resolve())
        with self.catalog.writing() as session:
            if session.scalar(select(WatchedFolder).where(WatchedFolder.path == real)):
                raise QmgrError(f"already watching {real}", code="conflict")
            row = WatchedFolder(path=real)
            session.add(row)
            session.flush()
            out = {"id": row.id, "path": row.path}
        self._schedule(real)
        return out

    def remove(self, folder: str) -> None:
        real = str(Path(folder).resolve())
        with self.catalog.writing() as session:
            row = session.scalar(select(WatchedFolder).where(WatchedFolder.path == real))
            if row is None:
                raise NotFound(f"not watching {folder}")
            session.delete(row)
        with self.lock:
            watch = self.watches.pop(real, None)
        if watch is not None:
            self.observer.unschedule(watch)

    def _schedule(self, folder: str) -> None:
        from watchdog.events import FileSystemEventHandler

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type not in CHANGE_EVENTS or event.is_directory:
                    return
                for attr in ("src_path", "dest_path"):
                    p = getattr(event, attr, "")
                    if p:
                        watcher.notice(folder, os.fsdecode(p))

        if not os.path.isdir(folder):
            log.warning("watched folder %s does not exist (yet)", folder)
            return
        watch = self.observer.schedule(Handler(), folder, recursive=True)
        with self.lock:
            self.watches[folder] = watch
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                self.notice(folder, os.path.join(root, name))

    # -- events ------------------------------------------------------------------------------

    def notice(self, folder: str, path: str) -> None:
        if not path.endswith(".gguf"):
            return
        relative = path[len(folder.rstrip("/")) + 1:] if path.startswith(folder) else path
        if any(part.startswith(".") for part in relative.split("/")):
            return
        if BAD_NAME_RE.search(path):
            self._refuse(path, "the name contains control characters")
            return
        with self.lock:
            self.pending[path] = (-1, time.monotonic())

    def _refuse(self, path: str, reason: str) -> None:
        entry = {"path": path, "reason": reason}
        with self.lock:
            # One file raises several events (created, modified, closed): report it once.
            if entry in self.refused:
                return
            self.refused.append(entry)
        log.warning("watch: refused %r: %s", path, reason)

    def _run(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            try:
                self._tick()
            except Exception:  # a watcher error must not stop the watching
                log.exception("watch: unexpected error")

    def _tick(self) -> None:
        now = time.monotonic()
        ready: list[str] = []
        gone: list[str] = []
        with self.lock:
            for path, (size, since) in list(self.pending.items()):
                try:
                    current = os.stat(path).st_size
                except OSError:
                    del self.pending[path]
                    gone.append(path)
                    continue
                if current != size:
                    self.pending[path] = (current, now)
                elif now - since >= self.settle:
                    del self.pending[path]
                    ready.append(path)
        # Catalog work happens outside the lock (hashing takes long; events keep arriving),
        # and one file's failure must not drop the others found in the same tick.
        for path in gone:
            self._guarded(self._gone, path)
        for path in ready:
            self._guarded(self._catalog, path)

    def _guarded(self, action: Any, path: str) -> None:
        try:
            action(path)
        except Exception as e:
            log.exception("watch: error on %r", path)
            self._refuse(path, f"unexpected error: {type(e).__name__}: {e}")

    def _folder_of(self, path: str) -> str | None:
        with self.lock:
            folders = list(self.watches)
        for folder in folders:
            if path.startswith(folder.rstrip("/") + "/"):
                return folder
        return None

    def _catalog(self, path: str) -> None:
        folder = self._folder_of(path)
        if folder is None:
            return
        real = os.path.realpath(path)
        if not real.startswith(folder.rstrip("/") + "/"):
            self._refuse(path, f"it is a link that leads outside {folder} (to {real})")
            return
        try:
            if self._unchanged(path):
                return
        except FileNotFoundError:  # gone since the last poll
            self._gone(path)
            return
        try:
            variant, created = catalog_file(self.catalog, self.store, Path(path))
        except QmgrError as e:
            self._refuse(path, e.message)
            return
        if created:
            log.info("watch: cataloged %s as %s", path, variant["ref"])

    def _unchanged(self, path: str) -> bool:
        """Whether ``path`` is cataloged with its current size and modification time (then it
        is ready again if it had gone missing). Blobs recorded at this path with other bytes
        become ``modified``: the file was rewritten in place."""
        st = os.stat(path)
        with self.catalog.writing() as session:
            same = False
            for blob in session.scalars(select(Blob).where(Blob.path == path)):
                if blob.size == st.st_size and blob.mtime_ns == st.st_mtime_ns:
                    same = True
                    queries.set_state_for_blob(session, blob, VariantState.READY)
                else:
                    queries.set_state_for_blob(session, blob, VariantState.MODIFIED)
            return same

    def _gone(self, path: str) -> None:
        with self.catalog.writing() as session:
            for blob in session.scalars(select(Blob).where(Blob.path == path)):
                if queries.set_state_for_blob(session, blob, VariantState.MISSING):
                    log.info("watch: %s disappeared; its variants are missing", path)
