"""The job runner on a real catalog: how a job's end is made known, and what is kept."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Job
from qmgr.work import jobs
from qmgr.work.jobs import TERMINAL, JobHandle, JobRunner


@pytest.fixture
def catalog(catalog_url: str) -> Catalog:
    catalog = Catalog(catalog_url)
    catalog.migrate()
    return catalog


def row_state(catalog: Catalog, job_id: int) -> str:
    with catalog.reading() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


def wait_ended(runner: JobRunner, job_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while (d := runner.get(job_id))["state"] not in TERMINAL:
        assert time.monotonic() < deadline, d
        time.sleep(0.01)
    return d


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_a_job_shows_its_end_only_once_its_row_says_so(catalog: Catalog, outcome: str) -> None:
    go = threading.Event()
    shown_while_saving: list[str] = []

    class Runner(JobRunner):
        def _persist(self, handle: JobHandle, force: bool = False) -> None:
            if force and handle.final is not None:
                shown_while_saving.append(handle.to_dict()["state"])
            super()._persist(handle, force)

    def work(handle: JobHandle) -> dict[str, Any]:
        go.wait(10)
        if outcome == "failed":
            raise RuntimeError("boom")
        return {"answer": 42}

    runner = Runner(catalog)
    runner.register("work", work)
    job_id = runner.submit("work", {})["id"]
    seen: list[tuple[str, str]] = []
    handle = runner.handles[job_id]
    handle.wakers.add(lambda: seen.append((handle.state, row_state(catalog, job_id))))
    go.set()
    ended = wait_ended(runner, job_id)
    runner.shutdown()
    assert ended["state"] == outcome
    # While the end was written, the job still showed itself running...
    assert shown_while_saving == ["running"]
    # ...and when it showed its end, the row already said the same.
    assert seen[-1] == (outcome, outcome)
    with catalog.reading() as session:
        job = session.get(Job, job_id)
        assert job is not None
        if outcome == "succeeded":
            assert job.progress["result"] == {"answer": 42}
        else:
            assert job.error == "internal error: RuntimeError: boom"


def test_finished_jobs_are_forgotten_in_memory_and_answered_from_the_catalog(
        catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "KEEP_FINISHED", 3)
    runner = JobRunner(catalog)
    runner.register("echo", lambda handle: {"n": handle.arguments["n"]})
    ids = [runner.submit("echo", {"n": n})["id"] for n in range(8)]
    for job_id in ids:
        wait_ended(runner, job_id)
    runner.shutdown()
    assert len(runner.handles) == 3 and set(runner.handles) <= set(ids)
    for n, job_id in enumerate(ids):
        d = runner.get(job_id)
        assert (d["state"], d["result"]) == ("succeeded", {"n": n})


def test_a_late_periodic_save_never_takes_the_row_back_to_running(tmp_path: Path) -> None:
    """The periodic saver snapshots a running job, then its commit is slow (a busy disk); the
    job ends meanwhile and writes its end. The row must stay at the end: a stale "running"
    committed after it would run the job again at the next start."""
    from contextlib import contextmanager

    class SlowSaves(Catalog):
        @contextmanager
        def writing(self):  # type: ignore[override]
            if "persist_progress" in threading.current_thread().name:
                time.sleep(0.8)  # the saver's commit, held up
            with super().writing() as session:
                yield session

    catalog = SlowSaves(f"sqlite:///{tmp_path / 'c.db'}")
    catalog.migrate()
    runner = JobRunner(catalog)
    runner.register("work", lambda handle: time.sleep(1.3) or {"ok": True})
    job = runner.submit("work", {})
    wait_ended(runner, job["id"])
    time.sleep(1.5)  # past any save still in flight
    assert row_state(catalog, job["id"]) == "succeeded"
    runner.shutdown()
