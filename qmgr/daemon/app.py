"""The daemon's HTTP API (Starlette), served on the Unix socket: every feature's endpoints on
one app, with one error shape and one OpenAPI document generated from the same endpoints.

Starlette rather than FastAPI: the daemon's start-up is on the path of the first command a user
runs (the client autostarts it), and FastAPI with pydantic adds ~0.4 s of imports on a 2-core
machine. How an endpoint is declared and admitted is :mod:`qmgr.work.api`; each feature
package declares its own in its ``routes.py``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from qmgr.daemon.routes import catalog_routes, daemon_routes
from qmgr.daemon.state import Daemon
from qmgr.eval import routes as eval_routes
from qmgr.fetch import routes as fetch_routes
from qmgr.fleet import routes as fleet_routes
from qmgr.quantize import routes as quantize_routes
from qmgr.run import routes as run_routes
from qmgr.work import api, openapi
from qmgr.work import routes as job_routes
from qmgr.work.api import Endpoint


def endpoints(d: Daemon) -> list[Endpoint]:
    """Every endpoint of the API, each feature's taking the services it works with."""
    return [
        *daemon_routes(d),
        *catalog_routes(d.catalog, d.store, d.watcher),
        *fetch_routes.routes(d.catalog, d.puller, d.fitter, d.jobs),
        *quantize_routes.routes(d.quantizing, d.plugins, d.jobs),
        *job_routes.routes(d.jobs),
        *run_routes.routes(d.catalog, d.running, d.models),
        *eval_routes.routes(d.measuring, d.jobs),
        *fleet_routes.routes(d.catalog, d.settings.node),
    ]


def build_app(d: Daemon) -> Starlette:
    table = endpoints(d)
    document = openapi.document(table)

    def describe(request: Request) -> JSONResponse:
        return JSONResponse(document)

    routes = [api.route(e, d.settings) for e in table]
    routes.append(Route("/openapi.json", describe, methods=["GET"]))
    return Starlette(routes=routes, exception_handlers=api.exception_handlers())
