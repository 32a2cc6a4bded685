"""The client's own HTTP, tested directly; the daemon's API through an independent client
(httpx over the Unix socket), so the two are not only tested against each other; and
`qmgr daemon`, the foreground daemon, which the client becomes without importing it."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import QMGR, Env

from qmgr.client import _dechunk, _parse, env_header
from qmgr.errors import QmgrError


def test_a_whole_answer_is_parsed() -> None:
    r = _parse(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
               b"X-Odd:  spaced value \r\n\r\n{\"error\": {\"code\": \"not_found\"}}")
    assert (r.status, r.headers["x-odd"], r.json()["error"]["code"]) == (
        404, "spaced value", "not_found")


def test_a_chunked_answer_is_joined() -> None:
    body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"
    assert _dechunk(body) == b"Wikipedia"
    r = _parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert r.body == b"Wikipedia"


def test_an_answer_cut_short_is_a_clear_error() -> None:
    with pytest.raises(QmgrError) as e:
        _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n")
    assert e.value.code == "bad_response"


def test_the_env_header_carries_only_what_it_should() -> None:
    environ = {"HF_TOKEN": "t", "QMGR_HF_ENDPOINT": "http://m:8787", "PATH": "/bin",
               "QMGR_HOME": "/h", "AWS_SECRET": "no"}
    line = env_header(environ)
    assert line.startswith("X-Qmgr-Env: ") and line.endswith("\r\n")
    assert json.loads(line.split(": ", 1)[1]) == {
        "HF_TOKEN": "t", "QMGR_HF_ENDPOINT": "http://m:8787", "QMGR_HOME": "/h"}
    assert env_header({"PATH": "/bin"}) == ""
    assert "\n" not in env_header({"HF_TOKEN": "a\nb"}).rstrip("\r\n")  # one header line


def test_the_api_through_an_independent_client(daemon: Env, tiny: Path) -> None:
    transport = httpx.HTTPTransport(uds=str(daemon.socket))
    with httpx.Client(transport=transport, base_url="http://qmgrd") as http:
        status = http.get("/v1/status").json()
        assert status["socket"] == str(daemon.socket)
        r = http.post("/v1/imports", json={"paths": [str(tiny)]})
        assert r.status_code == 200 and r.json()["results"][0]["created"] is True
        [row] = http.get("/v1/variants").json()
        assert http.get(f"/v1/variants/{row['ref']}").json()["sha256"] == row["sha256"]
        missing = http.get("/v1/variants/nothing:here")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        bad = http.post("/v1/imports", content=b"{not json",
                        headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
        spec = http.get("/openapi.json").json()
        assert "/v1/imports" in spec["paths"] and "/v1/jobs/{job_id}/events" in spec["paths"]


def test_qmgr_daemon_runs_qmgrd_in_the_foreground(qenv: Env) -> None:
    proc = subprocess.Popen([QMGR, "daemon"], env=qenv.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        qenv.proc = None
        qenv.wait_ready()
        assert qenv.json("status")["pid"] == proc.pid  # the client became the daemon
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
