"""The built-in sources end to end: an Ollama registry, plain URLs, cancelling, aliases.

Each group shares one real daemon (module scope: starting one costs more than its tests) and
talks to real HTTP servers on 127.0.0.1. Tests tell their rows apart by sha256, as each serves
its own bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from badmirror import BadMirror, random_file, sha256_of
from conftest import QMGR, Env, running_daemon, wait_for
from ggufmake import make_tiny_gguf
from ociregistry import OCIRegistry


def _env(**extra: str) -> Iterator[Env]:
    yield from running_daemon(QMGR_STALL_TIMEOUT="2", QMGR_RETRY_BACKOFF="0.05",
                              QMGR_RETRIES="2", **extra)


def rows_with(env: Env, sha256: str) -> list[dict[str, Any]]:
    return [r for r in env.json("list") if r["sha256"] == sha256]


def partials(env: Env) -> list[str]:
    d = env.home / "store" / "partial"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def store_files(env: Env) -> set[str]:
    store = env.home / "store"
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}


def failed(r: subprocess.CompletedProcess[str]) -> str:
    """The error a failed command printed: one ``Error: ...`` line last, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), r.stderr
    return last


def job(env: Env, job_id: int) -> dict[str, Any]:
    return next(j for j in env.json("jobs") if j["id"] == job_id)


# -- Ollama registry --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> Iterator[OCIRegistry]:
    server = OCIRegistry()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ollama_env() -> Iterator[Env]:
    yield from _env()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def test_ollama_pull_verifies_and_catalogs(ollama_env: Env, registry: OCIRegistry,
                                           models: Path) -> None:
    gguf = make_tiny_gguf(models / "ollama-tiny.gguf", ftype="Q8_0", seed=1)
    pushed = registry.add_model("library", "tiny", "latest", gguf, file_type="Q8_0")
    layer = pushed.manifest["layers"][0]
    assert layer["digest"] == f"sha256:{sha256_of(gguf)}"

    ref = f"ollama://{registry.host}/library/tiny"
    r = ollama_env.qmgr("pull", "--insecure", ref)
    assert r.stdout.strip() == "tiny:Q8_0"
    [row] = rows_with(ollama_env, pushed.model_sha256)
    assert (row["ref"], row["origin"], row["state"], row["quant_type"]) == (
        "tiny:Q8_0", "pulled", "ready", "Q8_0")
    assert row["size"] == layer["size"]
    assert Path(row["paths"][0]).read_bytes() == gguf.read_bytes()
    show = ollama_env.json("show", "tiny:Q8_0")
    assert show["source_ref"] == f"ollama://{registry.host}/library/tiny:latest"
    # The client asked for a manifest type it understands, and fetched the blob by digest.
    manifest_req = next(h for m, p, h in registry.requests if p.endswith("/manifests/latest"))
    assert "application/vnd.docker.distribution.manifest.v2+json" in manifest_req["Accept"]
    served = registry.blob_bytes_sent[pushed.model_sha256]
    assert served == pushed.model_size

    # The same model by its short form and explicit tag: the bytes are there, none fetched.
    r = ollama_env.qmgr("pull", "--insecure", f"ollama://{registry.host}/tiny:latest")
    assert r.stdout.strip() == "tiny:Q8_0" and "no download needed" in r.stderr
    assert registry.blob_bytes_sent[pushed.model_sha256] == served
    assert len(rows_with(ollama_env, pushed.model_sha256)) == 1
    assert partials(ollama_env) == []


def test_ollama_namespace_and_tag(ollama_env: Env, registry: OCIRegistry,
                                  models: Path) -> None:
    gguf = make_tiny_gguf(models / "small-f16.gguf", ftype="F16", seed=2)
    pushed = registry.add_model("someone", "small", "v2", gguf, file_type="F16")
    ref = f"ollama://{registry.host}/someone/small:v2"

    # Without --insecure the registry is spoken to in https, which a plain http one can't.
    before = store_files(ollama_env)
    r = ollama_env.qmgr("pull", ref, check=False)
    message = failed(r)
    assert f"https://{registry.host}/v2/someone/small/manifests/v2" in message
    assert rows_with(ollama_env, pushed.model_sha256) == []
    assert store_files(ollama_env) == before
    assert registry.blob_bytes_sent.get(pushed.model_sha256, 0) == 0

    r = ollama_env.qmgr("pull", "--insecure", ref)
    [row] = rows_with(ollama_env, pushed.model_sha256)
    # A tag other than latest is part of the model name; the quant comes from the header.
    assert row["ref"] == r.stdout.strip() == "small-v2:F16"
    assert row["quant_type"] == "F16" and row["origin"] == "pulled"
    assert ollama_env.json("show", row["ref"])["source_ref"] == ref


def test_ollama_plain_http_registry_without_insecure_says_so(ollama_env: Env,
                                                             registry: OCIRegistry,
                                                             models: Path) -> None:
    gguf = make_tiny_gguf(models / "plain.gguf", ftype="Q8_0", seed=7)
    registry.add_model("library", "plain", "latest", gguf)
    r = ollama_env.qmgr("pull", f"ollama://{registry.host}/plain", check=False)
    message = failed(r)
    assert "http" in message and "--insecure" in message


def test_ollama_variants_lists_the_model_layer(ollama_env: Env, registry: OCIRegistry,
                                               models: Path) -> None:
    gguf = make_tiny_gguf(models / "listed.gguf", ftype="Q8_0", seed=3)
    pushed = registry.add_model("library", "listed", "q8", gguf, file_type="Q8_0")
    out = ollama_env.json("variants", "--insecure", f"ollama://{registry.host}/listed:q8")
    assert out["ref"] == f"ollama://{registry.host}/library/listed:q8"
    [v] = out["variants"]
    assert (v["quant"], v["size"], v["sha256"]) == ("Q8_0", pushed.model_size,
                                                    pushed.model_sha256)
    assert [f["sha256"] for f in v["files"]] == [pushed.model_sha256]
    assert 8.0 < v["bits_per_weight"] < 9.0  # read from the blob's header by Range
    assert 0 < v["header_bytes"] < pushed.model_size
    # Listing is not pulling.
    assert rows_with(ollama_env, pushed.model_sha256) == []

    # The config blob is the one that names the quant: a registry saying F16 is believed.
    other = make_tiny_gguf(models / "listed-f16.gguf", ftype="F16", seed=4)
    registry.add_model("library", "listed", "f16", other, file_type="f16")
    out = ollama_env.json("variants", "--insecure", "--no-headers",
                          f"ollama://{registry.host}/listed:f16")
    assert [v["quant"] for v in out["variants"]] == ["F16"]


def test_ollama_malformed_digest_writes_nothing(ollama_env: Env, registry: OCIRegistry,
                                                models: Path) -> None:
    gguf = make_tiny_gguf(models / "evil.gguf", ftype="Q8_0", seed=5)
    registry.add_model("library", "evil", "latest", gguf, model_digest="sha256:../../x")
    before = store_files(ollama_env)
    rows = ollama_env.json("list")
    r = ollama_env.qmgr("pull", "--insecure", f"ollama://{registry.host}/evil", check=False)
    message = failed(r)
    assert "'sha256:../../x' is not sha256:<64 hex digits>" in message
    assert store_files(ollama_env) == before
    assert ollama_env.json("list") == rows
    assert not [p for p in registry.paths_requested() if ".." in p]
    [j] = [j for j in ollama_env.json("jobs") if "evil" in j["arguments"]["ref"]]
    assert (j["state"], j["error_code"]) == ("failed", "bad_digest")


def test_ollama_wrong_blob_bytes_are_deleted(ollama_env: Env, registry: OCIRegistry,
                                             models: Path) -> None:
    gguf = make_tiny_gguf(models / "liar.gguf", ftype="Q8_0", seed=6)
    pushed = registry.add_model("library", "liar", "latest", gguf, corrupt=True)
    r = ollama_env.qmgr("pull", "--insecure", f"ollama://{registry.host}/liar", check=False)
    message = failed(r)
    assert "sha256 mismatch" in message and pushed.model_sha256 in message
    assert registry.blob_bytes_sent[pushed.model_sha256] == pushed.model_size
    assert rows_with(ollama_env, pushed.model_sha256) == []
    assert partials(ollama_env) == []
    assert not any(pushed.model_sha256 in f for f in store_files(ollama_env))


# -- plain URLs, cancelling, aliases: one mirror, one daemon ------------------------------------


@pytest.fixture(scope="module")
def mirror_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mirror")
    (root / "test" / "tiny").mkdir(parents=True)
    (root / "test" / "other").mkdir(parents=True)
    (root / "test" / "big").mkdir(parents=True)
    (root / "test" / "two").mkdir(parents=True)
    make_tiny_gguf(root / "test" / "tiny" / "tiny-Q8_0.gguf", ftype="Q8_0", seed=10)
    make_tiny_gguf(root / "test" / "other" / "other-Q8_0.gguf", ftype="Q8_0", seed=11)
    for name, seed in (("base-Q8_0.gguf", 12), ("instruct-Q8_0.gguf", 13)):
        make_tiny_gguf(root / "test" / "two" / name, ftype="Q8_0", seed=seed)
    # Cancelled before it ends, so the content does not matter: random bytes, a few MB.
    random_file(root / "test" / "big" / "big-Q8_0.gguf", 4 << 20)
    return root


@pytest.fixture(scope="module")
def module_mirror(mirror_root: Path) -> Iterator[BadMirror]:
    server = BadMirror(mirror_root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mirror(module_mirror: BadMirror) -> Iterator[BadMirror]:
    module_mirror.behavior.clear()
    yield module_mirror
    module_mirror.behavior.clear()


@pytest.fixture(scope="module")
def url_env(module_mirror: BadMirror) -> Iterator[Env]:
    yield from _env(QMGR_HF_ENDPOINT=module_mirror.url)


def resolve_url(mirror: BadMirror, repo: str, name: str) -> str:
    return f"{mirror.url}/test/{repo}/resolve/main/{name}"


def test_url_pull_records_the_digest(url_env: Env, mirror: BadMirror, mirror_root: Path) -> None:
    src = mirror_root / "test" / "tiny" / "tiny-Q8_0.gguf"
    url = resolve_url(mirror, "tiny", "tiny-Q8_0.gguf")

    sent = mirror.bytes_sent
    r = url_env.qmgr("pull", url, check=False)
    message = failed(r)
    assert "refusing plain http" in message and "--insecure" in message
    assert rows_with(url_env, sha256_of(src)) == []
    assert mirror.bytes_sent == sent

    r = url_env.qmgr("pull", "--insecure", url)
    [row] = rows_with(url_env, sha256_of(src))
    assert row["ref"] == r.stdout.strip() == "tiny:Q8_0"
    assert (row["origin"], row["size"]) == ("pulled", src.stat().st_size)
    assert Path(row["paths"][0]).read_bytes() == src.read_bytes()
    assert url_env.json("show", "tiny:Q8_0")["source_ref"] == url
    assert partials(url_env) == []


def test_url_pull_with_sha256(url_env: Env, mirror: BadMirror, mirror_root: Path) -> None:
    src = mirror_root / "test" / "other" / "other-Q8_0.gguf"
    right = sha256_of(src)
    wrong = hashlib.sha256(b"some other file").hexdigest()  # bytes the store does not hold
    url = resolve_url(mirror, "other", "other-Q8_0.gguf")

    before = store_files(url_env)
    r = url_env.qmgr("pull", "--insecure", "--sha256", wrong, url, check=False)
    message = failed(r)
    assert "sha256 mismatch" in message and right in message
    assert rows_with(url_env, right) == [] and partials(url_env) == []
    assert store_files(url_env) == before

    url_env.qmgr("pull", "--insecure", "--sha256", right.upper(), url)
    [row] = rows_with(url_env, right)
    assert row["ref"] == "other:Q8_0"
    assert Path(row["paths"][0]).read_bytes() == src.read_bytes()

    r = url_env.qmgr("pull", "--insecure", "--sha256", "abc", url, check=False)
    assert "64 hex digits" in failed(r)


def test_url_with_query_string_names_the_model_by_its_file(url_env: Env, mirror: BadMirror,
                                                             mirror_root: Path) -> None:
    src = mirror_root / "test" / "tiny" / "tiny-Q8_0.gguf"
    url = resolve_url(mirror, "tiny", "tiny-Q8_0.gguf") + "?download=true"
    out = url_env.qmgr("pull", "--insecure", "--json", url).stdout.splitlines()
    variant = json.loads(out[-1])["result"]["variant"]
    assert variant["sha256"] == sha256_of(src)
    assert (variant["model"], variant["tag"]) == ("tiny", "Q8_0")


def test_two_files_of_one_quant_are_ambiguous(url_env: Env, mirror: BadMirror,
                                              mirror_root: Path) -> None:
    offered = url_env.json("variants", "--no-headers", "hf.co/test/two")["variants"]
    assert [v["quant"] for v in offered] == ["Q8_0", "Q8_0"]
    r = url_env.qmgr("pull", "hf.co/test/two:Q8_0", check=False)
    message = failed(r)
    assert "base-Q8_0.gguf" in message and "instruct-Q8_0.gguf" in message
    assert not any(sha256_of(f) == row["sha256"] for f in (mirror_root / "test" / "two").iterdir()
                   for row in url_env.json("list"))


def _start_slow_pull(mirror: BadMirror) -> None:
    # 4 MiB at 512 KiB/s: seconds of downloading to watch and cancel, in 256 KiB steps.
    mirror.behavior["rate"] = 512 << 10


def _downloading(env: Env, job_id: int) -> dict[str, Any] | None:
    j = job(env, job_id)
    p = j["progress"]
    return j if j["state"] == "running" and (p.get("done") or 0) > 0 else None


def test_cancel_a_detached_pull(url_env: Env, mirror: BadMirror, mirror_root: Path) -> None:
    big = mirror_root / "test" / "big" / "big-Q8_0.gguf"
    size = big.stat().st_size
    _start_slow_pull(mirror)
    sent = mirror.bytes_sent

    r = url_env.qmgr("pull", "--detach", "hf.co/test/big:Q8_0")
    assert r.stdout == ""
    job_id = int(re.search(r"job (\d+) pulling", r.stderr)[1])  # type: ignore[index]
    running = wait_for("progress", lambda: _downloading(url_env, job_id))
    p = running["progress"]
    assert p["phase"] == "downloading" and p["total"] == size and 0 < p["done"] < size

    r = url_env.qmgr("cancel", str(job_id))
    assert r.stdout.strip() == f"cancelling job {job_id}"
    ended = wait_for("the cancel", lambda: (j := job(url_env, job_id))["state"] != "running"
                     and j)
    assert (ended["state"], ended["error_code"]) == ("cancelled", "cancelled")
    assert rows_with(url_env, sha256_of(big)) == []
    assert partials(url_env) == []
    assert mirror.bytes_sent - sent < size  # it stopped before the end
    r = url_env.qmgr("cancel", str(job_id), check=False)
    assert "already cancelled" in failed(r)

    # The daemon goes on serving: the next pull works.
    mirror.behavior.clear()
    url_env.qmgr("pull", "--insecure", resolve_url(mirror, "tiny", "tiny-Q8_0.gguf"))


def test_url_pull_progress_has_a_total(url_env: Env, mirror: BadMirror,
                                       mirror_root: Path) -> None:
    size = (mirror_root / "test" / "big" / "big-Q8_0.gguf").stat().st_size
    _start_slow_pull(mirror)
    out = url_env.json("pull", "--insecure", "--detach",
                       resolve_url(mirror, "big", "big-Q8_0.gguf"))
    try:
        running = wait_for("progress", lambda: _downloading(url_env, out["id"]))
        assert running["progress"]["total"] == size
    finally:
        url_env.qmgr("cancel", str(out["id"]))
        wait_for("the cancel", lambda: job(url_env, out["id"])["state"] != "running")
    assert partials(url_env) == []


def test_interrupted_pull_without_a_tty_is_cancelled(url_env: Env, mirror: BadMirror,
                                                     mirror_root: Path) -> None:
    big = mirror_root / "test" / "big" / "big-Q8_0.gguf"
    _start_slow_pull(mirror)
    known = {j["id"] for j in url_env.json("jobs")}
    proc = subprocess.Popen([QMGR, "pull", "hf://test/big/big-Q8_0.gguf"], env=url_env.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        job_id = wait_for("the job", lambda: next(
            (j["id"] for j in url_env.json("jobs") if j["id"] not in known), None))
        wait_for("progress", lambda: _downloading(url_env, job_id))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # No terminal to ask on: the client cancels rather than leave a job running unseen.
    assert proc.returncode == 130, err
    assert f"cancelled job {job_id}" in err and "Traceback" not in err
    assert out == ""
    ended = wait_for("the cancel", lambda: (j := job(url_env, job_id))["state"] != "running"
                     and j)
    assert ended["state"] == "cancelled"
    assert rows_with(url_env, sha256_of(big)) == []
    assert partials(url_env) == []


def test_aliases(url_env: Env, mirror: BadMirror, mirror_root: Path) -> None:
    table = {a["name"]: a for a in url_env.json("alias", "list")}
    for name in ("llama3", "qwen2.5", "gemma3", "mistral", "phi3", "phi4", "deepseek-r1"):
        assert table[name]["builtin"] is True, name
        assert table[name]["reference"].startswith("hf.co/"), table[name]
    original = table["llama3"]["reference"]

    # A user alias of a built-in name wins: the pull goes to the mirror, named as typed.
    r = url_env.qmgr("alias", "add", "llama3", "hf.co/test/tiny")
    assert r.stdout.strip() == "llama3 -> hf.co/test/tiny"
    mine = {a["name"]: a for a in url_env.json("alias", "list")}["llama3"]
    assert mine == {"name": "llama3", "reference": "hf.co/test/tiny", "builtin": False}
    assert url_env.qmgr("pull", "llama3:Q8_0").stdout.strip() == "llama3:Q8_0"
    [row] = [r for r in url_env.json("list") if r["ref"] == "llama3:Q8_0"]
    assert row["sha256"] == sha256_of(mirror_root / "test" / "tiny" / "tiny-Q8_0.gguf")

    # Removing it brings the built-in back; a built-in itself cannot be removed.
    assert url_env.qmgr("alias", "rm", "llama3").stdout.strip() == "removed alias llama3"
    back = {a["name"]: a for a in url_env.json("alias", "list")}["llama3"]
    assert back == {"name": "llama3", "reference": original, "builtin": True}
    message = failed(url_env.qmgr("alias", "rm", "llama3", check=False))
    assert "built-in names cannot be removed" in message
    assert "built-in names cannot be removed" in failed(
        url_env.qmgr("alias", "rm", "qwen2.5", check=False))

    # An alias stands for a repository, or for a cataloged variant, kept by its catalog name
    # (whatever name found it); a name that finds nothing is refused.
    url_env.qmgr("alias", "add", "mine", "hf.co/test/tiny")
    for target in ("llama3", "llama3:Q8_0", "mine", "mine:Q8_0"):
        r = url_env.qmgr("alias", "add", "chain", target)
        assert r.stdout.strip() == "chain -> llama3:Q8_0", target
    assert url_env.qmgr("path", "chain").stdout.strip() == row["paths"][0]
    for target in ("nothing-here", "llama3:Q2_K"):
        message = failed(url_env.qmgr("alias", "add", "other", target, check=False))
        assert "not in the catalog" in message, target
    for bad_name in ("a/b", "x:Q8_0", "../x"):
        failed(url_env.qmgr("alias", "add", bad_name, "hf.co/test/tiny", check=False))
    names = {a["name"] for a in url_env.json("alias", "list") if not a["builtin"]}
    assert names == {"mine", "chain"}
