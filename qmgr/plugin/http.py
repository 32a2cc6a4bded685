"""HTTP for sources and downloads: httpx, with redirects followed by hand.

Redirects are followed (registries send downloads to a CDN), but never more than
:data:`MAX_REDIRECTS`, never from https to http, never to another scheme, and credentials are
dropped as soon as a redirect leaves the host they were meant for.
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from qmgr import __version__
from qmgr.errors import NotFound, QmgrError
from qmgr.refs import CONTROL_RE, redact_url

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
USER_AGENT = f"qmgr/{__version__}"

# httpcore reads the socket 64 KiB at a time; for multi-GB bodies the per-read overhead of the
# Python layers above it dominates (measured: ~300 MB/s on loopback). 1 MiB reads cut the
# number of trips through httpcore and h11 sixteenfold.
try:
    import httpcore._sync.http11 as _http11

    _http11.HTTP11Connection.READ_NUM_BYTES = 1 << 20
except (ImportError, AttributeError):  # another httpcore: keep its default
    pass


# What to do without the internet, in every error that means "no network".
OFFLINE_HELP = ("is this machine offline? Pull from a mirror on your network "
                "(QMGR_HF_ENDPOINT=http://HOST:8787, see `qmgr mirror serve`), catalog a file "
                "you have (`qmgr import FILE.gguf`), or, behind a proxy, set HTTPS_PROXY in the "
                "daemon's environment (for the service: `systemctl edit qmgr`)")


def _reason(e: Exception) -> str:
    text = str(e)
    for marker, said in (("Name or service not known", "no such host"),
                         ("Temporary failure in name resolution", "name resolution failed"),
                         ("No address associated", "no such host"),
                         ("Network is unreachable", "network unreachable"),
                         ("Connection refused", "connection refused")):
        if marker in text:
            return said
    return text[:120] or type(e).__name__


class FetchError(QmgrError):
    """The registry or the network failed in a way a retry may fix (or may not)."""

    code = "fetch_failed"


def make_client(stall_timeout: float = 30.0, ca_bundle: str | None = None) -> httpx.Client:
    """``ca_bundle``: a PEM file of certificate authorities to trust instead of the public ones
    (a registry on a private network with its own CA; ``QMGR_CA_BUNDLE``)."""
    # read= is the stall timeout: no byte for that long and the attempt is retried.
    timeout = httpx.Timeout(connect=15.0, read=stall_timeout, write=30.0, pool=30.0)
    return httpx.Client(timeout=timeout, follow_redirects=False, verify=ssl_context(ca_bundle),
                        headers={"User-Agent": USER_AGENT})


@functools.lru_cache(maxsize=4)
def ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Certificate checks as httpx does them: certifi's authorities, or ``ca_bundle``'s.
    Made once per daemon (loading the authorities takes ~50 ms) and shared: a context is safe
    to use from many threads."""
    if ca_bundle is None:
        import certifi

        ca_bundle = certifi.where()
    return ssl.create_default_context(cafile=ca_bundle)


def check_scheme(url: str, insecure: bool) -> None:
    scheme = urlsplit(url).scheme
    if scheme == "https" or (scheme == "http" and insecure):
        return
    if scheme == "http":
        raise QmgrError(f"refusing plain http for {redact(url)}: pass --insecure for a registry "
                        "on your own network", code="insecure")
    raise QmgrError(f"unsupported URL scheme in {redact(url)}", code="bad_url")




redact = redact_url  # the name the fetch modules know it by

REDIRECTS = (301, 302, 303, 307, 308)


def redirect_target(url: str, location: str, origin: str, headers: dict[str, str],
                    insecure: bool, http_origin: bool = False) -> str:
    """Where a redirect from ``url`` leads, if it may be followed; drops the credentials from
    ``headers`` when it leaves ``origin`` (the host they were meant for). ``http_origin``: the
    user configured ``origin`` to speak plain http (a mirror on the LAN): that allows plain
    http there, not at another host it redirects to, which needs ``--insecure``."""
    target = urljoin(url, location)
    if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
        raise QmgrError(f"refusing a redirect from https to {redact(target)}",
                        code="insecure")
    same_host = urlsplit(target).netloc == origin
    if urlsplit(target).scheme == "http" and not insecure and not (http_origin and same_host):
        raise QmgrError(f"refusing a redirect to plain http at another host ({redact(target)}); "
                        "pass --insecure if you trust it", code="insecure")
    check_scheme(target, insecure or http_origin)
    if not same_host:
        headers.pop("Authorization", None)  # the token is for the registry only
    return target


@contextmanager
def request(client: httpx.Client, method: str, url: str, headers: dict[str, str] | None = None,
            *, insecure: bool = False, http_origin: bool = False,
            stream: bool = True) -> Iterator[httpx.Response]:
    """Send a request, following redirects safely; yields the final response (streaming).
    ``http_origin``: plain http is allowed at ``url``'s host (see :func:`redirect_target`)."""
    check_scheme(url, insecure or http_origin)
    headers = dict(headers or {})
    origin = urlsplit(url).netloc
    for _hop in range(MAX_REDIRECTS + 1):
        try:
            response = client.send(client.build_request(method, url, headers=headers),
                                   stream=stream)
        except httpx.ConnectTimeout as e:
            raise FetchError(f"{redact(url)}: no answer to the connection ({OFFLINE_HELP})",
                             code="unreachable") from e
        except httpx.TimeoutException as e:
            raise FetchError(f"{redact(url)}: timed out ({type(e).__name__})") from e
        except httpx.HTTPError as e:
            if "WRONG_VERSION_NUMBER" in str(e) or "record layer failure" in str(e):
                raise FetchError(f"{redact(url)}: the server does not speak https; pass "
                                 "--insecure for a registry on your own network") from e
            if isinstance(e, httpx.ConnectError) and "SSL" not in str(e):
                raise FetchError(f"cannot reach {urlsplit(url).netloc} ({_reason(e)}): "
                                 f"{OFFLINE_HELP}", code="unreachable") from e
            raise FetchError(f"{redact(url)}: {type(e).__name__}: {e}") from e
        if response.status_code in REDIRECTS and "location" in response.headers:
            response.close()
            url = redirect_target(url, response.headers["location"], origin, headers, insecure,
                                  http_origin)
            continue
        try:
            yield response
        finally:
            response.close()
        return
    raise FetchError(f"more than {MAX_REDIRECTS} redirects from {redact(url)}")


# A JSON document (a listing page, a manifest) must arrive within this many seconds in all:
# the read timeout alone lets a server that sends a byte every few seconds hold a job forever.
DOCUMENT_DEADLINE_S = 120.0


def get_json(client: httpx.Client, url: str, headers: dict[str, str] | None = None, *,
             insecure: bool = False, http_origin: bool = False, limit: int = 64 << 20,
             deadline_s: float = DOCUMENT_DEADLINE_S) -> tuple[Any, httpx.Headers]:
    """GET a JSON document (bounded in size and time); raises a clear error on HTTP errors."""
    import json
    import time

    started = time.monotonic()

    with request(client, "GET", url, headers, insecure=insecure, http_origin=http_origin) as r:
        if r.status_code == 401 or r.status_code == 403:
            raise QmgrError(f"{redact(url)}: access denied ({r.status_code}); for a gated "
                            "repository set HF_TOKEN", code="unauthorized")
        if r.status_code == 404:
            raise NotFound(f"{redact(url)}: not found")
        if r.status_code == 503 and "retry-after" in r.headers:
            raise Busy(f"{redact(url)}: {_said(r) or 'busy'}", _seconds(r.headers["retry-after"]))
        if r.status_code >= 400:
            raise FetchError(f"{redact(url)}: HTTP {r.status_code}")
        body = bytearray()
        for chunk in r.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise FetchError(f"{redact(url)}: answer larger than {limit} bytes")
            if time.monotonic() - started > deadline_s:
                raise FetchError(f"{redact(url)}: the answer took longer than {deadline_s:.0f} s "
                                 f"({len(body)} bytes so far): the server is too slow",
                                 code="too_slow")
        try:
            return json.loads(body), r.headers
        except ValueError as e:
            raise FetchError(f"{redact(url)}: answer is not JSON") from e


class Busy(FetchError):
    """503 with ``Retry-After``: the server is up but not ready (a mirror still hashing)."""

    code = "registry_busy"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


def _seconds(value: str) -> float:
    return float(value) if value.strip().isdigit() else 5.0


def _said(r: httpx.Response) -> str:
    """The one-line message of a JSON error answer (``{"error": "..."}``), if there is one."""
    import json

    try:
        r.read()
        err = json.loads(r.content[:4096]).get("error")
    except (ValueError, AttributeError, httpx.HTTPError):
        return ""
    text = err if isinstance(err, str) else (err or {}).get("message", "")
    return CONTROL_RE.sub("?", str(text))[:300]


def next_link(headers: httpx.Headers) -> str | None:
    """The ``rel="next"`` URL of a paginated answer (RFC 8288 Link header)."""
    if "link" not in headers:
        return None
    link = httpx.Response(200, headers={"link": headers["link"]}).links.get("next")
    return link.get("url") if link else None
