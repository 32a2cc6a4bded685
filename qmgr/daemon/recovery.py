"""Start-up reconciliation of the catalog with the files on disk.

Runs after migrations and before the daemon reports READY:

- a blob whose file is gone makes its variants ``missing``; one that came back with the size and
  modification time it was verified with makes them ``ready`` again; one whose size changed
  makes them ``modified`` (re-import to verify the new bytes);
- partial files left by an interrupted copy are removed;
- a file in ``store/blobs`` without a catalog row is hashed: kept if its bytes match its name (a
  later import or pull of the same bytes adopts it), quarantined otherwise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

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
    orphans_kept: int = 0
    quarantined: list[str] = field(default_factory=list)


def reconcile(catalog: Catalog, store: Store) -> Report:
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
            elif blob.in_store or st.st_mtime_ns == blob.mtime_ns:
                report.restored += queries.set_state_for_blob(session, blob, VariantState.READY)
            else:
                report.modified += queries.set_state_for_blob(session, blob, VariantState.MODIFIED)
    for partial in store.stale_partials():
        partial.unlink(missing_ok=True)
        report.partials_removed += 1
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
