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
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qmgr.catalog.db import Catalog
from qmgr.errors import QmgrError
from qmgr.fetch.fitting import Fitter
from qmgr.fetch.pull import Puller
from qmgr.run.loading import Running
from qmgr.run.manager import ModelManager
from qmgr.serve import ollama, openai
from qmgr.work.jobs import JobRunner

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:11434"  # Ollama's
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:11434`` for IPv6) -> (host, port); a clear error otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise QmgrError(f"listen {value!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}",
                        code="bad_config")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, api_key: str | None) -> tuple[str, int]:
    """Where to listen; refused off loopback without an API key (anyone on the network could
    otherwise use, pull into and fill this machine)."""
    host, port = parse_listen(listen)
    if not is_loopback(host) and not api_key:
        raise QmgrError(f"listen {listen}: serving beyond this machine needs an api_key in "
                        "the configuration file (programs then send Authorization: Bearer "
                        "KEY)", code="bad_config")
    return host, port


class Guard(BaseHTTPMiddleware):
    def __init__(self, app: object, loopback: bool, api_key: str | None):
        super().__init__(app)  # type: ignore[arg-type]
        self.loopback = loopback
        self.api_key = api_key

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        host = (request.headers.get("host") or "").rpartition(":")[0] or \
            request.headers.get("host", "")
        host = host.strip("[]").lower()
        if self.loopback and host not in LOOPBACK_NAMES and not host.endswith(".localhost"):
            return JSONResponse({"error": f"host {host!r} is not allowed: this listener is "
                                 "on loopback (use localhost)"}, status_code=403)
        if self.api_key and request.url.path != "/":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return JSONResponse({"error": "missing or wrong API key (Authorization: "
                                     "Bearer KEY)"}, status_code=401)
        return await call_next(request)


def build_api_app(catalog: Catalog, running: Running, models: ModelManager, puller: Puller,
                  fitter: Fitter, jobs: JobRunner, listen: str,
                  api_key: str | None) -> Starlette:
    host, _port = check_listen(listen, api_key)

    async def known(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, QmgrError)
        return JSONResponse({"error": exc.message}, status_code=exc.http_status)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("API request %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"},
                            status_code=500)

    return Starlette(routes=[*ollama.routes(catalog, running, models),
                             *ollama.pull_routes(puller, fitter, jobs),
                             *openai.routes(catalog, running, models)],
                     middleware=[Middleware(Guard, loopback=is_loopback(host),
                                            api_key=api_key)],
                     exception_handlers={QmgrError: known, Exception: unexpected})
