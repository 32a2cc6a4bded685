"""``qmgr mirror serve DIR``: a read-only mirror speaking the Hugging Face endpoints qmgr uses.

``DIR/OWNER/REPO/<files>`` is served as repository ``OWNER/REPO`` (so ``DIR/test/tiny/
tiny-Q8_0.gguf`` is ``hf.co/test/tiny:Q8_0`` with ``QMGR_HF_ENDPOINT=http://host:port``):

- ``GET /api/models/OWNER/REPO/tree/REV[/PATH][?recursive=true]``: files with size, a git
  blob id and the LFS sha256, as the Hub answers;
- ``GET|HEAD /OWNER/REPO/resolve/REV/PATH``: the bytes, with ``Range`` (one range), ``ETag``,
  ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``.

Standard library only: a threading HTTP/1.1 server that sends file bodies with ``sendfile``.
It binds to loopback unless told otherwise, never follows a symlink out of DIR, and answers
every revision with the folder's current files. Digests are computed once per file (by size
and modification time) and kept in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CHUNK = 1 << 20


class Digests:
    """sha256 and git blob ids of files, computed once per (path, size, mtime).

    A file may come with its digest beside it (``NAME.sha256``: 64 hex digits, as a
    registry's LFS pointer gives it), newer than the file: then it is served without hashing
    gigabytes first. Clients verify what they download, so a wrong sidecar fails the pull, it
    never publishes wrong bytes.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._lock = threading.Lock()

    def of(self, path: Path) -> tuple[str, str]:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        sidecar = path.with_name(path.name + ".sha256")
        try:
            if sidecar.stat().st_mtime_ns >= st.st_mtime_ns:
                digest = sidecar.read_text().split()[0].lower()
                if re.fullmatch(r"[0-9a-f]{64}", digest):
                    # No git blob id without reading the file: derive a stable stand-in.
                    return digest, hashlib.sha1(digest.encode(), usedforsecurity=False).hexdigest()
        except (OSError, IndexError):
            pass
        sha256 = hashlib.sha256()
        git = hashlib.sha1(f"blob {st.st_size}\0".encode(), usedforsecurity=False)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                sha256.update(chunk)
                git.update(chunk)
        result = (sha256.hexdigest(), git.hexdigest())
        with self._lock:
            self._cache[key] = result
        return result


class Mirror(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, address: tuple[str, int],
                 handler: type[BaseHTTPRequestHandler] | None = None):
        self.root = root.resolve()
        self.digests = Digests()
        self.bytes_sent = 0  # body bytes, for tests and benchmarks that count what was served
        self.requests = 0
        self.stats_lock = threading.Lock()
        super().__init__(address, handler or Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def repo_dir(self, owner: str, repo: str) -> Path | None:
        if not (NAME_RE.match(owner) and NAME_RE.match(repo)):
            return None
        d = self.root / owner / repo
        return d if d.is_dir() and self.inside(d) else None

    def inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except OSError:
            return False

    def repo_file(self, repo_dir: Path, rel: str) -> Path | None:
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") or "\0" in p for p in parts):
            return None
        f = repo_dir.joinpath(*parts)
        return f if f.is_file() and self.inside(f) else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Mirror
    server_version = "qmgr-mirror"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

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
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _error(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _tree(self, owner: str, repo: str, rev: str, sub: str, query: dict[str, list[str]],
              head: bool) -> None:
        repo_dir = self.server.repo_dir(owner, repo)
        if repo_dir is None or not REV_RE.match(rev):
            self._error(404, f"repository {owner}/{repo} not found")
            return
        base = repo_dir
        if sub:
            if any(p in ("", ".", "..") for p in sub.split("/")):
                self._error(400, "bad path")
                return
            base = repo_dir / sub
            if not base.is_dir() or not self.server.inside(base):
                self._error(404, f"no folder {sub}")
                return
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = []
        walker = sorted(base.rglob("*")) if recursive else sorted(base.iterdir())
        for p in walker:
            if p.name.startswith(".") or p.name.endswith(".sha256") or not self.server.inside(p):
                continue
            rel = p.relative_to(repo_dir).as_posix()
            if p.is_dir():
                entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": rel})
            elif p.is_file():
                sha256, git = self.server.digests.of(p)
                size = p.stat().st_size
                entries.append({"type": "file", "oid": git, "size": size, "path": rel,
                                "lfs": {"oid": sha256, "size": size, "pointerSize": 134}})
        body = json.dumps(entries).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _resolve(self, owner: str, repo: str, rev: str, rel: str, head: bool) -> None:
        repo_dir = self.server.repo_dir(owner, repo)
        f = self.server.repo_file(repo_dir, rel) if repo_dir and REV_RE.match(rev) else None
        if f is None:
            self._error(404, f"{owner}/{repo}: no file {rel!r} at {rev!r}")
            return
        size = f.stat().st_size
        sha256, _ = self.server.digests.of(f)
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
        """The body: ``length`` bytes of ``f`` from ``start``, by ``sendfile``."""
        with f.open("rb") as fh:
            sent = 0
            while sent < length:
                n = os.sendfile(self.connection.fileno(), fh.fileno(), start + sent,
                                min(length - sent, 1 << 30))
                if n == 0:
                    break
                sent += n
                self.count(n)

    def count(self, n: int) -> None:
        with self.server.stats_lock:
            self.server.bytes_sent += n


def serve(root: Path, host: str = "127.0.0.1", port: int = 8787) -> Mirror:
    """A mirror bound and ready; call ``serve_forever()`` (or run it in a thread)."""
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    return Mirror(root, (host, port))
