"""The API listener's rules for browsers (CORS), spoken to with plain HTTP as a browser would.

A real daemon with ``--listen 127.0.0.1:PORT``; no model is needed. A browser sends the page's
``Origin`` with a cross-origin request, and before a request it may not send unasked (a POST of
JSON, an ``Authorization`` header) a preflight ``OPTIONS`` without credentials; it lets the
page read the answer only if it names that origin in ``Access-Control-Allow-Origin``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Env

from qmgr import settings
from qmgr.errors import QmgrError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def serve(qenv: Env) -> Iterator[Callable[..., str]]:
    """Start the daemon with the listener, with ``config`` as its configuration file and
    ``env`` added to its environment; returns the listener's URL."""

    def start(config: str = "", **env: str) -> str:
        Path(qenv.env["QMGR_CONFIG"]).write_text(config)
        qenv.env.update(env)
        port = free_port()
        qenv.start("--listen", f"127.0.0.1:{port}")
        return f"http://127.0.0.1:{port}"

    yield start


def preflight(url: str, origin: str, **headers: str) -> httpx.Response:
    return httpx.options(url, headers={"Origin": origin,
                                       "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers":
                                           "authorization,content-type", **headers})


def test_pages_on_this_machine_may_call_and_others_are_refused(serve: Callable[..., str]
                                                               ) -> None:
    url = serve()
    for origin in ("http://localhost:3000", "https://127.0.0.1", "http://[::1]:8080",
                   "app://obsidian.md", "tauri://localhost", "file://"):
        r = httpx.get(url + "/api/tags", headers={"Origin": origin})
        assert r.status_code == 200, (origin, r.text)
        assert r.headers["access-control-allow-origin"] == origin
        assert "Origin" in r.headers["vary"]
    # A page on the web: refused (as Ollama refuses it), so it cannot pull or generate here
    # even with a request a browser sends without asking first (a text/plain POST).
    for origin in ("https://evil.example", "http://localhost.evil.example",
                   "http://127.0.0.1.evil.example:80", "null"):
        r = httpx.post(url + "/api/pull", headers={"Origin": origin,
                                                   "Content-Type": "text/plain"},
                       content='{"model": "hf.co/test/tiny"}')
        assert r.status_code == 403, (origin, r.text)
        assert "access-control-allow-origin" not in r.headers
        assert f"origin {origin!r} is not allowed" in r.json()["error"]
        assert preflight(url + "/api/chat", origin).status_code == 403
    # Programs that are not browsers send no Origin, and get no CORS headers.
    r = httpx.get(url + "/api/tags")
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_configured_origins_are_allowed_too(serve: Callable[..., str]) -> None:
    url = serve('origins = ["https://chat.example.com", "https://*.tools.example"]\n')
    for origin in ("https://chat.example.com", "https://a.tools.example",
                   "http://localhost:5173"):  # the local ones stay
        r = httpx.get(url + "/v1/models", headers={"Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    for origin in ("http://chat.example.com", "https://chat.example.com.evil.example",
                   "https://tools.example"):
        assert httpx.get(url + "/v1/models", headers={"Origin": origin}).status_code == 403


def test_the_environment_replaces_the_file_and_a_star_allows_any(serve: Callable[..., str]
                                                                 ) -> None:
    url = serve('origins = ["https://chat.example.com"]\n', QMGR_ORIGINS="*")
    r = httpx.get(url + "/api/tags", headers={"Origin": "https://anywhere.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://anywhere.example"


def test_a_preflight_passes_before_the_api_key(serve: Callable[..., str]) -> None:
    url = serve('api_key = "sesame"\n')
    origin = "http://localhost:5173"
    # The browser asks first, without the key; the answer says it may send it.
    r = preflight(url + "/api/chat", origin)
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization,content-type"
    assert int(r.headers["access-control-max-age"]) > 0
    # Then the request itself: without the key refused, in a way the page can read.
    r = httpx.get(url + "/api/tags", headers={"Origin": origin})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == origin
    r = httpx.get(url + "/api/tags", headers={"Origin": origin,
                                              "Authorization": "Bearer sesame"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    # An OPTIONS that is not a preflight is no way around the key.
    assert httpx.options(url + "/api/tags", headers={"Origin": origin}).status_code == 401
    # The Host rule holds for preflights: a rebound DNS name is refused before anything.
    r = preflight(url + "/api/chat", origin, Host="evil.example")
    assert r.status_code == 403 and "host 'evil.example' is not allowed" in r.json()["error"]


def test_origins_are_read_from_environment_then_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('origins = ["https://a.example", " https://b.example "]\n')
    env = {"QMGR_CONFIG": str(config)}
    assert settings.load(env=env).origins == ["https://a.example", "https://b.example"]
    assert settings.load(env={**env, "QMGR_ORIGINS": "https://c.example, *"}).origins == [
        "https://c.example", "*"]
    assert settings.load(env={**env, "QMGR_ORIGINS": ""}).origins == []  # set, but none
    config.write_text('origins = "https://a.example,https://b.example"\n')
    assert settings.load(env=env).origins == ["https://a.example", "https://b.example"]
    config.write_text("origins = [1]\n")
    with pytest.raises(QmgrError) as e:
        settings.load(env=env)
    assert e.value.code == "bad_config" and "expected a list of strings" in e.value.message
