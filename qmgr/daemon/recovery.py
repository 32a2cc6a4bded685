"""Start-up reconciliation of the catalog with the files on disk.

Runs after migrations and before the daemon reports READY:

- a blob whose file is gone makes its variants ``missing``; one that came back with the size and
  modification time it was verified with makes them ``ready`` again; one whose size changed
  makes them ``modified`` (re-import to verify the new bytes); a store blob of the right size
  but another modification time is hashed again: kept if its bytes still match its name, else
  quarantined (its variants ``missing``, for a pull to fetch again);
- a partial download (``.partial`` with its ``.state``) is kept for the pull that resumes it,
  unless it is older than ``partial_max_age`` (default 7 days); other partial files (an
  interrupted copy) are removed, except, on a fleet node (whose store may be shared), those
  written to in the last hour: another node may be writing them;
- a file in ``store/blobs`` without a catalog row is hashed: kept if its bytes match its name (a
  later import or pull of the same bytes adopts it), quarantined otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Blob, BlobCopy, VariantState
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
# In a fleet the store may be shared: a partial file another node is writing now (a copy,
# a quantization) has no state file either, so one written to lately is left alone.
SHARED_PARTIAL_GRACE_S = 3600


def reconcile(catalog: Catalog, store: Store, partial_max_age: float = PARTIAL_MAX_AGE_S) -> Report:
    report = Report()
    held: set[str] | None = None  # in a fleet: the blobs this node holds a copy of
    adopt = None
    if catalog.node_id is not None:
        known, held = _check_copies(catalog, store, report)
        adopt = _adopter(catalog)
    else:
        known = _check_blobs(catalog, store, report)
    _sweep(store, known, held, adopt, report, partial_max_age,
           grace=SHARED_PARTIAL_GRACE_S if catalog.node_id is not None else 0.0)
    log.info("recovery: %s", report)
    return report


def _check_blobs(catalog: Catalog, store: Store, report: Report) -> set[str]:
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
                if _rehashed(blob.path, blob.sha256, store, report):
                    blob.mtime_ns = st.st_mtime_ns
                    report.restored += queries.set_state_for_blob(session, blob,
                                                                  VariantState.READY)
                else:
                    report.missing += queries.set_state_for_blob(session, blob,
                                                                 VariantState.MISSING)
            else:
                report.modified += queries.set_state_for_blob(session, blob, VariantState.MODIFIED)
    return known


def _check_copies(catalog: Catalog, store: Store, report: Report) -> tuple[set[str], set[str]]:
    """A fleet node's check: its own copies only. A copy that is gone or changed is no
    longer this node's (the row goes); a variant turns ``missing`` only when no node holds
    its bytes any more (the catalog is the fleet's: a peer's copy is as good)."""
    with catalog.writing() as session:
        known = set(session.scalars(select(Blob.sha256)))
        copies = session.scalars(select(BlobCopy).where(BlobCopy.node_id == catalog.node_id)
                                 .with_for_update()).all()
        held = set()
        for copy in copies:
            blob = session.get(Blob, copy.blob_id)
            assert blob is not None
            try:
                st = os.stat(copy.path)
            except OSError:
                st = None
            keep = st is not None and st.st_size == blob.size and (
                st.st_mtime_ns == copy.mtime_ns or (
                    copy.in_store and _rehashed(copy.path, blob.sha256, store, report)))
            if keep:
                assert st is not None
                copy.mtime_ns = st.st_mtime_ns
                held.add(blob.sha256)
                continue
            if st is None:
                report.missing += 1
            else:
                report.modified += 1
            session.delete(copy)
            session.flush()
            if not session.scalar(select(BlobCopy.node_id).where(
                    BlobCopy.blob_id == blob.id).limit(1)):
                queries.set_state_for_blob(session, blob, VariantState.MISSING)
    return known, held


def _rehashed(path: str, sha256: str, store: Store, report: Report) -> bool:
    """A store file written since it was verified: kept if its bytes still match its name,
    else quarantined."""
    report.rehashed += 1
    if hash_file(Path(path))[0] == sha256:
        return True
    target = store.quarantine / Path(path).name
    os.replace(path, target)
    report.quarantined.append(str(target))
    log.warning("quarantined %s: its bytes no longer match its name", path)
    return False


def _adopter(catalog: Catalog) -> Callable[[str, Path], None]:
    """In a fleet: a verified store file of a cataloged blob this node had no row for (a
    shared store, or a copy made while the catalog was away) becomes this node's copy."""
    def adopt(digest: str, path: Path) -> None:
        with catalog.writing() as session:
            blob = session.scalar(select(Blob).where(Blob.sha256 == digest))
            if blob is not None:
                queries.record_copy(session, blob, str(path), True, path.stat().st_mtime_ns)
                queries.set_state_for_blob(session, blob, VariantState.READY)
    return adopt


def _sweep(store: Store, known: set[str], held: set[str] | None,
           adopt: Callable[[str, Path], None] | None, report: Report,
           partial_max_age: float, grace: float) -> None:
    now = time.time()
    for partial in store.stale_partials():
        state = partial.with_suffix(".state")
        try:
            fresh = (state.exists() and now - state.stat().st_mtime < partial_max_age) or \
                (grace > 0 and now - partial.stat().st_mtime < grace)
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
            if digest in known and (held is None or digest in held):
                continue
            if digest in known and adopt is not None and path.is_file() and \
                    hash_file(path)[0] == digest:
                adopt(digest, path)
                report.restored += 1
                continue
            if SHA256_RE.match(digest) and path.is_file() and hash_file(path)[0] == digest:
                report.orphans_kept += 1
                continue
            target = store.quarantine / path.name
            os.replace(path, target)
            report.quarantined.append(str(target))
            log.warning("quarantined %s: no catalog row and bytes do not match its name", path)

