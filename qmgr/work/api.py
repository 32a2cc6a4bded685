"""How an endpoint of the daemon's HTTP API is declared, admitted and answered.

Each feature package declares its endpoints in a :class:`Table` (its ``routes.py``); the daemon
mounts every table on one Starlette app and publishes one OpenAPI document from the same
endpoints (:mod:`qmgr.work.openapi`), streams included. Before a handler runs, the request is
admitted here the same way for every endpoint: the caller's uid, the path's ids and names, the
client's settings, and the body, read with limits and validated against the schema that the
document publishes (so the two cannot disagree).

A handler is a plain function taking a :class:`Call`, run in Starlette's thread pool (SQLite
and hashing block), returning JSON (or a Response). A streaming endpoint's handler is a
coroutine function that does what may fail first (the error is then an ordinary JSON answer)
and returns the stream's lines.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qmgr.errors import NotFound, QmgrError, as_qmgr_error
from qmgr.work.access import Caller, caller, check_caller, client_env

if TYPE_CHECKING:
    from qmgr.settings import Settings

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
# A request body is a few hundred bytes of JSON (a reference, some paths, chat messages):
# 8 MiB leaves room for a long conversation and none for a client that streams forever.
MAX_BODY = 8 << 20
BODY_DEADLINE_S = 30.0

Schema = dict[str, Any]  # JSON Schema


@dataclass(frozen=True)
class Call:
    """One admitted request, as a handler sees it."""

    request: Request
    body: dict[str, Any]  # validated against the endpoint's schema; {} without one
    env: dict[str, str]  # the client's settings (X-Qmgr-Env)
    who: Caller | None  # None where the transport carries no credentials

    @property
    def params(self) -> dict[str, Any]:
        return self.request.path_params

    @property
    def query(self) -> QueryParams:
        return self.request.query_params


Handler = Callable[[Call], Any]  # JSON or a Response; for a stream, a coroutine of its lines
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # Starlette's, converters included: /v1/jobs/{job_id:int}
    summary: str
    handler: Handler
    body: Schema | None = None  # the request body's schema
    stream: str | None = None  # the media type of a streamed answer (NDJSON)
    query: dict[str, Schema] = field(default_factory=dict)  # documented query parameters

    @property
    def name(self) -> str:
        return self.handler.__name__


class Table:
    """A feature's endpoints, declared with ``@table.endpoint(METHOD, PATH, SUMMARY, ...)``."""

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []

    def endpoint(self, method: str, path: str, summary: str, body: Schema | None = None,
                 stream: str | None = None,
                 query: dict[str, Schema] | None = None) -> Callable[[H], H]:
        def declare(fn: H) -> H:
            self.endpoints.append(Endpoint(method, path, summary, fn, body, stream,
                                           dict(query or {})))
            return fn

        return declare


# -- the request body ------------------------------------------------------------------------

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "boolean": (bool,), "integer": (int,), "number": (int, float),
    "array": (list,), "object": (dict,),
}


def check(value: Any, schema: Schema, where: str) -> None:
    """Validate against the subset of JSON Schema the endpoints use."""
    kind = schema.get("type")
    types = _JSON_TYPES.get(kind or "", (object,))
    if not isinstance(value, types) or (kind in ("integer", "number")
                                        and isinstance(value, bool)):
        raise QmgrError(f"{where} must be of type {kind}", code="bad_request")
    value = cast(Any, value)  # isinstance against a tuple of types narrows to object
    if kind == "string" and "pattern" in schema and not re.fullmatch(schema["pattern"], value):
        what = schema.get("description") or f"a match of {schema['pattern']}"
        raise QmgrError(f"{where} must be {what}", code="bad_request")
    if kind == "array":
        if len(value) < schema.get("minItems", 0):
            raise QmgrError(f"{where} needs at least {schema['minItems']} items",
                            code="bad_request")
        for i, item in enumerate(value):
            check(item, schema.get("items", {}), f"{where}[{i}]")
    if kind == "object" and "properties" in schema:
        for key in schema.get("required", []):
            if key not in value:
                raise QmgrError(f"{where} needs '{key}'", code="bad_request")
        for key, item in value.items():
            if key in schema["properties"] and item is not None:
                check(item, schema["properties"][key], f"'{key}'")


async def read_body(request: Request) -> bytes:
    """The request's body, refused past MAX_BODY bytes or BODY_DEADLINE_S seconds."""
    import asyncio

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise QmgrError(f"request body larger than {MAX_BODY} bytes",
                                code="too_large")
        return bytes(body)

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise QmgrError(f"request body larger than {MAX_BODY} bytes", code="too_large")
    try:
        return await asyncio.wait_for(read(), BODY_DEADLINE_S)
    except TimeoutError:
        raise QmgrError(f"request body not received within {BODY_DEADLINE_S:.0f} s",
                        code="timeout") from None


def parse_body(raw: bytes, schema: Schema | None) -> dict[str, Any]:
    """The body's JSON object (``{}`` for none), validated against ``schema``."""
    import json

    if not raw:
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        except RecursionError:
            raise QmgrError("request body is nested too deep", code="bad_request") from None
        except ValueError as e:
            raise QmgrError(f"request body is not JSON: {e}", code="bad_request") from e
        try:  # a lone surrogate (\udc80) decodes, then breaks every path and message
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise QmgrError("request body has text that is not valid UTF-8 (a lone "
                            "surrogate)", code="bad_request") from None
    if not isinstance(data, dict):
        raise QmgrError("request body must be a JSON object", code="bad_request")
    if schema is not None:
        check(data, schema, "the request body")
    return data


def check_path_params(request: Request) -> None:
    """Ids and names in the path that no row can have answer 404 or 400 here, before they
    reach SQL (an integer past 64 bits overflows SQLite's; a lone surrogate cannot be
    encoded)."""
    for key, value in request.path_params.items():
        if isinstance(value, int) and not 0 <= value < 1 << 63:
            raise NotFound(f"no such {key}: {value}")
        if isinstance(value, str):
            if len(value) > 4096:
                raise QmgrError(f"{key} is longer than 4096 characters", code="bad_request")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise QmgrError(f"{key} is not valid UTF-8", code="bad_request") from None


# -- serving ---------------------------------------------------------------------------------


async def admit(request: Request, e: Endpoint, settings: Settings) -> Call:
    """The request as a :class:`Call`, or the error that refuses it."""
    who = caller(request.client)
    check_caller(who, settings.system, settings.socket)
    check_path_params(request)
    env = client_env(settings, request.headers.get("x-qmgr-env"), who)
    body = parse_body(await read_body(request), e.body)
    return Call(request, body, env, who)


def route(e: Endpoint, settings: Settings) -> Route:
    """The Starlette route that admits a request and answers it with ``e``'s handler."""

    async def handle(request: Request) -> Response:
        call = await admit(request, e, settings)
        if e.stream is not None:
            lines = await cast(Callable[[Call], Awaitable[Any]], e.handler)(call)
            return StreamingResponse(lines, media_type=e.stream)
        result = await run_in_threadpool(e.handler, call)
        return result if isinstance(result, Response) else JSONResponse(result)

    return Route(e.path, handle, methods=[e.method], name=e.name)


def error_response(code: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


def exception_handlers() -> dict[type[Exception], ExceptionHandler]:
    """Every error as ``{"error": {"code", "message"}}``: a QmgrError with its own code and
    status, unknown routes and methods alike, anything unexpected as ``internal`` (logged
    with its traceback)."""

    async def on_qmgr_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, QmgrError)
        return error_response(exc.code, exc.message, exc.http_status)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error_response("no_route", f"no such endpoint: {request.method} "
                                  f"{request.url.path} (see /openapi.json)", 404)
        if exc.status_code == 405:
            return error_response("method_not_allowed",
                                  f"{request.method} is not allowed on {request.url.path}", 405)
        return error_response("http_error", str(exc.detail), exc.status_code)

    async def on_crash(request: Request, exc: Exception) -> Response:
        known = as_qmgr_error(exc)
        if known is not None:
            return error_response(known.code, known.message, known.http_status)
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response("internal", f"internal error: {type(exc).__name__}: {exc} "
                              "(the daemon log has the details)", 500)

    return {QmgrError: on_qmgr_error, HTTPException: on_http_error, Exception: on_crash}
