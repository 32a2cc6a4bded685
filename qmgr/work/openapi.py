"""The OpenAPI document of the daemon's API, generated from its endpoints (streams included)."""

from __future__ import annotations

import re
from typing import Any

import qmgr
from qmgr.work.api import Endpoint

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"},
                                            "message": {"type": "string"}}}},
}


def path_of(e: Endpoint) -> str:
    """The endpoint's path as OpenAPI writes it: ``{job_id}`` for Starlette's ``{job_id:int}``."""
    return re.sub(r":\w+}", "}", e.path)


def operation(e: Endpoint) -> dict[str, Any]:
    media = e.stream or "application/json"
    op: dict[str, Any] = {
        "summary": e.summary,
        "operationId": e.name,
        "responses": {
            "200": {"description": "a stream, one item a line" if e.stream else "OK",
                    "content": {media: {"schema": {}}}},
            "default": {"description": "Error", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    }
    params = [p.strip("{}").split(":") for p in e.path.split("/") if p.startswith("{")]
    parameters = [{"name": p[0], "in": "path", "required": True,
                   "schema": {"type": "integer" if p[1:] == ["int"] else "string"}}
                  for p in params]
    for name, schema in e.query.items():
        described = dict(schema)
        parameters.append({"name": name, "in": "query", "required": False,
                           "description": described.pop("description", ""),
                           "schema": described})
    if parameters:
        op["parameters"] = parameters
    if e.body:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": e.body}}}
    return op


def document(endpoints: list[Endpoint], title: str = "qmgrd") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        paths.setdefault(path_of(e), {})[e.method.lower()] = operation(e)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": qmgr.__version__},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR}},
    }
