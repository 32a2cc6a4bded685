"""Resumable, verified downloads into the store.

A file arrives in ``store/partial/<key>.partial`` (key: the expected sha256, else a hash of
the URL, so a restarted daemon finds the same partial file again). Large files over https come
in parallel ranged parts; each part's progress is recorded in ``<key>.state`` after every chunk
written, so a daemon killed at any moment resumes where it was, reusing the bytes on disk.

The bytes flow through a few reusable 4 MiB buffers: a receiving thread per part reads the
socket into one (:mod:`qmgr.fetch.wire`), the hashing thread hashes it (in file order) and a
writing thread writes it with O_DIRECT (no copy into the page cache, no writeback left for the
final fsync). The hash never waits for the disk nor reads anything back, and it is ready when
the last byte lands.
Then: fsync, size and digest checked, published into the store. Nothing unverified is ever
published; a file whose digest does not match is deleted.

Failures a retry may fix (dropped connection, stall, short body, server error) are retried
with exponential backoff, each retry continuing from the last byte received.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import queue
import re
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from qmgr.errors import QmgrError
from qmgr.fetch import wire
from qmgr.plugin.http import FetchError, redact, request, ssl_context
from qmgr.plugin.source import RemoteFile
from qmgr.store import Store, check_digest, fsync_dir, start_writeback

log = logging.getLogger(__name__)

CHUNK = 4 << 20
# O_DIRECT needs offsets, lengths and buffer addresses aligned to the device's block size.
ALIGN = 4096
BUFFERS = 8  # per download, plus two per extra part
# In buffered mode (a filesystem without O_DIRECT) dirty pages are flushed every this many
# bytes while the download runs, so the fsync before publication has little left to do.
FLUSH_EVERY = 128 << 20
# Free space kept beyond what a download needs, so the catalog and logs can still be written.
SPACE_MARGIN = 64 << 20
_STATE = struct.Struct("<8sQI")
_PART = struct.Struct("<QQQ")
_VALIDATOR = struct.Struct("<H")  # length of the validator that follows the parts
_MAGIC = b"qmgrprt2"
MAX_VALIDATOR = 512
# A file that changes under a download more often than this is given up on.
MAX_RESTARTS = 2
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Cancelled(QmgrError):
    code = "cancelled"


class FileChanged(FetchError):
    """The server's file is not the one the partial bytes came from (another ETag or
    Last-Modified, or a full answer to an ``If-Range``): start over."""

    code = "file_changed"


class TooSlow(FetchError):
    """Bytes arrive, but slower than ``Options.min_speed``."""


def validator_of(body: wire.Body) -> str | None:
    """What identifies this version of the file: a strong ETag (a weak one can't be used with
    ``If-Range``), else Last-Modified."""
    etag = body.header("etag")
    if etag and not etag.startswith("W/") and len(etag) <= MAX_VALIDATOR and etag.isascii():
        return etag
    modified = body.header("last-modified")
    if modified and len(modified) <= MAX_VALIDATOR and modified.isascii():
        return modified
    return None


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
    stall_timeout: float = 30.0  # seconds without a byte before the attempt is retried
    # Bytes per second an attempt must average over each stall_timeout window: a server that
    # trickles a byte every few seconds never stalls, and is retried as one that does.
    min_speed: float = 1024.0
    ca_bundle: str | None = None  # certificate authorities to trust instead of certifi's
    direct_io: bool = True  # O_DIRECT writes where the filesystem allows them


@dataclass
class Part:
    start: int
    end: int  # exclusive
    done: int = 0  # bytes written (and recorded in the state file)
    got: int = 0  # bytes received: written, or queued for the writing thread

    @property
    def finished(self) -> bool:
        return self.start + self.done >= self.end

    @property
    def received(self) -> bool:
        return self.start + self.got >= self.end


@dataclass
class Piece:
    """Received bytes in a buffer: ``buf[lo:hi]`` belongs at file offset ``base + lo``
    (``base`` is aligned, so the aligned middle of the piece can be written with O_DIRECT)."""

    buf: mmap.mmap
    base: int
    lo: int
    hi: int
    part: Part

    @property
    def offset(self) -> int:
        return self.base + self.lo

    @property
    def size(self) -> int:
        return self.hi - self.lo


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
        self.insecure = opts.insecure
        if remote.sha256:
            check_digest(remote.sha256)
            key = remote.sha256
        else:
            key = "url-" + hashlib.sha256(remote.url.encode()).hexdigest()[:40]
        self.partial = store.partial / f"{key}.partial"
        self.state_path = store.partial / f"{key}.state"
        self.parts: list[Part] = []
        self.unflushed = 0
        self.pool: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self.to_write: queue.SimpleQueue[Piece | None] = queue.SimpleQueue()
        # Received pieces waiting for the hashing thread, by offset: only those that continue
        # the run of bytes it will hash next (a piece of a later part goes straight to the
        # writing thread and is read back when the hash gets there).
        self.parked: dict[int, Piece] = {}
        self.hash_tail = 0
        self.flush_wanted = threading.Event()
        self.lock = threading.Condition()
        self.error: BaseException | None = None
        self.dfd: int | None = None
        self.direct_bytes = 0  # written with O_DIRECT (the rest went through the page cache)
        self._context: ssl.SSLContext | None = None
        # The version of the file the bytes on disk are from (ETag or Last-Modified), kept
        # in the state file: a resumed download asks for more of that version only.
        self.validator: str | None = None
        self.bodies: set[wire.Body] = set()  # open transfers, for hang_up

    # -- state on disk ---------------------------------------------------------------------

    def _load_state(self, size: int) -> list[Part] | None:
        try:
            raw = self.state_path.read_bytes()
            magic, total, n = _STATE.unpack_from(raw)
            if magic != _MAGIC or total != size or not 0 < n <= 64:
                return None
            parts = [Part(*_PART.unpack_from(raw, _STATE.size + i * _PART.size))
                     for i in range(n)]
            at = _STATE.size + n * _PART.size
            (length,) = _VALIDATOR.unpack_from(raw, at)
            text = raw[at + _VALIDATOR.size:at + _VALIDATOR.size + length]
            if len(text) != length or length > MAX_VALIDATOR:
                return None
            validator = text.decode("ascii") or None
        except (OSError, struct.error, UnicodeDecodeError):
            return None
        if not self.partial.exists() or self.partial.stat().st_size != size:
            return None
        if parts[0].start != 0 or parts[-1].end != size or any(
                a.end != b.start for a, b in zip(parts, parts[1:], strict=False)):
            return None
        for p in parts:
            p.done = min(p.done, p.end - p.start)
        self.validator = validator
        return parts

    def _save_state(self) -> None:
        # One pwrite of a few hundred bytes at offset 0: complete or absent if we are killed.
        validator = (self.validator or "").encode("ascii")
        raw = _STATE.pack(_MAGIC, self.size, len(self.parts)) + b"".join(
            _PART.pack(p.start, p.end, p.done) for p in self.parts) + _VALIDATOR.pack(
            len(validator)) + validator
        os.pwrite(self.state_fd, raw, 0)

    def bytes_on_disk(self, size: int) -> int:
        parts = self._load_state(size)
        return sum(p.done for p in parts) if parts else 0

    # -- the work -----------------------------------------------------------------------------

    def _probe_size(self) -> int:
        """The size when the registry did not say: a HEAD request."""
        with request(self.client, "HEAD", self.remote.url, self.remote.headers,
                     insecure=self.insecure, http_origin=self.remote.allow_http) as r:
            if r.status_code >= 400:
                raise FetchError(f"{redact(self.remote.url)}: HTTP {r.status_code}")
            linked = r.headers.get("x-linked-size") or r.headers.get("content-length")
            if not linked or not linked.isdigit():
                raise FetchError(f"{redact(self.remote.url)} does not say how large it is")
            return int(linked)

    def run(self) -> tuple[str, int, Path]:
        restarts = 0
        while True:
            try:
                return self._run()
            except FileChanged as e:
                self.discard()
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise FileChanged(f"{e.message}; it changed {restarts} times while being "
                                      "downloaded: giving up") from e
                log.warning("%s: starting over", e.message)
                # A fresh start: no parts, buffers, queues or version left from the old one.
                self.__init__(self.client, self.store, self.remote, self.opts,  # type: ignore[misc]
                              self.progress, self.cancel)

    def _run(self) -> tuple[str, int, Path]:
        size = self.remote.size if self.remote.size is not None else self._probe_size()
        self.size = size
        needed = size - self.bytes_on_disk(size) + SPACE_MARGIN
        free = self.store.free_bytes()
        if free < needed:
            raise QmgrError(
                f"not enough disk space for {self.remote.name}: needs {needed / 2**30:.2f} GiB, "
                f"{free / 2**30:.2f} GiB free in {self.store.root}", code="no_space")
        parts = self._load_state(size)
        if parts is None:
            wanted = self.opts.parts or (4 if self.remote.url.startswith("https://") else 1)
            n = wanted if size >= self.opts.part_threshold else 1
            step = -(-size // max(1, n)) if size else 0
            step = -(-step // ALIGN) * ALIGN  # parts start aligned, for O_DIRECT
            bounds = list(range(0, size, step)) if size else [0]
            parts = [Part(s, min(s + step, size)) for s in bounds] if size else [Part(0, 0)]
            with open(self.partial, "wb") as f:
                f.truncate(size)
        else:
            log.info("resuming %s: %d of %d bytes already on disk", self.remote.name,
                     sum(p.done for p in parts), size)
        for p in parts:
            p.got = p.done
        self.parts = parts
        self.fd = os.open(self.partial, os.O_RDWR)
        self.dfd = self._open_direct() if self.opts.direct_io else None
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
            if self.dfd is not None:
                os.close(self.dfd)
            os.close(self.state_fd)
        if self.remote.sha256 and sha != self.remote.sha256:
            self.discard()
            raise QmgrError(
                f"{self.remote.name}: sha256 mismatch (registry says {self.remote.sha256}, "
                f"received {sha}); the bytes were deleted", code="digest_mismatch")
        path = self.store.publish(self.partial, sha, size)
        self.state_path.unlink(missing_ok=True)
        fsync_dir(self.store.partial)
        return sha, size, path

    def hang_up(self) -> None:
        """Cancel from another thread: end every open transfer, so no part waits for the
        network to notice (the parts then see ``cancel`` set)."""
        self.cancel.set()
        with self.lock:
            bodies = list(self.bodies)
        for body in bodies:
            body.hang_up()

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)

    def _open_direct(self) -> int | None:
        """A second descriptor with O_DIRECT, or None where the filesystem refuses it."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            return os.open(self.partial, os.O_RDWR | flag)
        except OSError:  # tmpfs on older kernels, some FUSE and network filesystems
            return None

    def _transfer(self) -> str:
        active = [p for p in self.parts if not p.finished]
        for _ in range(BUFFERS + 2 * max(0, len(active) - 1)):
            self.pool.put(mmap.mmap(-1, CHUNK))
        self.hash_tail = self._frontier()
        threads = [threading.Thread(target=self._part_worker, args=(p,), daemon=True,
                                    name=f"qmgr-dl-{i}")
                   for i, p in enumerate(self.parts) if not p.finished]
        for t in threads:
            t.start()
        writer = threading.Thread(target=self._writer, daemon=True, name="qmgr-dl-write")
        writer.start()
        flusher = threading.Thread(target=self._flusher, args=(threads,), daemon=True)
        flusher.start()
        sha = self._hash_following()
        for t in threads:
            t.join()
        self.to_write.put(None)
        writer.join()
        self.flush_wanted.set()
        flusher.join()
        self.parked.clear()
        if self.error is not None:
            raise self.error
        assert sha is not None
        return sha

    def _flusher(self, workers: list[threading.Thread]) -> None:
        """Write dirty pages back while the download runs (see FLUSH_EVERY)."""
        writeback = start_writeback()
        while any(t.is_alive() for t in workers):
            if self.flush_wanted.wait(0.5):
                self.flush_wanted.clear()
                writeback(self.fd)

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
                while (hashed not in self.parked and self._frontier() <= hashed
                       and self.error is None):
                    self.lock.wait(1.0)
                    if self.cancel.is_set() and self.error is None:
                        self.error = Cancelled(f"download of {self.remote.name} cancelled")
                if self.error is not None:
                    return None
                piece = self.parked.pop(hashed, None)
                # Bytes not handed over (on disk before this run, or of a later part) are read
                # back once written, up to the next handed-over piece.
                frontier = self._frontier()
                upto = min(frontier, min(self.parked, default=frontier), hashed + CHUNK)
            if piece is not None:
                h.update(memoryview(piece.buf)[piece.lo:piece.hi])
                hashed += piece.size
                self.to_write.put(piece)
                continue
            chunk = os.pread(self.fd, upto - hashed, hashed)
            if not chunk:
                raise QmgrError(f"{self.partial} shrank while downloading")
            h.update(chunk)
            hashed += len(chunk)
        return h.hexdigest()

    def _fail(self, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
            self.lock.notify_all()

    # -- writing --------------------------------------------------------------------------------

    def _writer(self) -> None:
        while (piece := self.to_write.get()) is not None:
            if self.error is not None:
                self.pool.put(piece.buf)
                continue
            try:
                self._write(piece)
            except OSError as e:
                self.pool.put(piece.buf)
                self._fail(QmgrError(f"cannot write {self.partial}: {e.strerror or e}",
                                     code="io_error"))
                continue
            self.pool.put(piece.buf)
            with self.lock:
                piece.part.done += piece.size
                self._save_state()
                self.lock.notify_all()
                self.unflushed += piece.size
                if self.dfd is None and self.unflushed >= FLUSH_EVERY:
                    self.unflushed = 0
                    self.flush_wanted.set()
            self.progress(piece.size)

    def _write(self, piece: Piece) -> None:
        """The aligned middle with O_DIRECT, the unaligned ends (if any) through the cache."""
        view = memoryview(piece.buf)
        lo, hi = piece.lo, piece.hi
        if self.dfd is not None:
            a, b = -(-lo // ALIGN) * ALIGN, hi // ALIGN * ALIGN
            if a < b:
                try:
                    _pwrite_all(self.dfd, view[a:b], piece.base + a)
                except OSError as e:
                    if e.errno != errno.EINVAL:  # this device wants another alignment
                        raise
                    log.info("O_DIRECT refused for %s: writing through the page cache",
                             self.partial)
                    os.close(self.dfd)
                    self.dfd = None
                    _pwrite_all(self.fd, view[lo:hi], piece.offset)
                    return
                self.direct_bytes += b - a
                _pwrite_all(self.fd, view[lo:a], piece.base + lo)
                _pwrite_all(self.fd, view[b:hi], piece.base + b)
                return
        _pwrite_all(self.fd, view[lo:hi], piece.offset)

    # -- receiving ------------------------------------------------------------------------------

    def _part_worker(self, part: Part) -> None:
        attempt = 0
        while not part.received:
            if self.cancel.is_set() or self.error is not None:
                self._fail(Cancelled(f"download of {self.remote.name} cancelled"))
                return
            before = part.got
            try:
                self._fetch_range(part)
                attempt = 0
            except FileChanged as e:  # no retry continues another version's bytes
                self._fail(e)
                return
            except FetchError as e:
                # Retries are counted between attempts that make no progress: a connection
                # that keeps dropping but delivers bytes each time gets there in the end.
                # (A server that is too slow delivers bytes every time: that is no progress.)
                progressed = part.got > before and not isinstance(e, TooSlow)
                attempt = 1 if progressed else attempt + 1
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

    def _hand_over(self, piece: Piece) -> None:
        """To the hashing thread if it continues what that will hash next, else to the disk."""
        with self.lock:
            if piece.offset == self.hash_tail:
                self.parked[piece.offset] = piece
                self.hash_tail += piece.size
                self.lock.notify_all()
                return
        self.to_write.put(piece)

    def _buffer(self) -> mmap.mmap:
        while True:
            if self.cancel.is_set() or self.error is not None:
                raise Cancelled(f"download of {self.remote.name} cancelled")
            try:
                return self.pool.get(timeout=0.5)
            except queue.Empty:
                continue

    def _fetch_range(self, part: Part) -> None:
        offset = part.start + part.got
        headers = dict(self.remote.headers)
        headers["Range"] = f"bytes={offset}-{part.end - 1}"
        headers["Accept-Encoding"] = "identity"
        with self.lock:
            sent_validator = self.validator
        if sent_validator:
            # "The rest, if it is still that version; else all of the new one" (RFC 9110).
            headers["If-Range"] = sent_validator
        if self._context is None and self.remote.url.startswith("https://"):
            self._context = ssl_context(self.opts.ca_bundle)
        with wire.get(self.client, self.remote.url, headers, insecure=self.insecure,
                      http_origin=self.remote.allow_http,
                      stall=self.opts.stall_timeout, context=self._context) as r, \
                self._open(r):
            if r.status >= 400:
                kind = FetchError if r.status >= 500 or r.status == 429 else QmgrError
                raise kind(f"{redact(self.remote.url)}: HTTP {r.status}")
            self._same_version(r, sent_validator)
            skip = 0
            if r.status == 206:
                m = _CONTENT_RANGE.fullmatch(r.header("content-range") or "")
                if not m or int(m.group(1)) != offset:
                    raise FetchError(f"{redact(self.remote.url)}: answered a different range "
                                     f"({r.header('content-range')!r}) than asked")
                if m.group(3) != "*" and int(m.group(3)) != self.size:
                    raise QmgrError(f"{self.remote.name}: the server says the file has "
                                    f"{m.group(3)} bytes, the registry said {self.size}",
                                    code="size_mismatch")
            elif r.status == 200:
                # The server ignored Range: it sends the whole file; skip to our offset.
                length = r.header("content-length")
                if length is not None and length.isdigit() and int(length) != self.size:
                    raise QmgrError(f"{self.remote.name}: the server says the file has "
                                    f"{length} bytes, the registry said {self.size}",
                                    code="size_mismatch")
                skip = offset
            else:
                raise FetchError(f"{redact(self.remote.url)}: unexpected HTTP {r.status}")
            # Never more than the part asks for: what a server sends beyond it is not read.
            window_at, window_got = time.monotonic(), part.got
            while not part.received:
                now = time.monotonic()
                if now - window_at >= self.opts.stall_timeout:
                    speed = (part.got - window_got) / (now - window_at)
                    if speed < self.opts.min_speed:
                        raise TooSlow(f"{redact(self.remote.url)}: too slow ({speed:.0f} "
                                         f"bytes/s for {now - window_at:.0f} s)")
                    window_at, window_got = now, part.got
                buf = self._buffer()
                if skip:
                    n, error = r.fill(memoryview(buf)[:min(CHUNK, skip)])
                    self.pool.put(buf)
                    skip -= n
                else:
                    offset = part.start + part.got
                    lo = offset % ALIGN
                    n, error = r.fill(memoryview(buf)[lo:lo + min(CHUNK - lo, part.end - offset)])
                    if n:
                        part.got += n
                        self._hand_over(Piece(buf, offset - lo, lo, lo + n, part))
                    else:
                        self.pool.put(buf)
                if error is not None:
                    raise error
                if not n:
                    break
            if not part.received:
                raise FetchError(f"{redact(self.remote.url)}: connection ended after "
                                 f"{part.got} of {part.end - part.start} bytes")


    @contextlib.contextmanager
    def _open(self, body: wire.Body) -> Iterator[None]:
        with self.lock:
            self.bodies.add(body)
        try:
            if self.cancel.is_set():
                raise Cancelled(f"download of {self.remote.name} cancelled")
            yield
        finally:
            with self.lock:
                self.bodies.discard(body)

    def _same_version(self, r: wire.Body, sent: str | None) -> None:
        """Check that an answer is of the version the bytes on disk are from, recording the
        version at the first answer."""
        seen = validator_of(r)
        with self.lock:
            if self.validator is None and sent is None:
                if seen is not None:
                    self.validator = seen
                    self._save_state()
                return
            known = self.validator
        name = self.remote.name
        if sent is not None and r.status == 200 and any(p.got for p in self.parts):
            raise FileChanged(f"{name} changed on the server (it answered our If-Range with "
                              "the whole file)")
        if seen is not None and known is not None and seen != known:
            raise FileChanged(f"{name} changed on the server (version {seen[:60]}, the bytes "
                              f"on disk are from {known[:60]})")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
