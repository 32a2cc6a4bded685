"""A mirror that misbehaves on request: for tests of what qmgr does with a lying server.

The real ``qmgr.mirror`` server with a handler whose body and listing can be made to drop,
stall, lie or redirect. ``server.behavior`` is a dict the test sets; ``server.bytes_sent``
counts body bytes served.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from qmgr import mirror


class BadHandler(mirror.Handler):
    server: BadMirror

    def _dispatch(self, head: bool) -> None:
        with self.server.stats_lock:  # what each request carried, for tests of credentials
            self.server.behavior.setdefault("log", []).append(
                {"method": self.command, "path": self.path, "headers": dict(self.headers)})
        super()._dispatch(head)

    def _resolve(self, owner: str, repo: str, rev: str, rel: str, head: bool) -> None:
        b = self.server.behavior
        if b.get("redirect_to") and not head:
            self.send_response(302)
            self.send_header("Location", b["redirect_to"] + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if b.get("mode") == "ignore_range" and "Range" in self.headers:
            del self.headers["Range"]
        super()._resolve(owner, repo, rev, rel, head)

    def send_file(self, f: Path, start: int, length: int) -> None:
        b = self.server.behavior
        mode = b.get("mode")
        with self.server.stats_lock:
            b["bodies"] = b.get("bodies", 0) + 1
            misbehave = b.get("times", 1 << 30) >= b["bodies"]
        if not misbehave or mode in (None, "ignore_range"):
            return self._throttled(f, start, length, b.get("rate"))
        half = max(1, length // 2)
        if mode == "drop":
            self._throttled(f, start, half, None)
            self._hang_up()
        elif mode == "drop_then_change":  # half, then the file is replaced (same size)
            self._throttled(f, start, half, None)
            self.wfile.flush()
            f.write_bytes(b["replacement"])
            self._hang_up()
        elif mode == "trickle":  # a byte at a time, never stalling, never getting there
            for i in range(length):
                if self.server.stopping.wait(b.get("every_s", 0.2)):
                    break
                with f.open("rb") as fh:
                    fh.seek(start + i)
                    self.wfile.write(fh.read(1))
                self.wfile.flush()
                self.count(1)
            self._hang_up()
        elif mode == "hangup":  # headers, then nothing: no progress at all
            self._hang_up()
        elif mode == "half_then_hangup":
            if b["bodies"] == 1:
                self._throttled(f, start, half, None)
            self._hang_up()
        elif mode == "stall":
            self._throttled(f, start, half, None)
            self.wfile.flush()
            time.sleep(b.get("stall_s", 3))
            self._hang_up()
        elif mode == "wrong_bytes":
            data = bytes(length)  # zeros: right length, wrong bytes
            self.wfile.write(data)
            self.count(len(data))
        elif mode == "extra_bytes":
            self._throttled(f, start, length, None)
            self.wfile.write(b"garbage after the body")
        else:
            raise AssertionError(f"unknown mode {mode}")

    def _hang_up(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(2)

    def _throttled(self, f: Path, start: int, length: int, rate: float | None) -> None:
        if rate is None:
            return super().send_file(f, start, length)
        chunk = 256 << 10
        with f.open("rb") as fh:
            fh.seek(start)
            left = length
            while left > 0:
                data = fh.read(min(chunk, left))
                if not data:
                    break
                self.wfile.write(data)
                self.count(len(data))
                left -= len(data)
                time.sleep(len(data) / rate)

    def _tree(self, owner: str, repo: str, rev: str, sub: str, query: Any, head: bool) -> None:
        import json

        b = self.server.behavior
        with self.server.stats_lock:
            busy = b.get("busy", 0) > 0
            if busy:
                b["busy"] -= 1
        if b.get("trickle_listing"):  # a listing a byte at a time, forever
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            with self.server.stats_lock:
                b["trickling"] = b.get("trickling", 0) + 1
            try:
                while not self.server.stopping.wait(0.2):
                    self.wfile.write(b" ")
                    self.wfile.flush()
            except OSError:  # the client went away
                pass
            finally:
                with self.server.stats_lock:
                    b["trickling"] -= 1
            return
        if busy:  # a server up but not ready, as qmgr's mirror while it hashes
            body = json.dumps({"error": "hashing 1 of 2 files"}).encode()
            self.send_response(503)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        rewrite = b.get("tree")
        if rewrite is None:
            return super()._tree(owner, repo, rev, sub, query, head)

        body = json.dumps(rewrite).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class BadMirror(mirror.Mirror):
    def __init__(self, root: Path, port: int = 0, ssl_context: Any = None):
        self.behavior: dict[str, Any] = {}
        self.stopping = threading.Event()  # ends the handlers that trickle
        super().__init__(root, ("127.0.0.1", port), BadHandler)
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)
        self.scheme = "https" if ssl_context is not None else "http"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


def sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    os.utime(path)
    return path
