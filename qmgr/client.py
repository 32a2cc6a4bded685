"""The client side of the socket: HTTP/1.1 over AF_UNIX, error mapping, daemon autostart.

This is on the start-up path of every ``qmgr`` command, so it speaks the little HTTP it needs
with the standard library's ``socket`` (httpx costs ~230 ms to import on a 2-core machine;
``http.client`` ~50 ms). One request per connection (``Connection: close``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from qmgr.errors import DaemonUnavailable, QmgrError
from qmgr.settings import (
    COMPARED_ENV,
    FORWARDED_ENV,
    Settings,
    check_private_dir,
    client_socket,
    user_runtime_dir,
)

AUTOSTART_WAIT_S = 30.0


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def _parse(raw: bytes, head_only: bool = False) -> Response:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise QmgrError("the daemon closed the connection without a complete answer",
                        code="bad_response")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked" and not head_only:
        body = _dechunk(body)
    return Response(status, headers, body)


def _raise_for(response: Response) -> None:
    """The daemon's JSON error as a :class:`QmgrError` with its code."""
    try:
        data = response.json()
    except ValueError:
        data = None
    err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
    raise QmgrError(err.get("message") or f"HTTP {response.status}",
                    code=err.get("code", "error"))


class Client:
    def __init__(self, settings: Settings, timeout: float | None = None):
        self.settings = settings
        self.socket_path = client_socket(settings)
        self.timeout = timeout
        if self.socket_path.parent == user_runtime_dir() and not settings.socket_explicit:
            check_private_dir(self.socket_path.parent)
        self.env_header = env_header(os.environ)

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.socket_path))
        except OSError:
            s.close()
            raise
        return s

    def connect(self) -> socket.socket:
        """A connection to the daemon, starting one first if allowed and none answers."""
        try:
            return self._connect()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if not self.settings.autostart:
                raise DaemonUnavailable(
                    f"no qmgr daemon answers on {self.socket_path} ({e.strerror}); start one "
                    "with `qmgr daemon`, or drop --no-autostart / QMGR_NO_AUTOSTART"
                ) from e
        except PermissionError as e:
            raise DaemonUnavailable(
                f"permission denied on {self.socket_path}: the daemon's socket admits its own "
                "user and group only (add yourself to the qmgr group for the system service)"
            ) from e
        self.autostart()
        return self._connect()

    def autostart(self) -> None:
        """Start a per-user daemon in the background and wait until it answers."""
        import subprocess

        log_path = self.settings.home / "qmgrd.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "qmgr.daemon.main", "--socket", str(self.socket_path),
               "--home", str(self.settings.home)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, close_fds=True)
        print(f"qmgr: started the daemon (pid {proc.pid}, log {log_path})", file=sys.stderr)
        deadline = time.monotonic() + AUTOSTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                self._connect().close()
                return
            except OSError:
                pass
            code = proc.poll()
            # Exit 1 with a live socket means another client started a daemon first: fine.
            if code not in (None, 1):
                break
            time.sleep(0.05)
        raise DaemonUnavailable(f"the daemon did not come up on {self.socket_path}; "
                                f"see {log_path}")

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None) -> Any:
        return self.request_raw(method, path, body, query).json()

    def request_raw(self, method: str, path: str, body: Any = None,
                    query: dict[str, Any] | None = None) -> Response:
        """The daemon's answer as it came (JSON bytes); raises :class:`QmgrError` on errors."""
        if query:
            path += "?" + urlencode(query)
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: qmgrd\r\nConnection: close\r\n"
                f"Accept: application/json\r\nContent-Length: {len(payload)}\r\n"
                f"{self.env_header}")
        if body is not None:
            head += "Content-Type: application/json\r\n"
        with self.connect() as s:
            s.sendall(head.encode() + b"\r\n" + payload)
            chunks = []
            while data := s.recv(1 << 16):
                chunks.append(data)
        response = _parse(b"".join(chunks))
        if response.status >= 400:
            _raise_for(response)
        return response

    def stream_lines(self, path: str, body: Any = None) -> Any:
        """A newline-delimited JSON stream (GET, or POST with a body); yields one decoded
        object per line as it arrives."""
        method = "GET" if body is None else "POST"
        payload = b"" if body is None else json.dumps(body).encode()
        with self.connect() as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: qmgrd\r\nConnection: close\r\n"
                      "Accept: application/x-ndjson\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(payload)}\r\n{self.env_header}\r\n".encode()
                      + payload)
            f = s.makefile("rb")
            head = b""
            while (line := f.readline()) not in (b"\r\n", b"\n", b""):
                head += line
            response = _parse(head + b"\r\n", head_only=True)
            if response.status >= 400:
                _raise_for(_parse(head + b"\r\n" + f.read()))
            chunked = response.headers.get("transfer-encoding") == "chunked"
            buffer = b""
            while True:
                if chunked:
                    size_line = f.readline()
                    if not size_line:
                        return
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        return
                    data = f.read(size)
                    f.readline()
                else:
                    data = f.read1(65536)
                    if not data:
                        return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)

    def get(self, path: str, /, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str, /, **query: Any) -> Any:
        return self.request("DELETE", path, query=query or None)


def env_header(environ: Any) -> str:
    """The ``X-Qmgr-Env`` header line with the client's settings the daemon must know (see
    :data:`qmgr.settings.FORWARDED_ENV`), or nothing when none is set."""
    sent = {k: environ[k] for k in (*FORWARDED_ENV, *COMPARED_ENV) if environ.get(k)}
    if not sent:
        return ""
    # ensure_ascii: a header is latin-1; JSON escapes keep any value on one line.
    return f"X-Qmgr-Env: {json.dumps(sent, ensure_ascii=True)}\r\n"


def ref_path(ref: str) -> str:
    return quote(ref, safe="")


def absolute(path: str) -> str:
    return os.path.abspath(Path(path).expanduser())
