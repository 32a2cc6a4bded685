"""The JSON-lines protocol of worker processes (``qmgr.quantize.worker``, ``qmgr.eval.worker``,
``qmgr.run.runner``): one request on stdin, answers on stdout.

A one-shot worker answers ``{"progress": 0.42, "message": ...}`` as it goes, then one
``{"result": {...}}`` or ``{"error": {"code": ..., "message": ...}}``; the daemon's side is
``qmgr.work.jobs.run_worker``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


PROGRESS_EVERY_S = 0.05  # the daemon shows progress at most ten times a second
_last_progress = [0.0]


def progress(fraction: float | None, message: str) -> None:
    """Report progress, at most every ``PROGRESS_EVERY_S`` (a quantizer reports each tensor:
    hundreds a second on a small model, each one parsed by the daemon), the end always."""
    now = time.monotonic()
    if now - _last_progress[0] < PROGRESS_EVERY_S and fraction is not None and fraction < 1:
        return
    _last_progress[0] = now
    emit({"progress": fraction, "message": message})


def serve(work: Callable[[dict[str, Any]], dict[str, Any]], refusal: type[Exception],
          failure_code: str, prepare: Callable[[], None] | None = None) -> int:
    """Run one request: ``prepare()`` first (a warm worker does it before its request comes,
    see ``qmgr.work.jobs.WarmWorkers``), then ``work(request)``. ``refusal`` errors carry a
    ``code`` and a ``message`` for the user; anything else is reported as ``failure_code``,
    its traceback on stderr (the daemon's log). An empty stdin is a warm worker the daemon no
    longer needs: it exits quietly. Returns the exit status."""
    try:
        if prepare is not None:
            prepare()
        raw = sys.stdin.read()
        if not raw.strip():
            return 0
        emit({"result": work(json.loads(raw))})
        return 0
    except refusal as e:
        emit({"error": {"code": getattr(e, "code", failure_code),
                        "message": getattr(e, "message", str(e))}})
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        emit({"error": {"code": failure_code, "message": f"{type(e).__name__}: {e}"}})
    return 1
