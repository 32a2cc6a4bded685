"""The daemon's own endpoints and the catalog's: status, plugins, variants, imports, watches.

Here rather than in the catalog package: the catalog sits below the endpoint machinery
(:mod:`qmgr.work.api`), and importing files and watching folders are the daemon's
(:mod:`qmgr.daemon.importer`, :mod:`qmgr.daemon.watcher`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse, Response

import qmgr
from qmgr.catalog import queries, record
from qmgr.catalog.db import Catalog
from qmgr.daemon.importer import catalog_file
from qmgr.daemon.state import Daemon
from qmgr.daemon.watcher import Watcher
from qmgr.errors import QmgrError
from qmgr.store import Store
from qmgr.work.access import check_readable_by
from qmgr.work.api import Call, Endpoint, Table

IMPORT_BODY = {
    "type": "object",
    "required": ["paths"],
    "properties": {
        "paths": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "copy": {"type": "boolean", "default": False},
        "name": {"type": "string"},
    },
}
WATCH_BODY = {"type": "object", "required": ["path"],
              "properties": {"path": {"type": "string"}}}


def daemon_routes(d: Daemon) -> list[Endpoint]:
    api = Table()

    @api.endpoint("GET", "/v1/status", "Daemon version, uptime, where it keeps its data, "
                  "catalog counts")
    def status(call: Call) -> dict[str, Any]:
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
            "caller": call.who,
        }

    @api.endpoint("GET", "/v1/plugins", "Loaded plugins: name, version, hooks, errors")
    def list_plugins(call: Call) -> list[dict[str, Any]]:
        return d.plugins.describe()

    return api.endpoints


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def catalog_routes(catalog: Catalog, store: Store, watcher: Watcher) -> list[Endpoint]:
    api = Table()
    # `qmgr list` is the command users run most: its answer is cached until the next write
    # (the catalog's generation, which every write transaction bumps), where this daemon is
    # the only writer (SQLite).
    cached: tuple[int, bytes] | None = None

    @api.endpoint("GET", "/v1/variants", "Every cataloged variant")
    def list_variants(call: Call) -> Response:
        nonlocal cached
        generation, hit = catalog.generation, cached
        if hit is None or hit[0] != generation or not catalog.exclusive:
            with catalog.reading() as session:
                body = JSONResponse(queries.list_rows(session)).body
            hit = cached = (generation, bytes(body))
        return Response(hit[1], media_type="application/json")

    @api.endpoint("GET", "/v1/variants/{ref:path}", "One variant with header facts and lineage")
    def show_variant(call: Call) -> dict[str, Any]:
        with catalog.reading() as session:
            return queries.variant_detail(session, queries.resolve_one(session,
                                                                       call.params["ref"]))

    @api.endpoint("DELETE", "/v1/variants/{ref:path}",
                  "Remove variants from the catalog (?all=1 for every variant of a model); "
                  "deletes store files no other variant uses, never files imported in place")
    def remove_variant(call: Call) -> dict[str, Any]:
        return record.remove_variants(catalog, call.params["ref"],
                                      every=call.query.get("all") in ("1", "true"))

    @api.endpoint("POST", "/v1/imports", "Inspect, hash and catalog GGUF files (absolute "
                  "paths)", body=IMPORT_BODY)
    def import_files(call: Call) -> dict[str, Any]:
        paths, name = call.body["paths"], call.body.get("name")
        results = []
        for p in paths:
            try:
                check_readable_by(p, call.who)
                variant, created = catalog_file(catalog, store, Path(p),
                                                copy=bool(call.body.get("copy")), name=name)
                results.append({"path": p, "created": created, "variant": variant})
            except QmgrError as e:
                results.append({"path": p, "error": e.to_dict()["error"]})
        return {"results": results}

    @api.endpoint("GET", "/v1/watches", "Watched folders, and files recently refused in them")
    def list_watches(call: Call) -> dict[str, Any]:
        with catalog.reading() as session:
            folders = [{"id": f.id, "path": f.path} for f in queries.watched_folders(session)]
        return {"folders": folders, "refused": list(watcher.refused)}

    @api.endpoint("POST", "/v1/watches", "Watch a folder", body=WATCH_BODY)
    def add_watch(call: Call) -> dict[str, Any]:
        path = call.body["path"]
        check_readable_by(path, call.who)
        return watcher.add(path)

    @api.endpoint("DELETE", "/v1/watches", "Stop watching a folder (?path=DIR)")
    def remove_watch(call: Call) -> dict[str, Any]:
        path = call.query.get("path")
        if not path:
            raise QmgrError("give the folder as ?path=DIR", code="bad_request")
        watcher.remove(path)
        return {"removed": path}

    return api.endpoints
