"""A runner: one process per loaded model (``python -m qmgr.run.runner``).

Protocol, JSON lines: the first line on stdin names the backend, the file and the load
options; the runner answers ``{"ready": {...}}`` (or ``{"error": ...}`` and exits). Then one
request per line — ``{"op": "generate", "prompt": ..., "params": {...}}``,
``{"op": "chat", "messages": [...], "params": {...}}``, ``{"op": "exit"}`` — each answered by
``{"text": ...}`` lines and a final ``{"done": {stats}}`` or ``{"error": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from qmgr.run.contract import GenParams, LoadOptions
from qmgr.workerio import emit


def find_backend(name: str) -> Any:
    from qmgr.plugins import PluginSet

    backends = PluginSet().registered("register_backends")
    for b in backends:
        if getattr(b, "name", None) == name:
            return b
    raise LookupError(f"no backend named {name!r} (installed: "
                      f"{', '.join(str(getattr(b, 'name', '?')) for b in backends) or 'none'})")


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def serve(session: Any) -> None:
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            emit({"error": {"code": "bad_request", "message": "not JSON"}})
            continue
        op = req.get("op")
        if op == "exit":
            return
        try:
            params = GenParams.from_dict(req.get("params") or {})
            if op == "generate":
                pieces = session.generate(req["prompt"], params)
            elif op == "chat":
                pieces = session.chat(req["messages"], params)
            else:
                emit({"error": {"code": "bad_request", "message": f"unknown op {op!r}"}})
                continue
            for piece in pieces:
                if piece.text:
                    emit({"text": piece.text})
                if piece.done:
                    emit({"done": {**(piece.stats or {}), "rss": rss()}})
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            emit({"error": {"code": "backend_failed", "message": f"{type(e).__name__}: {e}"}})


def main() -> int:
    try:
        first = json.loads(sys.stdin.readline())
        backend = find_backend(first["backend"])
        options = LoadOptions(**first.get("options", {}))
        session = backend.load(Path(first["path"]), options)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        emit({"error": {"code": "load_failed", "message": f"{type(e).__name__}: {e}"}})
        return 1
    emit({"ready": {"pid": os.getpid(), "rss": rss(), "backend": backend.name}})
    try:
        serve(session)
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
