"""The name you pulled with is the name you use; the client's settings reach the daemon; an
offline or busy registry says what to do; progress fits the terminal.

A real daemon and the project's misbehaving mirror (tests/badmirror.py) on 127.0.0.1. The
daemon is started without ``QMGR_HF_ENDPOINT``: the client's environment carries it, as a
user's shell does when the daemon was started elsewhere (autostarted earlier, or the service).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from badmirror import BadMirror, sha256_of
from conftest import QMGR, Env, running_daemon
from ggufmake import make_tiny_gguf
from test_sources import failed

from qmgr.cli.progress import progress_line


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "mirror"
    d = root / "test" / "tiny"
    d.mkdir(parents=True)
    make_tiny_gguf(d / "tiny-Q8_0.gguf", ftype="Q8_0", n_vocab=2000)
    make_tiny_gguf(d / "tiny-Q4_K_M.gguf", ftype="F32", n_vocab=2000)  # the name decides
    return root


@pytest.fixture
def env(mirror: BadMirror) -> Iterator[Env]:
    # No QMGR_HF_ENDPOINT for the daemon: alone, it would go to huggingface.co.
    for e in running_daemon(QMGR_STALL_TIMEOUT="2", QMGR_RETRY_BACKOFF="0.05",
                            QMGR_RETRIES="1"):
        e.env["QMGR_HF_ENDPOINT"] = mirror.url  # the user's shell has it
        yield e


def test_the_clients_endpoint_and_token_are_used(env: Env, mirror: BadMirror,
                                                 repo: Path) -> None:
    env.env["HF_TOKEN"] = "hf_secret_of_the_user"
    out = env.json("variants", "hf.co/test/tiny", "--no-headers")
    assert sorted(v["quant"] for v in out["variants"]) == ["Q4_K_M", "Q8_0"]
    assert env.qmgr("pull", "hf.co/test/tiny:Q8_0").stdout.strip() == "tiny:Q8_0"
    # The token went to the listing and downloads (the mirror is the Hub here) ...
    seen = {r["headers"].get("Authorization") for r in mirror.behavior["log"]}
    assert seen == {"Bearer hf_secret_of_the_user"}, seen
    # ... and is not kept in the job's row, which outlives the request.
    job = env.json("jobs")[0]
    assert "hf_secret" not in json.dumps(job)
    assert job["arguments"]["env"] == {"QMGR_HF_ENDPOINT": mirror.url}
    [row] = env.json("list")
    assert row["sha256"] == sha256_of(repo / "test" / "tiny" / "tiny-Q8_0.gguf")

    # Without the client's setting the daemon uses its own (here: none, so huggingface.co,
    # which this machine cannot reach): never the mirror by accident.
    del env.env["QMGR_HF_ENDPOINT"]
    message = failed(env.qmgr("variants", "hf.co/test/tiny", check=False))
    assert "huggingface.co" in message


def test_another_qmgr_home_is_refused_with_the_difference(env: Env) -> None:
    env.env["QMGR_HOME"] = str(env.root / "elsewhere")
    message = failed(env.qmgr("list", check=False))
    assert str(env.home) in message and str(env.root / "elsewhere") in message
    assert "QMGR_SOCKET" in message
    env.env["QMGR_HOME"] = str(env.home) + "/"  # the same folder, spelled differently
    assert env.qmgr("list").returncode == 0


def _raw(env: Env, header: str) -> tuple[int, dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(env.socket))
        s.sendall(f"GET /v1/variants HTTP/1.1\r\nHost: qmgrd\r\nConnection: close\r\n"
                  f"{header}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_bad_env_header_is_a_clear_error(env: Env) -> None:
    status, body = _raw(env, "X-Qmgr-Env: {not json")
    assert (status, body["error"]["code"]) == (400, "bad_request")
    status, body = _raw(env, 'X-Qmgr-Env: {"LD_PRELOAD": "/tmp/x.so"}')
    assert status == 400 and "may carry only" in body["error"]["message"]
    assert _raw(env, 'X-Qmgr-Env: {"HF_TOKEN": "x"}')[0] == 200


def test_the_name_you_pulled_with_is_the_name_you_use(env: Env, repo: Path) -> None:
    q8 = repo / "test" / "tiny" / "tiny-Q8_0.gguf"
    env.qmgr("pull", "hf.co/test/tiny:Q8_0")
    for ref in ("hf.co/test/tiny:Q8_0", "hf.co/test/tiny:q8_0", "huggingface.co/test/tiny:Q8_0",
                "tiny:Q8_0", "tiny", "hf.co/test/tiny"):
        assert env.json("show", ref)["sha256"] == sha256_of(q8), ref
    path = env.qmgr("path", "hf.co/test/tiny:Q8_0").stdout.strip()
    assert sha256_of(Path(path)) == sha256_of(q8)
    [row] = env.json("list")
    assert row["source_ref"] == "hf.co/test/tiny:Q8_0"
    listed = env.qmgr("list").stdout
    assert "hf.co/test/tiny:Q8_0" in listed and "SOURCE" in listed

    # A second quant: the bare name is now ambiguous, until one is pulled without a quant.
    env.qmgr("pull", "hf.co/test/tiny:Q4_K_M")
    assert "names 2 variants" in failed(env.qmgr("show", "tiny", check=False))
    env.qmgr("alias", "add", "mine", "hf.co/test/tiny")
    env.qmgr("pull", "mine")  # no quant named: Q4_K_M, the default, becomes what "mine" means
    assert env.json("show", "mine")["tag"] == "Q4_K_M"
    assert [r["ref"] for r in env.json("list") if r["default"]] == ["mine:Q4_K_M"]
    # An alias of a cataloged variant names it everywhere, pull included (nothing to fetch).
    env.qmgr("alias", "add", "small", "tiny:Q8_0")
    assert env.json("show", "small")["ref"] == "tiny:Q8_0"
    assert "no download needed" in env.qmgr("pull", "small").stderr
    env.env["QMGR_HW"] = "ram=16GiB,cores=2"
    fit = env.json("fit", "small")  # the cataloged model's variants, no network
    assert fit["source"] == "catalog:tiny" and fit["pick"]
    assert env.json("fit", "hf.co/test/tiny:Q8_0")["pick"] == "Q8_0"

    removed = env.json("rm", "hf.co/test/tiny:Q8_0")["removed"]
    assert removed == ["tiny:Q8_0"]
    assert "not in the catalog" in failed(env.qmgr("path", "hf.co/test/tiny:Q8_0",
                                                   check=False))
    # `pull --fit` prints the decision on stderr: stdout is the name pulled, alone.
    r = env.qmgr("pull", "mine", "--fit")
    assert r.stdout.strip() == "mine:Q8_0" and "pick:" in r.stderr
    assert env.json("show", "mine")["tag"] == "Q8_0"  # what the pull chose is what it means
    # It decided first, then pulled that one variant: the job is a plain pull of it.
    job = env.json("jobs")[0]
    assert job["arguments"]["ref"] == "hf.co/test/tiny:Q8_0"
    assert job["arguments"]["name"] == "mine" and job["arguments"]["decision"]["pick"] == "Q8_0"


def test_offline_fails_at_once_with_what_to_do(env: Env) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cases = [(f"http://127.0.0.1:{closed}", "connection refused"),
             ("https://hub.invalid", "no such host")]
    for endpoint, reason in cases:
        env.env["QMGR_HF_ENDPOINT"] = endpoint
        for args in (("pull", "hf.co/test/tiny:Q8_0"), ("fit", "hf.co/test/tiny"),
                     ("variants", "hf.co/test/tiny")):
            message = failed(env.qmgr(*args, check=False, timeout=60))
            assert reason in message, (args, message)
            assert "qmgr mirror serve" in message and "qmgr import" in message
            assert "HTTPS_PROXY" in message


def test_a_busy_registry_is_waited_for_while_the_job_says_so(env: Env,
                                                              mirror: BadMirror) -> None:
    mirror.behavior["busy"] = 2  # two answers of 503 + Retry-After: 1, then the listing
    r = env.qmgr("pull", "hf.co/test/tiny:Q8_0")
    assert "waiting" in r.stderr, r.stderr
    assert env.json("show", "tiny:Q8_0")["state"] == "ready"
    # A listing asked for directly is not waited for: the server's own words come back.
    mirror.behavior["busy"] = 1
    message = failed(env.qmgr("variants", "hf.co/test/tiny", check=False))
    assert "hashing 1 of 2 files" in message


@pytest.mark.parametrize("columns", [20, 40, 60, 80, 100, 200])
def test_a_progress_line_fits_the_terminal(columns: int) -> None:
    job = {"state": "running", "progress": {"phase": "downloading", "done": 3 << 30,
                                            "total": 40 << 30, "speed": 123e6}}
    for label in ("tiny", "hf.co/bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M"):
        line = progress_line(label, job, columns)
        assert len(line) < columns, line
        assert "7.5%" in line or columns < 10
    wide = progress_line("tiny", job, 200)
    assert wide.startswith("tiny  ") and "[" in wide and "ETA" in wide


def test_progress_redraws_leave_no_wrapped_lines(env: Env, mirror: BadMirror,
                                                 repo: Path) -> None:
    """In a real terminal 40 columns wide, every redraw of a pull's progress stays on one
    row: the screen shows the pull's lines only, none of them a wrapped remainder."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    mirror.behavior.update(rate=2e6)  # slow enough for several redraws
    big = repo / "test" / "tiny" / "tiny-F16.gguf"
    make_tiny_gguf(big, ftype="F16", n_vocab=20000)
    pid, fd = pty.fork()
    if pid == 0:  # the child: qmgr on a 40-column terminal
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
        os.execve(QMGR, [QMGR, "pull", "hf.co/test/tiny:F16"], env.env)
    out = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    text = out.decode(errors="replace")
    redraws = [part.split("\x1b[K")[0] for part in text.split("\r") if "\x1b[K" in part]
    assert len(redraws) >= 2, text
    assert all(len(r) < 40 for r in redraws), [r for r in redraws if len(r) >= 40]
