"""Bodies of downloads, read from the socket straight into the caller's buffer.

httpx hands a body over as new ``bytes`` objects, each copied several times on the way (h11's
receive buffer); for multi-GB files that costs as much CPU as hashing them (measured: 0.9 s per
GiB on loopback, against 0.3 s for ``recv_into``). So the download path sends its ranged GETs
with the standard library's ``http.client`` and reads the body with ``readinto``, into buffers
it then writes with O_DIRECT and hashes without another copy.

Redirects follow the same rules as :func:`qmgr.plugin.http.request`. Where a proxy is
configured for the URL (``HTTPS_PROXY`` and friends) the body comes through httpx instead,
which knows how to use one.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from qmgr.plugin.http import (
    MAX_REDIRECTS,
    REDIRECTS,
    USER_AGENT,
    FetchError,
    check_scheme,
    redact,
    redirect_target,
    request,
)

# A slow link still shows progress, and records on disk what it received, this often (a fast
# one fills a buffer long before: 4 MiB take ~4 ms on loopback).
FILL_SECONDS = 0.1


class Body(Protocol):
    status: int

    def header(self, name: str) -> str | None: ...

    def hang_up(self) -> None:
        """End the transfer from another thread: a read blocked on it returns at once."""
        ...

    def fill(self, buf: memoryview) -> tuple[int, FetchError | None]:
        """Read into ``buf`` until it is full, the body ends, or ``FILL_SECONDS`` passed with
        some bytes read. Returns (bytes read, the error that stopped it, if any): bytes read
        before a failure are never lost. 0 bytes and no error: the body has ended."""
        ...


class SocketBody:
    """A response of ``http.client``; the body is read with ``readinto1``."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 url: str):
        self.conn = conn
        self.response = response
        self.url = url
        self.status = response.status
        length = response.getheader("content-length")
        self.left = int(length) if length and length.isdigit() else None
        self.chunked = response.chunked

    def header(self, name: str) -> str | None:
        return self.response.getheader(name)

    def hang_up(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # close() would not wake a blocked recv

    def fill(self, buf: memoryview) -> tuple[int, FetchError | None]:
        n = 0
        want = len(buf) if self.left is None else min(len(buf), self.left)
        deadline = time.monotonic() + FILL_SECONDS
        fp = self.response.fp
        try:
            while n < want:
                if self.chunked or fp is None:  # rare for files: http.client decodes it
                    got = self.response.readinto(buf[n:want])
                else:
                    got = fp.readinto1(buf[n:want])
                if not got:
                    break
                n += got
                if time.monotonic() > deadline:
                    break
        except TimeoutError:
            return n, FetchError(f"{redact(self.url)}: stalled (no data for "
                                 f"{self.conn.timeout} s)")
        except (OSError, http.client.HTTPException) as e:
            return n, FetchError(f"{redact(self.url)}: {type(e).__name__}: {e}")
        finally:
            if self.left is not None:
                self.left -= n
        return n, None


class HttpxBody:
    """The same over httpx (used through a proxy)."""

    def __init__(self, response: httpx.Response, url: str, stall: float):
        self.response = response
        self.url = url
        self.stall = stall
        self.status = response.status_code
        self.chunks = response.iter_raw()
        self.rest = memoryview(b"")

    def header(self, name: str) -> str | None:
        return self.response.headers.get(name)

    def hang_up(self) -> None:
        with contextlib.suppress(Exception):
            self.response.close()

    def fill(self, buf: memoryview) -> tuple[int, FetchError | None]:
        n = 0
        deadline = time.monotonic() + FILL_SECONDS
        try:
            while n < len(buf):
                if not self.rest:
                    self.rest = memoryview(next(self.chunks, b""))
                    if not self.rest:
                        break
                k = min(len(self.rest), len(buf) - n)
                buf[n:n + k] = self.rest[:k]
                self.rest = self.rest[k:]
                n += k
                if time.monotonic() > deadline:
                    break
        except httpx.TimeoutException:
            return n, FetchError(f"{redact(self.url)}: stalled (no data for {self.stall} s)")
        except httpx.HTTPError as e:
            return n, FetchError(f"{redact(self.url)}: {type(e).__name__}: {e}")
        return n, None


def _proxied(url: str) -> bool:
    proxies = urllib.request.getproxies()
    host = urlsplit(url).hostname or ""
    return urlsplit(url).scheme in proxies and not urllib.request.proxy_bypass(host)


@contextmanager
def get(client: httpx.Client, url: str, headers: dict[str, str], *, insecure: bool,
        http_origin: bool = False,
        stall: float, context: ssl.SSLContext | None) -> Iterator[Body]:
    """GET ``url`` (following redirects safely); yields the final response's :class:`Body`."""
    check_scheme(url, insecure or http_origin)
    if _proxied(url):
        with request(client, "GET", url, headers, insecure=insecure,
                     http_origin=http_origin) as r:
            yield HttpxBody(r, url, stall)
        return
    headers = {"User-Agent": USER_AGENT, **headers}
    origin = urlsplit(url).netloc
    for _hop in range(MAX_REDIRECTS + 1):
        conn, response = _send(url, headers, stall, context)
        try:
            location = response.getheader("location")
            if response.status in REDIRECTS and location:
                url = redirect_target(url, location, origin, headers, insecure, http_origin)
                continue
            yield SocketBody(conn, response, url)
            return
        finally:
            conn.close()
    raise FetchError(f"more than {MAX_REDIRECTS} redirects from {redact(url)}")


def _send(url: str, headers: dict[str, str], stall: float,
          context: ssl.SSLContext | None) -> tuple[http.client.HTTPConnection,
                                                    http.client.HTTPResponse]:
    u = urlsplit(url)
    if u.hostname is None:
        raise FetchError(f"{redact(url)}: no host")
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=stall,
                                           context=context or ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=stall)
    target = u.path or "/"
    if u.query:
        target += "?" + u.query
    try:
        conn.request("GET", target, headers={**headers, "Host": u.netloc.rsplit("@", 1)[-1]})
        response = conn.getresponse()
    except TimeoutError as e:
        conn.close()
        raise FetchError(f"{redact(url)}: timed out ({type(e).__name__})") from e
    except ssl.SSLError as e:
        conn.close()
        if "WRONG_VERSION_NUMBER" in str(e) or "record layer failure" in str(e):
            raise FetchError(f"{redact(url)}: the server does not speak https; pass "
                             "--insecure for a registry on your own network") from e
        raise FetchError(f"{redact(url)}: {type(e).__name__}: {e}") from e
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise FetchError(f"{redact(url)}: {type(e).__name__}: {e}") from e
    return conn, response
