"""Reading a remote GGUF header with HTTP Range requests, before anything is downloaded.

qmgr's header reader asks for growing chunks (64 KiB, doubling to 4 MiB) only as far as the
header goes, so a small model costs one request of 64 KiB and a 262k-token vocabulary about
8 MiB. :attr:`RangeReader.bytes_read` says how much it took.
"""

from __future__ import annotations

import time

import httpx

from qmgr import gguf
from qmgr.errors import QmgrError
from qmgr.plugin.http import DOCUMENT_DEADLINE_S, FetchError, redact, request
from qmgr.plugin.source import RemoteFile


class RangeReader:
    """A :class:`qmgr.gguf.byteio.ByteReader` over HTTP Range requests."""

    def __init__(self, client: httpx.Client, remote: RemoteFile, insecure: bool = False):
        if remote.size is None:
            raise QmgrError(f"{remote.name}: size unknown; cannot read its header remotely")
        self.client = client
        self.remote = remote
        self.insecure = insecure
        self.bytes_read = 0
        self.requests = 0

    @property
    def size(self) -> int:
        assert self.remote.size is not None
        return self.remote.size

    def read_at(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        headers = dict(self.remote.headers)
        headers["Range"] = f"bytes={offset}-{offset + size - 1}"
        self.requests += 1
        out = bytearray()
        started = time.monotonic()
        with request(self.client, "GET", self.remote.url, headers, insecure=self.insecure,
                     http_origin=self.remote.allow_http) as r:
            if r.status_code not in (200, 206):
                raise FetchError(f"{redact(self.remote.url)}: HTTP {r.status_code}")
            skip = offset if r.status_code == 200 else 0  # a server that ignores Range
            for chunk in r.iter_raw(1 << 16):
                if skip:
                    drop = min(skip, len(chunk))
                    chunk, skip = chunk[drop:], skip - drop
                out += chunk
                if len(out) >= size:
                    break
                if time.monotonic() - started > DOCUMENT_DEADLINE_S:
                    raise FetchError(f"{redact(self.remote.url)}: {size} bytes of its header "
                                     f"took longer than {DOCUMENT_DEADLINE_S:.0f} s: the server "
                                     "is too slow", code="too_slow")
        self.bytes_read += min(len(out), size)
        return bytes(out[:size])


def remote_facts(client: httpx.Client, remote: RemoteFile,
                 insecure: bool = False) -> tuple[gguf.ModelFacts, int]:
    """The header facts of a remote file, and the bytes it took to read them."""
    source = RangeReader(client, remote, insecure)
    facts = gguf.facts_from_header(gguf.read_header_from(source))
    return facts, source.bytes_read
