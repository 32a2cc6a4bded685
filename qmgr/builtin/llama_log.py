"""llama.cpp's log captured while it works, and the cores it may use: shared by the built-in
quantizer, importance matrix and backend (none of them imports another for these)."""

from __future__ import annotations

import collections
import ctypes
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any


class LlamaLog:
    """llama.cpp's log, captured while the ``with`` block runs.

    Each piece of text goes to ``on_text`` (if given) as llama.cpp emits it; complete lines
    are kept, the last ``keep`` of them, for error messages. The callback that was set before
    (llama-cpp-python's own, or none: stderr) is restored on exit.
    """

    def __init__(self, on_text: Callable[[str], None] | None = None, keep: int = 40):
        self.on_text = on_text
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.errors: list[BaseException] = []
        self._partial = ""
        # Pieces logged by these threads go to their own handler instead (a dry run that
        # runs next to the real quantization, see llama_digest).
        self.routes: dict[int, Callable[[str], None]] = {}

    def __enter__(self) -> LlamaLog:
        import llama_cpp

        self._llama = llama_cpp
        self._previous = llama_cpp.llama_log_callback()  # NULL until llama_log_get fills it
        self._previous_data = ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(self._previous), ctypes.byref(self._previous_data))
        self._callback = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self._callback, None)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._llama.llama_log_set(self._previous, self._previous_data)
        if self._partial.strip():
            self.lines.append(self._partial.rstrip())
        self._partial = ""

    def _on_log(self, level: int, text: bytes | None, user_data: Any) -> None:
        # Must not raise into C: ctypes would only print the traceback.
        try:
            piece = (text or b"").decode("utf-8", "replace")
            route = self.routes.get(threading.get_ident())
            if route is not None:
                route(piece)
                return
            if self.on_text is not None:
                self.on_text(piece)
            *done, self._partial = (self._partial + piece).split("\n")
            self.lines.extend(line.rstrip() for line in done if line.strip())
        except BaseException as exc:  # noqa: BLE001 - kept for the caller
            self.errors.append(exc)

    def tail(self, n: int = 12) -> str:
        lines = list(self.lines)
        if self._partial.strip():
            lines.append(self._partial.rstrip())
        return "\n".join(lines[-n:])


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
