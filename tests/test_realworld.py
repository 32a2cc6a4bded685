"""qmgr end to end against replays of the real registries (tests/hubreplay.py).

The Hub replay serves a bartowski-style repository (a listing in two pages, an importance
matrix, lower-case ``f16``, a Q8_0 split in a folder) and an Unsloth-style vision repository
(``UD-*`` quants, BF16 shards in a folder, three ``mmproj-*`` projectors, Ollama's ``params``
and ``template``, images with spaces and brackets in their names), and sends downloads to a
CDN on another port that refuses any request carrying ``Authorization``. The Ollama replay
serves recorded manifests with projector, params, license, template and system layers.
Each group shares one daemon; tests tell their own requests apart by counting from where the
request log stood when they began.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import Env, running_daemon
from hubreplay import (
    BARTOWSKI,
    UNSLOTH,
    HubReplay,
    OllamaReplay,
    ReplayRepo,
    Request,
    quant_in_name,
)
from ociregistry import MODEL_TYPE, PROJECTOR_TYPE, SYSTEM_TYPE
from test_sources import failed

HW = "ram=16GiB,cores=4"


def _env(**extra: str) -> Iterator[Env]:
    yield from running_daemon(QMGR_STALL_TIMEOUT="5", QMGR_RETRY_BACKOFF="0.05",
                              QMGR_RETRIES="2", QMGR_HW=HW, **extra)



def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def blobs(env: Env) -> set[str]:
    """The sha256 of every blob in the store."""
    d = env.home / "store" / "blobs"
    return {p.name.removeprefix("sha256-") for p in d.iterdir()} if d.exists() else set()


def quants_of(repo: ReplayRepo) -> set[str]:
    """The variants a repository offers, as its file names announce them (upper case)."""
    return {q.upper() for p in repo.files if p.endswith(".gguf")
            and not p.rsplit("/", 1)[-1].startswith("mmproj") and (q := quant_in_name(p))}


def files_of(repo: ReplayRepo, quant: str) -> list[str]:
    """The model files of one variant (its shards, in order)."""
    return sorted(p for p in repo.files if p.endswith(".gguf")
                  and not p.rsplit("/", 1)[-1].startswith("mmproj")
                  and (quant_in_name(p) or "").upper() == quant)


class Log:
    """What a replay was asked from the moment the test began."""

    def __init__(self, hub: HubReplay):
        self.hub = hub
        self.hub_at = len(hub.requests)
        self.cdn_at = len(hub.cdn.requests)

    def hub_requests(self) -> list[Request]:
        return self.hub.requests[self.hub_at:]

    def cdn_requests(self) -> list[Request]:
        return self.hub.cdn.requests[self.cdn_at:]

    def resolves(self, repo: str) -> set[str]:
        """Repository paths asked for through ``resolve`` since the test began."""
        return set(self.hub.resolved(repo, self.hub_at))

    def downloads(self, repo: str) -> set[str]:
        """Repository paths the CDN served bytes of (in part or whole) since then."""
        return set(self.hub.served(repo, self.cdn_at))


# -- one replay, one daemon ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubReplay]:
    with HubReplay(tmpdir=tmp_path_factory.mktemp("hub"), tls=True) as replay:
        yield replay


@pytest.fixture(scope="module")
def world(hub: HubReplay) -> Iterator[Env]:
    yield from _env(QMGR_HF_ENDPOINT=hub.url, QMGR_CA_BUNDLE=str(hub.ca_bundle))


def test_variants_of_a_vision_repository(world: Env, hub: HubReplay) -> None:
    repo = hub.repo(UNSLOTH)
    log = Log(hub)
    out = world.json("variants", "--no-headers", f"hf.co/{UNSLOTH}")
    assert UNSLOTH in out["ref"]
    quants = [v["quant"] for v in out["variants"]]
    assert len(quants) == len(set(quants))  # one entry per variant
    assert set(quants) == quants_of(repo)
    assert {"UD-Q4_K_XL", "BF16", "IQ4_NL", "Q2_K", "Q2_K_L"} <= set(quants)
    by_quant = {v["quant"]: v for v in out["variants"]}
    assert [f["name"] for f in by_quant["BF16"]["files"]] == files_of(repo, "BF16")
    assert len(by_quant["BF16"]["files"]) == 2
    for v in out["variants"]:
        for f in v["files"]:
            assert "mmproj" not in f["name"]
            assert (f["size"], f["sha256"]) == (repo.files[f["name"]].size,
                                                repo.files[f["name"]].sha256)
    projectors = {p["name"]: p for p in out["projectors"]}
    assert set(projectors) == {"mmproj-BF16.gguf", "mmproj-F16.gguf", "mmproj-F32.gguf"}
    for name, p in projectors.items():
        assert (p["size"], p["sha256"]) == (repo.files[name].size, repo.files[name].sha256)
    extras = {e["name"]: e["size"] for e in out["extras"]}
    assert extras == {p: f.size for p, f in repo.files.items() if not p.endswith(".gguf")}
    assert "images/Screenshot (1).png" in extras and "params" in extras
    assert out["skipped"] == []
    # Listing is not fetching: no file was asked for.
    assert log.resolves(UNSLOTH) == set() and log.cdn_requests() == []


def test_variants_of_a_listing_in_two_pages_with_headers(world: Env, hub: HubReplay) -> None:
    repo = hub.repo(BARTOWSKI)
    log = Log(hub)
    out = world.json("variants", f"hf.co/{BARTOWSKI}")
    pages = [r for r in log.hub_requests() if r.path == f"/api/models/{BARTOWSKI}/tree/main"]
    assert len(pages) == 2 and "cursor" in pages[1].query
    by_quant = {v["quant"]: v for v in out["variants"]}
    assert set(by_quant) == quants_of(repo)
    assert "F16" in by_quant and "f16" not in by_quant  # Meta-Llama-3-8B-Instruct-f16.gguf
    assert {"IQ4_NL", "IQ1_S", "Q3_K_L"} <= set(by_quant)
    assert [f["name"] for f in by_quant["Q8_0"]["files"]] == [
        "Meta-Llama-3-8B-Instruct-Q8_0/Meta-Llama-3-8B-Instruct-Q8_0-00001-of-00002.gguf",
        "Meta-Llama-3-8B-Instruct-Q8_0/Meta-Llama-3-8B-Instruct-Q8_0-00002-of-00002.gguf"]
    assert out["projectors"] == []
    assert {e["name"] for e in out["extras"]} == {
        ".gitattributes", "README.md", "Meta-Llama-3-8B-Instruct.imatrix"}
    # Each header was read by Range from the CDN the Hub redirected to.
    for v in out["variants"]:
        assert "header_error" not in v, v
        assert v["bits_per_weight"] and 0 < v["header_bytes"] <= v["files"][0]["size"]
    assert log.downloads(BARTOWSKI) <= {f for q in by_quant for f in files_of(repo, q)}
    assert all(r.header("Range") for r in log.cdn_requests() if r.method == "GET")


def test_pull_fetches_one_variant_and_one_projector(world: Env, hub: HubReplay) -> None:
    repo = hub.repo(UNSLOTH)
    ref = f"hf.co/{UNSLOTH}:Q4_K_M"
    log = Log(hub)
    world.qmgr("pull", ref)
    wanted = {"gemma-3-4b-it-Q4_K_M.gguf", "mmproj-F16.gguf"}
    assert log.resolves(UNSLOTH) == wanted  # no README, .gitattributes or other quant
    assert log.downloads(UNSLOTH) == wanted
    show = world.json("show", ref)
    assert show["sha256"] == repo.files["gemma-3-4b-it-Q4_K_M.gguf"].sha256
    [attachment] = show["attachments"]
    projector = repo.files["mmproj-F16.gguf"]
    assert {k: attachment[k] for k in ("kind", "name", "sha256")} == {
        "kind": "projector", "name": "mmproj-F16.gguf", "sha256": projector.sha256}
    assert sha256_of(attachment["path"]) == projector.sha256
    path = world.qmgr("path", ref).stdout.strip()
    assert sha256_of(path) == repo.files["gemma-3-4b-it-Q4_K_M.gguf"].sha256
    rows = world.json("list")
    assert all("source_ref" in r for r in rows)
    assert [r["source_ref"] for r in rows if r["sha256"] == show["sha256"]] == [ref]
    world.qmgr("rm", ref)
    assert not [r for r in world.json("list") if r["sha256"] == show["sha256"]]


@pytest.mark.parametrize("repo_name,quant,projector", [(BARTOWSKI, "Q8_0", None),
                                                       (UNSLOTH, "BF16", "mmproj-F16.gguf")])
def test_a_folder_of_shards_pulls_as_one_variant(world: Env, hub: HubReplay, repo_name: str,
                                                 quant: str, projector: str | None) -> None:
    repo = hub.repo(repo_name)
    shards = files_of(repo, quant)
    assert len(shards) == 2 and all("/" in s for s in shards)
    ref = f"hf.co/{repo_name}:{quant}"
    log = Log(hub)
    world.qmgr("pull", ref)
    assert set(shards) <= log.downloads(repo_name) <= {*shards, *([projector] if projector else [])}
    paths = world.qmgr("path", "--all-shards", ref).stdout.split()
    assert [sha256_of(p) for p in paths] == [repo.files[s].sha256 for s in shards]
    show = world.json("show", ref)
    assert show["size"] == sum(repo.files[s].size for s in shards)
    assert [a["name"] for a in show.get("attachments") or []] == ([projector] if projector else [])


def test_fit_and_pull_fit_choose_among_quants_only(world: Env, hub: HubReplay) -> None:
    repo = hub.repo(UNSLOTH)
    fit = world.json("fit", f"hf.co/{UNSLOTH}")
    assert fit["pick"] in quants_of(repo)
    assert {o["quant"] for o in fit["options"]} <= quants_of(repo)
    world.qmgr("alias", "add", "mine", f"hf.co/{UNSLOTH}")
    before = blobs(world)
    # The decision comes first on stdout, the pulled variant's name last.
    pulled = world.qmgr("pull", "mine", "--fit").stdout.strip().splitlines()[-1]
    pick = pulled.rpartition(":")[2]
    assert pick in quants_of(repo)
    # Fit read every variant's header (by Range); only the pick and its projector were stored.
    assert blobs(world) - before <= {repo.files[p].sha256
                                     for p in [*files_of(repo, pick), "mmproj-F16.gguf"]}
    path = world.qmgr("path", "mine").stdout.strip()
    assert sha256_of(path) == repo.files[files_of(repo, pick)[0]].sha256
    rows = [r for r in world.json("list") if r["ref"] == pulled]
    assert [r["source_ref"] for r in rows] == [f"hf.co/{UNSLOTH}:{pick}"]


# -- the token: from the client, to the Hub only --------------------------------------------------


@pytest.mark.reliability
def test_the_clients_token_goes_to_the_hub_never_to_the_cdn(qenv: Env, tmp_path: Path) -> None:
    with HubReplay([UNSLOTH], tmp_path / "hub", token="secret", tls=True) as gated:
        qenv.env.pop("HF_TOKEN", None)
        qenv.env.update(QMGR_HF_ENDPOINT=gated.url, QMGR_HW=HW, QMGR_RETRIES="1",
                        QMGR_RETRY_BACKOFF="0.05", QMGR_CA_BUNDLE=str(gated.ca_bundle))
        qenv.start()  # the daemon's environment has no token
        ref = f"hf.co/{UNSLOTH}:Q4_K_M"
        message = failed(qenv.qmgr("pull", ref, check=False))
        assert "HF_TOKEN" in message
        log = Log(gated)
        qenv.env["HF_TOKEN"] = "secret"  # the client's only
        qenv.qmgr("pull", ref)
        assert log.hub_requests()
        assert {r.header("Authorization") for r in log.hub_requests()} == {"Bearer secret"}
        assert log.cdn_requests()
        assert not any(r.header("Authorization") for r in log.cdn_requests())
        assert {r.status for r in log.cdn_requests()} <= {200, 206}
        assert log.downloads(UNSLOTH) == {"gemma-3-4b-it-Q4_K_M.gguf", "mmproj-F16.gguf"}
        assert "secret" not in qenv.daemon_log()


# -- a listing that lies ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def liar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubReplay]:
    with HubReplay([UNSLOTH], tmp_path_factory.mktemp("liar"), tls=True) as replay:
        yield replay


@pytest.fixture(scope="module")
def lied_to(liar: HubReplay) -> Iterator[Env]:
    yield from _env(QMGR_HF_ENDPOINT=liar.url, QMGR_CA_BUNDLE=str(liar.ca_bundle))


@contextmanager
def tampered(replay: HubReplay, path: str, /, **changes: Any) -> Iterator[dict[str, Any]]:
    repo = replay.repo(UNSLOTH)
    entry = repo.entry(path)
    saved = json.loads(json.dumps(entry))
    try:
        yield repo.patch(path, **changes)
    finally:
        entry.clear()
        entry.update(saved)


Q4 = "gemma-3-4b-it-Q4_K_M.gguf"
SHARD2 = "BF16/gemma-3-4b-it-BF16-00002-of-00002.gguf"


@pytest.mark.reliability
@pytest.mark.parametrize("path,changes,quant,named", [
    (Q4, {"path": f"../{Q4}"}, "Q4_K_M", f"../{Q4}"),
    (Q4, {"path": f"/{Q4}"}, "Q4_K_M", f"/{Q4}"),
    (Q4, {"lfs": {"oid": "not-a-sha256"}}, "Q4_K_M", Q4),
    (SHARD2, {"lfs": {"oid": "Z" * 64}}, "BF16", SHARD2),
], ids=["dotdot", "absolute", "digest", "digest-of-a-shard"])
def test_a_bad_entry_of_the_wanted_variant_is_a_clear_error(
        lied_to: Env, liar: HubReplay, path: str, changes: dict[str, Any], quant: str,
        named: str) -> None:
    rows = lied_to.json("list")
    log = Log(liar)
    with tampered(liar, path, **changes):
        message = failed(lied_to.qmgr("pull", f"hf.co/{UNSLOTH}:{quant}", check=False))
    assert named in message
    assert lied_to.json("list") == rows
    assert log.downloads(UNSLOTH) <= {"mmproj-F16.gguf"}  # not a byte of the refused file
    assert not [r for r in log.hub_requests() if ".." in r.path or "//" in r.path]


@pytest.mark.reliability
@pytest.mark.parametrize("path,changes,named", [
    ("README.md", {"path": "../README.md"}, "../README.md"),
    ("README.md", {"path": "/etc/passwd"}, "/etc/passwd"),
    ("images/Screenshot (1).png", {"lfs": {"oid": "not-hex"}}, "images/Screenshot (1).png"),
], ids=["dotdot", "absolute", "digest"])
def test_a_bad_extra_entry_is_skipped(lied_to: Env, liar: HubReplay, path: str,
                                      changes: dict[str, Any], named: str) -> None:
    log = Log(liar)
    with tampered(liar, path, **changes):
        out = lied_to.json("variants", "--no-headers", f"hf.co/{UNSLOTH}")
        [skipped] = out["skipped"]
        assert skipped["name"] == named and skipped["why"]
        assert named not in {e["name"] for e in out["extras"]}
        assert len(out["variants"]) == len(quants_of(liar.repo(UNSLOTH)))
        pulled = lied_to.qmgr("pull", f"hf.co/{UNSLOTH}:Q4_0").stdout.strip()
    try:
        assert log.downloads(UNSLOTH) <= {"gemma-3-4b-it-Q4_0.gguf", "mmproj-F16.gguf"}
        assert not [r for r in log.hub_requests() if ".." in r.path or "/etc/" in r.path]
    finally:
        lied_to.qmgr("rm", pulled)  # so that the next case lists the repository again


# -- the Ollama registry ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> Iterator[OllamaReplay]:
    with OllamaReplay() as replay:
        yield replay


@pytest.fixture(scope="module")
def ollama_world() -> Iterator[Env]:
    yield from _env()


def test_ollama_model_with_a_projector(ollama_world: Env, registry: OllamaReplay) -> None:
    llava = registry.models["library/llava:latest"]
    model = llava.digest(MODEL_TYPE)
    projector = llava.digest(PROJECTOR_TYPE)
    ref = f"ollama://{registry.host}/library/llava:latest"
    offered = ollama_world.json("variants", "--insecure", "--no-headers", ref)
    assert [v["sha256"] for v in offered["variants"]] == [model]  # one model layer, no other
    cdn_at = len(registry.cdn.requests)
    pulled = ollama_world.qmgr("pull", "--insecure", ref).stdout.strip()
    [row] = [r for r in ollama_world.json("list") if r["ref"] == pulled]
    assert row["sha256"] == model and row["quant_type"] == "Q4_0"
    [attachment] = ollama_world.json("show", pulled)["attachments"]
    assert (attachment["kind"], attachment["sha256"]) == ("projector", projector)
    assert sha256_of(attachment["path"]) == projector
    # The blobs came from the CDN the registry redirected to, which got no credentials.
    cdn = registry.cdn.requests[cdn_at:]
    fetched = {r.path.rsplit("/", 2)[1] for r in cdn if r.status in (200, 206)}
    assert {model, projector} <= fetched
    assert not any(r.header("Authorization") for r in cdn)
    # Template, license and params are no model: nothing cataloged has their bytes.
    others = {llava.digest(m) for m in llava.layers} - {model, projector}
    assert len(others) == 3
    assert not others & {r["sha256"] for r in ollama_world.json("list")}


def test_ollama_model_with_a_system_layer(ollama_world: Env, registry: OllamaReplay) -> None:
    llama3 = registry.models["library/llama3:8b"]
    assert SYSTEM_TYPE in llama3.layers and PROJECTOR_TYPE not in llama3.layers
    model = llama3.digest(MODEL_TYPE)
    pulled = ollama_world.qmgr("pull", "--insecure",
                               f"ollama://{registry.host}/library/llama3:8b").stdout.strip()
    [row] = [r for r in ollama_world.json("list") if r["ref"] == pulled]
    assert row["sha256"] == model
    assert not ollama_world.json("show", pulled).get("attachments")


@pytest.mark.reliability
def test_a_hub_file_without_an_lfs_digest_is_pulled_unverified(liar: HubReplay) -> None:
    """A listing entry without an LFS digest: nothing vouches for the bytes before they come,
    so the variant is cataloged as unverified (as a URL without --sha256 is)."""
    entry = liar.repo(UNSLOTH).entry(Q4)
    saved = json.loads(json.dumps(entry))
    try:
        entry.pop("lfs", None)
        entry.pop("xetHash", None)
        for env in _env(QMGR_HF_ENDPOINT=liar.url, QMGR_CA_BUNDLE=str(liar.ca_bundle)):
            env.qmgr("pull", f"hf.co/{UNSLOTH}:Q4_K_M")
            [row] = [r for r in env.json("list") if r["tag"] == "Q4_K_M"]
            assert row["verified"] is False and row["state"] == "ready"
            assert sha256_of(row["paths"][0]) == liar.repo(UNSLOTH).files[Q4].sha256
            assert "unverified" in env.qmgr("show", row["ref"]).stdout
    finally:
        entry.clear()
        entry.update(saved)
