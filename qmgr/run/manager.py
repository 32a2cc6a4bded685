"""Loaded models: one runner process per (variant, context, placement), kept while in use.

A runner stays loaded for ``keep_alive`` seconds after its last request (``QMGR_KEEP_ALIVE``,
default 300; 0 unloads after every request) and is then stopped by the reaper. Requests to one
runner are served one at a time, in the order they came; at most ``QMGR_MAX_QUEUE`` (default
32) wait behind the one being answered, and one more is refused at once with ``queue_full``
(503, with a ``Retry-After`` of about one request's time). ``qmgr ps`` lists runners with
their memory and placement, ``qmgr stop`` unloads. A runner that died (a crash of its engine)
is dropped, and the next request for its model starts a new one.

With ``warm`` (the API listener on, ``QMGR_WARM_WORKERS`` not 0) one runner process is kept
started ahead of need, its backend's library imported: a model's first request then waits
for the engine's load only, not for Python's start and the imports (~0.3 s). It holds ~60 MB
and no CPU; the next one is started once no request has come for a couple of seconds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmgr.errors import Busy, QmgrError
from qmgr.plugin.backend import LoadOptions
from qmgr.run.crash import crash_error

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "llama.cpp"
# Seconds a runner just handed to a request is kept from being unloaded to make room.
RESERVE_S = 10.0
# Seconds without a request before the next warm runner is started.
QUIET_S = 2.0


@dataclass
class Runner:
    key: tuple[Any, ...]
    ref: str
    path: str
    backend: str
    options: LoadOptions
    placement: dict[str, Any]
    proc: subprocess.Popen[str]
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: bool = False
    # Seconds it stays loaded after its last request, when a request said (Ollama's
    # keep_alive); None: the manager's. Negative: until stopped.
    keep_alive: float | None = None
    # The final line of the last request: its stats, ``cancelled`` when its client left.
    last: dict[str, Any] | None = None
    # Requests are written under ``lock``; a cancel or an exit may come from another thread.
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    # Requests waiting for ``lock``, and how many may (more are refused: queue_full).
    waiting: int = 0
    max_queue: int = 32
    # How long the last request took (seconds): what a refused client is told to wait.
    last_s: float = 1.0
    # Notified whenever a request ends: the scheduler waits on it for a model to go idle.
    idle: threading.Condition | None = None

    # Handed to a request that has not sent it yet: not unloaded to make room before then.
    reserved_until: float = 0.0

    def in_use(self) -> bool:
        """Answering a request, with requests waiting for it, or just handed out."""
        return self.busy or self.waiting > 0 or time.monotonic() < self.reserved_until

    def reserve(self) -> Runner:
        self.last_used = time.monotonic()
        self.reserved_until = self.last_used + RESERVE_S
        return self

    def rss(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _write(self, req: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with self.write_lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()

    def died(self, doing: str) -> QmgrError:
        """Why the runner is gone: killed by a signal (a crash of the engine), or an exit."""
        returncode = self.proc.wait()
        if returncode < 0:
            return crash_error(self.backend, returncode, f"{doing} {self.ref}")
        return QmgrError(f"the runner of {self.ref} exited (status {returncode}) while "
                         f"{doing}; see the daemon log", code="runner_died")

    def request(self, req: dict[str, Any]) -> Generator[dict[str, Any], None, None]:
        """Send one request; yield its answer lines up to the final one. Closing the iterator
        before the final line (the client went away) cancels the generation in the runner
        and waits for it to stop, so the next request finds the runner idle. Refused with
        :class:`~qmgr.errors.Busy` when ``max_queue`` requests already wait."""
        with self.write_lock:
            if self.busy and self.waiting >= self.max_queue:
                raise Busy(f"{self.ref} is busy: {self.waiting} requests are waiting for it "
                           f"already (QMGR_MAX_QUEUE={self.max_queue}); try again shortly",
                           retry_after=max(1, round(self.last_s + 0.5)))
            self.waiting += 1
            self.reserved_until = 0.0  # waiting now: counted as such
        try:
            self.lock.acquire()
        finally:
            with self.write_lock:
                self.waiting -= 1
        started = time.monotonic()
        try:
            self.busy = True
            finished = False
            assert self.proc.stdout is not None
            try:
                try:
                    self._write(req)
                except BrokenPipeError:
                    finished = True
                    raise self.died("generating with") from None
                for line in self.proc.stdout:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue  # a native library writing to stdout
                    if "done" in msg or "error" in msg:
                        finished = True
                        self.last = msg.get("done") or msg
                    yield msg
                    if finished:
                        return
                finished = True
                raise self.died("generating with")
            finally:
                if not finished:
                    self._cancel()
                self.busy = False
                self.last_used = time.monotonic()
                self.last_s = self.last_used - started
        finally:
            self.lock.release()
            if self.idle is not None:
                with self.idle:
                    self.idle.notify_all()

    def _cancel(self) -> None:
        assert self.proc.stdout is not None
        try:
            self._write({"op": "cancel"})
        except BrokenPipeError:
            return
        for line in self.proc.stdout:  # the rest of the answer, up to its final line
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "done" in msg or "error" in msg:
                self.last = msg.get("done") or msg
                log.info("%s: generation cancelled (its client left)", self.ref)
                return

    def stop(self) -> None:
        if self.alive():
            try:
                # A cancel first: a request in progress ends at its next token.
                self._write({"op": "cancel"})
                self._write({"op": "exit"})
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired, AssertionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "pid": self.proc.pid, "backend": self.backend,
                "ctx": self.options.n_ctx, "gpu_layers": self.options.n_gpu_layers,
                "kv_type": self.options.kv_type, "rss": self.rss(), "busy": self.busy,
                "placement": self.placement, "loaded_at": self.loaded_at,
                "idle_s": round(time.monotonic() - self.last_used, 1), "last": self.last,
                "keep_alive": self.keep_alive}


class ModelManager:
    def __init__(self, keep_alive: float = 300.0, env: dict[str, str] | None = None,
                 max_queue: int = 32, warm: bool = False):
        self.keep_alive = keep_alive
        self.max_queue = max_queue
        self.env = dict(os.environ) if env is None else env
        self.warm = warm
        self.spare: subprocess.Popen[str] | None = None  # a warm runner, for DEFAULT_BACKEND
        if warm:
            self.spare = self._spawn(DEFAULT_BACKEND)
        self.runners: dict[tuple[Any, ...], Runner] = {}
        self.lock = threading.Lock()
        # Notified when a request ends anywhere: a model waiting for room watches it.
        self.idle = threading.Condition()
        # One model starts at a time (its load is not under ``lock``: loaded ones stay usable).
        self.starting = threading.RLock()
        self.stopping = threading.Event()
        self.reaper = threading.Thread(target=self._reap, name="qmgr-reaper", daemon=True)
        self.reaper.start()

    def runner(self, ref: str, path: str, options: LoadOptions, placement: dict[str, Any],
               backend: str = DEFAULT_BACKEND) -> Runner:
        key = (ref, path, options.n_ctx, options.n_gpu_layers, options.kv_type, backend)
        with self.starting:
            with self.lock:
                r = self.runners.get(key)
                if r is not None and r.alive():
                    return r.reserve()
            r = self._start(key, ref, path, options, placement, backend)
            r.max_queue, r.idle = self.max_queue, self.idle
            with self.lock:
                self.runners[key] = r
            return r.reserve()

    def _spawn(self, warm: str | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "qmgr.run.runner",
                                 *(["--warm", warm] if warm else [])], env=self.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                bufsize=1, start_new_session=True)

    def _process(self, backend: str) -> subprocess.Popen[str]:
        """A runner process for ``backend``: the warm one when it is there, else a new one."""
        spare = self.spare
        if spare is not None and spare.poll() is not None:
            spare = self.spare = None  # it died waiting: the next quiet moment starts another
        if spare is not None and backend == DEFAULT_BACKEND:
            self.spare = None
            return spare
        return self._spawn()

    def _start(self, key: tuple[Any, ...], ref: str, path: str, options: LoadOptions,
               placement: dict[str, Any], backend: str) -> Runner:
        proc = self._process(backend)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"backend": backend, "path": path,
                                         "options": options.to_dict()}) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died before reading: its exit status says how (below)
        line = proc.stdout.readline()
        try:
            answer = json.loads(line) if line else {}
        except ValueError:
            answer = {}
        if "ready" not in answer:
            if line:  # its error, or not the protocol at all
                proc.kill()
            try:
                returncode = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # its stdout closed, and yet it lives on
                proc.kill()
                returncode = proc.wait()
            if not line and returncode < 0:
                raise crash_error(backend, returncode, f"loading {ref}")
            err = answer.get("error") or {"message": f"the runner exited (status {returncode})"
                                                     " while loading (see the daemon log)"}
            raise QmgrError(f"cannot load {ref}: {err['message']}", code="load_failed")
        log.info("loaded %s (pid %d, ctx %d, %d GPU layers)", ref, proc.pid, options.n_ctx,
                 options.n_gpu_layers)
        return Runner(key, ref, path, backend, options, placement, proc)

    def find(self, ref: str, n_ctx: int, kv_type: str) -> Runner | None:
        """A loaded runner of ``ref`` with that context and KV type (marked used), if any."""
        with self.lock:
            for r in self.runners.values():
                if r.ref == ref and r.options.n_ctx == n_ctx and r.options.kv_type == kv_type \
                        and r.alive():
                    return r.reserve()
        return None

    def loaded(self) -> list[Runner]:
        with self.lock:
            return [r for r in self.runners.values() if r.alive()]

    def unload_least_recently_used(self) -> Runner | None:
        """Stop the idle runner used longest ago, to make room; None when every one is busy
        (or has requests waiting)."""
        with self.lock:
            idle = [(r.last_used, k) for k, r in self.runners.items() if not r.in_use()]
            if not idle:
                return None
            r = self.runners.pop(min(idle)[1])
        log.info("unloading %s (least recently used) to make room", r.ref)
        r.stop()
        return r

    def wait_idle(self, timeout: float) -> None:
        """Wait until some request ends (or ``timeout`` seconds)."""
        with self.idle:
            self.idle.wait(timeout)

    def keep_alive_of(self, r: Runner) -> float:
        return self.keep_alive if r.keep_alive is None else r.keep_alive

    def ps(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.to_dict() for r in self.runners.values() if r.alive()]

    def stop(self, ref: str | None = None) -> list[str]:
        with self.lock:
            chosen = [k for k, r in self.runners.items() if ref is None or r.ref == ref]
            runners = [self.runners.pop(k) for k in chosen]
        for r in runners:
            r.stop()
        return [r.ref for r in runners]

    def _reap(self) -> None:
        while not self.stopping.wait(1.0):
            now = time.monotonic()
            with self.lock:
                idle = [k for k, r in self.runners.items()
                        if not r.alive() or (not r.in_use() and 0 <= self.keep_alive_of(r)
                                             < now - r.last_used)]
                runners = [self.runners.pop(k) for k in idle]
            for r in runners:
                if r.alive():
                    log.info("unloading %s (idle)", r.ref)
                    r.stop()
                else:
                    log.warning("the runner of %s ended by itself (exit status %s)", r.ref,
                                r.proc.wait())
            self._keep_warm(now)

    def _keep_warm(self, now: float) -> None:
        """Start the next warm runner once nothing has been asked for QUIET_S seconds (its
        imports would slow a load or a generation down), and never during a load."""
        if not self.warm or self.spare is not None or not self.starting.acquire(blocking=False):
            return
        try:
            with self.lock:
                quiet = all(not r.in_use() and now - r.last_used > QUIET_S
                            for r in self.runners.values())
            if quiet and not self.stopping.is_set():
                self.spare = self._spawn(DEFAULT_BACKEND)
        finally:
            self.starting.release()

    def shutdown(self) -> None:
        self.stopping.set()
        self.stop()
        spare, self.spare = self.spare, None
        if spare is not None and spare.poll() is None:
            assert spare.stdin is not None
            spare.stdin.close()  # it waits for its first line: end of input ends it
            try:
                spare.wait(timeout=10)
            except subprocess.TimeoutExpired:
                spare.kill()
                spare.wait()
