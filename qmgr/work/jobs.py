"""Jobs: long work (pull, quantize, eval) run by the daemon in worker threads.

Each job is a row in ``jobs`` (kind, arguments, state, progress, error) and, while the daemon
runs it, a :class:`JobHandle` in memory that workers update and event streams watch. Jobs
survive restarts: at start the daemon runs again every job left ``queued`` or ``running``, and
job functions are written to resume (a pull finds its partial file again).

Cancel (``qmgr cancel``) and shutdown both stop a job through its ``cancel`` event; the job
function tells them apart by :attr:`JobHandle.cancel_reason`: a cancelled job cleans up, a job
stopped by shutdown keeps what it has for the next start.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from sqlalchemy import or_, select

from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Job, JobState, Node
from qmgr.errors import NotFound, QmgrError, as_qmgr_error
from qmgr.settings import knob

log = logging.getLogger(__name__)

TERMINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
PERSIST_EVERY_S = 1.0
REFILL_DELAY_S = 1.0
# Finished jobs whose handles stay in memory (their rows in the catalog are complete; what is
# asked of an older one is read from there).
KEEP_FINISHED = 64


class JobHandle:
    def __init__(self, job_id: int, kind: str, arguments: dict[str, Any],
                 secrets: dict[str, str] | None = None):
        self.id = job_id
        self.kind = kind
        self.arguments = arguments
        # What the job needs but its row must not keep (the client's HF_TOKEN): in memory
        # only, so a job resumed after a restart runs without it.
        self.secrets = dict(secrets or {})
        self.state: str = JobState.QUEUED
        self.progress: dict[str, Any] = {}
        self.error: str | None = None
        self.error_code: str | None = None
        self.result: dict[str, Any] | None = None
        self.version = 0
        self.cancel = threading.Event()
        self.cancel_reason: str | None = None
        self.lock = threading.Lock()
        # Held while the row is written: the periodic save and the final one never cross (a
        # stale "running" committed after the end would run the job again at the next start).
        self.persist_lock = threading.Lock()
        # Called when the job is cancelled (or stopped for shutdown), from the cancelling
        # thread: what a blocked read needs to wake up (a socket shut down).
        self.cancel_hooks: list[Callable[[], None]] = []
        self._persisted = 0.0
        # How the job ended (state, result, error...), written to its row before the handle
        # shows it: whoever sees the end can read it from the catalog too.
        self.final: dict[str, Any] | None = None
        self._rate_at: tuple[float, int] | None = None
        # Event streams waiting for a change: called (from any thread) when the state or the
        # phase changes, so a client learns at once that its job ended.
        self.wakers: set[Callable[[], None]] = set()

    def request_cancel(self, reason: str) -> None:
        self.cancel_reason = self.cancel_reason or reason
        self.cancel.set()
        for hook in list(self.cancel_hooks):
            try:
                hook()
            except Exception:  # a hook that fails must not keep the others from running
                log.exception("job %d: a cancel hook failed", self.id)

    @contextmanager
    def interrupted_by_cancel(self, hook: Callable[[], None]) -> Iterator[None]:
        """Run ``hook`` if the job is cancelled while the block runs (at once if it is
        already)."""
        self.cancel_hooks.append(hook)
        try:
            if self.cancel.is_set():
                hook()
            yield
        finally:
            self.cancel_hooks.remove(hook)

    def changed(self) -> None:
        self.version += 1
        for wake in list(self.wakers):
            wake()

    def update(self, **progress: Any) -> None:
        """Merge progress fields; ``done`` (bytes) also yields a smoothed ``speed``."""
        with self.lock:
            if "done" in progress:
                now = time.monotonic()
                if self._rate_at is None or progress["done"] < self._rate_at[1]:
                    self._rate_at = (now, progress["done"])
                elif now - self._rate_at[0] >= 0.5:
                    rate = (progress["done"] - self._rate_at[1]) / (now - self._rate_at[0])
                    old = self.progress.get("speed")
                    progress["speed"] = rate if old is None else 0.5 * old + 0.5 * rate
                    self._rate_at = (now, progress["done"])
            new_phase = "phase" in progress and progress["phase"] != self.progress.get("phase")
            self.progress.update(progress)
            self.version += 1
        if new_phase:
            self.changed()

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"id": self.id, "kind": self.kind, "arguments": self.arguments,
                    "state": self.state, "progress": dict(self.progress), "error": self.error,
                    "error_code": self.error_code, "result": self.result}


def job_row_dict(job: Job) -> dict[str, Any]:
    progress = dict(job.progress or {})
    return {"id": job.id, "kind": job.kind, "arguments": job.arguments, "state": job.state,
            "progress": progress, "error": job.error,
            "error_code": progress.pop("error_code", None), "result": progress.pop("result", None),
            "created_at": job.created_at.isoformat()}


JobFunction = Callable[[JobHandle], dict[str, Any]]


class WarmWorkers:
    """One idle worker process per module and environment, started when the previous one
    finished, so that the next job does not wait for Python and the native libraries to load
    (~0.3-0.6 s: llama-cpp-python's import and the quantizer plugins, done by the worker
    before it reads its request). An idle worker costs ~45 MB and no CPU; it exits when the
    daemon does (its stdin closes). ``QMGR_WARM_WORKERS=0`` turns this off."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: dict[tuple[str, tuple[tuple[str, str], ...]], subprocess.Popen[str]] = {}
        self.closed = False

    @staticmethod
    def _key(module: str, env: dict[str, str] | None) -> tuple[str, tuple[tuple[str, str], ...]]:
        return module, tuple(sorted((env or {}).items()))

    @staticmethod
    def spawn(module: str, env: dict[str, str] | None) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, start_new_session=True,
                                text=True)

    @staticmethod
    def wanted(env: dict[str, str] | None) -> bool:
        return bool(knob("QMGR_WARM_WORKERS", env))

    def take(self, module: str, env: dict[str, str] | None) -> subprocess.Popen[str]:
        with self.lock:
            proc = self.idle.pop(self._key(module, env), None)
        if proc is not None and proc.poll() is None:
            return proc
        return self.spawn(module, env)

    def refill(self, module: str, env: dict[str, str] | None, now: bool = False) -> None:
        """Start the next idle worker: a moment later, as starting Python and loading the
        libraries takes a core for a fraction of a second, which the job that just ended
        needs to publish its output; ``now`` when the job has another step for it at once
        (the next target of a quantization: it would otherwise start a worker itself)."""
        if not self.wanted(env):
            return
        if now:
            self._refill(module, env)
            return
        timer = threading.Timer(REFILL_DELAY_S, self._refill, (module, env))
        timer.daemon = True
        timer.start()

    def _refill(self, module: str, env: dict[str, str] | None) -> None:
        key = self._key(module, env)
        with self.lock:
            if self.closed or (key in self.idle and self.idle[key].poll() is None):
                return
            self.idle[key] = self.spawn(module, env)

    def close(self) -> None:
        with self.lock:
            procs, self.idle, self.closed = list(self.idle.values()), {}, True
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()  # the worker reads an empty request and exits
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


WARM = WarmWorkers()


def _reap(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for _line in proc.stdout:  # whatever it still writes, so that it never blocks on a pipe
        pass
    proc.stdout.close()
    proc.wait()


def run_worker(handle: JobHandle, module: str, request: dict[str, Any], label: str,
               env: dict[str, str] | None = None, failure_code: str = "job_failed",
               more: bool = False) -> dict[str, Any]:
    """Run ``python -m MODULE`` (a worker speaking JSON lines: progress, then one result or
    error) for a job: relay its progress to the job, kill it when the job is cancelled.
    ``more``: the job runs another worker of this module right after this one."""
    import json

    proc = WARM.take(module, env)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(request))
    proc.stdin.close()

    def kill_on_cancel() -> None:
        handle.cancel.wait()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    threading.Thread(target=kill_on_cancel, daemon=True).start()
    answer: dict[str, Any] = {}
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except ValueError:
            continue  # a native library writing to stdout
        if "progress" in msg:
            handle.update(phase=label, fraction=msg["progress"], message=msg.get("message", ""))
        else:
            answer = msg
            break  # its work is done: no need to wait for the interpreter to wind down
    threading.Thread(target=_reap, args=(proc,), daemon=True).start()
    WARM.refill(module, env, now=more)  # for the next job, while this one finishes up
    if handle.cancel.is_set():
        raise QmgrError(f"{label} cancelled", code="cancelled")
    if "result" in answer:
        return answer["result"]
    if not answer:
        proc.wait()
    err = answer.get("error") or {"code": failure_code,
                                  "message": f"the worker died (exit {proc.returncode}); see "
                                             "the daemon log"}
    raise QmgrError(err["message"], code=err.get("code", failure_code))


class JobRunner:
    def __init__(self, catalog: Catalog, workers: int = 2):
        self.catalog = catalog
        self.kinds: dict[str, JobFunction] = {}
        self.handles: dict[int, JobHandle] = {}
        self.finished: collections.deque[int] = collections.deque()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qmgr-job")
        self.stopping = False
        self.lock = threading.Lock()
        # In a fleet: this node's row id. Jobs are then claimed (claim()) rather than all
        # resumed, and a row another node has taken over is neither written nor run here.
        self.node_id: int | None = None

    def register(self, kind: str, fn: JobFunction) -> None:
        self.kinds[kind] = fn

    def submit(self, kind: str, arguments: dict[str, Any],
               secrets: dict[str, str] | None = None,
               node_id: int | None = None) -> dict[str, Any]:
        """Record a job and run it here; in a fleet, ``node_id`` may name another node, which
        claims it at its next heartbeat (its row is then the job's only news here)."""
        if kind not in self.kinds:
            raise QmgrError(f"unknown job kind {kind!r}", code="bad_request")
        elsewhere = node_id is not None and node_id != self.node_id
        with self.catalog.writing() as session:
            job = Job(kind=kind, arguments=arguments, state=JobState.QUEUED, progress={},
                      node_id=node_id if elsewhere else self.node_id)
            session.add(job)
            session.flush()
            job_id = job.id
            if elsewhere:
                return job_row_dict(job)
        return self._start(JobHandle(job_id, kind, arguments, secrets)).to_dict()

    def _start(self, handle: JobHandle) -> JobHandle:
        with self.lock:
            self.handles[handle.id] = handle
        self.pool.submit(self._run, handle)
        return handle

    def claim(self) -> int:
        """In a fleet: take the unfinished jobs that are this node's (left by its previous
        run), nobody's, or a gone node's, locking each row so that two nodes claiming at once
        never take the same job (``FOR UPDATE SKIP LOCKED``: a row another node is claiming
        or saving is passed over, not waited for). Returns how many were started."""
        if self.stopping or self.node_id is None:
            return 0
        gone = select(Node.id).where(Node.state == "gone")
        started = []
        with self.catalog.writing() as session:
            rows = session.scalars(select(Job).where(
                Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
                Job.kind.in_(list(self.kinds)),
                or_(Job.node_id.is_(None), Job.node_id == self.node_id,
                    Job.node_id.in_(gone)))
                .order_by(Job.id).with_for_update(skip_locked=True))
            for job in rows:
                if job.id in self.handles:
                    continue
                if job.node_id != self.node_id:
                    log.info("taking over job %d (%s) from %s", job.id, job.kind,
                             "nobody" if job.node_id is None else f"gone node {job.node_id}")
                job.node_id = self.node_id
                started.append(JobHandle(job.id, job.kind, dict(job.arguments)))
        for handle in started:
            self._start(handle)
        return len(started)

    def follow_rows(self) -> list[int]:
        """In a fleet: stop the jobs running here whose rows say another node has taken them
        over (this node was thought gone: that node runs them now) or that they were
        cancelled (`qmgr cancel` on another node). Returns the ids stopped."""
        if self.node_id is None:
            return []
        mine = [h.id for h in list(self.handles.values()) if h.state not in TERMINAL]
        if not mine:
            return []
        with self.catalog.reading() as session:
            rows = session.execute(select(Job.id, Job.node_id, Job.state).where(
                Job.id.in_(mine))).all()
        stopped = []
        for job_id, node_id, state in rows:
            handle = self.handles.get(job_id)
            if handle is None:
                continue
            if state == JobState.CANCELLED:
                log.info("job %d was cancelled from another node", job_id)
                handle.request_cancel("user")
            elif node_id != self.node_id:
                log.warning("job %d was taken over by another node: stopping it here", job_id)
                handle.request_cancel("taken")
            else:
                continue
            stopped.append(job_id)
        return stopped

    def resume_unfinished(self) -> int:
        if self.node_id is not None:
            return self.claim()
        with self.catalog.reading() as session:
            rows = list(session.scalars(select(Job).where(
                Job.state.in_([JobState.QUEUED, JobState.RUNNING])).order_by(Job.id)))
        for job in rows:
            if job.kind in self.kinds:
                log.info("resuming job %d (%s %s)", job.id, job.kind, job.arguments)
                self._start(JobHandle(job.id, job.kind, dict(job.arguments)))
        return len(rows)

    def _persist(self, handle: JobHandle, force: bool = False) -> None:
        with handle.persist_lock:
            self._persist_locked(handle, force)

    def _persist_locked(self, handle: JobHandle, force: bool) -> None:
        now = time.monotonic()
        if not force and now - handle._persisted < PERSIST_EVERY_S:
            return
        handle._persisted = now
        d = handle.to_dict()
        d.update(handle.final or {})  # the end, even if a periodic save comes after it
        progress = dict(d["progress"])
        if d["result"] is not None:
            progress["result"] = d["result"]
        if d["error_code"]:
            progress["error_code"] = d["error_code"]
        with self.catalog.writing() as session:
            # Locked: a cancel written meanwhile (by another daemon of a fleet) is seen, and a
            # job that ended stays ended.
            job = session.get(Job, handle.id, with_for_update=True)
            if job is not None and self.node_id is not None and job.node_id != self.node_id:
                return  # taken over by another node of the fleet: its row now
            if job is not None and (job.state not in TERMINAL or job.state == d["state"]):
                job.state, job.progress, job.error = d["state"], progress, d["error"]

    def _run(self, handle: JobHandle) -> None:
        if self.stopping:
            return
        handle.state = JobState.RUNNING
        handle.changed()
        # The row says "queued" until the saver's first write, a second in, not here: the
        # work does not wait for a commit and its fsync. Nothing reads the row of a job that
        # has a handle, and start-up resumes queued and running jobs alike.

        def persist_progress() -> None:
            while handle.state == JobState.RUNNING and not handle.cancel.wait(PERSIST_EVERY_S):
                self._persist(handle)

        saver = threading.Thread(target=persist_progress, daemon=True)
        saver.start()
        final: dict[str, Any]
        try:
            final = {"state": JobState.SUCCEEDED, "result": self.kinds[handle.kind](handle)}
        except BaseException as e:
            if handle.cancel_reason in ("shutdown", "taken"):
                if handle.cancel_reason == "shutdown":
                    log.info("job %d stopped for shutdown; it resumes at the next start",
                             handle.id)
                else:  # what is asked of it is read from its row, which its new node writes
                    with self.lock:
                        self.handles.pop(handle.id, None)
                handle.changed()
                # The row stays queued or running: resumed at the next start (or run by the
                # node that took it over).
                return
            if handle.cancel_reason == "user":
                final = {"state": JobState.CANCELLED, "error": "cancelled",
                         "error_code": "cancelled"}
            elif isinstance(e, QmgrError) or as_qmgr_error(e) is not None:
                known = e if isinstance(e, QmgrError) else as_qmgr_error(e)
                assert known is not None
                final = {"state": JobState.FAILED, "error": known.message,
                         "error_code": known.code}
            else:
                log.exception("job %d failed", handle.id)
                final = {"state": JobState.FAILED, "error_code": "internal",
                         "error": f"internal error: {type(e).__name__}: {e}"}
        handle.final = final
        try:
            self._persist(handle, force=True)
        finally:
            # Only now, the row written, does the handle show the end: a client that saw it
            # may ask the catalog.
            with handle.lock:
                for key, value in final.items():
                    setattr(handle, key, value)
            handle.changed()
            self._forget_old(handle)
        log.info("job %d %s: %s", handle.id, handle.state, handle.error or "ok")

    def _forget_old(self, handle: JobHandle) -> None:
        """Keep the handles of the last KEEP_FINISHED finished jobs only."""
        with self.lock:
            self.finished.append(handle.id)
            while len(self.finished) > KEEP_FINISHED:
                self.handles.pop(self.finished.popleft(), None)

    def get(self, job_id: int) -> dict[str, Any]:
        handle = self.handles.get(job_id)
        if handle is not None:
            return handle.to_dict()
        with self.catalog.reading() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            return job_row_dict(job)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.catalog.reading() as session:
            rows = list(session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))
            out = [job_row_dict(j) for j in rows]
        for d in out:
            handle = self.handles.get(d["id"])
            if handle is not None:
                d.update({k: v for k, v in handle.to_dict().items() if k != "arguments"})
        return out

    def cancel(self, job_id: int) -> dict[str, Any]:
        handle = self.handles.get(job_id)
        if handle is None or handle.state in TERMINAL:
            current = self.get(job_id)
            if current["state"] in TERMINAL:
                raise QmgrError(f"job {job_id} already {current['state']}", code="conflict")
            # Queued in the catalog but not running here: mark it so it never starts (locked,
            # and checked again: it may have ended since it was read).
            with self.catalog.writing() as session:
                job = session.get(Job, job_id, with_for_update=True)
                if job is not None and job.state not in TERMINAL:
                    job.state, job.error = JobState.CANCELLED, "cancelled"
            return self.get(job_id)
        handle.request_cancel("user")
        return handle.to_dict()

    def shutdown(self) -> None:
        self.stopping = True
        for handle in list(self.handles.values()):
            if handle.state not in TERMINAL:
                handle.request_cancel("shutdown")
        self.pool.shutdown(wait=True, cancel_futures=True)
        WARM.close()
