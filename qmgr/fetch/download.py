"""Resumable, verified downloads into the store.

A file arrives in ``store/partial/<key>.partial`` (key: the expected sha256, else a hash of
the URL, so a restarted daemon finds the same partial file again). Large files come in
parallel ranged parts; each part's progress is recorded in ``<key>.state`` after every chunk
written, so a daemon killed at any moment resumes where it was, reusing the bytes on disk.
A hashing thread follows the contiguous prefix of the file as it fills, so the sha256 is ready
when the last byte lands. Then: fsync, size and digest checked, published into the store.
Nothing unverified is ever published; a file whose digest does not match is deleted.

Failures a retry may fix (dropped connection, stall, short body, server error) are retried
with exponential backoff, each retry continuing from the last byte written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from qmgr.errors import QmgrError
from qmgr.fetch.http import FetchError, redact, request
from qmgr.fetch.remote import RemoteFile
from qmgr.store import Store, check_digest, fsync_dir

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Dirty pages are flushed every this many bytes while the download runs, so the fsync before
# publication has little left to do (the disk works while the network does).
FLUSH_EVERY = 128 << 20
HANDOFF_LIMIT = 64 << 20  # bytes of written chunks kept for the hashing thread
# Free space kept beyond what a download needs, so the catalog and logs can still be written.
SPACE_MARGIN = 64 << 20
_STATE = struct.Struct("<8sQI")
_PART = struct.Struct("<QQQ")
_MAGIC = b"qmgrprt1"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Cancelled(QmgrError):
    code = "cancelled"
    http_status = 409


@dataclass
class Options:
    # Parallel ranged parts: None means 4 over https (CDNs limit each connection) and 1 over
    # plain http (a mirror on the local network or this machine: one connection is fastest,
    # and on 2 cores extra connections only compete with the hashing).
    parts: int | None = None
    part_threshold: int = 256 << 20  # files smaller than this come in one part
    retries: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    insecure: bool = False


@dataclass
class Part:
    start: int
    end: int  # exclusive
    done: int = 0

    @property
    def finished(self) -> bool:
        return self.start + self.done >= self.end


class Download:
    """Fetch one :class:`RemoteFile` into the store; :meth:`run` returns (sha256, size, path)."""

    def __init__(self, client: httpx.Client, store: Store, remote: RemoteFile, opts: Options,
                 progress: Callable[[int], None] | None = None,
                 cancel: threading.Event | None = None):
        self.client = client
        self.store = store
        self.remote = remote
        self.opts = opts
        self.progress = progress or (lambda done: None)
        self.cancel = cancel or threading.Event()
        self.insecure = opts.insecure or remote.allow_http
        if remote.sha256:
            check_digest(remote.sha256)
            key = remote.sha256
        else:
            key = "url-" + hashlib.sha256(remote.url.encode()).hexdigest()[:40]
        self.partial = store.partial / f"{key}.partial"
        self.state_path = store.partial / f"{key}.state"
        self.parts: list[Part] = []
        self.unflushed = 0
        # Chunks just written, handed to the hashing thread by offset so that it need not read
        # them back from the file (sha256 is the pace-maker: every copy saved counts).
        self.fresh: dict[int, bytes] = {}
        self.fresh_bytes = 0
        self.flush_wanted = threading.Event()
        self.lock = threading.Condition()
        self.error: BaseException | None = None

    # -- state on disk ---------------------------------------------------------------------

    def _load_state(self, size: int) -> list[Part] | None:
        try:
            raw = self.state_path.read_bytes()
            magic, total, n = _STATE.unpack_from(raw)
            if magic != _MAGIC or total != size or not 0 < n <= 64:
                return None
            parts = [Part(*_PART.unpack_from(raw, _STATE.size + i * _PART.size))
                     for i in range(n)]
        except (OSError, struct.error):
            return None
        if not self.partial.exists() or self.partial.stat().st_size != size:
            return None
        if parts[0].start != 0 or parts[-1].end != size or any(
                a.end != b.start for a, b in zip(parts, parts[1:], strict=False)):
            return None
        for p in parts:
            p.done = min(p.done, p.end - p.start)
        return parts

    def _save_state(self) -> None:
        # One pwrite of a few hundred bytes at offset 0: complete or absent if we are killed.
        raw = _STATE.pack(_MAGIC, self.size, len(self.parts)) + b"".join(
            _PART.pack(p.start, p.end, p.done) for p in self.parts)
        os.pwrite(self.state_fd, raw, 0)

    def bytes_on_disk(self, size: int) -> int:
        parts = self._load_state(size)
        return sum(p.done for p in parts) if parts else 0

    # -- the work -----------------------------------------------------------------------------

    def _probe_size(self) -> int:
        """The size when the registry did not say: a HEAD request."""
        with request(self.client, "HEAD", self.remote.url, self.remote.headers,
                     insecure=self.insecure) as r:
            if r.status_code >= 400:
                raise FetchError(f"{redact(self.remote.url)}: HTTP {r.status_code}")
            linked = r.headers.get("x-linked-size") or r.headers.get("content-length")
            if not linked or not linked.isdigit():
                raise FetchError(f"{redact(self.remote.url)} does not say how large it is")
            return int(linked)

    def run(self) -> tuple[str, int, Path]:
        size = self.remote.size if self.remote.size is not None else self._probe_size()
        self.size = size
        needed = size - self.bytes_on_disk(size) + SPACE_MARGIN
        free = self.store.free_bytes()
        if free < needed:
            raise QmgrError(
                f"not enough disk space for {self.remote.name}: needs {needed / 2**30:.2f} GiB, "
                f"{free / 2**30:.2f} GiB free in {self.store.root}", code="no_space",
                http_status=507)
        parts = self._load_state(size)
        if parts is None:
            wanted = self.opts.parts or (4 if self.remote.url.startswith("https://") else 1)
            n = wanted if size >= self.opts.part_threshold else 1
            step = -(-size // max(1, n)) if size else 0
            bounds = list(range(0, size, step)) if size else [0]
            parts = [Part(s, min(s + step, size)) for s in bounds] if size else [Part(0, 0)]
            with open(self.partial, "wb") as f:
                f.truncate(size)
        else:
            log.info("resuming %s: %d of %d bytes already on disk", self.remote.name,
                     sum(p.done for p in parts), size)
        self.parts = parts
        self.fd = os.open(self.partial, os.O_RDWR)
        self.state_fd = os.open(self.state_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            self._save_state()
            sha = self._transfer()
            os.fsync(self.fd)
        except BaseException:
            if not any(p.done for p in self.parts):
                self.discard()  # nothing worth resuming
            raise
        finally:
            os.close(self.fd)
            os.close(self.state_fd)
        if self.remote.sha256 and sha != self.remote.sha256:
            self.discard()
            raise QmgrError(
                f"{self.remote.name}: sha256 mismatch (registry says {self.remote.sha256}, "
                f"received {sha}); the bytes were deleted", code="digest_mismatch",
                http_status=502)
        path = self.store.publish(self.partial, sha, size)
        self.state_path.unlink(missing_ok=True)
        fsync_dir(self.store.partial)
        return sha, size, path

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)

    def _transfer(self) -> str:
        threads = [threading.Thread(target=self._part_worker, args=(p,), daemon=True,
                                    name=f"qmgr-dl-{i}")
                   for i, p in enumerate(self.parts) if not p.finished]
        for t in threads:
            t.start()
        flusher = threading.Thread(target=self._flusher, args=(threads,), daemon=True)
        flusher.start()
        sha = self._hash_following()
        for t in threads:
            t.join()
        self.flush_wanted.set()
        flusher.join()
        if self.error is not None:
            raise self.error
        assert sha is not None
        return sha

    def _flusher(self, workers: list[threading.Thread]) -> None:
        """Write dirty pages back while the download runs (see FLUSH_EVERY)."""
        while any(t.is_alive() for t in workers):
            if self.flush_wanted.wait(0.5):
                self.flush_wanted.clear()
                os.fdatasync(self.fd)

    def _frontier(self) -> int:
        """End of the contiguous prefix of bytes on disk."""
        for p in self.parts:
            if not p.finished:
                return p.start + p.done
        return self.size

    def _hash_following(self) -> str | None:
        h = hashlib.sha256()
        hashed = 0
        while hashed < self.size:
            with self.lock:
                while self._frontier() <= hashed and self.error is None:
                    self.lock.wait(1.0)
                    if self.cancel.is_set() and self.error is None:
                        self.error = Cancelled(f"download of {self.remote.name} cancelled")
                if self.error is not None:
                    return None
                frontier = self._frontier()
            while hashed < frontier:
                with self.lock:
                    chunk = self.fresh.pop(hashed, None)
                    if chunk is not None:
                        self.fresh_bytes -= len(chunk)
                if chunk is None:  # not handed over (resumed bytes, or the buffer was full)
                    chunk = os.pread(self.fd, min(CHUNK * 4, frontier - hashed), hashed)
                if not chunk:
                    raise QmgrError(f"{self.partial} shrank while downloading")
                h.update(chunk)
                hashed += len(chunk)
                with self.lock:
                    for stale in [k for k in self.fresh if k < hashed]:
                        self.fresh_bytes -= len(self.fresh.pop(stale))
        return h.hexdigest()

    def _fail(self, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
            self.lock.notify_all()

    def _part_worker(self, part: Part) -> None:
        attempt = 0
        while not part.finished:
            if self.cancel.is_set() or self.error is not None:
                self._fail(Cancelled(f"download of {self.remote.name} cancelled"))
                return
            before = part.done
            try:
                self._fetch_range(part)
                attempt = 0
            except FetchError as e:
                # Retries are counted between attempts that make no progress: a connection
                # that keeps dropping but delivers bytes each time gets there in the end.
                attempt = 1 if part.done > before else attempt + 1
                if attempt > self.opts.retries:
                    self._fail(FetchError(f"{self.remote.name}: giving up after "
                                          f"{self.opts.retries} retries: {e.message}"))
                    return
                delay = self.opts.backoff * 2 ** (attempt - 1)
                log.warning("%s (attempt %d of %d; retrying in %.1f s)", e.message, attempt,
                            self.opts.retries, delay)
                if self.cancel.wait(delay):
                    continue
            except BaseException as e:  # an error no retry fixes
                self._fail(e)
                return

    def _fetch_range(self, part: Part) -> None:
        offset = part.start + part.done
        headers = dict(self.remote.headers)
        headers["Range"] = f"bytes={offset}-{part.end - 1}"
        headers["Accept-Encoding"] = "identity"
        with request(self.client, "GET", self.remote.url, headers,
                     insecure=self.insecure) as r:
            if r.status_code >= 400:
                error = FetchError if r.status_code >= 500 or r.status_code == 429 else QmgrError
                raise error(f"{redact(self.remote.url)}: HTTP {r.status_code}")
            skip = 0
            if r.status_code == 206:
                m = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", ""))
                if not m or int(m.group(1)) != offset:
                    raise FetchError(f"{redact(self.remote.url)}: answered a different range "
                                     f"({r.headers.get('content-range')!r}) than asked")
                if m.group(3) != "*" and int(m.group(3)) != self.size:
                    raise QmgrError(f"{self.remote.name}: the server says the file has "
                                    f"{m.group(3)} bytes, the registry said {self.size}",
                                    code="size_mismatch", http_status=502)
            elif r.status_code == 200:
                # The server ignored Range: it sends the whole file; skip to our offset.
                length = r.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) != self.size:
                    raise QmgrError(f"{self.remote.name}: the server says the file has "
                                    f"{length} bytes, the registry said {self.size}",
                                    code="size_mismatch", http_status=502)
                skip = offset
            else:
                raise FetchError(f"{redact(self.remote.url)}: unexpected HTTP {r.status_code}")
            try:
                # Chunks as they arrive (no re-chunking): every byte received is on disk and
                # counted before a dropped connection can lose it.
                for chunk in r.iter_raw():
                    if skip:
                        drop = min(skip, len(chunk))
                        chunk = chunk[drop:]
                        skip -= drop
                        if not chunk:
                            continue
                    room = part.end - (part.start + part.done)
                    if len(chunk) > room:
                        if r.status_code == 200 and room > 0:
                            chunk = chunk[:room]  # the rest belongs to the next part
                        elif r.status_code == 200 and room == 0:
                            break
                        else:
                            raise FetchError(f"{redact(self.remote.url)}: sent more bytes "
                                             "than the range asked for")
                    offset = part.start + part.done
                    os.pwrite(self.fd, chunk, offset)
                    with self.lock:
                        if self.fresh_bytes < HANDOFF_LIMIT:
                            self.fresh[offset] = chunk
                            self.fresh_bytes += len(chunk)
                        part.done += len(chunk)
                        self._save_state()
                        self.lock.notify_all()
                        self.unflushed += len(chunk)
                        if self.unflushed >= FLUSH_EVERY:
                            self.unflushed = 0
                            self.flush_wanted.set()
                    self.progress(len(chunk))
                    if self.cancel.is_set() or self.error is not None:
                        raise Cancelled(f"download of {self.remote.name} cancelled")
                    if part.finished:
                        break
            except httpx.TimeoutException as e:
                raise FetchError(f"{redact(self.remote.url)}: stalled (no data for "
                                 f"{self.client.timeout.read} s)") from e
            except httpx.HTTPError as e:
                raise FetchError(f"{redact(self.remote.url)}: {type(e).__name__}: {e}") from e
            if not part.finished:
                raise FetchError(f"{redact(self.remote.url)}: connection ended after "
                                 f"{part.done} of {part.end - part.start} bytes")
