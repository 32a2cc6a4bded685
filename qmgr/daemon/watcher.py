"""Watched folders: GGUF files that appear are cataloged in place once they stop growing.

A file is cataloged when its size has not changed for ``settle`` seconds and its header is
valid; a file that disappears marks its variants missing. Refused: symlinks that lead outside
the watched folder, and names with control characters. Hidden files and names not ending in
``.gguf`` are ignored (downloaders write to such names and rename when done).
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
from qmgr.errors import QmgrError
from qmgr.store import Store

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25


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
                raise QmgrError(f"already watching {real}", code="conflict", http_status=409)
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
                raise QmgrError(f"not watching {folder}", code="not_found", http_status=404)
            session.delete(row)
        watch = self.watches.pop(real, None)
        if watch is not None:
            self.observer.unschedule(watch)

    def _schedule(self, folder: str) -> None:
        from watchdog.events import FileSystemEventHandler

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                for attr in ("src_path", "dest_path"):
                    p = getattr(event, attr, "")
                    if p:
                        watcher.notice(folder, os.fsdecode(p))

        if not os.path.isdir(folder):
            log.warning("watched folder %s does not exist (yet)", folder)
            return
        self.watches[folder] = self.observer.schedule(Handler(), folder, recursive=True)
        for root, _dirs, files in os.walk(folder):
            for name in files:
                self.notice(folder, os.path.join(root, name))

    # -- events ------------------------------------------------------------------------------

    def notice(self, folder: str, path: str) -> None:
        name = os.path.basename(path)
        if name.startswith(".") or not name.endswith(".gguf"):
            return
        if BAD_NAME_RE.search(path):
            self._refuse(path, "the name contains control characters")
            return
        with self.lock:
            self.pending[path] = (-1, time.monotonic())

    def _refuse(self, path: str, reason: str) -> None:
        log.warning("watch: refused %r: %s", path, reason)
        self.refused.append({"path": path, "reason": reason})

    def _run(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            try:
                self._tick()
            except Exception:  # a watcher error must not stop the watching
                log.exception("watch: unexpected error")

    def _tick(self) -> None:
        now = time.monotonic()
        ready: list[str] = []
        with self.lock:
            for path, (size, since) in list(self.pending.items()):
                try:
                    current = os.stat(path).st_size
                except OSError:
                    del self.pending[path]
                    self._gone(path)
                    continue
                if current != size:
                    self.pending[path] = (current, now)
                elif now - since >= self.settle:
                    del self.pending[path]
                    ready.append(path)
        for path in ready:
            self._catalog(path)

    def _folder_of(self, path: str) -> str | None:
        for folder in self.watches:
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
            variant, created = catalog_file(self.catalog, self.store, Path(path))
        except QmgrError as e:
            self._refuse(path, e.message)
            return
        if created:
            log.info("watch: cataloged %s as %s", path, variant["ref"])

    def _gone(self, path: str) -> None:
        with self.catalog.writing() as session:
            blob = session.scalar(select(Blob).where(Blob.path == path))
            if blob is not None and queries.set_state_for_blob(session, blob, VariantState.MISSING):
                log.info("watch: %s disappeared; its variants are missing", path)
