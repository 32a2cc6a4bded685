"""The daemon's HTTP API (Starlette), served on the Unix socket.

Starlette rather than FastAPI: the daemon's start-up is on the path of the first command a user
runs (the client autostarts it), and FastAPI with pydantic adds ~0.4 s of imports on a 2-core
machine. The API is small; its OpenAPI document is generated from the route table below.
Handlers are plain functions (Starlette runs them in its thread pool) taking the
:class:`~qmgr.daemon.state.Daemon` and the request.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import qmgr
from qmgr.catalog import queries
from qmgr.daemon.importer import catalog_file
from qmgr.daemon.peercred import caller
from qmgr.daemon.state import Daemon
from qmgr.errors import QmgrError

log = logging.getLogger(__name__)


@dataclass
class Endpoint:
    method: str
    path: str
    summary: str
    handler: Callable[[Daemon, Request], Any]
    body: dict[str, Any] | None = None  # JSON schema of the request body


ENDPOINTS: list[Endpoint] = []


def endpoint(method: str, path: str, summary: str, body: dict[str, Any] | None = None):
    def decorate(fn: Callable[[Daemon, Request], Any]) -> Callable[[Daemon, Request], Any]:
        ENDPOINTS.append(Endpoint(method, path, summary, fn, body))
        return fn

    return decorate


def _json_body(request: Request) -> dict[str, Any]:
    import json

    raw = request.state.body
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise QmgrError(f"request body is not JSON: {e}", code="bad_request") from e
    if not isinstance(data, dict):
        raise QmgrError("request body must be a JSON object", code="bad_request")
    return data


def _ref(request: Request) -> str:
    return str(request.path_params["ref"])


# -- endpoints -------------------------------------------------------------------------------


@endpoint("GET", "/v1/status", "Daemon version, uptime, where it keeps its data, catalog counts")
def status(d: Daemon, request: Request) -> dict[str, Any]:
    with d.catalog.reading() as session:
        variants = queries.list_rows(session)
    return {
        "version": qmgr.__version__,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - d.started, 3),
        "system": d.settings.system,
        "socket": str(d.settings.socket),
        "home": str(d.settings.home),
        "database": d.catalog.engine.url.render_as_string(hide_password=True),
        "schema": d.catalog.revision(),
        "models": len({v["model"] for v in variants}),
        "variants": len(variants),
        "variants_by_state": _count(v["state"] for v in variants),
        "plugin_errors": sum(len(p["errors"]) for p in d.plugins.describe()),
        "recovery": d.recovery.__dict__,
        "caller": caller(request.client),
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


@endpoint("GET", "/v1/variants", "Every cataloged variant")
def list_variants(d: Daemon, request: Request) -> Response:
    # `qmgr list` is the command users run most: its answer is cached until the next write.
    generation = d.catalog.generation
    cached = d.cache.get("variants")
    if cached is None or cached[0] != generation:
        with d.catalog.reading() as session:
            body = JSONResponse(queries.list_rows(session)).body
        cached = d.cache["variants"] = (generation, body)
    return Response(cached[1], media_type="application/json")


@endpoint("GET", "/v1/variants/{ref:path}", "One variant with header facts and lineage")
def show_variant(d: Daemon, request: Request) -> dict[str, Any]:
    with d.catalog.reading() as session:
        return queries.variant_detail(session, queries.resolve_one(session, _ref(request)))


@endpoint("DELETE", "/v1/variants/{ref:path}",
          "Remove variants from the catalog (?all=1 for every variant of a model); deletes "
          "store files no other variant uses, never files imported in place")
def remove_variant(d: Daemon, request: Request) -> dict[str, Any]:
    ref = _ref(request)
    every = request.query_params.get("all") in ("1", "true")
    deleted_files: list[str] = []
    with d.catalog.writing() as session:
        found = queries.resolve(session, ref) if every else [queries.resolve_one(session, ref)]
        removed = [f"{v.model.name}:{v.tag}" for v in found]
        blobs = queries.blobs_only_used_by(session, found)
        models = {v.model for v in found}
        for v in found:
            session.delete(v)
        session.flush()
        for blob in blobs:
            if blob.in_store:
                deleted_files.append(blob.path)
            session.delete(blob)
        for m in models:
            session.refresh(m)
            if not m.variants:
                session.delete(m)
    # Rows first, files after the commit: a crash in between leaves an orphan blob that
    # recovery keeps or quarantines, never a row without its file.
    for path in deleted_files:
        Path(path).unlink(missing_ok=True)
    return {"removed": removed, "deleted_files": deleted_files}


IMPORT_BODY = {
    "type": "object",
    "required": ["paths"],
    "properties": {
        "paths": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "copy": {"type": "boolean", "default": False},
        "name": {"type": "string"},
    },
}


@endpoint("POST", "/v1/imports", "Inspect, hash and catalog GGUF files (absolute paths)",
          body=IMPORT_BODY)
def import_files(d: Daemon, request: Request) -> dict[str, Any]:
    body = _json_body(request)
    paths = body.get("paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise QmgrError("'paths' must be a non-empty list of absolute paths", code="bad_request")
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise QmgrError("'name' must be a string", code="bad_request")
    results = []
    for p in paths:
        try:
            variant, created = catalog_file(d.catalog, d.store, Path(p),
                                            copy=bool(body.get("copy")), name=name)
            results.append({"path": p, "created": created, "variant": variant})
        except QmgrError as e:
            results.append({"path": p, "error": e.to_dict()["error"]})
    return {"results": results}


@endpoint("GET", "/v1/watches", "Watched folders, and files recently refused in them")
def list_watches(d: Daemon, request: Request) -> dict[str, Any]:
    with d.catalog.reading() as session:
        folders = [{"id": f.id, "path": f.path} for f in queries.watched_folders(session)]
    return {"folders": folders, "refused": list(d.watcher.refused)}


WATCH_BODY = {"type": "object", "required": ["path"],
              "properties": {"path": {"type": "string"}}}


@endpoint("POST", "/v1/watches", "Watch a folder", body=WATCH_BODY)
def add_watch(d: Daemon, request: Request) -> dict[str, Any]:
    path = _json_body(request).get("path")
    if not isinstance(path, str):
        raise QmgrError("'path' must be an absolute directory path", code="bad_request")
    return d.watcher.add(path)


@endpoint("DELETE", "/v1/watches", "Stop watching a folder (?path=DIR)")
def remove_watch(d: Daemon, request: Request) -> dict[str, Any]:
    path = request.query_params.get("path")
    if not path:
        raise QmgrError("give the folder as ?path=DIR", code="bad_request")
    d.watcher.remove(path)
    return {"removed": path}


@endpoint("GET", "/v1/plugins", "Loaded plugins: name, version, hooks, errors")
def list_plugins(d: Daemon, request: Request) -> list[dict[str, Any]]:
    return d.plugins.describe()


# -- plumbing --------------------------------------------------------------------------------


def openapi(app_title: str = "qmgrd") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    error = {"$ref": "#/components/schemas/Error"}
    for e in ENDPOINTS:
        path = e.path.replace(":path}", "}")
        op: dict[str, Any] = {
            "summary": e.summary,
            "operationId": e.handler.__name__,
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": {}}}},
                "default": {"description": "Error",
                            "content": {"application/json": {"schema": error}}},
            },
        }
        params = [p.strip("{}").split(":")[0] for p in e.path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True,
                                 "schema": {"type": "string"}} for p in params]
        if e.body:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": e.body}}}
        paths.setdefault(path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": app_title, "version": qmgr.__version__},
        "paths": paths,
        "components": {"schemas": {"Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"],
                                     "properties": {"code": {"type": "string"},
                                                    "message": {"type": "string"}}}},
        }}},
    }


def _route(d: Daemon, e: Endpoint) -> Route:
    async def handle(request: Request) -> Response:
        request.state.body = await request.body()
        # Catalog work blocks (SQLite, hashing): run it in the thread pool.
        result = await run_in_threadpool(e.handler, d, request)
        return result if isinstance(result, Response) else JSONResponse(result)

    return Route(e.path, handle, methods=[e.method], name=e.handler.__name__)


def _error_response(code: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def build_app(d: Daemon) -> Starlette:
    document = openapi()
    routes = [_route(d, e) for e in ENDPOINTS]
    routes.append(Route("/openapi.json", lambda r: JSONResponse(document), methods=["GET"]))

    async def on_qmgr_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, QmgrError)
        return _error_response(exc.code, exc.message, exc.http_status)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return _error_response("no_route", f"no such endpoint: {request.method} "
                                   f"{request.url.path} (see /openapi.json)", 404)
        if exc.status_code == 405:
            return _error_response("method_not_allowed",
                                   f"{request.method} is not allowed on {request.url.path}", 405)
        return _error_response("http_error", str(exc.detail), exc.status_code)

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response("internal", f"internal error: {type(exc).__name__}: {exc} "
                               "(the daemon log has the details)", 500)

    return Starlette(
        routes=routes,
        exception_handlers={QmgrError: on_qmgr_error, HTTPException: on_http_error,
                            Exception: on_crash},
    )
