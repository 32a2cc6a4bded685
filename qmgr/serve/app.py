"""The API listener's app: Ollama's and OpenAI's routes behind the listener's own rules.

- On a loopback address, a request whose ``Host`` is not a loopback name is refused (403):
  a web page the user visits cannot reach the API through a DNS name it rebinds to 127.0.0.1
  (Ollama refuses the same way).
- With an ``api_key`` in the configuration, every request but ``GET /`` must carry
  ``Authorization: Bearer KEY`` (401 otherwise); off loopback the key is required, and the
  daemon does not start without one (:func:`check_listen`).
- Each API answers errors in its own shape (Ollama's ``{"error": "..."}``, OpenAI's
  ``{"error": {"message", "type", "code"}}``), with the status of qmgr's code. qmgr's own API
  stays on the Unix socket: none of its paths is served here.
- Browsers: a request with an ``Origin`` that is not allowed is refused (403), as Ollama
  refuses it: a page elsewhere on the web cannot make the user's browser pull or generate
  here. Allowed are this machine's pages (``http(s)://localhost``, ``127.0.0.1``, ``[::1]``,
  ``0.0.0.0``, any port) and local apps' schemes (Ollama's ``OLLAMA_ORIGINS`` defaults), plus
  the configured ``origins``; their answers carry ``Access-Control-Allow-Origin``, and their
  CORS preflights (``OPTIONS``, which browsers send without the API key) are answered before
  the key is checked. The ``Host`` rule applies to preflights too.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Iterable, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qmgr.catalog.db import Catalog
from qmgr.errors import Busy, QmgrError
from qmgr.fetch.fitting import Fitter
from qmgr.fetch.pull import Puller
from qmgr.fleet.routes import authorized
from qmgr.run.loading import Running
from qmgr.run.manager import ModelManager
from qmgr.serve import ollama, openai
from qmgr.settings import check_listen, is_loopback
from qmgr.work.jobs import JobRunner

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

# The origins Ollama allows by default (envconfig.AllowedOrigins): pages served from this
# machine, on any port, and the schemes local apps' pages have (Electron's app://, file://,
# Tauri, VS Code's webviews). ``*`` stands for any characters.
LOCAL_ORIGINS = (
    *(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
      for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)
# What a preflight may ask for: the methods the routes take; any header the page asks to send
# (Authorization, Content-Type, the OpenAI SDK's x-stainless-*) is allowed.
CORS_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
CORS_MAX_AGE = "7200"  # seconds a browser may cache a preflight's answer (Chromium's cap)


class Origins:
    """The web origins whose pages may call the listener: the local ones and ``extra``
    (``*`` in a pattern: any characters; ``*`` alone: any origin at all)."""

    def __init__(self, extra: Iterable[str] = ()):
        patterns = [*LOCAL_ORIGINS, *extra]
        self.any = "*" in patterns
        self.pattern = re.compile("|".join(
            ".*".join(map(re.escape, p.lower().split("*"))) for p in patterns))

    def allows(self, origin: str) -> bool:
        return self.any or self.pattern.fullmatch(origin.lower()) is not None


class Guard(BaseHTTPMiddleware):
    def __init__(self, app: object, loopback: bool, api_key: str | None, origins: Origins,
                 fleet_key: str | None = None):
        super().__init__(app)  # type: ignore[arg-type]
        self.loopback = loopback
        self.api_key = api_key
        self.fleet_key = fleet_key
        self.origins = origins

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        host = (request.headers.get("host") or "").rpartition(":")[0] or \
            request.headers.get("host", "")
        host = host.strip("[]").lower()
        if self.loopback and host not in LOOPBACK_NAMES and not host.endswith(".localhost"):
            return JSONResponse({"error": f"host {host!r} is not allowed: this listener is "
                                 "on loopback (use localhost)"}, status_code=403)
        origin = request.headers.get("origin")
        cors: dict[str, str] = {}
        if origin is not None:
            if not self.origins.allows(origin):
                return JSONResponse({"error": f"origin {origin!r} is not allowed: add it to "
                                     "`origins` in the configuration file (or QMGR_ORIGINS)"},
                                    status_code=403)
            cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
            if request.method == "OPTIONS" and \
                    "access-control-request-method" in request.headers:
                return Response(status_code=204, headers={
                    **cors, "Access-Control-Allow-Methods": CORS_METHODS,
                    "Access-Control-Allow-Headers": request.headers.get(
                        "access-control-request-headers", ""),
                    "Access-Control-Max-Age": CORS_MAX_AGE,
                    "Vary": "Origin, Access-Control-Request-Method, "
                            "Access-Control-Request-Headers"})
        if self.api_key and request.url.path != "/":
            given = request.headers.get("authorization", "")
            # A peer of the fleet passing on a request for a model it does not hold sends
            # the fleet key (qmgr.fleet.router).
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()) \
                    and not authorized(given, self.fleet_key):
                # With the CORS headers: the page may read why it was refused.
                return JSONResponse({"error": "missing or wrong API key (Authorization: "
                                     "Bearer KEY)"}, status_code=401, headers=cors)
        response = await call_next(request)
        if origin is not None:  # an allowed one
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.append("Vary", "Origin")
        return response


def build_api_app(catalog: Catalog, running: Running, models: ModelManager, puller: Puller,
                  fitter: Fitter, jobs: JobRunner, addresses: Sequence[str],
                  api_key: str | None, origins: Iterable[str] = (),
                  fleet_key: str | None = None) -> Starlette:
    """The listener's app, for sockets at ``addresses`` (HOST:PORT each; each is checked as a
    ``listen`` setting is). The ``Host`` rule applies when all of them are on loopback."""
    loopback = all(is_loopback(check_listen(address, api_key)[0]) for address in addresses)

    async def known(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, QmgrError)
        # A full queue says when to come back (Ollama's clients show it; OpenAI's obey it).
        retry = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
        return JSONResponse({"error": exc.message}, status_code=exc.http_status, headers=retry)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("API request %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"},
                            status_code=500)

    blobs, routing = [], []
    if catalog.node_id is not None and fleet_key:
        from qmgr.fleet.router import Router
        from qmgr.fleet.routes import PeerBlobs

        blobs = [Middleware(PeerBlobs, catalog=catalog, fleet_key=fleet_key)]
        routing = [Middleware(Router, catalog=catalog, fleet_key=fleet_key)]
    return Starlette(routes=[*ollama.routes(catalog, running, models),
                             *ollama.pull_routes(puller, fitter, jobs),
                             *openai.routes(catalog, running, models)],
                     middleware=[*blobs, Middleware(Guard, loopback=loopback, api_key=api_key,
                                            origins=Origins(origins), fleet_key=fleet_key),
                                 *routing],
                     exception_handlers={QmgrError: known, Exception: unexpected})
