"""Domain errors shared by the client and the daemon.

Every expected failure is a :class:`QmgrError` with a stable ``code`` (part of the API: the
daemon sends it as ``{"error": {"code": ..., "message": ...}}``) and a message a person can act
on. The CLI prints ``Error: <message>`` and exits non-zero; no traceback.
"""

from __future__ import annotations

from typing import Any

# Every error code qmgr sends, with its HTTP status and what it means: the one list (docs/
# errors.md is checked against it, and a test fails on a code used anywhere but not here).
CODES: dict[str, tuple[int, str]] = {
    # the request
    "error": (400, "an expected failure with no more specific code"),
    "bad_request": (400, "the request is malformed: a field missing, or of the wrong type"),
    "too_large": (413, "a request body or a file larger than qmgr accepts"),
    "timeout": (408, "a request body that did not arrive in time"),
    "no_route": (404, "no such API endpoint"),
    "method_not_allowed": (405, "the endpoint does not take that method"),
    "http_error": (400, "another HTTP-level refusal (sent with the status it had)"),
    "forbidden": (403, "the caller may not do this, or not name that path (another user's "
                  "files, or daemon)"),
    "unauthorized": (403, "the registry refused the credentials (401/403)"),
    "env_differs": (409, "the client's QMGR_HOME is not this daemon's"),
    "bad_config": (400, "a setting (QMGR_* variable, config file) that does not parse"),
    # names and references
    "bad_ref": (400, "a reference that does not parse"),
    "ambiguous_ref": (409, "a reference that names more than one variant"),
    "bad_name": (400, "a model or alias name qmgr does not accept"),
    "bad_path": (400, "a path that is not absolute, or not a file qmgr can read"),
    "not_found": (404, "no such model, variant, job, alias or folder"),
    "conflict": (409, "the request clashes with what is already there"),
    "not_ready": (409, "a variant whose file is not usable (pulling, broken...)"),
    "not_here": (409, "a fleet's variant whose bytes are on other nodes, not this one"),
    "cancelled": (409, "the job was cancelled"),
    # registries and downloads
    "no_source": (404, "no installed source plugin owns the reference's kind"),
    "bad_source": (502, "a source plugin answered something that is not what it promised"),
    "unreachable": (502, "the registry or mirror cannot be reached"),
    "fetch_failed": (502, "a download or registry request failed"),
    "registry_busy": (503, "the registry answers 503 (a mirror still hashing): try later"),
    "bad_registry": (502, "the registry answered something malformed or dangerous"),
    "bad_response": (502, "an answer that is not what the protocol says"),
    "bad_url": (400, "a URL qmgr does not fetch (scheme, host)"),
    "insecure": (400, "plain http, or a redirect to it, without --insecure"),
    "size_mismatch": (502, "a download whose size is not the one announced"),
    "digest_mismatch": (502, "a download whose sha256 is not the one announced"),
    "bad_digest": (400, "a digest that is not a sha256 (64 hex digits)"),
    "file_changed": (409, "the remote file changed during a resumed download"),
    "too_slow": (502, "a download slower than QMGR_MIN_SPEED for a whole stall window"),
    "missing_shards": (422, "a split model whose shards are not all there"),
    "not_first_shard": (400, "a shard other than the first named as a model"),
    "gguf_invalid": (422, "a file that is not a GGUF file qmgr can read"),
    "no_space": (507, "the disk (or the catalog's database) is full"),
    # hardware and fit
    "bad_hw": (400, "a hardware declaration (QMGR_HW, config hw) that does not parse"),
    "cannot_estimate": (422, "a model whose memory qmgr cannot estimate"),
    "does_not_fit": (507, "no variant fits this machine's memory"),
    "ctx_too_large": (400, "a context larger than the model was trained for"),
    # plugins
    "no_quantizer": (404, "no installed quantizer of that name"),
    "no_backend": (404, "no installed backend of that name (or none at all)"),
    "cannot_run": (409, "no installed backend can run the model: each one's reason"),
    "no_probe": (404, "no installed probe of that name"),
    "quantizer_unavailable": (409, "the quantizer cannot run here (its library is missing)"),
    "broken_install": (500, "a package qmgr needs is installed but broken"),
    # quantizing
    "quantize_failed": (422, "a quantizer failed"),
    "bad_target": (400, "a quant type the quantizer does not make"),
    "bad_option": (400, "a quantize option the quantizer does not take, or a bad value"),
    "requantize_refused": (409, "the source is already quantized (allow_requantize)"),
    "unsupported_file": (422, "a file the quantizer cannot read (split, big-endian)"),
    "imatrix_required": (409, "the target type needs an importance matrix"),
    "imatrix_failed": (422, "computing an importance matrix failed"),
    "imatrix_invalid": (422, "an importance matrix file that does not parse"),
    "imatrix_mismatch": (409, "an importance matrix of another model"),
    "imatrix_unsupported": (409, "no installed quantizer computes importance matrices"),
    # running and measuring
    "load_failed": (500, "the backend could not load the model"),
    "backend_failed": (500, "the backend failed while answering"),
    "runner_died": (500, "the runner process died"),
    "backend_crashed": (500, "the engine's process was killed by a signal (a build for another "
                        "CPU, the out-of-memory killer)"),
    "no_chat_template": (409, "a chat with a model whose file has no chat template"),
    "no_embeddings": (409, "embeddings from a backend (or model) that does not make them"),
    "no_tools": (409, "tools given to a backend that cannot render them"),
    "no_thinking": (400, "think asked of a model whose chat template has no thinking"),
    "input_too_long": (400, "an input longer than the model takes, with truncation off"),
    "bad_format": (400, "a structured-output format (JSON schema) qmgr cannot enforce"),
    "queue_full": (503, "a model's queue of waiting requests is full: retry after a while"),
    "catalog_unavailable": (503, "the catalog's database server is not answering, or undid a "
                            "transaction two writers crossed in: retry after a while"),
    "eval_failed": (422, "an evaluation failed"),
    "tokenizer_mismatch": (409, "variants that tokenize differently: not one model"),
    "text_too_short": (400, "a text too short for one chunk of the context"),
    # the daemon and the service
    "daemon_unavailable": (503, "no daemon answers on the socket (and none could start)"),
    "daemon_running": (409, "a daemon already listens on that socket"),
    "other_daemon": (409, "another daemon (another user's, the system one) answers there"),
    "already_running": (409, "the job or service is already running"),
    "unsafe_socket_dir": (400, "a socket directory someone else could have planted"),
    "no_systemd": (400, "systemd is not there to install the service into"),
    "systemd_failed": (500, "systemctl failed"),
    "io_error": (507, "a write to the disk failed"),
    "internal": (500, "a bug in qmgr: please report it"),
}


def status_of(code: str) -> int:
    """The HTTP status a code is sent with."""
    return CODES.get(code, CODES["error"])[0]


class QmgrError(Exception):
    """An expected failure with a stable code (one of :data:`CODES`, which gives its HTTP
    status) and an actionable message."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def http_status(self) -> int:
        return status_of(self.code)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"error": {"code": self.code, "message": self.message}}


class Busy(QmgrError):
    """A model's queue is full (``queue_full``): the request may be sent again after
    ``retry_after`` seconds (sent as ``Retry-After``)."""

    code = "queue_full"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"error": {"code": self.code, "message": self.message,
                          "retry_after": self.retry_after}}


def error_from(error: dict[str, Any]) -> QmgrError:
    """The error a ``{"code", "message"}`` dict (``to_dict()["error"]``) stands for."""
    if error.get("code") == Busy.code:
        return Busy(error["message"], int(error.get("retry_after") or 1))
    return QmgrError(error["message"], code=error.get("code") or "error")


class NotFound(QmgrError):
    """The named model, variant, job or folder is not in the catalog."""

    code = "not_found"


class Conflict(QmgrError):
    """The request clashes with what is already there."""

    code = "conflict"


class DaemonUnavailable(QmgrError):
    """No daemon answers on the socket (and none could be started)."""

    code = "daemon_unavailable"


class GGUFError(QmgrError):
    """A file is not a GGUF file qmgr can read: malformed, truncated, or unsupported."""

    code = "gguf_invalid"


def as_qmgr_error(exc: BaseException) -> QmgrError | None:
    """An error of the machine that a person can act on, as a QmgrError: a full disk (from a
    file write or from the catalog's SQLite). None for a real bug."""
    import errno

    text = str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" ({exc.filename})" if exc.filename else ""
        return QmgrError(f"no space left on the disk{where}: free some (`qmgr rm` variants you "
                         "do not use, or other files), then try again", code="no_space")
    if "database or disk is full" in text:
        return QmgrError("no space left for the catalog's database: free some disk space "
                         "(`qmgr rm` variants you do not use, or other files), then try again",
                         code="no_space")
    return _from_postgresql(exc)


# PostgreSQL's SQLSTATE codes a person (or a retry) can act on.
PG_DISK_FULL = "53100"
PG_RETRY = {"40001": "a serialization failure", "40P01": "a deadlock between two writers"}


def _from_postgresql(exc: BaseException) -> QmgrError | None:
    """A PostgreSQL catalog's errors that are the machine's, not a bug: its disk full, its
    server away (a restart, the network), a transaction it undid for a crossing writer.
    Read from SQLAlchemy's wrapper and psycopg's ``sqlstate`` without importing either."""
    if not type(exc).__module__.startswith("sqlalchemy"):
        return None
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None)
    detail = str(orig or exc).strip().splitlines()[0][:300]
    if state == PG_DISK_FULL:
        return QmgrError(f"no space left on the catalog's PostgreSQL server ({detail}): free "
                         "some there, then try again", code="no_space")
    if state in PG_RETRY:
        return QmgrError(f"the catalog undid this change: {PG_RETRY[state]} ({detail}); try "
                         "again", code="catalog_unavailable")
    if type(exc).__name__ == "OperationalError" and (state is None or state.startswith(
            ("08", "57P"))):
        return QmgrError(f"the catalog's database is not answering: {detail}",
                         code="catalog_unavailable")
    return None
