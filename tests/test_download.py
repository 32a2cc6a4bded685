"""The download data path in-process: O_DIRECT with unaligned pieces, the page-cache fallback,
parallel parts, and downloads through an HTTP proxy (which take the httpx path)."""

from __future__ import annotations

import http.client
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from badmirror import BadMirror, random_file, sha256_of

from qmgr.fetch.download import ALIGN, Download, Options
from qmgr.plugin.http import make_client
from qmgr.plugin.source import RemoteFile
from qmgr.store import Store

SIZE = 9 * (1 << 20) + 1234  # not a multiple of anything


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[BadMirror, Path]]:
    d = tmp_path / "mirror" / "test" / "big"
    d.mkdir(parents=True)
    f = random_file(d / "big-Q8_0.gguf", SIZE, seed=7)
    server = BadMirror(tmp_path / "mirror")
    try:
        yield server, f
    finally:
        server.stop()


def download(server: BadMirror, f: Path, store_root: Path, **opts: Any) -> Download:
    store = Store(store_root)
    store.create()
    remote = RemoteFile(f.name, f"{server.url}/test/big/resolve/main/{f.name}", SIZE,
                        sha256_of(f), allow_http=True)
    options = Options(backoff=0.01, stall_timeout=2, retries=8, **opts)
    with make_client(2) as client:
        dl = Download(client, store, remote, options)
        sha, size, path = dl.run()
    assert (sha, size) == (remote.sha256, SIZE)
    assert path.read_bytes() == f.read_bytes()
    assert list(store.partial.iterdir()) == []
    return dl


def direct_io_works(folder: Path) -> bool:
    """Whether this filesystem takes an aligned O_DIRECT write (tmpfs, for one, may not)."""
    import mmap

    probe = folder / "probe"
    probe.write_bytes(b"")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.pwrite(fd, mmap.mmap(-1, ALIGN), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct_io", [True, False], ids=["o_direct", "page_cache"])
def test_connections_dropped_at_odd_offsets(served: tuple[BadMirror, Path], tmp_path: Path,
                                            direct_io: bool) -> None:
    server, f = served
    # Each of the first 4 answers stops halfway through what was asked: the pieces that
    # follow start at offsets that are not aligned for O_DIRECT.
    server.behavior.update(mode="drop", times=4)
    dl = download(server, f, tmp_path / "store", direct_io=direct_io)
    assert server.behavior["bodies"] == 5
    if direct_io and direct_io_works(tmp_path):
        # Most bytes went around the page cache; the unaligned ends of pieces through it.
        assert SIZE - 8 * 2 * ALIGN < dl.direct_bytes < SIZE
    else:
        assert dl.direct_bytes == 0


def test_parallel_parts_with_drops(served: tuple[BadMirror, Path], tmp_path: Path) -> None:
    server, f = served
    server.behavior.update(mode="drop", times=3)
    dl = download(server, f, tmp_path / "store", parts=3, part_threshold=1)
    assert len(dl.parts) == 3 and all(p.finished for p in dl.parts)
    assert server.bytes_sent == SIZE  # a dropped connection's bytes are kept, not fetched again


class Proxy(http.server.ThreadingHTTPServer):
    """A forward proxy for plain http: what a client behind a corporate proxy talks to."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: Proxy
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self.server.requests.append(self.path)
        u = http.client.urlsplit(self.path)
        conn = http.client.HTTPConnection(u.hostname or "", u.port)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "proxy-connection"}
        conn.request("GET", u.path, headers=headers)
        r = conn.getresponse()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("connection", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        while data := r.read(1 << 16):
            self.wfile.write(data)
        conn.close()

    def log_message(self, *args: Any) -> None:
        pass


def test_download_through_a_proxy(served: tuple[BadMirror, Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server, f = served
    proxy = Proxy()
    try:
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        server.behavior.update(mode="drop", times=1)
        download(server, f, tmp_path / "store")
        assert len(proxy.requests) == 2  # the dropped answer and its retry, both proxied
        assert all(r.startswith(server.url) for r in proxy.requests)
    finally:
        proxy.shutdown()
        proxy.server_close()
