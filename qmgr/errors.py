"""Domain errors shared by the client and the daemon.

Every expected failure is a :class:`QmgrError` with a stable ``code`` (part of the API: the
daemon sends it as ``{"error": {"code": ..., "message": ...}}``) and a message a person can act
on. The CLI prints ``Error: <message>`` and exits non-zero; no traceback.
"""

from __future__ import annotations


class QmgrError(Exception):
    """An expected failure with a stable code and an actionable message."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class NotFound(QmgrError):
    """The named model, variant, job or folder is not in the catalog."""

    code = "not_found"
    http_status = 404


class Conflict(QmgrError):
    """The request clashes with what is already there."""

    code = "conflict"
    http_status = 409


class DaemonUnavailable(QmgrError):
    """No daemon answers on the socket (and none could be started)."""

    code = "daemon_unavailable"
    http_status = 503


class GGUFError(QmgrError):
    """A file is not a GGUF file qmgr can read: malformed, truncated, or unsupported."""

    code = "gguf_invalid"
    http_status = 422


def as_qmgr_error(exc: BaseException) -> QmgrError | None:
    """An error of the machine that a person can act on, as a QmgrError: a full disk (from a
    file write or from the catalog's SQLite). None for a real bug."""
    import errno

    text = str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" ({exc.filename})" if exc.filename else ""
        return QmgrError(f"no space left on the disk{where}: free some (`qmgr rm` variants you "
                         "do not use, or other files), then try again", code="no_space",
                         http_status=507)
    if "database or disk is full" in text:
        return QmgrError("no space left for the catalog's database: free some disk space "
                         "(`qmgr rm` variants you do not use, or other files), then try again",
                         code="no_space", http_status=507)
    return None
