"""The content-addressed blob store: partial files, verification, atomic publication.

Layout under ``$QMGR_HOME/store``: ``blobs/sha256-<hex>`` (published, verified bytes),
``partial/`` (bytes still arriving), ``quarantine/`` (files found without a catalog row whose
bytes do not match their name). Publication order: data fsynced, size and digest checked,
renamed into ``blobs/``, directory fsynced; only then may the catalog mark a variant ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from qmgr.errors import QmgrError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


def check_digest(digest: str) -> str:
    """A sha256 hex digest, validated before it names any file."""
    if not SHA256_RE.match(digest):
        raise QmgrError(f"not a sha256 digest: {digest[:80]!r}", code="bad_digest")
    return digest


@dataclasses.dataclass(frozen=True)
class Identity:
    """Which file a path named when it was checked: to read that file, and no other, later."""

    dev: int
    ino: int
    mtime_ns: int
    link: bool  # the path itself was a symlink (one the user chose: followed)


def identity(path: Path) -> Identity:
    st = os.stat(path)
    return Identity(st.st_dev, st.st_ino, st.st_mtime_ns, os.path.islink(path))


def open_regular(path: Path, same_as: Identity | None = None) -> BinaryIO:
    """Open a file to read its bytes, refusing without blocking whatever is not the regular
    file it was (a FIFO, device or symlink swapped in after inspection): O_NONBLOCK so that a
    FIFO cannot hang the open, O_NOFOLLOW unless the path was a symlink when ``same_as`` was
    taken, then ``fstat`` of the handle read, compared with ``same_as``."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if same_as is not None and not same_as.link:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise QmgrError(f"{path} became a symbolic link while qmgr read it: refused",
                            code="file_changed") from e
        raise
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file (a FIFO, device or folder)"
    elif same_as is not None and (st.st_dev, st.st_ino, st.st_mtime_ns) != (
            same_as.dev, same_as.ino, same_as.mtime_ns):
        problem = "was replaced by another file while qmgr read it"
    if problem:
        os.close(fd)
        raise QmgrError(f"{path} {problem}: refused", code="file_changed")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def hash_file(path: Path, progress: Callable[[int], None] | None = None,
              same_as: Identity | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in 1 MiB chunks (see :func:`open_regular`)."""
    h = hashlib.sha256()
    size = 0
    with open_regular(path, same_as) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            if progress:
                progress(size)
    return h.hexdigest(), size


SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def start_writeback() -> Callable[[int], object]:
    """A function that makes the kernel start writing a file's dirty pages to disk without
    waiting for them, so that the fsync before publication finds little left: Linux's
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which, unlike ``fdatasync``, commits no journal
    (a commit can hold up the writer's own writes; flushing every 0.25 s beside a direct
    quantization of Gemma 3 270M measured +2.3% with ``fdatasync``, +0.3% with this: medians
    of 22 pairs, within this machine's noise); ``fdatasync`` elsewhere. It makes nothing
    durable: the fsync before publication does."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            return lambda fd: fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
    return os.fdatasync


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        self.quarantine = root / "quarantine"

    def create(self) -> None:
        for d in (self.blobs, self.partial, self.quarantine):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"sha256-{check_digest(sha256)}"

    def new_partial(self) -> Path:
        return self.partial / f"{uuid.uuid4().hex}.partial"

    def publish(self, partial: Path, sha256: str, size: int) -> Path:
        """Move verified bytes into place. The caller has fsynced and checked them."""
        target = self.blob_path(sha256)
        if partial.stat().st_size != size:
            raise QmgrError(f"refusing to publish {partial}: size differs from {size}")
        if target.exists() and target.stat().st_size == size:
            partial.unlink()  # identical bytes are stored once
            return target
        os.replace(partial, target)
        fsync_dir(self.blobs)
        return target

    def copy_in(self, src: Path, same_as: Identity | None = None
                ) -> tuple[str, int, Path]:
        """Copy a file into the store while hashing it; returns (sha256, size, blob path)."""
        partial = self.new_partial()
        h = hashlib.sha256()
        size = 0
        try:
            with open_regular(src, same_as) as fin, partial.open("xb") as fout:
                while chunk := fin.read(CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            sha = h.hexdigest()
            return sha, size, self.publish(partial, sha, size)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def stale_partials(self) -> list[Path]:
        return sorted(self.partial.glob("*.partial")) if self.partial.is_dir() else []
