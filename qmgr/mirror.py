"""``qmgr mirror serve DIR``: a read-only mirror speaking the Hugging Face endpoints qmgr uses.

Two layouts, which may be mixed in one folder:

- ``DIR/OWNER/REPO/<files>`` is repository ``OWNER/REPO``: ``DIR/test/tiny/tiny-Q8_0.gguf``
  is ``hf.co/test/tiny:Q8_0``;
- ``DIR/NAME-QUANT.gguf`` (and shards ``DIR/NAME-QUANT-00001-of-00003.gguf``) is a file of
  repository ``local/NAME``, NAME being the file's stem without its quant:
  ``gemma-3-270m-it-Q4_K_M.gguf`` is ``hf.co/local/gemma-3-270m-it:Q4_K_M``. A vision
  projector beside it (``mmproj-...gguf``) goes with the model its name names, or with the
  only model there is.

Endpoints (clients set ``QMGR_HF_ENDPOINT=http://host:port``):

- ``GET /api/models/OWNER/REPO/tree/REV[/PATH][?recursive=true]``: files with size, the git
  blob id of their LFS pointer and the LFS sha256, as the Hub answers; ``503`` with
  ``Retry-After`` while some of them are still being hashed;
- ``GET|HEAD /OWNER/REPO/resolve/REV/PATH``: the bytes, with ``Range`` (one range),
  ``X-Linked-Size``, and ``ETag``/``X-Linked-Etag`` (the sha256) once it is known. Bytes are
  served before their digest is known: they do not depend on it, and clients verify against
  the digest of the listing.

Digests are computed once per file, identified by path (relative to DIR), size, mtime and
inode, and kept in a small SQLite state file, so a restart hashes only what changed; a
``NAME.sha256`` file beside ``NAME`` and newer than it spares the hashing. A mirror whose
``start_hashing()`` was called hashes in one background thread and answers at once; one
without it hashes in the request that first needs a digest (tests, benchmarks).

Standard library only (``qmgr.gguf.names``'s naming rules and ``qmgr.plugin.source``'s
types need no more): a threading HTTP/1.1 server that sends bodies with ``sendfile``, logs
one line per request (logger ``qmgr.mirror.access``), binds to loopback unless told
otherwise, never follows a symlink out of DIR, and answers every revision with the folder's
current files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import selectors
import socket
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from qmgr.gguf.names import PROJECTOR_RE, SHARD_RE, file_kind, quant_from_name, strip_quant_suffix
from qmgr.plugin.source import RemoteFile, group_gguf_files

log = logging.getLogger(__name__)
access_log = logging.getLogger("qmgr.mirror.access")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
FLAT_OWNER = "local"  # the owner of repositories made of DIR/*.gguf files
CHUNK = 1 << 20
SEND_CHUNK = 1 << 30
# Hashing speed assumed for Retry-After before any was measured (sha256 with SHA-NI on one
# core reads ~1.5 GB/s from the page cache; disks are often slower).
ASSUMED_HASH_RATE = 300e6
MAX_RETRY_AFTER = 30


def default_state_path(root: Path) -> Path:
    """``$XDG_CACHE_HOME/qmgr/mirror/NAME-HASH.sqlite``: one state file per served folder
    (the folder itself may be read-only)."""
    root = root.resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    tag = hashlib.sha256(os.fsencode(root)).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", root.name).strip("-.") or "root"
    return Path(cache) / "qmgr" / "mirror" / f"{name}-{tag}.sqlite"


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s"


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer the Hub keeps in git for a file; its blob id is the listing's
    ``oid``. So the mirror's ``oid`` is the Hub's, and costs no second hash of the bytes
    (sha256 alone: ~1.5 GB/s on this project's 2-core machine; with a sha1 of the bytes
    too, as before: ~0.8 GB/s)."""
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


class Digests:
    """sha256 of the files under ``root``, computed once per (relative path, size, mtime,
    inode), kept in the SQLite file ``state`` when there is one.

    A file may come with its digest beside it (``NAME.sha256``: 64 hex digits, as a registry's
    LFS pointer gives it), newer than the file: then it is served without hashing gigabytes
    first. Clients verify what they download, so a wrong sidecar fails the pull, it never
    publishes wrong bytes.
    """

    def __init__(self, root: Path, state: Path | None = None) -> None:
        self.root = root.resolve()
        self.state = state
        self.hashed = 0  # files read whole to hash them (a restart should add none)
        self._known: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if state is not None:
            try:
                self._db = self._open(state)
            except (OSError, sqlite3.Error) as e:
                log.warning("cannot keep digests in %s (%s): they are kept in memory, and "
                            "hashed again at the next start", state, e)

    def _open(self, state: Path) -> sqlite3.Connection:
        state.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            db = sqlite3.connect(state, timeout=10, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, "
                           "size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT)")
                for path, size, mtime_ns, inode, sha256 in db.execute(
                        "SELECT path, size, mtime_ns, inode, sha256 FROM digests"):
                    self._known[path] = ((size, mtime_ns, inode), sha256)
                return db
            except sqlite3.DatabaseError:
                db.close()
                if attempt == 2:
                    raise
                # Only a cache: a damaged one is started afresh.
                log.warning("%s is not a digest state file; starting a new one", state)
                state.unlink()
        raise AssertionError("unreachable")

    @property
    def kept_in(self) -> str:
        """Where the digests are kept, in words."""
        return str(self.state) if self._db is not None else "memory only"

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def known(self, path: Path, st: os.stat_result | None = None) -> str | None:
        """The digest of ``path`` if known without reading it (state, memory or sidecar)."""
        st = st or path.stat()
        with self._lock:
            entry = self._known.get(self.rel(path))
        if entry is not None and entry[0] == _identity(st):
            return entry[1]
        sidecar = path.with_name(path.name + ".sha256")
        try:
            if sidecar.stat().st_mtime_ns >= st.st_mtime_ns:
                digest = sidecar.read_text().split()[0].lower()
                if re.fullmatch(r"[0-9a-f]{64}", digest):
                    return digest
        except (OSError, IndexError, UnicodeDecodeError):
            pass
        return None

    def of(self, path: Path, st: os.stat_result | None = None) -> str:
        """The digest of ``path``: known, else hashed now, in the caller's thread."""
        st = st or path.stat()
        return self.known(path, st) or self.hash(path, st)

    def hash(self, path: Path, st: os.stat_result | None = None,
             progress: Callable[[int], None] | None = None) -> str:
        """Read ``path`` whole, remember its digest and return it. A file that changed while
        being read (still being copied in) is not remembered: it is hashed again when asked."""
        st = st or path.stat()
        digest = self.compute(path, progress)
        after = path.stat()
        with self._lock:
            self.hashed += 1
            if _identity(after) != _identity(st):
                return digest
            rel = self.rel(path)
            self._known[rel] = (_identity(st), digest)
            if self._db is not None:
                try:
                    self._db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)",
                                     (rel, *_identity(st), digest))
                except sqlite3.Error as e:
                    log.warning("cannot write %s (%s): digests are kept in memory only",
                                self.state, e)
                    self._db.close()
                    self._db = None
        return digest

    def compute(self, path: Path, progress: Callable[[int], None] | None = None) -> str:
        """The sha256 of the bytes of ``path``; ``progress(n)`` after each chunk."""
        sha256 = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                sha256.update(chunk)
                if progress is not None:
                    progress(len(chunk))
        return sha256.hexdigest()

    def forget_all_but(self, rels: set[str]) -> None:
        """Drop what is remembered of files no longer served (the state file stays small)."""
        with self._lock:
            gone = [rel for rel in self._known if rel not in rels]
            for rel in gone:
                del self._known[rel]
            if self._db is not None and gone:
                try:
                    self._db.executemany("DELETE FROM digests WHERE path = ?",
                                         [(rel,) for rel in gone])
                except sqlite3.Error as e:
                    log.warning("cannot write %s (%s)", self.state, e)


class _Stopped(Exception):
    pass


class Hasher(threading.Thread):
    """One background thread hashing queued files one at a time; the files a client asks
    for move to the front of the queue."""

    def __init__(self, digests: Digests) -> None:
        super().__init__(name="qmgr-mirror-hasher", daemon=True)
        self.digests = digests
        self._queue: OrderedDict[Path, int] = OrderedDict()  # path -> size
        self._cond = threading.Condition()
        self._stopping = False
        self.current: Path | None = None
        self.current_size = 0
        self.current_done = 0
        self._hashed_bytes = 0
        self._hashing_s = 0.0
        self._batch_files = 0
        self._batch_bytes = 0
        self._batch_started = 0.0

    def want(self, files: Iterable[tuple[Path, int]], first: bool = False) -> None:
        """Queue ``(path, size)`` files not queued yet; ``first``: ahead of the others."""
        with self._cond:
            if not self._queue and self.current is None:
                self._batch_files = self._batch_bytes = 0
                self._batch_started = time.monotonic()
            for path, size in files:
                if path == self.current:
                    continue
                if path not in self._queue:
                    self._queue[path] = size
                if first:
                    self._queue.move_to_end(path, last=False)
            self._cond.notify_all()

    def left(self, paths: Iterable[Path]) -> tuple[int, int, int]:
        """Of ``paths``: how many are still to hash, their bytes left, and seconds until
        they should be done (for ``Retry-After``)."""
        with self._cond:
            files = bytes_left = 0
            ahead = self.current_size - self.current_done if self.current else 0
            for p in paths:
                if p == self.current:
                    files += 1
                    bytes_left += self.current_size - self.current_done
                    ahead = 0
                elif p in self._queue:
                    files += 1
                    bytes_left += self._queue[p]
            rate = (self._hashed_bytes / self._hashing_s if self._hashing_s > 0.5
                    else ASSUMED_HASH_RATE)
        seconds = math.ceil((bytes_left + ahead) / rate)
        return files, bytes_left, min(max(seconds, 1), MAX_RETRY_AFTER)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or being hashed; False if ``timeout`` came first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self.current is None,
                                       timeout)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self.is_alive():
            self.join(5)

    def _progress(self, n: int) -> None:
        if self._stopping:
            raise _Stopped
        self.current_done += n  # read unlocked by left(): an estimate either way

    def run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                path, size = self._queue.popitem(last=False)
                self.current, self.current_size, self.current_done = path, size, 0
            started = time.monotonic()
            hashed = False
            try:
                st = path.stat()
                # Queued twice, or a sidecar written since: nothing to read.
                if self.digests.known(path, st) is None:
                    self.digests.hash(path, st, progress=self._progress)
                    hashed = True
            except _Stopped:
                return
            except (OSError, ValueError) as e:  # gone, unreadable, or moved out of DIR
                log.warning("cannot hash %s: %s", path, e)
            seconds = time.monotonic() - started
            with self._cond:
                self._hashed_bytes += self.current_done
                self._hashing_s += seconds
                self._batch_files += hashed
                self._batch_bytes += self.current_done if hashed else 0
                self.current = None
                left = len(self._queue)
                self._cond.notify_all()
                files, total = self._batch_files, self._batch_bytes
                took = time.monotonic() - self._batch_started
            if hashed:
                log.info("hashed %s (%s) in %s%s", self.digests.rel(path), size_text(size),
                         duration_text(seconds), f"; {left} to go" if left else "")
            if not left and files:
                log.info("hashed %d file%s, %s, in %s: every listing answers now", files,
                         "" if files == 1 else "s", size_text(total), duration_text(took))


@dataclass
class Repository:
    """What ``OWNER/REPO`` is made of: a folder (``DIR/OWNER/REPO``), or some of the files
    of DIR itself (``local/NAME``)."""

    name: str
    folder: Path | None = None
    flat: list[Path] = field(default_factory=list)


@dataclass
class Layout:
    """What a scan of DIR found: the repositories, and GGUF files it does not serve."""

    repositories: list[Repository]
    ignored: list[tuple[Path, str]]  # (file, why)


def flat_name(file_name: str) -> str:
    """The repository name of ``DIR/FILE``: the stem without its shard number and quant,
    within the characters a repository name may have (``gemma-3-270m-it-Q4_K_M.gguf`` ->
    ``gemma-3-270m-it``)."""
    m = SHARD_RE.match(file_name)
    stem = m.group("stem") if m else file_name.removesuffix(".gguf")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", strip_quant_suffix(stem))
    return name.strip("-._")[:96]


def _projector_target(file_name: str) -> str:
    """``mmproj-gemma-3-4b-it-F16.gguf`` -> ``gemma-3-4b-it``: the model a projector is for."""
    stem = PROJECTOR_RE.sub("", file_name.removesuffix(".gguf"))
    return flat_name(stem.strip("-._") + ".gguf")


class Mirror(ThreadingHTTPServer):
    """The server: a thread per connection, the layout of ``root`` read at each request."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, address: tuple[str, int],
                 handler: type[BaseHTTPRequestHandler] | None = None, *,
                 digests: Digests | None = None):
        self.root = root.resolve()
        self.digests = digests or Digests(self.root)
        self.hasher: Hasher | None = None
        self.bytes_sent = 0  # file bytes served, for tests and benchmarks that count them
        self.requests = 0
        self.stats_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler or Handler)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start_hashing(self) -> tuple[int, int]:
        """Hash from now on in a background thread, starting with every served file whose
        digest is not known (smallest repositories first, so that they answer soonest).
        Returns the files and bytes queued."""
        self.hasher = Hasher(self.digests)
        served: set[str] = set()
        queue: list[tuple[int, str, Path, int]] = []
        for repo in self.scan().repositories:
            files = []
            for _, p in self.repo_files(repo):
                try:
                    files.append((p, p.stat()))
                except OSError:
                    continue  # gone since the walk
            total = sum(st.st_size for _, st in files)
            for p, st in files:
                served.add(self.digests.rel(p))
                if self.digests.known(p, st) is None:
                    queue.append((total, repo.name, p, st.st_size))
        self.digests.forget_all_but(served)
        queue.sort(key=lambda item: (item[0], item[1], item[2]))
        self.hasher.want((p, size) for _, _, p, size in queue)
        self.hasher.start()
        return len(queue), sum(item[3] for item in queue)

    def server_close(self) -> None:
        if self.hasher is not None:
            self.hasher.stop()
        super().server_close()
        self.digests.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away, or the network did
            access_log.info("%s connection ended: %s", client_address[0], error)
            return
        log.exception("error while serving %s", client_address[0])

    def digest(self, path: Path, st: os.stat_result) -> str | None:
        """The digest of a served file, or None while it waits for the background hasher."""
        if self.hasher is None:
            return self.digests.of(path, st)
        digest = self.digests.known(path, st)
        if digest is None:
            self.hasher.want([(path, st.st_size)])
        return digest

    # Layout.

    def inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except OSError:
            return False

    def repository(self, owner: str, repo: str) -> Repository | None:
        if not (NAME_RE.match(owner) and NAME_RE.match(repo)):
            return None
        d = self.root / owner / repo
        if d.is_dir() and self.inside(d):
            return Repository(f"{owner}/{repo}", folder=d)
        if owner == FLAT_OWNER:
            files = self.flat_repositories()[0].get(repo)
            if files:
                return Repository(f"{owner}/{repo}", flat=files)
        return None

    def flat_repositories(self) -> tuple[dict[str, list[Path]], list[tuple[Path, str]]]:
        """The repositories made of DIR/*.gguf files (name -> files), and the GGUF files there
        that belong to none (and why)."""
        models: dict[str, list[Path]] = {}
        projectors: list[Path] = []
        orphans: list[tuple[Path, str]] = []
        for p in sorted(self.root.glob("*.gguf")):
            if p.name.startswith(".") or not p.is_file() or not self.inside(p):
                continue
            kind = file_kind(p.name)
            name = flat_name(p.name)
            if kind == "projector":
                projectors.append(p)
            elif kind == "model" and NAME_RE.match(name):
                models.setdefault(name, []).append(p)
            elif kind == "model":
                orphans.append((p, "no repository name can be made of its name"))
        for p in projectors:
            target = _projector_target(p.name)
            if target not in models and len(models) == 1:
                target = next(iter(models))
            if target in models:
                models[target].append(p)
            else:
                orphans.append((p, "a vision projector for no model here"))
        return models, orphans

    def scan(self) -> Layout:
        """Every repository that holds a GGUF file, and the GGUF files left out (and why)."""
        flat, ignored = self.flat_repositories()
        repositories = []
        nested: set[str] = set()
        for owner in sorted(self.root.iterdir()):
            if not owner.is_dir() or not NAME_RE.match(owner.name) or not self.inside(owner):
                continue
            try:
                below = sorted(owner.iterdir())
            except OSError:
                continue  # unreadable (lost+found, someone else's): nothing served from it
            for d in below:
                if d.is_file() and d.name.endswith(".gguf"):
                    ignored.append((d, "one folder down: the mirror serves DIR/NAME.gguf "
                                       "and DIR/OWNER/REPO/NAME.gguf"))
                    continue
                if not (d.is_dir() and NAME_RE.match(d.name) and self.inside(d)):
                    continue
                repo = Repository(f"{owner.name}/{d.name}", folder=d)
                if any(rel.endswith(".gguf") for rel, _ in self.repo_files(repo)):
                    repositories.append(repo)
                    nested.add(repo.name)
        for name, files in sorted(flat.items()):
            full = f"{FLAT_OWNER}/{name}"
            if full in nested:
                ignored += [(p, f"the folder {FLAT_OWNER}/{name} is served by that name")
                            for p in files]
            else:
                repositories.append(Repository(full, flat=files))
        repositories.sort(key=lambda r: r.name)
        return Layout(repositories, ignored)

    def repo_files(self, repo: Repository, sub: str = "",
                   recursive: bool = True) -> list[tuple[str, Path]]:
        """``(path in the repository, file)``: every file (folders left out), sorted."""
        if repo.folder is None:
            return [] if sub else [(p.name, p) for p in repo.flat]
        return [(rel, p) for rel, p in self.repo_entries(repo.folder, sub, recursive)
                if p.is_file()]

    def repo_entries(self, folder: Path, sub: str, recursive: bool) -> list[tuple[str, Path]]:
        """Files and folders of a repository folder below ``sub``; hidden ones, digest
        sidecars and links out of DIR left out."""
        base = folder / sub if sub else folder
        walker = sorted(base.rglob("*")) if recursive else sorted(base.iterdir())
        out = []
        for p in walker:
            rel = p.relative_to(folder).as_posix()
            if any(part.startswith(".") for part in rel.split("/")) or p.name.endswith(
                    ".sha256") or not self.inside(p):
                continue
            out.append((rel, p))
        return out

    def repo_file(self, repo: Repository, rel: str) -> Path | None:
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") or "\0" in p for p in parts):
            return None
        if repo.folder is None:
            return next((p for p in repo.flat if p.name == rel), None)
        f = repo.folder.joinpath(*parts)
        return f if f.is_file() and self.inside(f) else None


def references(mirror: Mirror, repo: Repository) -> list[str]:
    """What to pull from ``repo``: ``hf.co/OWNER/REPO:QUANT`` per variant (``hf://`` and the
    file's path where its quant is unknown or not unique), as qmgr's Hugging Face source
    groups the files."""
    models = [RemoteFile(rel, "") for rel, _ in mirror.repo_files(repo)
              if file_kind(rel) == "model"]
    groups = sorted(group_gguf_files(models).values(), key=lambda g: g[0].name)
    quants = [quant_from_name(g[0].name) or quant_from_name(g[0].name.rpartition("/")[0])
              for g in groups]
    return [f"hf.co/{repo.name}:{q}" if q and quants.count(q) == 1
            else f"hf://{repo.name}/{g[0].name}" for g, q in zip(groups, quants, strict=True)]


def no_models_message(root: Path, layout: Layout) -> str:
    """Why nothing would be served from ``root``, and the layouts that would be."""
    lines = [f"{root} holds no GGUF file where the mirror looks for them. Either"
             f" layout works, and both may be mixed:",
             f"  {root}/NAME-QUANT.gguf              served as hf.co/{FLAT_OWNER}/NAME:QUANT",
             f"  {root}/OWNER/REPO/NAME-QUANT.gguf   served as hf.co/OWNER/REPO:QUANT",
             f"for example {root}/gemma-3-270m-it-Q4_K_M.gguf is served as "
             f"hf.co/{FLAT_OWNER}/gemma-3-270m-it:Q4_K_M"]
    for p, why in layout.ignored[:5]:
        lines.append(f"found {p.relative_to(root.resolve())}: {why}")
    return "\n".join(lines)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Mirror
    server_version = "qmgr-mirror"
    # A client that sends nothing, or stops reading, for this long is disconnected: it would
    # hold a thread (and an open file) forever.
    timeout = 60

    def handle_one_request(self) -> None:
        self.path = ""
        self._status: int | None = None
        self._body_bytes = 0
        self._started = time.monotonic()
        self._gone: OSError | None = None
        super().handle_one_request()
        if self._status is not None:
            self._log_request()

    def parse_request(self) -> bool:
        self._started = time.monotonic()  # not counting the wait for a keep-alive request
        return super().parse_request()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self._status = int(code) if isinstance(code, int) else 0

    def log_message(self, format: str, *args: Any) -> None:
        # http.server's own messages (bad request lines, timeouts): the request line says it.
        log.debug("%s " + format, self.address_string(), *args)

    def _log_request(self) -> None:
        path = CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}",
                              urlsplit(self.path).path or "-")
        gone = f" (client went away: {self._gone})" if self._gone else ""
        access_log.info("%s %s %s %s %d %.3fs%s", self.address_string(), self.command or "-",
                        path, self._status, self._body_bytes,
                        time.monotonic() - self._started, gone)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        with self.server.stats_lock:
            self.server.requests += 1
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        try:
            if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":
                self._tree(parts[2], parts[3], parts[5], "/".join(parts[6:]),
                           parse_qs(url.query), head)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]), head)
            else:
                self._error(404, "no such endpoint")
        except (ConnectionError, TimeoutError) as e:  # reset, broken pipe, stopped reading
            self._gone = e
            self.close_connection = True
        except OSError as e:  # this side: a file unreadable, or gone since it was listed
            log.warning("%s: %s", self.path, e)
            self.close_connection = True
            if self._status is None:  # nothing answered yet
                with contextlib.suppress(OSError):
                    self._error(500, f"cannot read a file: {e.strerror or e}")

    def _body(self, data: bytes, head: bool) -> None:
        if not head:
            self.wfile.write(data)
            self._body_bytes += len(data)

    def _json(self, status: int, value: Any, head: bool,
              headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, text in (headers or {}).items():
            self.send_header(name, text)
        self.end_headers()
        self._body(body, head)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message}, self.command == "HEAD")

    def _tree(self, owner: str, repo_name: str, rev: str, sub: str,
              query: dict[str, list[str]], head: bool) -> None:
        repo = self.server.repository(owner, repo_name)
        if repo is None or not REV_RE.match(rev):
            self._error(404, f"repository {owner}/{repo_name} not found")
            return
        if sub:
            if any(p in ("", ".", "..") for p in sub.split("/")):
                self._error(400, "bad path")
                return
            base = repo.folder / sub if repo.folder else None
            if base is None or not base.is_dir() or not self.server.inside(base):
                self._error(404, f"no folder {sub}")
                return
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        found = (self.server.repo_entries(repo.folder, sub, recursive) if repo.folder
                 else self.server.repo_files(repo))
        entries = []
        waiting: list[tuple[Path, int]] = []
        for rel, p in found:
            if p.is_dir():
                entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": rel})
                continue
            if not os.access(p, os.R_OK):
                continue  # it could not be served: listing it would make clients fail later
            try:
                st = p.stat()
                sha256 = self.server.digests.known(p, st)
                if sha256 is None and self.server.hasher is None:
                    sha256 = self.server.digests.hash(p, st)
            except OSError:
                continue  # gone since the walk
            if sha256 is None:
                waiting.append((p, st.st_size))
                continue
            pointer = lfs_pointer(sha256, st.st_size)
            entries.append({"type": "file", "oid": git_blob_id(pointer), "size": st.st_size,
                            "path": rel, "lfs": {"oid": sha256, "size": st.st_size,
                                                 "pointerSize": len(pointer)}})
        if waiting:
            files = len(waiting) + sum(e["type"] == "file" for e in entries)
            self._hashing(repo, waiting, files, head)
            return
        self._json(200, entries, head)

    def _hashing(self, repo: Repository, waiting: list[tuple[Path, int]], files: int,
                 head: bool) -> None:
        """503 and Retry-After: the listing waits for digests being computed, which go to
        the front of the hasher's queue."""
        hasher = self.server.hasher
        assert hasher is not None
        hasher.want(waiting, first=True)
        left, bytes_left, retry = hasher.left(p for p, _ in waiting)
        left = max(left, 1)  # all hashed since the walk: the next listing answers
        self._json(503, {"error": f"hashing {left} of {files} files ({size_text(bytes_left)} "
                                  f"left) of {repo.name}; try again in {retry} s",
                         "hashing": {"files_left": left, "files": files,
                                     "bytes_left": bytes_left}},
                   head, {"Retry-After": str(retry)})

    def _resolve(self, owner: str, repo_name: str, rev: str, rel: str, head: bool) -> None:
        repo = self.server.repository(owner, repo_name)
        f = self.server.repo_file(repo, rel) if repo and REV_RE.match(rev) else None
        if f is None:
            self._error(404, f"{owner}/{repo_name}: no file {rel!r} at {rev!r}")
            return
        st = f.stat()
        size = st.st_size
        sha256 = self.server.digest(f, st)
        start, end = 0, size - 1
        status = 200
        spec = self.headers.get("Range")
        if spec:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
            if not m or (not m.group(1) and not m.group(2)):
                self._error(416, f"unsupported range {spec!r}")
                return
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if sha256 is not None:
            self.send_header("ETag", f'"{sha256}"')
            self.send_header("X-Linked-Etag", f'"{sha256}"')
        self.send_header("X-Linked-Size", str(size))
        self.send_header("X-Repo-Commit", "0" * 40)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head or not length:
            return
        self.wfile.flush()
        self.send_file(f, start, length)

    def send_file(self, f: Path, start: int, length: int) -> None:
        """The body: ``length`` bytes of ``f`` from ``start``, by ``sendfile``.

        The socket has a timeout, which makes it non-blocking underneath: wait until it can
        take more (at most ``timeout`` seconds) and send again, as ``socket.sendfile`` does,
        counting each piece as it goes."""
        sock = self.connection
        with f.open("rb") as fh, selectors.DefaultSelector() as ready:
            ready.register(sock, selectors.EVENT_WRITE)
            sent = 0
            while sent < length:
                try:
                    n = os.sendfile(sock.fileno(), fh.fileno(), start + sent,
                                    min(length - sent, SEND_CHUNK))
                except BlockingIOError:
                    if not ready.select(self.timeout):
                        raise TimeoutError(f"the client read nothing for {self.timeout} s"
                                           ) from None
                    continue
                if n == 0:
                    break  # the file shrank: the client sees a short body and retries
                sent += n
                self.count(n)

    def count(self, n: int) -> None:
        self._body_bytes += n
        with self.server.stats_lock:
            self.server.bytes_sent += n


def serve(root: Path, host: str = "127.0.0.1", port: int = 8787, *,
          state: Path | None = None) -> Mirror:
    """A mirror bound and ready, its digests kept in ``state`` (else in memory); call
    ``start_hashing()`` to hash in the background, then ``serve_forever()``."""
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    return Mirror(root, (host, port), digests=Digests(root, state))


MAX_REFERENCES_SHOWN = 20


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m qmgr.mirror DIRECTORY [--host H] [--port P] [--state PATH] [-q]``: what
    ``qmgr mirror serve`` runs (it execs this, so the client never imports the mirror)."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="qmgr mirror serve")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--state", type=Path)
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    if args.quiet:
        access_log.setLevel(logging.WARNING)
    state = args.state or default_state_path(args.directory)
    try:
        server = serve(args.directory, args.host, args.port, state=state)
    except OSError as e:
        _say(f"Error: cannot listen on {args.host}:{args.port}: {e.strerror or e}")
        return 1
    try:
        try:
            layout = server.scan()
        except OSError as e:
            _say(f"Error: cannot read {server.root}: {e.strerror or e}")
            return 1
        if not layout.repositories:
            _say(f"Error: {no_models_message(server.root, layout)}")
            return 1
        refs = [r for repo in layout.repositories for r in references(server, repo)]
        _say(f"serving {server.root} at {server.url}: {len(refs)} variant"
             f"{'' if len(refs) == 1 else 's'} in {len(layout.repositories)} "
             f"repositor{'y' if len(layout.repositories) == 1 else 'ies'}")
        for ref in refs[:MAX_REFERENCES_SHOWN]:
            _say(f"  {ref}")
        if len(refs) > MAX_REFERENCES_SHOWN:
            _say(f"  ... and {len(refs) - MAX_REFERENCES_SHOWN} more")
        for path, why in layout.ignored:
            _say(f"not served: {path.relative_to(server.root)}: {why}")
        bound = str(server.server_address[0])
        reachable = server.url
        if bound in ("0.0.0.0", "::"):  # a wildcard address: tell clients a name to use
            reachable = server.url.replace(f"[{bound}]" if ":" in bound else bound,
                                           socket.gethostname(), 1)
        example = refs[0] if refs else "hf.co/OWNER/REPO:QUANT"
        _say(f"pull elsewhere with: QMGR_HF_ENDPOINT={reachable} qmgr pull {example}")
        # systemd stops a service with SIGTERM: close down as on Ctrl-C.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        files, size = server.start_hashing()
        if files:
            _say(f"hashing {files} file{'' if files == 1 else 's'}, {size_text(size)}, in the "
                 f"background; listings answer 503 until done (digests kept in "
                 f"{server.digests.kept_in})")
        else:
            _say(f"every digest is known already (kept in {server.digests.kept_in}); "
                 "nothing to hash")
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
