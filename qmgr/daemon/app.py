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
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import qmgr
from qmgr.catalog import queries
from qmgr.daemon.access import check_caller, check_readable_by
from qmgr.daemon.importer import catalog_file
from qmgr.daemon.peercred import caller
from qmgr.daemon.state import Daemon
from qmgr.errors import QmgrError, as_qmgr_error

if TYPE_CHECKING:
    from qmgr.fetch.fitting import Fitter

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


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "boolean": (bool,), "integer": (int,), "number": (int, float),
    "array": (list,), "object": (dict,),
}


def _check(value: Any, schema: dict[str, Any], where: str) -> None:
    """Validate against the subset of JSON Schema the endpoint table uses: the same document
    the OpenAPI description publishes, so the two cannot disagree."""
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
            _check(item, schema.get("items", {}), f"{where}[{i}]")
    if kind == "object" and "properties" in schema:
        for key in schema.get("required", []):
            if key not in value:
                raise QmgrError(f"{where} needs '{key}'", code="bad_request")
        for key, item in value.items():
            if key in schema["properties"] and item is not None:
                _check(item, schema["properties"][key], f"'{key}'")


def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, validated against its endpoint's body schema."""
    return request.state.json


# A request body is a few hundred bytes of JSON (a reference, some paths, chat messages):
# 8 MiB leaves room for a long conversation and none for a client that streams forever.
MAX_BODY = 8 << 20
BODY_DEADLINE_S = 30.0


async def _read_body(request: Request) -> bytes:
    """The request's body, refused past MAX_BODY bytes or BODY_DEADLINE_S seconds."""
    import asyncio

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise QmgrError(f"request body larger than {MAX_BODY} bytes",
                                code="too_large", http_status=413)
        return bytes(body)

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise QmgrError(f"request body larger than {MAX_BODY} bytes", code="too_large",
                        http_status=413)
    try:
        return await asyncio.wait_for(read(), BODY_DEADLINE_S)
    except TimeoutError:
        raise QmgrError(f"request body not received within {BODY_DEADLINE_S:.0f} s",
                        code="timeout", http_status=408) from None


def _parse_body(raw: bytes, schema: dict[str, Any] | None) -> dict[str, Any]:
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
        _check(data, schema, "the request body")
    return data


def _ref(request: Request) -> str:
    return str(request.path_params["ref"])


def client_env(d: Daemon, request: Request) -> dict[str, str]:
    """The client's settings sent in ``X-Qmgr-Env`` (see :data:`qmgr.settings.FORWARDED_ENV`),
    to apply to this request's work. A ``QMGR_HOME`` other than this daemon's is refused: the
    client meant another daemon. On the system service, only its own user (or root) may point
    it at another endpoint: the catalog it fills is shared."""
    import json

    from qmgr.settings import COMPARED_ENV, FORWARDED_ENV, SECRET_ENV

    raw = request.headers.get("x-qmgr-env")
    if not raw:
        return {}
    try:
        sent = json.loads(raw)
    except ValueError as e:
        raise QmgrError("the X-Qmgr-Env header is not JSON", code="bad_request") from e
    if not isinstance(sent, dict) or not all(
            k in (*FORWARDED_ENV, *COMPARED_ENV) and isinstance(v, str) for k, v in sent.items()):
        raise QmgrError(f"X-Qmgr-Env may carry only {', '.join(FORWARDED_ENV + COMPARED_ENV)}",
                        code="bad_request")
    home = sent.pop("QMGR_HOME", None)
    if home and Path(home).expanduser().resolve() != d.settings.home.resolve():
        raise QmgrError(
            f"the daemon on {d.settings.socket} (pid {os.getpid()}) keeps its data in "
            f"{d.settings.home}, but your QMGR_HOME is {home}: unset QMGR_HOME to use this "
            f"daemon, or give {home} a daemon of its own (QMGR_SOCKET=/another/path.sock; the "
            "next command starts it)", code="other_daemon", http_status=409)
    who = caller(request.client)
    if d.settings.system and who is not None and who["uid"] not in (0, os.getuid()):
        differs = sorted(k for k, v in sent.items()
                         if k not in SECRET_ENV and os.environ.get(k) != v)
        if differs:
            raise QmgrError(
                f"the system service uses its own {', '.join(differs)} (your environment "
                f"sets {', '.join(f'{k}={sent[k]}' for k in differs)}): unset it, or ask the "
                "service's administrator to configure it", code="env_differs",
                http_status=409)
    return sent


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
    paths, name = body["paths"], body.get("name")
    results = []
    for p in paths:
        try:
            check_readable_by(p, caller(request.client))
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
    path = _json_body(request)["path"]
    check_readable_by(path, caller(request.client))
    return d.watcher.add(path)


@endpoint("DELETE", "/v1/watches", "Stop watching a folder (?path=DIR)")
def remove_watch(d: Daemon, request: Request) -> dict[str, Any]:
    path = request.query_params.get("path")
    if not path:
        raise QmgrError("give the folder as ?path=DIR", code="bad_request")
    d.watcher.remove(path)
    return {"removed": path}


PULL_BODY = {
    "type": "object", "required": ["ref"],
    "properties": {"ref": {"type": "string"}, "insecure": {"type": "boolean"},
                   "sha256": {"type": "string", "pattern": "[0-9a-fA-F]{64}",
                              "description": "64 hex digits"},
                   "fit": {"type": "boolean"}, "ctx": {"type": "integer"},
                   "kv_type": {"type": "string"}, "headroom": {"type": "number"},
                   "hw": {"type": "string"}},
}


@endpoint("POST", "/v1/pulls", "Start a pull job (returns the job; follow /v1/jobs/{id}/events)",
          body=PULL_BODY)
def start_pull(d: Daemon, request: Request) -> dict[str, Any]:
    from qmgr.fetch.fitting import FitRequest
    from qmgr.refs import parse

    body = _json_body(request)
    ref, sha = body["ref"], body.get("sha256")
    parse(ref)  # a bad reference fails here, before a job exists
    from qmgr.settings import SECRET_ENV

    env = request.state.env
    args: dict[str, Any] = {"ref": ref, "insecure": bool(body.get("insecure")),
                            "sha256": sha.lower() if sha else None}
    if any(k not in SECRET_ENV for k in env):
        args["env"] = {k: v for k, v in env.items() if k not in SECRET_ENV}
    if body.get("fit"):
        # Decide first, then pull what was chosen: the job is an ordinary pull of one variant.
        decision = _fitter(d, env).fit(FitRequest.from_args({**body, "ref": ref,
                                                              "remote": True}))[0]
        if decision["pick"] is None:
            raise QmgrError(f"nothing downloaded: {decision['reason']}", code="does_not_fit",
                            http_status=507)
        typed = parse(ref)
        if parse(decision["pick_source_ref"]).kind == "hf":
            args["ref"] = decision["pick_source_ref"]  # one variant of the repository
        args.update(name=typed.name if typed.kind == "alias" else None, default=True,
                    decision=decision)
    return d.jobs.submit("pull", args, secrets={k: v for k, v in env.items() if k in SECRET_ENV})


def _fitter(d: Daemon, env: dict[str, str]) -> Fitter:
    """The fit service for one request: with the client's settings (its Hub endpoint and
    token) over the daemon's."""
    from qmgr.fetch.fitting import Fitter

    return d.fitter if not env else Fitter(d.puller.with_env(env), d.settings)


@endpoint("GET", "/v1/fit", "Which variant of a reference fits this machine, and why "
          "(?ref=REF[&ctx=N][&kv_type=f16|q8_0|q4_0][&headroom=0.1][&insecure=1])")
def fit(d: Daemon, request: Request) -> dict[str, Any]:
    from qmgr.fetch.fitting import FitRequest

    q: dict[str, Any] = dict(request.query_params)
    if not q.get("ref"):
        raise QmgrError("give the reference as ?ref=REF", code="bad_request")
    q["insecure"] = q.get("insecure") in ("1", "true")
    return _fitter(d, request.state.env).fit(FitRequest.from_args(q))[0]


@endpoint("GET", "/v1/hardware", "Devices (probed, or declared by QMGR_HW / config) and probe "
          "errors")
def hardware(d: Daemon, request: Request) -> dict[str, Any]:
    return d.fitter.hardware(request.query_params.get("hw")).to_dict()


@endpoint("GET", "/v1/remote", "What a reference's source offers (?ref=REF[&insecure=1]"
          "[&headers=0]): quant, size, sha256, and from each header read by HTTP Range, "
          "parameters and bits per weight")
def remote_variants(d: Daemon, request: Request) -> dict[str, Any]:
    q = request.query_params
    if not q.get("ref"):
        raise QmgrError("give the reference as ?ref=REF", code="bad_request")
    return d.puller.with_env(request.state.env).describe_remote(
        q["ref"], insecure=q.get("insecure") in ("1", "true"),
        headers=q.get("headers") not in ("0", "false"))


QUANTIZE_BODY = {
    "type": "object", "required": ["ref", "targets"],
    "properties": {"ref": {"type": "string"},
                   "targets": {"type": "array", "minItems": 1,
                               "items": {"type": "string", "pattern": "[A-Za-z0-9_]{1,32}",
                                         "description": "a quant type name"}},
                   "quantizer": {"type": "string"}, "imatrix": {"type": "string"},
                   "options": {"type": "object"}},
}


@endpoint("POST", "/v1/quantize", "Start a quantize job: REF to each target type",
          body=QUANTIZE_BODY)
def start_quantize(d: Daemon, request: Request) -> dict[str, Any]:
    from qmgr.plugin.quantizer import QuantizeOptions

    body = _json_body(request)
    targets = body["targets"]
    try:
        QuantizeOptions.from_dict(dict(body.get("options") or {}))
    except (TypeError, ValueError) as e:
        raise QmgrError(str(e), code="bad_option") from e
    d.quantizing.source(body["ref"])  # a missing or unready source fails before a job exists
    quantizer = body.get("quantizer")
    if quantizer is not None:
        d.plugins.find("register_quantizers", quantizer, "quantizer")  # 404 before a job
    return d.jobs.submit("quantize", {
        "ref": body["ref"], "targets": [t.upper() for t in targets], "quantizer": quantizer,
        "imatrix": body.get("imatrix"), "options": body.get("options") or {}})


@endpoint("GET", "/v1/quantizers", "Installed quantizers: name, version, target types")
def list_quantizers(d: Daemon, request: Request) -> list[dict[str, Any]]:
    out = []
    for q in d.plugins.quantizers():
        try:
            targets = list(q.targets())
        except Exception as e:  # a plugin's bug shows, the list still answers
            targets = [f"error: {type(e).__name__}: {e}"]
        out.append({"name": q.name, "version": str(getattr(q, "version", "?")),
                    "targets": targets,
                    "options": sorted(getattr(q, "supported_options", [])),
                    "imatrix": callable(getattr(q, "compute_imatrix", None)),
                    "reports_digest": getattr(q, "reports_digest", False) is True})
    return out


IMATRIX_BODY = {"type": "object", "required": ["ref", "text"],
                "properties": {"ref": {"type": "string"}, "text": {"type": "string"},
                               "n_ctx": {"type": "integer"},
                               "quantizer": {"type": "string"}}}


@endpoint("POST", "/v1/imatrix", "Start computing an importance matrix from calibration text",
          body=IMATRIX_BODY)
def start_imatrix(d: Daemon, request: Request) -> dict[str, Any]:
    body = _json_body(request)
    text = body["text"]
    check_readable_by(text, caller(request.client))
    if not Path(text).is_absolute() or not Path(text).is_file():
        raise QmgrError("give 'ref' and 'text', the absolute path of a calibration text file",
                        code="bad_request")
    d.quantizing.source(body["ref"])
    return d.jobs.submit("imatrix", {"ref": body["ref"], "text": text,
                                     "n_ctx": body.get("n_ctx"),
                                     "quantizer": body.get("quantizer")})


@endpoint("GET", "/v1/jobs", "Recent jobs, newest first")
def list_jobs(d: Daemon, request: Request) -> list[dict[str, Any]]:
    return d.jobs.list()


@endpoint("GET", "/v1/jobs/{job_id:int}", "One job: state, progress, error, result")
def show_job(d: Daemon, request: Request) -> dict[str, Any]:
    return d.jobs.get(request.path_params["job_id"])


@endpoint("POST", "/v1/jobs/{job_id:int}/cancel", "Cancel a job")
def cancel_job(d: Daemon, request: Request) -> dict[str, Any]:
    return d.jobs.cancel(request.path_params["job_id"])


@endpoint("GET", "/v1/aliases", "Model names: the built-in table and the user's own")
def list_aliases(d: Daemon, request: Request) -> list[dict[str, Any]]:
    from qmgr.fetch.aliases import all_aliases

    with d.catalog.reading() as session:
        return all_aliases(session)


ALIAS_BODY = {"type": "object", "required": ["name", "reference"],
              "properties": {"name": {"type": "string"}, "reference": {"type": "string"}}}


@endpoint("POST", "/v1/aliases", "Add or replace a user alias", body=ALIAS_BODY)
def add_alias(d: Daemon, request: Request) -> dict[str, Any]:
    from sqlalchemy import select

    from qmgr.catalog.models import Alias
    from qmgr.refs import parse

    body = _json_body(request)
    name, target = body["name"], body["reference"]
    typed = parse(name)
    if typed.kind != "alias" or typed.quant:
        raise QmgrError(f"alias name {name!r} must be a plain name (no ':' or '/')",
                        code="bad_name")
    if parse(target).kind == "alias":
        # Not a repository: a cataloged variant (llama3:Q4_K_M), kept by its catalog name.
        with d.catalog.reading() as session:
            found = queries.resolve_one(session, target)
            target = f"{found.model.name}:{found.tag}"
        if target.partition(":")[0] == typed.name:
            raise QmgrError(f"{name!r} is that model's own name already", code="bad_name")
    with d.catalog.writing() as session:
        alias = session.scalar(select(Alias).where(Alias.name == typed.name))
        if alias is None:
            session.add(Alias(name=typed.name, reference=target))
        else:
            alias.reference = target
    return {"name": typed.name, "reference": target}


@endpoint("DELETE", "/v1/aliases/{name}", "Remove a user alias")
def remove_alias(d: Daemon, request: Request) -> dict[str, Any]:
    from sqlalchemy import select

    from qmgr.catalog.models import Alias

    name = request.path_params["name"]
    with d.catalog.writing() as session:
        alias = session.scalar(select(Alias).where(Alias.name == name))
        if alias is None:
            raise QmgrError(f"no user alias {name!r} (built-in names cannot be removed)",
                            code="not_found", http_status=404)
        session.delete(alias)
    return {"removed": name}


@endpoint("GET", "/v1/plugins", "Loaded plugins: name, version, hooks, errors")
def list_plugins(d: Daemon, request: Request) -> list[dict[str, Any]]:
    return d.plugins.describe()


# -- plumbing --------------------------------------------------------------------------------


def openapi(app_title: str = "qmgrd") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    error = {"$ref": "#/components/schemas/Error"}
    for e in ENDPOINTS:
        path = re.sub(r":\w+}", "}", e.path)
        op: dict[str, Any] = {
            "summary": e.summary,
            "operationId": e.handler.__name__,
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": {}}}},
                "default": {"description": "Error",
                            "content": {"application/json": {"schema": error}}},
            },
        }
        params = [p.strip("{}").split(":") for p in e.path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [
                {"name": p[0], "in": "path", "required": True,
                 "schema": {"type": "integer" if p[1:] == ["int"] else "string"}}
                for p in params
            ]
        if e.body:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": e.body}}}
        paths.setdefault(path, {})[e.method.lower()] = op
    paths["/v1/generate"] = {"post": {
        "summary": "Generate from a prompt, or chat from messages, streaming newline-delimited "
                   "JSON ({\"text\"} pieces, then {\"done\": stats})",
        "operationId": "generate",
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": GENERATE_BODY}}},
        "responses": {"200": {"description": "pieces",
                              "content": {"application/x-ndjson": {"schema": {}}}},
                      "default": {"description": "Error",
                                  "content": {"application/json": {"schema": error}}}},
    }}
    paths["/v1/jobs/{job_id}/events"] = {"get": {
        "summary": "A job's progress as newline-delimited JSON, until it ends",
        "operationId": "job_events",
        "parameters": [{"name": "job_id", "in": "path", "required": True,
                        "schema": {"type": "integer"}},
                       {"name": "progress", "in": "query", "required": False,
                        "description": "0: only changes of state or phase, no progress "
                                       "(for clients that show none)",
                        "schema": {"type": "string", "enum": ["0", "1"], "default": "1"}}],
        "responses": {"200": {"description": "job states",
                              "content": {"application/x-ndjson": {"schema": {}}}},
                      "default": {"description": "Error",
                                  "content": {"application/json": {"schema": error}}}},
    }}
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
        check_caller(caller(request.client), d.settings.system, d.settings.socket)
        _check_path_params(request)
        request.state.env = client_env(d, request)
        request.state.json = _parse_body(await _read_body(request), e.body)
        # Catalog work blocks (SQLite, hashing): run it in the thread pool.
        result = await run_in_threadpool(e.handler, d, request)
        return result if isinstance(result, Response) else JSONResponse(result)

    return Route(e.path, handle, methods=[e.method], name=e.handler.__name__)


def _check_path_params(request: Request) -> None:
    """Ids and names in the path that no row can have answer 404 or 400 here, before they
    reach SQL (an integer past 64 bits overflows SQLite's; a lone surrogate cannot be
    encoded)."""
    for key, value in request.path_params.items():
        if isinstance(value, int) and not 0 <= value < 1 << 63:
            raise QmgrError(f"no such {key}: {value}", code="not_found", http_status=404)
        if isinstance(value, str):
            if len(value) > 4096:
                raise QmgrError(f"{key} is longer than 4096 characters", code="bad_request")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise QmgrError(f"{key} is not valid UTF-8", code="bad_request") from None


def _error_response(code: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def job_events(d: Daemon, request: Request) -> Response:
    """Newline-delimited JSON: the job as it changes, ending with its final state."""
    import asyncio
    import contextlib
    import json

    from starlette.responses import StreamingResponse

    from qmgr.work.jobs import TERMINAL

    check_caller(caller(request.client), d.settings.system, d.settings.socket)
    _check_path_params(request)
    client_env(d, request)
    job_id = request.path_params["job_id"]
    first = await run_in_threadpool(d.jobs.get, job_id)  # 404 before the stream starts
    # progress=0: a client that shows no progress (`-q`, output not a terminal) gets the
    # changes of state and phase only, and the stream sleeps until one comes.
    with_progress = request.query_params.get("progress", "1") != "0"

    async def events() -> Any:
        last: object = -1
        current = first
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(woken.set)

        watched = d.jobs.handles.get(job_id)
        if watched is not None:
            watched.wakers.add(wake)
        try:
            while True:
                handle = d.jobs.handles.get(job_id)
                if handle is None:  # not run here (`first` is its row), or forgotten since
                    if watched is not None and current["state"] not in TERMINAL:
                        current = await run_in_threadpool(d.jobs.get, job_id)
                    yield json.dumps(current) + "\n"
                    return
                seen = handle.version if with_progress \
                    else (handle.state, handle.progress.get("phase"))
                if seen != last:
                    last = seen
                    current = handle.to_dict()
                    yield json.dumps(current) + "\n"
                    if current["state"] in TERMINAL:
                        return
                # Progress at most ten times a second; a change of state or phase at once.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), 0.1 if with_progress else 5.0)
                woken.clear()
        finally:
            if watched is not None:
                watched.wakers.discard(wake)

    return StreamingResponse(events(), media_type="application/x-ndjson")


GENERATE_BODY = {
    "type": "object", "required": ["ref"],
    "properties": {"ref": {"type": "string"}, "prompt": {"type": "string"},
                   "messages": {"type": "array", "items": {"type": "object"}},
                   "ctx": {"type": "integer"}, "kv_type": {"type": "string"},
                   "hw": {"type": "string"}, "params": {"type": "object"},
                   "backend": {"type": "string"}},
}


async def generate(d: Daemon, request: Request) -> Response:
    """Newline-delimited JSON: ``{"text": ...}`` pieces, then ``{"done": stats}``."""
    import asyncio
    import contextlib
    import json
    import threading

    from starlette.responses import StreamingResponse

    check_caller(caller(request.client), d.settings.system, d.settings.socket)
    client_env(d, request)
    body = _parse_body(await _read_body(request), GENERATE_BODY)
    if ("prompt" in body) == ("messages" in body):
        raise QmgrError("give either 'prompt' or 'messages'", code="bad_request")
    runner = await run_in_threadpool(d.running.runner, body["ref"], body.get("ctx"),
                                      body.get("kv_type") or "f16", body.get("hw"),
                                      body.get("backend"))
    req = ({"op": "generate", "prompt": body["prompt"]} if "prompt" in body
           else {"op": "chat", "messages": body["messages"]})
    req["params"] = body.get("params") or {}
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = threading.Event()  # the client closed the stream (qmgr chat's Ctrl-C)

    def work() -> None:
        try:
            with contextlib.closing(runner.request(req)) as answers:
                for msg in answers:
                    if gone.is_set():
                        break  # closing the request cancels the generation in the runner
                    loop.call_soon_threadsafe(queue.put_nowait, msg)
        except QmgrError as e:
            loop.call_soon_threadsafe(queue.put_nowait, e.to_dict())
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=work, daemon=True).start()

    async def lines() -> Any:
        try:
            while (msg := await queue.get()) is not None:
                yield json.dumps(msg) + "\n"
        finally:
            gone.set()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


MEASURE_BODY = {
    "type": "object", "required": ["ref"],
    "properties": {"ref": {"type": "string"},
                   "variants": {"type": "array", "items": {"type": "string"}},
                   "text": {"type": "string"}, "ctx": {"type": "integer"},
                   "tokens": {"type": "integer"}, "max_tokens": {"type": "integer"}},
}


@endpoint("POST", "/v1/eval", "Start an eval job: perplexity, ΔPPL, KL divergence and top-token "
          "agreement of each variant against the model's highest-precision one",
          body=MEASURE_BODY)
def start_eval(d: Daemon, request: Request) -> dict[str, Any]:
    body = _json_body(request)
    text = body.get("text")
    if text:
        check_readable_by(text, caller(request.client))
    if text and (not Path(text).is_absolute() or not Path(text).is_file()):
        raise QmgrError(f"--text {text}: not a file", code="bad_request")
    d.measuring.variants(body["ref"], body.get("variants"))  # fail before a job exists
    return d.jobs.submit("eval", body)


@endpoint("POST", "/v1/bench", "Start a bench job: prompt and generation tokens/s per variant",
          body=MEASURE_BODY)
def start_bench(d: Daemon, request: Request) -> dict[str, Any]:
    body = _json_body(request)
    d.measuring.variants(body["ref"], body.get("variants"))
    return d.jobs.submit("bench", body)


@endpoint("GET", "/v1/ps", "Loaded models: memory, placement, idle time")
def ps(d: Daemon, request: Request) -> list[dict[str, Any]]:
    return d.models.ps()


@endpoint("POST", "/v1/stop", "Unload a model (all when 'ref' is absent)",
          body={"type": "object", "properties": {"ref": {"type": "string"}}})
def stop(d: Daemon, request: Request) -> dict[str, Any]:
    ref = _json_body(request).get("ref")
    if ref:
        with d.catalog.reading() as session:
            v = queries.resolve_one(session, ref)
            ref = f"{v.model.name}:{v.tag}"
    return {"stopped": d.models.stop(ref)}


def build_app(d: Daemon) -> Starlette:
    document = openapi()
    routes = [_route(d, e) for e in ENDPOINTS]

    async def events_route(request: Request) -> Response:
        return await job_events(d, request)

    routes.append(Route("/v1/jobs/{job_id:int}/events", events_route, methods=["GET"],
                        name="job_events"))

    async def generate_route(request: Request) -> Response:
        return await generate(d, request)

    routes.append(Route("/v1/generate", generate_route, methods=["POST"], name="generate"))
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
        known = as_qmgr_error(exc)
        if known is not None:
            return _error_response(known.code, known.message, known.http_status)
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response("internal", f"internal error: {type(exc).__name__}: {exc} "
                               "(the daemon log has the details)", 500)

    return Starlette(
        routes=routes,
        exception_handlers={QmgrError: on_qmgr_error, HTTPException: on_http_error,
                            Exception: on_crash},
    )
