"""The quantize job: worker processes, publication, lineage, failures that leave nothing.

Uses throwaway quantizer plugins installed for real (an entry point on the daemon's
PYTHONPATH), so the machinery is tested without llama.cpp; the llama.cpp and numpy
quantizers have tests of their own.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Env
from ggufmake import make_tiny_gguf
from test_plugins import install

from qmgr.errors import QmgrError

QUANTIZERS = """
    import os, shutil, time
    from qmgr import hookimpl
    from qmgr.plugin.quantizer import QuantizeError

    class Copy:
        name = "copy"
        version = "1.2"
        supported_options = frozenset({"pure", "threads"})

        def targets(self):
            return ["Q8_0", "F16"]

        def quantize(self, job):
            total = 4
            for i in range(total):
                job.progress((i + 1) / total, f"tensor {i}")
                time.sleep(float(os.environ.get("COPY_TENSOR_SECONDS", "0")))
            shutil.copyfile(job.src, job.dst)
            with open(job.dst, "ab") as f:  # other bytes per target: a new variant each
                f.write(job.target.encode().ljust(32, b"\\0"))
            return {"copied": os.path.getsize(job.src)}

    class Broken:
        name = "broken"
        version = "0"
        supported_options = frozenset()

        def targets(self):
            return ["Q8_0", "Q4_0", "SLOW", "REFUSE"]

        def quantize(self, job):
            if job.target == "Q8_0":
                with open(job.dst, "wb") as f:
                    f.write(b"GGUF" + b"\\xff" * 100)  # not a valid file
                return {}
            if job.target == "Q4_0":
                with open(job.dst, "wb") as f:
                    f.write(b"half a file")
                os.abort()  # a native library dying mid-write
            if job.target == "REFUSE":
                raise QuantizeError("this source is not quantizable", code="refused")
            with open(job.dst, "wb") as f:
                f.write(b"x" * 1000)
            job.progress(0.5, "sleeping")
            time.sleep(60)

    @hookimpl
    def register_quantizers(register):
        register(Copy())
        register(Broken())
"""


@pytest.fixture
def quantizing(qenv: Env, tmp_path: Path) -> Env:
    site = tmp_path / "site"
    site.mkdir()
    install(site, "testquant", QUANTIZERS)
    qenv.env.update(PYTHONPATH=str(site), QMGR_PLUGINS="testquant")
    qenv.start()
    src = make_tiny_gguf(tmp_path / "base-F16.gguf", ftype="F16")
    qenv.qmgr("import", "--copy", str(src))
    return qenv


def partials(env: Env) -> list[Path]:
    return list((env.home / "store" / "partial").iterdir())


def test_quantize_makes_variants_with_lineage_and_recipe(quantizing: Env) -> None:
    r = quantizing.qmgr("quantize", "base:F16", "--to", "Q8_0,F16", "--quantizer", "copy",
                        "--pure")
    assert r.stdout.split() == ["base:Q8_0", "base:F16-2"]
    rows = {x["ref"]: x for x in quantizing.json("list")}
    assert rows["base:Q8_0"]["origin"] == "quantized"
    show = quantizing.json("show", "base:Q8_0")
    assert show["lineage"] == ["base:F16"]
    recipe = show["recipe"]
    assert recipe["quantizer"] == "copy" and recipe["version"] == "1.2"
    assert recipe["options"] == {"pure": True} and recipe["imatrix_sha256"] is None
    assert recipe["parent_sha256"] == rows["base:F16"]["sha256"]
    assert recipe["details"]["copied"] == rows["base:F16"]["size"]
    parent = quantizing.json("show", "base:F16")
    assert sorted(parent["children"]) == ["base:F16-2", "base:Q8_0"]
    tree = quantizing.qmgr("show", "base:Q8_0").stdout
    assert "lineage" in tree and "base:F16" in tree and "└─ base:Q8_0" in tree
    # The same recipe again: nothing new.
    r = quantizing.qmgr("quantize", "base:F16", "--to", "Q8_0", "--quantizer", "copy", "--pure")
    assert r.stdout.split() == ["base:Q8_0"]
    assert partials(quantizing) == []


def test_progress_events(quantizing: Env) -> None:
    out = quantizing.qmgr("quantize", "base:F16", "--to", "Q8_0", "--quantizer", "copy",
                          "--json").stdout.splitlines()
    events = [json.loads(x) for x in out]
    assert events[-1]["state"] == "succeeded"
    fractions = [e["progress"].get("fraction") for e in events if e["progress"].get("fraction")]
    assert fractions == sorted(fractions)


def test_a_client_showing_no_progress_gets_only_changes_of_state_and_phase(
        quantizing: Env) -> None:
    from qmgr import settings
    from qmgr.client import Client

    quantizing.stop()
    quantizing.env["COPY_TENSOR_SECONDS"] = "0.3"  # progress for ~1.2 s
    quantizing.start()
    job = json.loads(quantizing.qmgr("quantize", "base:F16", "--to", "Q8_0", "--quantizer",
                                     "copy", "--detach", "--json").stdout)
    client = Client(settings.load(env=quantizing.env, autostart=False), timeout=30)
    streams: dict[str, list[dict[str, Any]]] = {}

    def read(query: str) -> None:
        streams[query] = list(client.stream_lines(f"/v1/jobs/{job['id']}/events{query}"))

    readers = [threading.Thread(target=read, args=(q,)) for q in ("", "?progress=0")]
    for t in readers:
        t.start()
    for t in readers:
        t.join(30)
    full, changes = streams[""], streams["?progress=0"]
    assert full[-1]["state"] == changes[-1]["state"] == "succeeded"
    assert full[-1]["result"] == changes[-1]["result"]
    steps = [(e["state"], e["progress"].get("phase")) for e in changes]
    assert len(set(steps)) == len(steps)  # each one a change
    fractions = {e["progress"].get("fraction") for e in full}
    assert {0.25, 0.5, 0.75} <= fractions  # the full stream had the progress between them
    assert len(changes) < len(full)
    # The command without a terminal uses that stream and still names each phase.
    r = quantizing.qmgr("quantize", "base:F16", "--to", "F16", "--quantizer", "copy")
    assert "quantize base:F16: quantizing F16 (1/1)" in r.stderr.splitlines()


@pytest.mark.parametrize("target,message", [
    ("Q8_0", "invalid GGUF"),
    ("Q4_0", "the worker died"),
    ("REFUSE", "this source is not quantizable"),
])
def test_failed_quantization_leaves_nothing(quantizing: Env, target: str, message: str) -> None:
    r = quantizing.qmgr("quantize", "base:F16", "--to", target, "--quantizer", "broken",
                        check=False)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert [x["ref"] for x in quantizing.json("list")] == ["base:F16"]
    assert partials(quantizing) == []
    assert len(list((quantizing.home / "store" / "blobs").iterdir())) == 1
    assert quantizing.proc is not None and quantizing.proc.poll() is None


def test_cancel_kills_the_worker(quantizing: Env) -> None:
    job = json.loads(quantizing.qmgr("quantize", "base:F16", "--to", "SLOW", "--quantizer",
                                     "broken", "--detach", "--json").stdout)
    deadline = time.monotonic() + 30
    while (j := quantizing.json("jobs")[0])["progress"].get("fraction") is None:
        assert time.monotonic() < deadline, j
        time.sleep(0.1)
    quantizing.qmgr("cancel", str(job["id"]))
    while (j := quantizing.json("jobs")[0])["state"] == "running":
        assert time.monotonic() < deadline, j
        time.sleep(0.1)
    assert j["state"] == "cancelled"
    assert partials(quantizing) == []


def test_bad_requests_are_refused_before_a_job(quantizing: Env) -> None:
    for args, message in [
        (["nope:F16", "--to", "Q8_0"], "not in the catalog"),
        (["base:F16", "--to", "Q8_0", "--quantizer", "missing"], "no quantizer named"),
        (["base:F16", "--to", "Q8_0", "--quantizer", "copy", "--leave-output"],
         "does not support leave_output"),
        (["base:F16", "--to", "Q2_K", "--quantizer", "copy"], "cannot make Q2_K"),
    ]:
        r = quantizing.qmgr("quantize", *args, check=False)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
    names = {q["name"]: q for q in quantizing.json("quantizers")}
    assert names["copy"]["targets"] == ["Q8_0", "F16"]


def waiting_workers(env: Env) -> list[int]:
    """The daemon's worker processes that are alive (not yet reaped or exited)."""
    assert env.proc is not None
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[1]) == env.proc.pid \
                and b"qmgr.quantize.worker" in cmdline:
            found.append(int(stat.parent.name))
    return found


def new_worker(env: Env, seen: set[int]) -> Callable[[], list[int]]:
    """A check for waiting workers other than ``seen`` (the job's own, winding down)."""
    return lambda: [p for p in waiting_workers(env) if p not in seen]


def wait_for(what: str, check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


def test_the_next_worker_is_started_ahead_and_waits(quantizing: Env) -> None:
    assert waiting_workers(quantizing) == []  # none before the first job
    quantizing.qmgr("quantize", "base:F16", "--to", "Q8_0", "--quantizer", "copy")
    # The job's own worker winds down; a second later the next one starts and waits.
    [ready] = wait_for("a worker started for the next job",
                       new_worker(quantizing, set(waiting_workers(quantizing))))
    wait_for("only the waiting worker", lambda: waiting_workers(quantizing) == [ready])
    time.sleep(1)
    assert waiting_workers(quantizing) == [ready]  # idle, waiting for its request
    quantizing.qmgr("quantize", "base:F16", "--to", "F16", "--quantizer", "copy")
    # That worker did the job; the next one is on its way.
    [after] = wait_for("the next worker",
                       new_worker(quantizing, {ready, *waiting_workers(quantizing)}))
    assert after != ready
    assert {v["ref"] for v in quantizing.json("list")} >= {"base:Q8_0", "base:F16"}
    assert quantizing.stop() == 0
    # A waiting worker leaves with the daemon (its stdin closes).
    wait_for("the idle worker exits", lambda: not Path(f"/proc/{after}").exists()
             or Path(f"/proc/{after}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_the_worker_finds_its_quantizers_once_and_again_after_an_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qmgr.quantize import worker

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("QMGR_PLUGINS", "testquant")
    monkeypatch.setattr(worker, "_plugins", [])
    first = worker.quantizer_plugins()
    assert worker.quantizer_plugins() is first  # nothing installed meanwhile: no new scan
    with pytest.raises(QmgrError, match="no quantizer named 'copy'") as e:
        worker.find_quantizer("copy")
    assert e.value.code == "no_quantizer"
    install(site, "testquant", QUANTIZERS)  # a package installed while the worker waits
    assert worker.find_quantizer("copy").version == "1.2"
    assert worker.quantizer_plugins() is not first


def _dirty_kib() -> int:
    """The machine's dirty page cache not yet being written back, in KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Dirty:"):
            return int(line.split()[1])
    raise AssertionError("no Dirty: line in /proc/meminfo")


def test_the_worker_writes_the_output_back_while_it_is_written(tmp_path: Path) -> None:
    from qmgr.quantize.worker import flush_while_writing

    if not Path("/proc/meminfo").exists():
        pytest.skip("needs Linux's /proc/meminfo to see dirty pages")
    out = tmp_path / "out.gguf"
    before = _dirty_kib()
    with out.open("wb") as f:
        f.write(os.urandom(1 << 20) * 64)  # 64 MiB, left in the page cache
    if _dirty_kib() - before < 48 << 10:
        pytest.skip(f"{tmp_path} keeps no dirty pages (tmpfs?): nothing to write back")
    done = threading.Event()
    flusher = threading.Thread(target=flush_while_writing, args=(out, done, 0.05))
    flusher.start()
    try:
        # The kernel would leave these pages dirty for ~30 s (dirty_expire_centisecs).
        wait_for("the output written back", lambda: _dirty_kib() - before < 16 << 10, 10)
    finally:
        done.set()
        flusher.join()
