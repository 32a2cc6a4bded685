"""Start-up reconciliation of the catalog with the files on disk.

Runs after migrations and before the daemon reports READY:

- a blob whose file is gone makes its variants ``missing``; one that came back with the size and
  modification time it was verified with makes them ``ready`` again; one whose size changed
  makes them ``modified`` (re-import to verify the new bytes); a store blob of the right size
  but another modification time is hashed again: kept if its bytes still match its name, else
  quarantined (its variants ``missing``, for a pull to fetch again);
- a partial download (``.partial`` with its ``.state``) is kept for the pull that resumes it,
  unless it is older than ``partial_max_age`` (default 7 days); other partial files (an
  interrupted copy) are removed;
- a file in ``store/blobs`` without a catalog row is hashed: kept if its bytes match its name (a
  later import or pull of the same bytes adopts it), quarantined otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Blob, VariantState
from qmgr.store import SHA256_RE, Store, hash_file

log = logging.getLogger(__name__)


@dataclass
class Report:
    missing: int = 0
    restored: int = 0
    modified: int = 0
    partials_removed: int = 0
    partials_kept: int = 0
    orphans_kept: int = 0
    rehashed: int = 0
    quarantined: list[str] = field(default_factory=list)


PARTIAL_MAX_AGE_S = 7 * 24 * 3600


def reconcile(catalog: Catalog, store: Store, partial_max_age: float = PARTIAL_MAX_AGE_S) -> Report:
    report = Report()
    with catalog.writing() as session:
        known = set()
        for blob in session.scalars(select(Blob)):
            known.add(blob.sha256)
            try:
                st = os.stat(blob.path)
            except OSError:
                report.missing += queries.set_state_for_blob(session, blob, VariantState.MISSING)
                continue
            if st.st_size != blob.size:
                report.modified += queries.set_state_for_blob(session, blob, VariantState.MODIFIED)
            elif st.st_mtime_ns == blob.mtime_ns:
                report.restored += queries.set_state_for_blob(session, blob, VariantState.READY)
            elif blob.in_store:
                # Written since it was verified (or never timed): its name is a promise only
                # its bytes can keep. Hashed; bytes that break it go to quarantine.
                report.rehashed += 1
                if hash_file(Path(blob.path))[0] == blob.sha256:
                    blob.mtime_ns = st.st_mtime_ns
                    report.restored += queries.set_state_for_blob(session, blob,
                                                                  VariantState.READY)
                else:
                    target = store.quarantine / Path(blob.path).name
                    os.replace(blob.path, target)
                    report.quarantined.append(str(target))
                    log.warning("quarantined %s: its bytes no longer match its name", blob.path)
                    report.missing += queries.set_state_for_blob(session, blob,
                                                                 VariantState.MISSING)
            else:
                report.modified += queries.set_state_for_blob(session, blob, VariantState.MODIFIED)
    now = time.time()
    for partial in store.stale_partials():
        state = partial.with_suffix(".state")
        try:
            fresh = state.exists() and now - state.stat().st_mtime < partial_max_age
        except OSError:
            fresh = False
        if fresh:
            report.partials_kept += 1
            continue
        partial.unlink(missing_ok=True)
        state.unlink(missing_ok=True)
        report.partials_removed += 1
    if store.partial.is_dir():
        for state in store.partial.glob("*.state"):
            if not state.with_suffix(".partial").exists():
                state.unlink(missing_ok=True)
    if store.blobs.is_dir():
        for path in store.blobs.iterdir():
            digest = path.name.removeprefix("sha256-")
            if digest in known:
                continue
            if SHA256_RE.match(digest) and path.is_file() and hash_file(path)[0] == digest:
                report.orphans_kept += 1
                continue
            target = store.quarantine / path.name
            os.replace(path, target)
            report.quarantined.append(str(target))
            log.warning("quarantined %s: no catalog row and bytes do not match its name", path)
    log.info("recovery: %s", report)
    return report
