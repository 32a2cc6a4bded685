"""Catalog operations on PostgreSQL against SQLite, in one run: the ratio is the figure.

Run: python bench/bench_catalog.py [--variants 1000] [--runs 50]

Three operations a fleet node does all the time, each timed on both engines, interleaved (so
machine noise hits both alike), through the code the daemon runs:

- list: ``queries.list_rows`` over 1,000 variants (what ``qmgr list`` answers; on SQLite the
  daemon caches it, on PostgreSQL it cannot, so this is the uncached cost on both);
- record: ``record_variant`` of a new variant (a model row locked, a blob, a file row);
- claim: a queued job claimed (``JobRunner.claim``: ``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) and run to its end (a job that does nothing).

PostgreSQL runs on this machine (tests/pgserver.py: initdb in a temp dir, a Unix socket), so
the figure is the engine and the driver, not a network; over a LAN add a round trip per
statement (about 0.2 ms each). The physical bound for "record" on both is the fsync of the
commit (SQLite: synchronous=FULL; PostgreSQL: fsync of its WAL), printed beside.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_list import fill_catalog  # noqa: E402


def fsync_ms(directory: Path, runs: int = 20) -> float:
    """The median time of a 4 KiB write + fsync here: what one durable commit costs at least."""
    path = directory / "fsync.probe"
    times = []
    with path.open("wb") as f:
        for _ in range(runs):
            t = time.perf_counter()
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t)
    path.unlink()
    return statistics.median(times) * 1000


def main() -> None:
    from pgserver import PgServer

    from qmgr.catalog import queries
    from qmgr.catalog.db import Catalog
    from qmgr.catalog.models import Node, Origin
    from qmgr.catalog.record import ShardFile, record_variant
    from qmgr.work.jobs import JobRunner

    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qmb-", dir="/tmp"))
    pg = PgServer()
    try:
        urls = {"sqlite": f"sqlite:///{root / 'catalog.db'}", "postgresql": pg.database()}
        catalogs = {}
        runners = {}
        for engine, url in urls.items():
            fill_catalog(root, args.variants, url)
            catalog = Catalog(url)
            with catalog.writing() as session:
                node = Node(name="bench", state="up", hardware={}, loaded=[])
                session.add(node)
                session.flush()
                catalog.node_id = node.id
            runner = JobRunner(catalog, workers=1)
            runner.node_id = catalog.node_id
            runner.register("noop", lambda handle: {})
            catalogs[engine], runners[engine] = catalog, runner
        sample = root / "sample.gguf"
        sample.write_bytes(b"GGUF" + b"\0" * 4092)
        facts = {"quant_type": "Q4_K_M", "architecture": "llama"}

        def do_list(engine: str, i: int) -> None:
            with catalogs[engine].reading() as session:
                assert len(queries.list_rows(session)) >= args.variants

        def do_record(engine: str, i: int) -> None:
            sha = hashlib.sha256(f"{engine}-{i}".encode()).hexdigest()
            record_variant(catalogs[engine], f"bench-{i % 10}", [ShardFile(sample, None, sha,
                                                                            4096)],
                           facts, origin=Origin.IMPORTED, source_ref=None, in_store=False,
                           tag=f"t{i}")

        def do_claim(engine: str, i: int) -> None:
            runner = runners[engine]
            from qmgr.catalog.models import Job

            with runner.catalog.writing() as session:
                job = Job(kind="noop", arguments={}, state="queued", progress={})
                session.add(job)
                session.flush()
                job_id = job.id
            t = time.perf_counter()
            assert runner.claim() == 1
            while runner.handles[job_id].state not in ("succeeded", "failed"):
                time.sleep(0.0002)
            timings[(engine, "claim")].append(time.perf_counter() - t)

        ops = {"list": do_list, "record": do_record, "claim": do_claim}
        timings: dict[tuple[str, str], list[float]] = {(e, o): [] for e in urls for o in ops}
        for name, op in ops.items():
            for engine in urls:
                op(engine, -1)  # untimed: caches, the first connection
            for i in range(args.runs):
                for engine in urls:
                    t = time.perf_counter()
                    op(engine, i)
                    if name != "claim":  # claim times itself, without the job's insert
                        timings[(engine, name)].append(time.perf_counter() - t)
        print(f"{args.variants} variants, {args.runs} runs each; fsync here: "
              f"{fsync_ms(root):.2f} ms (the bound of a durable commit)")
        print(f"{'operation':<8} {'sqlite ms':>10} {'postgresql ms':>14} {'pg/sqlite':>10}")
        for name in ops:
            lite = statistics.median(timings[("sqlite", name)]) * 1000
            post = statistics.median(timings[("postgresql", name)]) * 1000
            print(f"{name:<8} {lite:>10.2f} {post:>14.2f} {post / lite:>9.2f}x")
        for runner in runners.values():
            runner.shutdown()
        for catalog in catalogs.values():
            catalog.close()
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
