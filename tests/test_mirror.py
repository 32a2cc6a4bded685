"""``qmgr mirror serve``: layouts, digests kept across restarts, hashing in the background
(503 + Retry-After until done), the request log, clients that go away, and pulls through it."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from badmirror import random_file, sha256_of
from conftest import QMGR, Env
from ggufmake import make_tiny_gguf

from qmgr import mirror
from qmgr.mirror import Digests, Handler, Mirror, flat_name


def get(server: Mirror, path: str, method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def tree(server: Mirror, repo: str) -> tuple[int, dict[str, str], Any]:
    status, headers, body = get(server, f"/api/models/{repo}/tree/main?recursive=true")
    return status, headers, json.loads(body)


class Running:
    """A mirror served from a thread, closed at the end of the ``with``."""

    def __init__(self, root: Path, digests: Digests, handler: type[Handler] = Handler,
                 background: bool = True):
        self.server = Mirror(root, ("127.0.0.1", 0), handler, digests=digests)
        self.queued = self.server.start_hashing() if background else (0, 0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Mirror:
        self.thread.start()
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """A folder in both layouts: flat files of two models (one sharded), and OWNER/REPO."""
    from gguf import GGUFValueType

    root = tmp_path / "models"
    nested = root / "test" / "tiny"
    nested.mkdir(parents=True)
    make_tiny_gguf(nested / "tiny-Q8_0.gguf", ftype="Q8_0", seed=1)
    make_tiny_gguf(root / "gemma-3-270m-it-Q8_0.gguf", ftype="Q8_0", seed=2)
    make_tiny_gguf(root / "gemma-3-270m-it-F16.gguf", ftype="F16", seed=3)
    for i in range(3):
        make_tiny_gguf(root / f"big-Q8_0-{i + 1:05d}-of-00003.gguf", ftype="Q8_0", seed=10 + i,
                       extra_kv={"split.no": (i, GGUFValueType.UINT16),
                                 "split.count": (3, GGUFValueType.UINT16),
                                 "split.tensors.count": (63, GGUFValueType.INT32)})
    (root / "notes.txt").write_text("not served")
    return root


@pytest.mark.parametrize("file,name", [
    ("gemma-3-270m-it-Q4_K_M.gguf", "gemma-3-270m-it"),
    ("gemma-3-270m-it-Q8_0.gguf", "gemma-3-270m-it"),
    ("Llama-3.2-1B-Instruct.IQ4_XS.gguf", "Llama-3.2-1B-Instruct"),
    ("big-Q8_0-00002-of-00003.gguf", "big"),
    ("My Model (v2)-F16.gguf", "My-Model-v2"),
    ("plain.gguf", "plain"),
])
def test_flat_files_are_named_after_their_stem_without_the_quant(file: str, name: str) -> None:
    assert flat_name(file) == name


def test_layouts_and_references(mixed: Path) -> None:
    (mixed / "mmproj-gemma-3-270m-it-F16.gguf").write_bytes(b"projector")
    (mixed / "odd").mkdir()
    shutil.copyfile(mixed / "gemma-3-270m-it-F16.gguf", mixed / "odd" / "x-Q8_0.gguf")
    server = Mirror(mixed, ("127.0.0.1", 0))
    try:
        layout = server.scan()
        refs = [r for repo in layout.repositories for r in mirror.references(server, repo)]
        assert refs == ["hf.co/local/big:Q8_0", "hf.co/local/gemma-3-270m-it:F16",
                        "hf.co/local/gemma-3-270m-it:Q8_0", "hf.co/test/tiny:Q8_0"]
        gemma = server.repository("local", "gemma-3-270m-it")
        assert gemma is not None
        assert [rel for rel, _ in server.repo_files(gemma)] == [
            "gemma-3-270m-it-F16.gguf", "gemma-3-270m-it-Q8_0.gguf",
            "mmproj-gemma-3-270m-it-F16.gguf"]  # the projector goes with its model
        assert [(p.name, why.split(":")[0]) for p, why in layout.ignored] == [
            ("x-Q8_0.gguf", "one folder down")]
        assert server.repository("local", "notes") is None
    finally:
        server.server_close()


def test_digests_are_kept_across_restarts(mixed: Path, tmp_path: Path) -> None:
    state = tmp_path / "cache" / "state.sqlite"
    files = sorted(p for p in mixed.rglob("*.gguf"))
    digests = Digests(mixed, state)
    with Running(mixed, digests) as server:
        assert server.hasher is not None and server.hasher.wait_idle(60)
        assert digests.hashed == len(files) == 6
        status, _, listing = tree(server, "local/gemma-3-270m-it")
        assert status == 200
        by_path = {e["path"]: e for e in listing}
        q8 = mixed / "gemma-3-270m-it-Q8_0.gguf"
        assert by_path[q8.name]["lfs"]["oid"] == sha256_of(q8)
        # The Hub's oid: the git blob id of the file's LFS pointer.
        pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256_of(q8)}\n"
                   f"size {q8.stat().st_size}\n").encode()
        assert by_path[q8.name]["lfs"]["pointerSize"] == len(pointer)
        assert by_path[q8.name]["oid"] == mirror.git_blob_id(pointer)

    # A restart reads nothing again: every listing answers at once.
    digests = Digests(mixed, state)
    running = Running(mixed, digests)
    assert running.queued == (0, 0)
    with running as server:
        status, _, again = tree(server, "local/gemma-3-270m-it")
        assert status == 200 and again == listing
        assert tree(server, "test/tiny")[0] == 200
    assert digests.hashed == 0

    # Changed files are hashed again, and only they: new bytes (size and mtime change), and
    # the same size and mtime with another inode (a file replaced by a copy).
    changed = mixed / "test" / "tiny" / "tiny-Q8_0.gguf"
    with changed.open("ab") as f:
        f.write(b"\0" * 32)
    replaced = mixed / "gemma-3-270m-it-F16.gguf"
    st = replaced.stat()
    copy = replaced.with_name("copy.tmp")
    shutil.copyfile(replaced, copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    copy.rename(replaced)
    digests = Digests(mixed, state)
    running = Running(mixed, digests)
    assert running.queued == (2, changed.stat().st_size + replaced.stat().st_size)
    with running as server:
        assert server.hasher is not None and server.hasher.wait_idle(60)
        status, _, listing = tree(server, "test/tiny")
        assert status == 200 and listing[0]["lfs"]["oid"] == sha256_of(changed)
    assert digests.hashed == 2


def test_a_damaged_state_file_is_started_afresh(mixed: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state.sqlite"
    state.write_bytes(b"not a database" * 100)
    digests = Digests(mixed, state)
    assert digests.kept_in == str(state)
    assert "not a digest state file" in caplog.text
    digests.of(mixed / "test" / "tiny" / "tiny-Q8_0.gguf")
    digests.close()
    assert Digests(mixed, state).known(mixed / "test" / "tiny" / "tiny-Q8_0.gguf")


class HeldDigests(Digests):
    """Hashes only when the test lets it: each file waits for ``go``; records the order."""

    def __init__(self, root: Path, state: Path | None = None):
        super().__init__(root, state)
        self.go = threading.Event()
        self.order: list[str] = []
        self.waiting = threading.Event()

    def compute(self, path: Path, progress: Any = None) -> str:
        self.order.append(path.name)
        self.waiting.set()
        assert self.go.wait(60), "the test never let the hasher go"
        return super().compute(path, progress)


def test_listings_answer_503_until_their_files_are_hashed(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    small = [make_tiny_gguf(root / f"small-{q}.gguf", ftype=q, seed=i)
             for i, q in enumerate(("Q8_0", "F16"))]
    big = random_file(root / "big-Q8_0.gguf", 3 << 20, seed=1)
    ready = make_tiny_gguf(root / "ready-Q8_0.gguf", ftype="Q8_0", seed=5)
    (root / "ready-Q8_0.gguf.sha256").write_text(sha256_of(ready) + "\n")
    digests = HeldDigests(root)
    running = Running(root, digests)
    # The smaller repository first; the one with a digest beside its file not at all.
    assert running.queued == (3, sum(p.stat().st_size for p in [*small, big]))
    with running as server:
        assert digests.waiting.wait(30)  # the hasher holds small-F16, the first file
        status, _, body = tree(server, "local/small")
        assert status == 503 and body["hashing"]["files_left"] == 2
        status, headers, body = tree(server, "local/big")
        assert status == 503
        assert 1 <= int(headers["retry-after"]) <= mirror.MAX_RETRY_AFTER
        assert body["error"].startswith("hashing 1 of 1 files (3.0 MiB left) of local/big")
        assert body["hashing"] == {"files_left": 1, "files": 1, "bytes_left": 3 << 20}
        # Another repository whose digests are known answers meanwhile.
        status, _, listing = tree(server, "local/ready")
        assert status == 200 and listing[0]["lfs"]["oid"] == sha256_of(ready)
        # Bytes are served before their digest is known; the digest headers come later.
        url = f"/local/big/resolve/main/{big.name}"
        status, headers, data = get(server, url, headers={"Range": "bytes=0-99"})
        assert status == 206 and data == big.read_bytes()[:100]
        assert "x-linked-etag" not in headers and headers["x-linked-size"] == str(3 << 20)
        digests.go.set()
        assert server.hasher is not None and server.hasher.wait_idle(60)
        # local/big was the last one asked for: it went next.
        assert digests.order == ["small-F16.gguf", "big-Q8_0.gguf", "small-Q8_0.gguf"]
        status, _, listing = tree(server, "local/big")
        assert status == 200 and listing[0]["lfs"]["oid"] == sha256_of(big)
        status, headers, _ = get(server, url, "HEAD")
        assert headers["x-linked-etag"] == f'"{sha256_of(big)}"'
        # A new file is hashed when asked for.
        make_tiny_gguf(root / "late-Q8_0.gguf", ftype="Q8_0", seed=9)
        assert tree(server, "local/late")[0] == 503
        assert server.hasher.wait_idle(60)
        assert tree(server, "local/late")[0] == 200


class QuickHandler(Handler):
    timeout = 1  # the server gives up on a client that reads nothing for a second


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.errors: list[logging.LogRecord] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.lines.append(record.getMessage())
            if record.levelno >= logging.WARNING:
                self.errors.append(record)
            self.changed.notify_all()

    def wait_for(self, text: str) -> str:
        with self.changed:
            assert self.changed.wait_for(lambda: any(text in x for x in self.lines), 60), \
                self.lines
            return next(x for x in self.lines if text in x)


def test_a_client_that_stops_reading_is_dropped_quietly(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    big = random_file(root / "big-Q8_0.gguf", 32 << 20, seed=2)
    records = Records()
    logging.getLogger("qmgr.mirror").addHandler(records)  # the request log's parent
    logging.getLogger("qmgr.mirror").setLevel(logging.DEBUG)
    try:
        with Running(root, Digests(root), QuickHandler, background=False) as server, \
                socket.create_connection(("127.0.0.1", server.server_address[1])) as s:
            s.sendall(f"GET /local/big/resolve/main/{big.name} HTTP/1.1\r\n"
                      "Host: x\r\n\r\n".encode())
            line = records.wait_for("client went away")
            assert re.fullmatch(r"127\.0\.0\.1 GET /local/big/resolve/main/big-Q8_0\.gguf 200 "
                                r"\d+ [\d.]+s \(client went away: the client read nothing "
                                r"for 1 s\)", line), line
            assert int(line.split()[4]) < big.stat().st_size
            assert get(server, "/api/models/local/big/tree/main")[0] == 200  # still serving
        assert records.errors == []
    finally:
        logging.getLogger("qmgr.mirror").removeHandler(records)
        logging.getLogger("qmgr.mirror").setLevel(logging.NOTSET)


class Served:
    """``qmgr mirror serve`` as a subprocess, its stderr in a file."""

    def __init__(self, root: Path, tmp: Path, *args: str, env: dict[str, str] | None = None):
        self.log = tmp / f"mirror-{time.monotonic_ns()}.log"
        env = {**(env or os.environ), "XDG_CACHE_HOME": str(tmp / "cache")}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([QMGR, "mirror", "serve", str(root), "--port", "0",
                                          *args], env=env, stdout=subprocess.DEVNULL,
                                         stderr=out)
        m = self.wait_for(r"at (http://127\.0\.0\.1:\d+)")
        self.url = m.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1) -> re.Match[str]:
        """The first match of ``pattern`` in the log once there are ``count`` of them."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.text()))
            if len(found) >= count:
                return found[0]
            assert self.proc.poll() is None, self.text()
            time.sleep(0.05)
        raise AssertionError(f"not {count} of {pattern!r} in:\n{self.text()}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # as systemd stops it; SIGINT may be ignored
            assert self.proc.wait(30) == 0, self.text()
        return self.text()


@pytest.fixture
def served(mixed: Path, tmp_path: Path) -> Iterator[Served]:
    s = Served(mixed, tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_start_says_what_it_serves_and_that_it_hashes(served: Served, mixed: Path,
                                                      tmp_path: Path) -> None:
    served.wait_for("every listing answers now")
    text = served.stop()
    for ref in ("hf.co/local/big:Q8_0", "hf.co/local/gemma-3-270m-it:Q8_0",
                "hf.co/local/gemma-3-270m-it:F16", "hf.co/test/tiny:Q8_0"):
        assert f"  {ref}\n" in text
    assert f"QMGR_HF_ENDPOINT={served.url} qmgr pull hf.co/local/big:Q8_0" in text
    assert re.search(r"hashing 6 files, [\d.]+ [KM]iB, in the background; listings answer 503 "
                     r"until done \(digests kept in .*/cache/qmgr/mirror/models-\w+\.sqlite\)",
                     text), text
    again = Served(mixed, tmp_path)
    try:
        again.wait_for("pull elsewhere")
        assert "every digest is known already" in again.wait_for(r".*nothing to hash").group()
    finally:
        assert "Traceback" not in again.stop()


def test_request_log_and_clients_that_go_away(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    size = 64 << 20
    with (root / "big-Q8_0.gguf").open("wb") as f:
        f.truncate(size)  # a hole: more than any socket buffer, no disk
    served = Served(root, tmp_path)
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", served.port)) as s:
                s.sendall(b"GET /local/big/resolve/main/big-Q8_0.gguf?x=1 HTTP/1.1\r\n"
                          b"Host: x\r\n\r\n")
                got = 0
                while got < 1 << 20:  # well into the body
                    data = s.recv(1 << 16)
                    assert data
                    got += len(data)
                # Reset, not a polite close: the server is in the middle of the body.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with socket.create_connection(("127.0.0.1", served.port)) as s:
            s.sendall(b"GET /no/\x1b[31mred HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(1 << 16).startswith(b"HTTP/1.1 404")
        with socket.create_connection(("127.0.0.1", served.port)) as s:
            s.sendall(b"NONSENSE\r\n\r\n")  # no HTTP version: answered as HTTP/0.9 would be
            assert b"Error code: 400" in s.recv(1 << 16)
        served.wait_for(r"GET /no/")
        served.wait_for("client went away", count=3)
    finally:
        text = served.stop()
    assert "Traceback" not in text and "Exception" not in text, text
    gone = [line for line in text.splitlines() if "client went away" in line]
    assert len(gone) == 3, text
    for line in gone:
        m = re.search(r" 127\.0\.0\.1 GET /local/big/resolve/main/big-Q8_0\.gguf 200 (\d+) "
                      r"[\d.]+s \(client went away: .+\)$", line)
        assert m and 1 << 19 < int(m.group(1)) < size, line
    assert "\x1b" not in text and " 127.0.0.1 GET /no/\\x1b[31mred 404 " in text
    assert re.search(r" 127\.0\.0\.1 - - 400 \d+ ", text), text

    quiet = Served(root, tmp_path, "--quiet")
    try:
        with socket.create_connection(("127.0.0.1", quiet.port)) as s:
            s.sendall(b"GET /api/models/local/big/tree/main HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(1 << 16).startswith(b"HTTP/1.1 ")
    finally:
        assert "/api/models" not in quiet.stop()


def test_a_folder_without_gguf_files_says_which_layout_it_wants(tmp_path: Path) -> None:
    root = tmp_path / "stuff"
    (root / "gemma").mkdir(parents=True)
    (root / "README.md").write_text("hello")
    make_tiny_gguf(root / "gemma" / "gemma-Q8_0.gguf", ftype="Q8_0")
    r = subprocess.run([QMGR, "mirror", "serve", str(root), "--port", "0"], capture_output=True,
                       text=True, timeout=60, env={**os.environ,
                                                   "XDG_CACHE_HOME": str(tmp_path / "c")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"Error: {root} holds no GGUF file")
    assert f"{root}/NAME-QUANT.gguf" in r.stderr and "hf.co/local/NAME:QUANT" in r.stderr
    assert f"{root}/OWNER/REPO/NAME-QUANT.gguf" in r.stderr
    assert "found gemma/gemma-Q8_0.gguf: one folder down" in r.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        make_tiny_gguf(root / "gemma-Q8_0.gguf", ftype="Q8_0")
        r = subprocess.run([QMGR, "mirror", "serve", str(root), "--port", port],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "c")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"Error: cannot listen on 127.0.0.1:{port}:")


def test_pull_from_a_flat_folder_end_to_end(qenv: Env, mixed: Path, tmp_path: Path) -> None:
    served = Served(mixed, tmp_path, env=qenv.env)
    try:
        # The client does not wait on 503 (yet): pull once every digest is known.
        served.wait_for("every listing answers now")
        qenv.env["QMGR_HF_ENDPOINT"] = served.url
        qenv.start()
        offered = qenv.json("variants", "--no-headers", "hf.co/local/gemma-3-270m-it")
        assert sorted(v["quant"] for v in offered["variants"]) == ["F16", "Q8_0"]
        qenv.qmgr("pull", "hf.co/local/gemma-3-270m-it:Q8_0")
        qenv.qmgr("pull", "hf.co/local/big:Q8_0")
        qenv.qmgr("pull", "hf.co/test/tiny:Q8_0")
        rows = {row["ref"]: row for row in qenv.json("list")}
        assert set(rows) == {"gemma-3-270m-it:Q8_0", "big:Q8_0", "tiny:Q8_0"}
        q8 = mixed / "gemma-3-270m-it-Q8_0.gguf"
        assert rows["gemma-3-270m-it:Q8_0"]["sha256"] == sha256_of(q8)
        assert Path(rows["gemma-3-270m-it:Q8_0"]["paths"][0]).read_bytes() == q8.read_bytes()
        assert len(rows["big:Q8_0"]["paths"]) == 3
        assert [sha256_of(Path(p)) for p in rows["big:Q8_0"]["paths"]] == [
            sha256_of(p) for p in sorted(mixed.glob("big-*.gguf"))]
        assert rows["tiny:Q8_0"]["sha256"] == sha256_of(mixed / "test" / "tiny" /
                                                        "tiny-Q8_0.gguf")
    finally:
        text = served.stop()
    assert "Traceback" not in text
    assert re.search(r" 127\.0\.0\.1 GET /local/big/resolve/main/big-Q8_0-00002-of-00003\.gguf "
                     r"20[06] \d+ ", text), text
