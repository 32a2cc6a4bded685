"""The OpenAPI document describes the API the daemon serves, no more and no less: every route
with its method, the streams with their media type."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Env

STREAMS = {("/v1/generate", "POST"), ("/v1/jobs/{job_id}/events", "GET")}
NDJSON = "application/x-ndjson"


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[set[tuple[str, str]]]:
    """(path, method) of every route of the app the daemon builds, built here in a world of
    its own (the daemon's is in use by the daemon)."""
    from qmgr import settings
    from qmgr.daemon.app import build_app
    from qmgr.daemon.state import Daemon

    world = Env(tmp_path)
    for key, value in world.env.items():
        if key.startswith(("QMGR_", "XDG_")):
            monkeypatch.setenv(key, value)
    d = Daemon(settings.load(env=world.env, autostart=False))
    try:
        app = build_app(d)
        yield {(re.sub(r":\w+}", "}", route.path), method)
               for route in app.routes for method in getattr(route, "methods", None) or ()
               if method != "HEAD"}  # Starlette's own, beside every GET
    finally:
        d.close()


def test_the_document_describes_every_route_and_only_those(
        daemon: Env, served: set[tuple[str, str]]) -> None:
    transport = httpx.HTTPTransport(uds=str(daemon.socket))
    with httpx.Client(transport=transport, base_url="http://qmgrd", timeout=60) as http:
        doc = http.get("/openapi.json").json()
        documented = {(path, method.upper()) for path, ops in doc["paths"].items()
                      for method in ops}
        # The document does not describe itself; everything else the app serves, it does.
        assert served - {("/openapi.json", "GET")} == documented
        assert documented >= STREAMS
        for path, method in documented:
            op = doc["paths"][path][method.lower()]
            media = set(op["responses"]["200"]["content"])
            assert media == ({NDJSON} if (path, method) in STREAMS else {"application/json"})
            assert op["summary"] and op["operationId"]
            for p in op.get("parameters", []):
                assert p["in"] != "path" or "{" + p["name"] + "}" in path
            # The real daemon has the route: an empty request is refused by the endpoint (a
            # missing argument, an unknown id), not by the router.
            target = re.sub(r"{(\w+)}", lambda m: "0" if m[1] == "job_id" else "nope", path)
            r = http.request(method, target, json={} if method == "POST" else None)
            if r.headers["content-type"].startswith("application/json"):
                answer = r.json()
                code = answer["error"]["code"] if isinstance(answer, dict) and \
                    "error" in answer else None
                assert code not in ("no_route", "method_not_allowed"), (method, path, answer)
        events = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]
        assert {p["name"]: p["in"] for p in events["parameters"]} == {
            "job_id": "path", "progress": "query"}
