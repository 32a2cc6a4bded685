"""A fleet on this machine: one real PostgreSQL, three qmgrd processes with their own homes,
API listeners on loopback ports and declared hardware of different sizes (docs/fleet.md)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from badmirror import BadMirror, sha256_of
from conftest import QMGR, Env, free_port, pg_server, wait_for
from ggufmake import make_tiny_gguf

KEY = "fleet-secret-for-tests"
# Declared hardware: a small box, a middling one, a large one.
HW = {"a": "ram=1GiB", "b": "ram=2GiB", "c": "ram=8GiB"}


class Fleet:
    def __init__(self, url: str, origin: str, hw: dict[str, str] | None = None,
                 timeout: float = 2):
        self.url = url
        self.hw = hw or HW
        self.timeout = timeout
        self.nodes: dict[str, Env] = {}
        self.started: list[Env] = []  # every node started, a name started again included
        self.ports: dict[str, int] = {}
        self.origin = origin

    def add(self, name: str, store: Path | None = None) -> Env:
        """Start node ``name``; ``store``: its store is that folder (a shared one), not its
        own."""
        root = Path(tempfile.mkdtemp(prefix=f"qf{name}-", dir="/tmp"))
        env = Env(root)
        if store is not None:
            env.home.mkdir(parents=True)
            (env.home / "store").symlink_to(store)
        for hub in ("HF_ENDPOINT", "HF_TOKEN"):
            env.env.pop(hub, None)
        port = self.ports.setdefault(name, free_port())
        env.env.update(QMGR_DATABASE_URL=self.url, QMGR_NODE=name, QMGR_HW=self.hw[name],
                       QMGR_LISTEN=f"127.0.0.1:{port}", QMGR_HEARTBEAT="0.3",
                       QMGR_NODE_TIMEOUT=str(self.timeout), QMGR_HF_ENDPOINT=self.origin,
                       QMGR_STALL_TIMEOUT="2", QMGR_RETRY_BACKOFF="0.05",
                       QMGR_RETRIES="3", QMGR_WARM_WORKERS="0")
        (root / "config.toml").write_text(f'fleet_key = "{KEY}"\n')
        self.started.append(env)
        env.start()
        self.nodes[name] = env
        return env

    def view(self, name: str = "a") -> dict[str, dict[str, Any]]:
        out = self.nodes[name].json("fleet")
        return {n["name"]: n for n in out["nodes"]}

    def close(self) -> None:
        for env in self.started:
            if env.proc is not None and env.proc.poll() is None:
                env.stop()
            shutil.rmtree(env.root, ignore_errors=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "mirror"
    d = root / "test" / "tiny"
    d.mkdir(parents=True)
    make_tiny_gguf(d / "tiny-Q8_0.gguf", ftype="Q8_0", n_vocab=4000)
    make_tiny_gguf(d / "tiny-F16.gguf", ftype="F16", n_vocab=4000)
    return root


@pytest.fixture
def fleet(mirror: BadMirror) -> Iterator[Fleet]:
    f = Fleet(pg_server().database(), mirror.url)
    try:
        for name in "abc":
            f.add(name)
        yield f
    finally:
        f.close()


def test_nodes_register_heartbeat_and_go(fleet: Fleet) -> None:
    view = fleet.view("b")
    assert sorted(view) == ["a", "b", "c"]
    for name, node in view.items():
        assert node["state"] == "up"
        assert node["address"] == f"http://127.0.0.1:{fleet.ports[name]}"
        # Each node's own declared devices, as its probes would have reported them.
        assert [(d["kind"], d["memory_total"]) for d in node["devices"]] == [
            ("cpu", {"a": 1, "b": 2, "c": 8}[name] << 30)]
        assert node["heartbeat_age"] < 2
    table = fleet.nodes["a"].qmgr("fleet").stdout
    assert table.splitlines()[0].split()[:3] == ["NODE", "STATE", "ADDRESS"]
    assert "a *" in table  # the node asked
    # A node killed without a word stops heartbeating: the others mark it gone.
    fleet.nodes["c"].stop(signal.SIGKILL)
    wait_for("c marked gone", lambda: fleet.view("a")["c"]["state"] == "gone")
    assert fleet.view("b")["a"]["state"] == "up"
    # It comes back under its name: the same row, up again.
    fleet.add("c")
    assert fleet.view("a")["c"]["state"] == "up"
    assert len(fleet.nodes["a"].catalog_rows("SELECT id FROM nodes WHERE name = 'c'")) == 1
    # A clean stop says so at once (its jobs are then taken over without waiting).
    fleet.nodes["b"].stop()
    assert fleet.view("a")["b"]["state"] == "gone"


def test_fleet_needs_postgresql(qenv: Env) -> None:
    qenv.env.update(QMGR_NODE="x", QMGR_DATABASE_URL=f"sqlite:///{qenv.root / 'c.db'}")
    proc = qenv.start(wait=False)
    assert proc.wait(30) == 1
    assert "share a PostgreSQL catalog" in qenv.daemon_log()


def test_blob_from_peer_with_origin_stopped(fleet: Fleet, mirror: BadMirror,
                                            repo: Path) -> None:
    a, b = fleet.nodes["a"], fleet.nodes["b"]
    src = repo / "test" / "tiny" / "tiny-Q8_0.gguf"
    a.qmgr("pull", "hf.co/test/tiny:Q8_0")
    served = mirror.bytes_sent
    assert served == src.stat().st_size
    # The variant is the fleet's: every node lists it, held by a only.
    row = b.json("list")[0]
    assert row["nodes"] == ["a"] and row["paths"] == []
    # Not on b: running it there says where it is.
    r = b.qmgr("run", "tiny:Q8_0", "hi", check=False)
    assert r.returncode != 0 and "on a, not on this node" in r.stderr
    # The origin gone, b pulls the same reference: from its peer a.
    mirror.stop()
    r = b.qmgr("pull", "hf.co/test/tiny:Q8_0", "--json")
    assert mirror.bytes_sent == served  # nothing more from the origin
    row = b.json("list")[0]
    assert row["nodes"] == ["a", "b"]
    path = Path(row["paths"][0])
    assert path.is_relative_to(b.home / "store" / "blobs")
    assert sha256_of(path) == sha256_of(src) == row["sha256"]
    assert fleet.view("c")["b"]["blobs"] == 1
    # The peer endpoint wants the fleet's key.
    url = f"http://127.0.0.1:{fleet.ports['a']}/fleet/blobs/sha256:{row['sha256']}"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    ok = httpx.get(url, headers={**auth, "Range": "bytes=0-3"})
    assert ok.status_code == 206 and ok.content == b"GGUF"
    assert ok.headers["content-range"] == f"bytes 0-3/{src.stat().st_size}"
    tail = httpx.get(url, headers={**auth, "Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == src.read_bytes()[-5:]
    assert httpx.get(url, headers={**auth, "Range": "bytes=99999999-"}).status_code == 416
    head = httpx.head(url, headers=auth)
    assert head.status_code == 200 and int(head.headers["content-length"]) == \
        src.stat().st_size and head.content == b""
    assert httpx.get(url, headers=auth).content == src.read_bytes()
    missing = url[:-64] + "0" * 64
    assert httpx.get(missing, headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    # Each node's copies are its own: rows say which node holds what, where.
    copies = a.catalog_rows("SELECT n.name, c.path FROM blob_copies c JOIN nodes n ON "
                            "n.id = c.node_id ORDER BY n.name")
    assert [name for name, _ in copies] == ["a", "b"]
    assert Path(copies[0][1]).is_relative_to(a.home)


class Liar(BaseHTTPRequestHandler):
    """A peer that serves the right size of the wrong bytes."""

    def do_GET(self) -> None:  # noqa: N802
        self.server.hits += 1  # type: ignore[attr-defined]
        size = self.server.size  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.write(b"\0" * size)

    def log_message(self, *args: Any) -> None:
        pass


def test_peer_serving_wrong_bytes_is_skipped(fleet: Fleet, mirror: BadMirror,
                                             repo: Path) -> None:
    a, b = fleet.nodes["a"], fleet.nodes["b"]
    a.qmgr("pull", "hf.co/test/tiny:Q8_0")
    sha = a.json("list")[0]["sha256"]
    liar = ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    liar.hits, liar.size = 0, (repo / "test" / "tiny" / "tiny-Q8_0.gguf").stat().st_size  # type: ignore[attr-defined]
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    try:
        # A node that claims the blob, heard from last (so asked first), and lies.
        import sqlalchemy as sa

        engine = sa.create_engine(fleet.url)
        with engine.begin() as conn:
            node_id = conn.execute(sa.text(
                "INSERT INTO nodes (name, address, state, hardware, loaded, started_at, "
                "heartbeat_at) VALUES ('liar', :addr, 'up', '{}', '[]', now(), "
                "now() + interval '1 hour') RETURNING id"),
                {"addr": f"http://127.0.0.1:{liar.server_address[1]}"}).scalar_one()
            conn.execute(sa.text(
                "INSERT INTO blob_copies (blob_id, node_id, path, in_store) SELECT id, :n, "
                "'/nowhere', true FROM blobs WHERE sha256 = :sha"), {"n": node_id, "sha": sha})
        engine.dispose()
        mirror.stop()
        b.qmgr("pull", "hf.co/test/tiny:Q8_0")
        assert liar.hits >= 1  # type: ignore[attr-defined]
        row = b.json("list")[0]
        assert sha256_of(Path(row["paths"][0])) == sha
        assert "liar" in b.daemon_log() and "sha256 mismatch" in b.daemon_log()
        assert list((b.home / "store" / "partial").iterdir()) == []
    finally:
        liar.shutdown()
        liar.server_close()


def test_killed_node_job_is_finished_by_another(fleet: Fleet, mirror: BadMirror,
                                                repo: Path) -> None:
    a, b = fleet.nodes["a"], fleet.nodes["b"]
    size = (repo / "test" / "tiny" / "tiny-F16.gguf").stat().st_size
    mirror.behavior["rate"] = size // 20  # ~20 s for the whole file: a is killed well before
    pull = subprocess.Popen([QMGR, "pull", "hf.co/test/tiny:F16"], env=a.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        job = wait_for("a's pull downloading", lambda: next(
            (j for j in b.json("jobs") if j["state"] == "running"
             and j["progress"].get("done")), None))
        owner = b.catalog_rows(f"SELECT n.name FROM jobs j JOIN nodes n ON n.id = j.node_id "
                               f"WHERE j.id = {job['id']}")
        assert owner == [("a",)]
        a.stop(signal.SIGKILL)
    finally:
        pull.kill()
        pull.wait()
    mirror.behavior.pop("rate")
    done = wait_for("the job finished elsewhere", lambda: (
        lambda j: j if j["state"] in ("succeeded", "failed") else None)(
            b.json("jobs")[0]), timeout=60)
    assert done["id"] == job["id"] and done["state"] == "succeeded", done
    taker = b.catalog_rows(f"SELECT n.name FROM jobs j JOIN nodes n ON n.id = j.node_id "
                           f"WHERE j.id = {job['id']}")[0][0]
    assert taker in ("b", "c")
    # Consistent afterwards: one variant, ready, its bytes on the node that finished the job,
    # no job left running, a marked gone.
    rows = fleet.nodes[taker].json("list")
    assert [(r["ref"], r["state"], r["nodes"]) for r in rows] == [
        ("tiny:F16", "ready", [taker])]
    assert sha256_of(Path(rows[0]["paths"][0])) == sha256_of(
        repo / "test" / "tiny" / "tiny-F16.gguf")
    assert b.catalog_rows("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')") \
        == [(0,)]
    assert fleet.view("b")["a"]["state"] == "gone"


def test_placement_picks_the_node_and_the_quant(ladder_mirror: BadMirror) -> None:
    """Llama-3-8B's real quant ladder (headers only) on three boxes of 6, 8 and 12 GiB."""
    f = Fleet(pg_server().database(), ladder_mirror.url,
              {"a": "ram=6GiB", "b": "ram=8GiB", "c": "ram=12GiB"})
    try:
        for name in "abc":
            f.add(name)
        a = f.nodes["a"]
        a.qmgr("alias", "add", "llama3", "hf.co/test/llama3-8b")
        out = a.json("fit", "llama3", "--fleet")
        # Each node decided as `qmgr fit` on it would (tests/test_fit.py: 6 GiB -> Q2_K,
        # 8 GiB -> Q6_K, 12 GiB -> Q8_0), and the best quality anywhere wins.
        assert {n["name"]: n["pick"] for n in out["nodes"]} == {
            "a": "Q2_K", "b": "Q6_K", "c": "Q8_0"}
        assert (out["node"], out["pick"]) == ("c", "Q8_0")
        assert out["reason"].startswith("on node c (is where it fits best): Q8_0")
        text = a.qmgr("fit", "llama3", "--fleet").stdout
        assert "* c" in text and "pick: on node c" in text
        # c gone: the next best is b's.
        f.nodes["c"].stop()
        out = a.json("fit", "llama3", "--fleet")
        assert (out["node"], out["pick"]) == ("b", "Q6_K")
        assert [n["name"] for n in out["nodes"]] == ["a", "b"]
    finally:
        f.close()


def test_pull_fit_fleet_puts_it_on_the_chosen_node(fleet: Fleet, repo: Path) -> None:
    a, b, c = (fleet.nodes[n] for n in "abc")
    # Everything fits everywhere: the same best quality on every node; none has the bytes,
    # so the most free memory (c's 8 GiB) decides.
    out = a.json("fit", "hf.co/test/tiny", "--fleet")
    assert {n["pick"] for n in out["nodes"]} == {"F16"}
    assert out["node"] == "c" and "most free memory" in out["reason"]
    # Pulled from a, run by c: a's client follows the job through its row.
    r = a.qmgr("pull", "hf.co/test/tiny", "--fit", "--fleet")
    assert r.stdout.strip() == "tiny:F16", r.stderr
    row = a.json("list")[0]
    assert row["nodes"] == ["c"] and row["paths"] == []
    assert not (a.home / "store" / "blobs").exists() or \
        list((a.home / "store" / "blobs").iterdir()) == []
    job = a.json("jobs")[0]
    assert job["state"] == "succeeded"
    assert a.catalog_rows(f"SELECT n.name FROM jobs j JOIN nodes n ON n.id = j.node_id "
                          f"WHERE j.id = {job['id']}") == [("c",)]
    # Among equals, the node that holds the bytes wins over free memory.
    b.qmgr("pull", "hf.co/test/tiny:Q8_0")
    out = b.json("fit", "hf.co/test/tiny:Q8_0", "--fleet")
    assert out["node"] == "b" and "holds those bytes already" in out["reason"]
    assert c.json("fit", "hf.co/test/tiny", "--fleet")["node"] == "c"


def test_a_request_is_routed_to_the_node_that_holds_the_model(fleet: Fleet,
                                                               tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="generation needs the llama extra (qmgr[llama])")
    import ollama
    import openai

    a, b = fleet.nodes["a"], fleet.nodes["b"]
    a.qmgr("import", str(make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")))
    at_b = f"http://127.0.0.1:{fleet.ports['b']}"
    # Asked of b, which has no copy: answered by a, streamed through b as it comes.
    chunks = list(ollama.Client(host=at_b).generate(
        model="tiny:F16", prompt="hello", stream=True, options={"num_predict": 4, "seed": 0}))
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert [m.model for m in ollama.Client(host=f"http://127.0.0.1:{fleet.ports['a']}")
            .ps().models] == ["tiny:F16"]
    assert ollama.Client(host=at_b).ps().models == []
    assert "routing /api/generate to http://127.0.0.1:" in b.daemon_log()
    # OpenAI's SSE too, and a's heartbeat now says it has the model loaded.
    wait_for("a's heartbeat with the model", lambda: fleet.view("c")["a"]["loaded"])
    stream = openai.OpenAI(base_url=at_b + "/v1", api_key="unused").completions.create(
        model="tiny:F16", prompt="hello", max_tokens=4, seed=0, stream=True)
    pieces = list(stream)
    assert pieces and pieces[-1].choices[0].finish_reason in ("length", "stop")
    # A model nobody holds is b's own answer: not found.
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=at_b).generate(model="nothing-here", prompt="hi")
    assert e.value.status_code == 404
    # The name pulled on b: its bytes from a (an import there, no origin at all).
    b.qmgr("pull", "tiny:F16")
    assert b.json("list")[0]["nodes"] == ["a", "b"]


def test_a_shared_store_needs_no_fetch(mirror: BadMirror, repo: Path) -> None:
    """One store (an NFS share, here a folder both homes link to) for two nodes: a file one
    pulled is the other's at once, with neither the origin nor the peer asked."""
    f = Fleet(pg_server().database(), mirror.url, {"d": "ram=1GiB", "e": "ram=1GiB"})
    shared = Path(tempfile.mkdtemp(prefix="qfshared-", dir="/tmp"))
    try:
        d = f.add("d", store=shared)
        d.qmgr("pull", "hf.co/test/tiny:Q8_0")
        d.stop()  # gone: no peer to fetch from
        mirror.stop()  # and no origin
        # A copy another node is writing into the shared store: e's start leaves it alone.
        busy = shared / "partial" / "0123456789abcdef.partial"
        busy.write_bytes(b"being copied")
        e = f.add("e", store=shared)
        assert busy.exists()
        e.qmgr("pull", "hf.co/test/tiny:Q8_0")
        [row] = e.json("list")
        assert row["nodes"] == ["e"] and row["state"] == "ready"
        assert Path(row["paths"][0]).resolve().is_relative_to(shared.resolve())
        assert e.catalog_rows("SELECT n.name FROM blob_copies c JOIN nodes n ON "
                              "n.id = c.node_id ORDER BY n.name") == [("d",), ("e",)]
        assert len(list((shared / "blobs").iterdir())) == 1
    finally:
        f.close()
        shutil.rmtree(shared, ignore_errors=True)


def test_a_peer_fetch_cut_off_resumes(tmp_path: Path) -> None:
    """b killed while it fetches 2 GiB from a: started again, it claims its own job back and
    goes on from the bytes it has, by byte ranges from the peer. (A minute's timeout: b is
    back before anyone would take its job over.)"""
    fleet = Fleet(pg_server().database(), "http://127.0.0.1:9", timeout=60)
    try:
        _resume(fleet, tmp_path)
    finally:
        fleet.close()


def _resume(fleet: Fleet, tmp_path: Path) -> None:
    from ggufmake import make_sparse_gguf

    a, b = fleet.add("a"), fleet.add("b")
    src = make_sparse_gguf(tmp_path / "big-Q4_K_M.gguf", 2 << 30)
    a.qmgr("import", str(src), "--name", "big", timeout=300)
    pull = subprocess.Popen([QMGR, "pull", "big:Q4_K_M"], env=b.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = b.home / "store" / "partial"
    wait_for("b's fetch under way", lambda: partial.is_dir() and any(
        p.suffix == ".state" for p in partial.iterdir()), timeout=120)
    time.sleep(0.5)
    b.stop(signal.SIGKILL)
    pull.kill()
    pull.wait()
    assert [p for p in partial.iterdir() if p.suffix == ".partial"]  # kept for the resume
    b.start()  # within the timeout: nobody took its job, it is b's again
    done = wait_for("the pull finished on b", lambda: (
        lambda j: j if j["state"] in ("succeeded", "failed") else None)(b.json("jobs")[0]),
        timeout=300)
    assert done["state"] == "succeeded", done
    log = b.daemon_log()
    resumed = [line for line in log.splitlines() if "resuming sha256-" in line]
    assert resumed, log[-3000:]
    have = int(resumed[0].split("resuming ")[1].split(": ")[1].split(" of ")[0])
    assert 0 < have < src.stat().st_size
    [row] = b.json("list")
    assert row["nodes"] == ["a", "b"]
    assert sha256_of(Path(row["paths"][0])) == row["sha256"]
