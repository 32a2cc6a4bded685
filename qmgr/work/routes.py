"""The jobs' endpoints: list, show, cancel, and a job's events as they happen."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool

from qmgr.work.api import NDJSON, Call, Endpoint, Table
from qmgr.work.jobs import TERMINAL, JobRunner


def routes(jobs: JobRunner) -> list[Endpoint]:
    api = Table()

    @api.endpoint("GET", "/v1/jobs", "Recent jobs, newest first")
    def list_jobs(call: Call) -> list[dict[str, Any]]:
        return jobs.list()

    @api.endpoint("GET", "/v1/jobs/{job_id:int}", "One job: state, progress, error, result")
    def show_job(call: Call) -> dict[str, Any]:
        return jobs.get(call.params["job_id"])

    @api.endpoint("POST", "/v1/jobs/{job_id:int}/cancel", "Cancel a job")
    def cancel_job(call: Call) -> dict[str, Any]:
        return jobs.cancel(call.params["job_id"])

    @api.endpoint("GET", "/v1/jobs/{job_id:int}/events",
                  "A job's progress as newline-delimited JSON, until it ends", stream=NDJSON,
                  query={"progress": {"type": "string", "enum": ["0", "1"], "default": "1",
                                      "description": "0: only changes of state or phase, no "
                                                     "progress (for clients that show none)"}})
    async def job_events(call: Call) -> AsyncIterator[str]:
        """The job as it changes, ending with its final state."""
        job_id = call.params["job_id"]
        first = await run_in_threadpool(jobs.get, job_id)  # 404 before the stream starts
        # progress=0: a client that shows no progress (`-q`, output not a terminal) gets the
        # changes of state and phase only, and the stream sleeps until one comes.
        return _events(jobs, job_id, first, call.query.get("progress", "1") != "0")

    return api.endpoints


async def _events(jobs: JobRunner, job_id: int, first: dict[str, Any],
                  with_progress: bool) -> AsyncIterator[str]:
    import json

    async for job in updates(jobs, job_id, first, with_progress):
        yield json.dumps(job) + "\n"


async def updates(jobs: JobRunner, job_id: int, first: dict[str, Any],
                  with_progress: bool = True) -> AsyncIterator[dict[str, Any]]:
    """The job (``first``: as it was when asked for) each time it changes, ending with its
    final state; without ``with_progress``, only changes of state or phase."""
    import asyncio
    import contextlib

    last: object = -1
    current = first
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(woken.set)

    watched = jobs.handles.get(job_id)
    if watched is not None:
        watched.wakers.add(wake)
    try:
        while True:
            handle = jobs.handles.get(job_id)
            if handle is None:  # not run here (`first` is its row), or forgotten since
                if watched is not None and current["state"] not in TERMINAL:
                    current = await run_in_threadpool(jobs.get, job_id)
                if jobs.node_id is None or current["state"] in TERMINAL:
                    yield current
                    return
                # Run by another node of the fleet: its row, as that node saves it (every
                # second), until it ends.
                seen_row = current["state"], current["progress"] if with_progress \
                    else current["progress"].get("phase")
                if seen_row != last:
                    last = seen_row
                    yield current
                await asyncio.sleep(0.5)
                current = await run_in_threadpool(jobs.get, job_id)
                continue
            seen = handle.version if with_progress \
                else (handle.state, handle.progress.get("phase"))
            if seen != last:
                last = seen
                current = handle.to_dict()
                yield current
                if current["state"] in TERMINAL:
                    return
            # Progress at most ten times a second; a change of state or phase at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), 0.1 if with_progress else 5.0)
            woken.clear()
    finally:
        if watched is not None:
            watched.wakers.discard(wake)
