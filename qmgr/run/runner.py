"""A runner: one process per loaded model (``python -m qmgr.run.runner``).

Protocol, JSON lines: the first line on stdin names the backend, the file and the load
options; the runner answers ``{"ready": {...}}`` (or ``{"error": ...}`` and exits). Then one
request per line — ``{"op": "generate", "prompt": ..., "params": {...}}``,
``{"op": "chat", "messages": [...], "params": {...}, "tools": [...]}`` (tools optional),
``{"op": "embed", "input": [texts], "truncate": true}``, ``{"op": "exit"}`` — each answered
by ``{"text": ...}`` lines and a final ``{"done": {stats}}`` or ``{"error": ...}``; an embed's
``done`` holds ``embeddings`` (one vector per text) and ``prompt_tokens``.

``{"op": "cancel"}`` stops the generation in progress (it is read while the runner generates;
between requests it does nothing): the request ends with ``{"done": {"cancelled": true,
"pieces": N}}``, N the text pieces sent. A chat with no messages generates nothing: it
answers ``{"done": {"chat_format": ...}}`` (the session's ``chat_format()``), or the error that
this model cannot chat, so a chat can be refused before anyone types.

``--warm BACKEND``: a runner started ahead of need (the manager keeps one while the API
listener is on) finds that backend and calls its ``warm()`` (the llama.cpp one imports its
native library) before it reads its first line.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

from qmgr.plugin.backend import Backend, GenParams, LoadOptions, Refusal, Session
from qmgr.workerio import emit


def find_backend(name: str) -> Backend:
    from qmgr.plugins import PluginSet

    return cast(Backend, PluginSet().find("register_backends", name))


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Requests:
    """The request lines on stdin, read on a thread of its own (the main thread reads nothing
    while it generates) so that a cancel is seen at once. A cancel applies to the request
    read last before it: the daemon sends one only while that request is being answered, so
    a late cancel (the answer was finished) never stops the next request."""

    def __init__(self, lines: Iterable[str]):
        self.pending: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self.cancelled_upto = 0  # requests numbered from 1; those up to this one are cancelled
        threading.Thread(target=self._read, args=(lines,), daemon=True, name="requests").start()

    def _read(self, lines: Iterable[str]) -> None:
        number = 0
        for line in lines:
            try:
                is_cancel = json.loads(line).get("op") == "cancel"
            except (ValueError, AttributeError):
                is_cancel = False
            if is_cancel:
                self.cancelled_upto = number
            else:
                number += 1
                self.pending.put((number, line))
        self.pending.put(None)

    def cancelled(self, number: int) -> bool:
        return self.cancelled_upto >= number

    def __iter__(self) -> Iterator[tuple[int, str]]:
        while (item := self.pending.get()) is not None:
            yield item


def answer(session: Session, req: dict[str, Any], cancelled: Callable[[], bool]) -> None:
    op = req.get("op")
    params = GenParams.from_dict(req.get("params") or {})
    if op == "generate":
        pieces = session.generate(req["prompt"], params)
    elif op == "chat" and not req["messages"]:
        chat_format = getattr(session, "chat_format", None)
        emit({"done": {"chat_format": chat_format() if chat_format else "backend",
                       "rss": rss()}})
        return
    elif op == "chat" and req.get("tools"):
        if "tools" not in inspect.signature(session.chat).parameters:
            raise Refusal("this backend cannot show tools to a model (its chat takes no "
                          "tools)", code="no_tools")
        pieces = session.chat(req["messages"], params, tools=req["tools"])  # type: ignore[call-arg]
    elif op == "chat":
        pieces = session.chat(req["messages"], params)
    elif op == "embed":
        embed = getattr(session, "embed", None)
        if embed is None:
            raise Refusal("this backend does not make embeddings", code="no_embeddings")
        done = embed(list(req["input"]), bool(req.get("truncate", True)))
        emit({"done": {"embeddings": done.vectors, "prompt_tokens": done.prompt_tokens,
                       "rss": rss()}})
        return
    else:
        emit({"error": {"code": "bad_request", "message": f"unknown op {op!r}"}})
        return
    sent = 0
    for piece in pieces:
        if cancelled():
            # Closing the backend's generator stops it before its next token.
            getattr(pieces, "close", lambda: None)()
            emit({"done": {"cancelled": True, "pieces": sent, "rss": rss()}})
            return
        if piece.text:
            emit({"text": piece.text})
            sent += 1
        if piece.done:
            emit({"done": {**(piece.stats or {}), "rss": rss()}})


def serve(session: Session, lines: Iterable[str]) -> None:
    requests = Requests(lines)
    for number, line in requests:
        try:
            req = json.loads(line)
        except ValueError:
            emit({"error": {"code": "bad_request", "message": "not JSON"}})
            continue
        if req.get("op") == "exit":
            return
        try:
            answer(session, req, functools.partial(requests.cancelled, number))
        except Refusal as e:
            emit({"error": {"code": e.code, "message": e.message}})
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            emit({"error": {"code": "backend_failed", "message": f"{type(e).__name__}: {e}"}})


def main() -> int:
    # A warm runner (the manager keeps one ready) has its backend found and its native library
    # imported before it is asked for a model: a load then costs the engine's load alone.
    # (``python -m qmgr.run.runner --warm BACKEND``: ``Backend.warm``, when it has one.)
    warm = sys.argv[2] if sys.argv[1:2] == ["--warm"] and len(sys.argv) > 2 else None
    backend = None
    if warm:
        try:
            backend = find_backend(warm)
            getattr(backend, "warm", lambda: None)()
        except Exception:
            backend = None  # found again below, where a failure is reported
    try:
        first = json.loads(sys.stdin.readline())
        if backend is None or backend.name != first["backend"]:
            backend = find_backend(first["backend"])
        options = LoadOptions(**first.get("options", {}))
        session = backend.load(Path(first["path"]), options)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        emit({"error": {"code": "load_failed", "message": f"{type(e).__name__}: {e}"}})
        return 1
    emit({"ready": {"pid": os.getpid(), "rss": rss(), "backend": backend.name}})
    try:
        serve(session, sys.stdin)
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
