"""The daemon and the CLI together: real qmgrd process, real qmgr command, real socket."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

from conftest import QMGR, Env
from ggufmake import make_tiny_gguf


def test_import_and_list_autostart_the_daemon(qenv: Env, tiny: Path) -> None:
    # No daemon started by hand: the first command starts one.
    r = qenv.qmgr("import", str(tiny))
    assert "imported tiny:Q8_0" in r.stdout
    assert "started the daemon" in r.stderr
    rows = qenv.json("list")
    assert len(rows) == 1
    row = rows[0]
    assert row["ref"] == "tiny:Q8_0"
    assert row["quant_type"] == "Q8_0"
    assert row["size"] == tiny.stat().st_size
    assert row["state"] == "ready" and row["origin"] == "imported"
    assert row["architecture"] == "llama"
    assert 8.0 < row["bits_per_weight"] < 9.0
    assert row["paths"] == [str(tiny)]
    import hashlib

    assert row["sha256"] == hashlib.sha256(tiny.read_bytes()).hexdigest()


def test_no_autostart_is_a_clear_error(qenv: Env) -> None:
    r = qenv.qmgr("--no-autostart", "list", check=False)
    assert r.returncode == 1
    assert "no qmgr daemon answers" in r.stderr and "Traceback" not in r.stderr
    qenv.env["QMGR_NO_AUTOSTART"] = "1"
    r = qenv.qmgr("list", check=False)
    assert r.returncode == 1 and "no qmgr daemon answers" in r.stderr
    assert not qenv.socket.exists()


def test_show_prints_header_facts(daemon: Env, tmp_path: Path) -> None:
    f = make_tiny_gguf(tmp_path / "demo-F16.gguf", ftype="F16", n_layers=3, n_embd=64,
                       n_head=4, n_head_kv=2, n_vocab=300, ctx=512)
    daemon.qmgr("import", str(f))
    out = daemon.qmgr("show", "demo:F16").stdout
    for expected in ("architecture         llama", "blocks               3",
                     "context length       512", "embedding length     64",
                     "attention heads      4", "KV heads             2",
                     "vocabulary           300", "file type            F16"):
        assert expected in out, out
    facts = daemon.json("show", "demo:F16")["facts"]
    assert facts["block_count"] == 3 and facts["vocab_size"] == 300
    assert facts["key_length"] == 16 and facts["value_length"] == 16


def test_path_and_rm(daemon: Env, tmp_path: Path) -> None:
    a = make_tiny_gguf(tmp_path / "m-Q8_0.gguf", ftype="Q8_0")
    b = make_tiny_gguf(tmp_path / "m-F16.gguf", ftype="F16")
    daemon.qmgr("import", str(a))
    daemon.qmgr("import", "--copy", str(b))
    assert daemon.qmgr("path", "m:Q8_0").stdout.strip() == str(a)
    stored = Path(daemon.qmgr("path", "m:F16").stdout.strip())
    assert stored.parent == daemon.home / "store" / "blobs"
    assert stored.read_bytes() == b.read_bytes()
    # Two variants: the bare name is ambiguous, and says which names exist.
    r = daemon.qmgr("path", "m", check=False)
    assert r.returncode == 1 and "m:F16, m:Q8_0" in r.stderr
    daemon.qmgr("rm", "m:Q8_0")
    assert a.exists(), "a file imported in place is never deleted"
    daemon.qmgr("rm", "m:F16")
    assert not stored.exists(), "a store file no variant uses is deleted"
    assert daemon.json("list") == []
    r = daemon.qmgr("rm", "m:F16", check=False)
    assert r.returncode == 1 and "not in the catalog" in r.stderr


def test_same_bytes_twice_is_one_variant(daemon: Env, tiny: Path, tmp_path: Path) -> None:
    daemon.qmgr("import", str(tiny))
    r = daemon.qmgr("import", str(tiny))
    assert "already cataloged tiny:Q8_0" in r.stdout
    copy = tmp_path / "other.gguf"
    copy.write_bytes(tiny.read_bytes())
    daemon.qmgr("import", "--name", "tiny", str(copy))
    assert len(daemon.json("list")) == 1
    # A second name for the same bytes is a second variant sharing one blob.
    daemon.qmgr("import", "--copy", "--name", "alias", str(copy))
    rows = daemon.json("list")
    assert sorted(r["ref"] for r in rows) == ["alias:Q8_0", "tiny:Q8_0"]
    blobs = list((daemon.home / "store" / "blobs").iterdir())
    assert len(blobs) == 1
    assert len({r["paths"][0] for r in rows}) == 1


def test_malformed_file_is_a_clear_error_and_the_daemon_lives(daemon: Env, tiny: Path,
                                                              tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    data = bytearray(tiny.read_bytes())
    data[8:16] = (2**63).to_bytes(8, "little")  # absurd tensor count
    bad.write_bytes(bytes(data))
    r = daemon.qmgr("import", str(bad), check=False)
    assert r.returncode == 1
    assert str(bad) in r.stderr and "Traceback" not in r.stderr
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    r = daemon.qmgr("import", str(text), check=False)
    assert r.returncode == 1 and "Error:" in r.stderr
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.json("list") == []
    daemon.qmgr("import", str(tiny))


def test_api_errors_are_json_with_a_code(daemon: Env) -> None:
    from qmgr import settings
    from qmgr.client import Client

    c = Client(settings.load(env=daemon.env))
    for method, path, code in [("GET", "/v1/variants/nope:Q4_K_M", "not_found"),
                               ("GET", "/v1/nothing", "no_route"),
                               ("PUT", "/v1/variants", "method_not_allowed")]:
        with c.connect() as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      "Content-Length: 0\r\n\r\n".encode())
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        body = json.loads(raw.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == code, body
        assert body["error"]["message"]
    doc = c.get("/openapi.json")
    assert doc["openapi"].startswith("3.")
    assert {"/v1/variants", "/v1/imports", "/v1/status", "/v1/plugins"} <= set(doc["paths"])


def test_socket_permissions_and_one_daemon_per_socket(daemon: Env) -> None:
    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o660
    assert stat.S_IMODE(os.stat(daemon.socket.parent).st_mode) == 0o700
    second = subprocess.run([str(Path(QMGR).parent / "qmgrd")], env=daemon.env,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "already serving" in second.stderr
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(daemon.socket))  # the first one still serves


def test_sigterm_stops_cleanly(daemon: Env) -> None:
    assert daemon.stop() == 0
    assert not daemon.socket.exists()
    assert "qmgrd stopped" in daemon.daemon_log()


def test_the_client_leaves_with_its_status_and_all_its_output() -> None:
    # The client skips the interpreter's teardown (os._exit): its buffered output must still
    # arrive whole, and its exit status be click's.
    full = subprocess.run([QMGR, "--help"], capture_output=True, text=True)
    assert full.returncode == 0
    assert full.stdout.startswith("Usage: qmgr") and full.stdout.rstrip().endswith(
        "Watch folders for GGUF files.")
    wrong = subprocess.run([QMGR, "frobnicate"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "No such command 'frobnicate'" in wrong.stderr
    closed = subprocess.run(f"{QMGR} --help | head -c 10", shell=True, capture_output=True,
                            text=True)
    assert closed.stdout == "Usage: qmg" and "Traceback" not in closed.stderr


def test_help_is_light() -> None:
    code = (
        "import sys; sys.argv=['qmgr','--help']\n"
        "from qmgr.cli import cli\n"
        "try:\n cli(prog_name='qmgr')\n"
        "except SystemExit: pass\n"
        "heavy=[m for m in ('sqlalchemy','numpy','qmgr.daemon','alembic','starlette','httpx',"
        "'uvicorn','gguf') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in r.stderr, r.stderr
    assert "Usage: qmgr" in r.stdout and "import" in r.stdout


def test_status_and_plugins(daemon: Env) -> None:
    st = daemon.json("status")
    assert st["socket"] == str(daemon.socket) and st["home"] == str(daemon.home)
    assert st["schema"] is not None and st["variants"] == 0
    # The daemon knows who calls (SO_PEERCRED).
    assert st["caller"]["uid"] == os.getuid() and st["caller"]["gid"] == os.getgid()
    plugins = daemon.json("plugins")
    cpu = next(p for p in plugins if p["name"] == "cpu_probe")
    assert cpu["builtin"] and cpu["hooks"] == ["register_probes"] and cpu["errors"] == []
