"""The plugin contracts, as a third party uses them: a real installed distribution (a package
and its dist-info on the daemon's PYTHONPATH, see test_plugins.install) that imports
``qmgr.plugin`` only, driven through the real daemon and client.

- a source that owns a scheme of its own (``shelf://``) is pulled from, with its own parse;
- a second backend is actually used: chosen by ``can_run`` when it is the one that can, by
  pluggy's order (``tryfirst``) when both can, and by ``--backend``;
- a quantizer that does not declare ``reports_digest`` is not trusted with the digest of its
  output, and one that provides ``compute_imatrix`` computes ``qmgr imatrix``;
- a raising hook wrapper is reported against its plugin, and the other plugins still count.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Env
from ggufmake import make_tiny_gguf
from test_plugins import install

from qmgr.store import hash_file

CONTRACTS = '''
import hashlib
import os
import shutil
from pathlib import Path

from qmgr.plugin import (
    Piece, QmgrError, QuantizeError, Reference, RemoteFile, RemoteVariant, hookimpl,
)


class ShelfSource:
    """shelf://NAME:QUANT: the files a test's HTTP server offers (SHELF_URL)."""

    name = "shelf"
    kinds = ("shelf",)

    def parse(self, raw):
        rest = raw.removeprefix("shelf://")
        name, _, quant = rest.partition(":")
        if not name.isalnum():
            raise QmgrError(f"{raw!r}: a shelf name is letters and digits", code="bad_ref")
        return Reference("shelf", raw, name, quant=quant or None)

    def variants(self, ref, ctx):
        base = ctx.env["SHELF_URL"]
        out = []
        for line in Path(ctx.env["SHELF_INDEX"]).read_text().splitlines():
            file, quant, size, sha = line.split()
            if file.startswith(ref.name + "-"):
                out.append(RemoteVariant(quant, [RemoteFile(file, f"{base}/{file}", int(size),
                                                            sha, allow_http=True)],
                                         f"shelf://{ref.name}:{quant}", ref.name))
        return out


class EchoSession:
    def __init__(self, path):
        self.path = path

    def generate(self, prompt, params):
        yield Piece(f"echo: {prompt[::-1]}")
        yield Piece("", done=True, stats={"prompt_tokens": len(prompt), "tokens": 1,
                                          "prompt_s": 0.001, "eval_s": 0.001})

    def chat(self, messages, params):
        return self.generate(messages[-1]["content"] if messages else "", params)

    def chat_format(self):
        return "echo"

    def tokenize(self, text):
        return list(text.encode())

    def score(self, tokens, n_ctx, want_distributions=False):
        return iter(())

    def close(self):
        pass


class EchoBackend:
    name = "echo"
    version = "1.0"

    def can_run(self, facts, devices):
        return None if facts.get("architecture") == "llama" else "echo runs llama models only"

    def load(self, path, options):
        return EchoSession(path)


class CopyQuantizer:
    """Copies its source and claims a digest it did not compute."""

    name = "copy"
    version = "1.0"
    supported_options = frozenset()

    def targets(self):
        return ["COPY"]

    def quantize(self, job):
        shutil.copyfile(job.src, job.dst)
        return {"output_sha256": "0" * 64, "output_size": os.path.getsize(job.dst)}

    def compute_imatrix(self, job):
        if len(job.text) < 10:
            raise QuantizeError("too little text", code="text_too_short")
        shutil.copyfile(job.src, job.dst)  # a GGUF the daemon can read: enough here
        return {"tokens": len(job.text.split())}


ORDER = os.environ.get("CONTRACTS_BACKEND_ORDER", "")


@hookimpl
def register_sources(register):
    register(ShelfSource())


@hookimpl(tryfirst=ORDER == "tryfirst", trylast=ORDER != "tryfirst")
def register_backends(register):
    register(EchoBackend())


@hookimpl
def register_quantizers(register):
    register(CopyQuantizer())
'''

WRAPPER = '''
from qmgr.plugin import hookimpl


@hookimpl(wrapper=True)
def register_backends(register):
    yield
    raise RuntimeError("the wrapper broke")
'''


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def shelf(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server offering tiny-Q8_0.gguf, and the index the shelf source reads."""
    files = tmp_path / "shelf"
    files.mkdir()
    model = make_tiny_gguf(files / "tiny-Q8_0.gguf", ftype="Q8_0")
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    index = tmp_path / "index.txt"
    index.write_text(f"tiny-Q8_0.gguf Q8_0 {model.stat().st_size} {sha}\n")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(files)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", index
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def world(qenv: Env, tmp_path: Path, shelf: tuple[str, Path]) -> Env:
    site = tmp_path / "site"
    site.mkdir()
    install(site, "contracts", CONTRACTS)
    install(site, "wrapper", WRAPPER)
    url, index = shelf
    qenv.env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site),
                                                             qenv.env.get("PYTHONPATH")])),
                    QMGR_PLUGINS="contracts", SHELF_URL=url, SHELF_INDEX=str(index))
    return qenv


def test_a_source_owns_its_scheme(world: Env) -> None:
    world.start()
    assert world.qmgr("pull", "shelf://tiny:Q8_0", "-q").returncode == 0
    [row] = world.json("list")
    assert row["source_ref"] == "shelf://tiny:Q8_0", row
    # The source's own parse refuses what qmgr's generic rules would let through.
    r = world.qmgr("pull", "shelf://ti-ny:Q8_0", check=False)
    assert r.returncode == 1 and "a shelf name is letters and digits" in r.stderr, r.stderr
    # An alias of a plugin's reference carries the quant asked for, and is parsed by the
    # source that owns it.
    world.qmgr("alias", "add", "onshelf", "shelf://tiny")
    world.qmgr("rm", "tiny:Q8_0")
    world.qmgr("pull", "onshelf:Q8_0", "-q")
    [row] = world.json("list")
    assert row["source_ref"] == "shelf://tiny:Q8_0", row
    world.qmgr("alias", "add", "badshelf", "shelf://ti-ny")
    r = world.qmgr("pull", "badshelf:Q8_0", check=False)
    assert r.returncode == 1 and "a shelf name is letters and digits" in r.stderr, r.stderr
    # A scheme no installed source owns names the kinds that are.
    r = world.qmgr("pull", "crate://tiny:Q8_0", check=False)
    assert r.returncode == 1 and "no source plugin handles crate references" in r.stderr
    assert "shelf" in r.stderr and "hf" in r.stderr, r.stderr


@pytest.mark.parametrize(("order", "disabled", "flag", "expected"), [
    ("", "llama_backend", None, "echo"),  # the only one that can run it
    ("tryfirst", "", None, "echo"),  # both can: tryfirst puts the plugin's first
    ("", "", None, "llama.cpp"),  # both can: trylast puts it after the built-in
    ("", "", "echo", "echo"),  # asked for by name
])
def test_the_backend_is_chosen_by_can_run_and_order(world: Env, tmp_path: Path, order: str,
                                                    disabled: str, flag: str | None,
                                                    expected: str) -> None:
    if expected == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="the built-in backend needs qmgr[llama]")
    world.env.update(CONTRACTS_BACKEND_ORDER=order, QMGR_DISABLE_PLUGINS=disabled)
    world.start()
    world.qmgr("import", str(make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")))
    args = ["run", "tiny", "abc", "--max-tokens", "1"] + (["--backend", flag] if flag else [])
    out = world.qmgr(*args).stdout
    assert ("echo: cba" in out) == (expected == "echo"), out
    [loaded] = world.json("ps")
    assert loaded["backend"] == expected


def test_no_backend_can_run_it_says_why(world: Env, tmp_path: Path) -> None:
    world.env.update(QMGR_DISABLE_PLUGINS="llama_backend")
    world.start()
    model = make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16", arch="qwen2")
    world.qmgr("import", str(model))
    r = world.qmgr("run", "tiny", "abc", check=False)
    assert r.returncode == 1, r
    assert "no installed backend can run this model" in r.stderr
    assert "echo: echo runs llama models only" in r.stderr, r.stderr
    r = world.qmgr("run", "tiny", "abc", "--backend", "nope", check=False)
    assert "no backend named 'nope' (installed: echo)" in r.stderr, r.stderr


def test_a_digest_is_trusted_only_from_a_quantizer_that_declares_it(world: Env,
                                                                   tmp_path: Path) -> None:
    world.start()
    world.qmgr("import", str(make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")))
    (ref,) = world.qmgr("quantize", "tiny:F16", "--to", "COPY", "--quantizer", "copy",
                        "-q").stdout.split()
    show = world.json("show", ref)
    # The plugin claimed 000...0; the daemon hashed the file itself.
    assert show["sha256"] != "0" * 64
    assert show["sha256"] == hash_file(Path(show["paths"][0]))[0]
    quantizers = {q["name"]: q for q in world.json("quantizers")}
    assert quantizers["copy"]["imatrix"] is True and quantizers["copy"]["reports_digest"] is False
    assert quantizers["numpy"]["imatrix"] is False


def test_importance_matrices_come_from_the_plugin_that_computes_them(world: Env,
                                                                     tmp_path: Path) -> None:
    world.env.update(QMGR_DISABLE_PLUGINS="llama_quantizer")
    world.start()
    world.qmgr("import", str(make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")))
    text = tmp_path / "calibration.txt"
    text.write_text("some words of calibration text " * 10)
    out = world.qmgr("imatrix", "tiny:F16", "--text", str(text), "-q", "--json").stdout
    result = json.loads(out.splitlines()[-1])["result"]  # the job, as it ended
    assert result["imatrix"]["computed_by"] == "copy"
    assert result["imatrix"]["tokens"] == 50
    # Without any quantizer that can, the error says which one would.
    world.stop()
    world.env.update(QMGR_PLUGINS="")
    world.start()
    r = world.qmgr("imatrix", "tiny:F16", "--text", str(text), check=False)
    assert r.returncode == 1 and "no installed quantizer computes importance matrices" in r.stderr


def test_a_raising_wrapper_is_reported_and_the_others_still_count(world: Env) -> None:
    world.env.update(QMGR_PLUGINS="contracts,wrapper")
    world.start()
    plugins = {p["name"]: p for p in world.json("plugins")}
    assert plugins["wrapper"]["errors"] == [
        "register_backends (a wrapper) raised RuntimeError: the wrapper broke"]
    assert plugins["contracts"]["errors"] == []
    assert plugins["contracts"]["distribution"] == "qmgr-test-contracts"
    assert sorted(plugins["contracts"]["provides"]) == ["backend:echo", "quantizer:copy",
                                                        "source:shelf"]
