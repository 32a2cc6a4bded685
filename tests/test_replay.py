"""The replays of tests/hubreplay.py answer like the recordings they are built from.

Plain HTTP (httpx) checks the Hub's pages, errors, redirects and the CDN's refusals; where the
``huggingface_hub`` package is installed, the Hub's own client is pointed at the replay too.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from gguf import GGUFReader
from hubreplay import (
    BARTOWSKI,
    HUB_FIXTURES,
    OLLAMA_FIXTURES,
    UNSLOTH,
    HubReplay,
    OllamaReplay,
    git_blob_id,
    lfs_pointer,
)
from ociregistry import MANIFEST_TYPE, MODEL_TYPE, PARAMS_TYPE, PROJECTOR_TYPE, TEMPLATE_TYPE


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubReplay]:
    with HubReplay(tmpdir=tmp_path_factory.mktemp("hub")) as replay:
        yield replay


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(follow_redirects=False, timeout=10) as client:
        yield client


def recorded_pages(repo: str) -> list[list[dict[str, Any]]]:
    meta = json.loads((HUB_FIXTURES / repo / "repo.json").read_text())
    return [json.loads((HUB_FIXTURES / repo / p).read_text()) for p in meta["pages"]]


def tree_url(replay: HubReplay, repo: str, sub: str = "", **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{replay.url}/api/models/{repo}/tree/main{'/' + quote(sub, safe='') if sub else ''}" \
        + (f"?{q}" if q else "")


def all_pages(client: httpx.Client, url: str) -> list[list[dict[str, Any]]]:
    pages = []
    next_url: str | None = url
    while next_url:
        r = client.get(next_url)
        assert r.status_code == 200, r.text
        pages.append(r.json())
        next_url = r.links.get("next", {}).get("url")
    return pages


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(client: httpx.Client, replay: HubReplay, repo: str, path: str,
             headers: dict[str, str] | None = None) -> bytes:
    r = client.get(f"{replay.url}/{repo}/resolve/main/{quote(path)}", headers=headers or {})
    if r.status_code == 302:
        r = client.get(r.headers["location"])
    assert r.status_code == 200, r.text
    return r.content


# -- listings -----------------------------------------------------------------------------------


def test_recursive_listing_is_served_in_the_recorded_pages(hub: HubReplay,
                                                           http: httpx.Client) -> None:
    recorded = recorded_pages(BARTOWSKI)
    assert len(recorded) == 2
    pages = all_pages(http, tree_url(hub, BARTOWSKI, recursive="true"))
    assert [len(p) for p in pages] == [len(p) for p in recorded]
    assert [e["path"] for p in pages for e in p] == [e["path"] for p in recorded for e in p]
    assert [e["type"] for p in pages for e in p] == [e["type"] for p in recorded for e in p]
    # The second page's URL came from the Link header and kept the query.
    tree_gets = [r for r in hub.requests if r.path.endswith(f"{BARTOWSKI}/tree/main")]
    assert tree_gets[-1].query["recursive"] == ["true"] and "cursor" in tree_gets[-1].query


def test_listing_sizes_and_digests_are_the_served_bytes(hub: HubReplay,
                                                        http: httpx.Client) -> None:
    entries = [e for p in all_pages(http, tree_url(hub, UNSLOTH, recursive="true")) for e in p]
    files = [e for e in entries if e["type"] == "file"]
    assert {e["path"] for e in files} == set(hub.repo(UNSLOTH).files)
    for e in files:
        data = download(http, hub, UNSLOTH, e["path"])
        assert e["size"] == len(data), e["path"]
        if "lfs" in e:
            assert e["lfs"] == {"oid": sha256(data), "size": len(data),
                                "pointerSize": len(lfs_pointer(sha256(data), len(data)))}
            assert e["oid"] == git_blob_id(lfs_pointer(sha256(data), len(data)))
            assert list(e) == ["type", "oid", "size", "lfs", "xetHash", "path"]
        else:
            assert e["oid"] == git_blob_id(data)
    # Recorded entries that had a xetHash still have one (a 64-hex stand-in), the others not.
    recorded = {e["path"]: e for p in recorded_pages(UNSLOTH) for e in p}
    for e in files:
        assert ("xetHash" in e) == ("xetHash" in recorded[e["path"]])
        assert "xetHash" not in e or len(e["xetHash"]) == 64


@pytest.mark.parametrize("page_size", [1, 5, 1000])
def test_page_size_splits_any_listing(tmp_path: Path, page_size: int) -> None:
    with HubReplay([UNSLOTH], tmp_path, page_size=page_size) as replay, httpx.Client() as c:
        pages = all_pages(c, tree_url(replay, UNSLOTH, recursive="true", expand="false"))
        n = len(replay.repo(UNSLOTH).entries())
        assert len(pages) == math.ceil(n / page_size)
        assert [e["path"] for p in pages for e in p] == [
            e["path"] for e in replay.repo(UNSLOTH).entries()]
        bad = c.get(tree_url(replay, UNSLOTH, recursive="true", cursor="not-a-cursor"))
        assert bad.status_code == 400


def test_folders_and_paths(hub: HubReplay, http: httpx.Client) -> None:
    top = http.get(tree_url(hub, UNSLOTH)).json()
    assert all("/" not in e["path"] for e in top)
    folders = [e for e in top if e["type"] == "directory"]
    assert {e["path"] for e in folders} == {"BF16", "images"}
    assert all(e["size"] == 0 and len(e["oid"]) == 40 and "lfs" not in e for e in folders)
    inside = http.get(tree_url(hub, UNSLOTH, "BF16")).json()
    assert [e["path"] for e in inside] == ["BF16/gemma-3-4b-it-BF16-00001-of-00002.gguf",
                                           "BF16/gemma-3-4b-it-BF16-00002-of-00002.gguf"]
    expanded = http.get(tree_url(hub, UNSLOTH, "images", expand="true")).json()
    assert {e["path"] for e in expanded} == {"images/Screenshot (1).png",
                                             "images/gemma 3 [chat template].png"}
    assert all(e["lastCommit"]["id"] == hub.repo(UNSLOTH).commit for e in expanded)


@pytest.mark.parametrize("url,auth,status,code", [
    ("/api/models/unsloth/gemma-3-4b-it-GGUF/tree/main/nothing", False, 404, "EntryNotFound"),
    ("/api/models/unsloth/gemma-3-4b-it-GGUF/tree/v9", False, 404, "RevisionNotFound"),
    ("/unsloth/gemma-3-4b-it-GGUF/resolve/main/nothing.gguf", False, 404, "EntryNotFound"),
    ("/api/models/someone/missing/tree/main", False, 401, "RepoNotFound"),
    ("/api/models/someone/missing/tree/main", True, 404, "RepoNotFound"),
])
def test_errors_say_what_the_hub_says(hub: HubReplay, http: httpx.Client, url: str, auth: bool,
                                      status: int, code: str) -> None:
    r = http.get(hub.url + url, headers={"Authorization": "Bearer x"} if auth else {})
    assert (r.status_code, r.headers.get("x-error-code")) == (status, code)
    assert r.json()["error"] == r.headers["x-error-message"]


def test_model_info(hub: HubReplay, http: httpx.Client) -> None:
    repo = hub.repo(UNSLOTH)
    info = http.get(f"{hub.url}/api/models/{UNSLOTH}").json()
    assert info["id"] == UNSLOTH and info["sha"] == repo.commit
    assert [s["rfilename"] for s in info["siblings"]] == [
        e["path"] for e in repo.entries() if e["type"] == "file"]
    blobs = http.get(f"{hub.url}/api/models/{UNSLOTH}/revision/{repo.commit}",
                     params={"blobs": "true"}).json()
    mmproj = next(s for s in blobs["siblings"] if s["rfilename"] == "mmproj-F16.gguf")
    assert mmproj["lfs"]["sha256"] == repo.files["mmproj-F16.gguf"].sha256


# -- resolve and the CDN --------------------------------------------------------------------------


def test_lfs_file_redirects_to_a_signed_cdn_url(hub: HubReplay, http: httpx.Client) -> None:
    f = hub.repo(UNSLOTH).files["gemma-3-4b-it-Q4_K_M.gguf"]
    head = http.head(f"{hub.url}/{UNSLOTH}/resolve/main/{f.path}")
    assert head.status_code == 302
    assert head.headers["x-linked-etag"] == f'"{f.sha256}"'
    assert head.headers["x-linked-size"] == str(f.size)
    assert head.headers["x-repo-commit"] == hub.repo(UNSLOTH).commit
    location = urlsplit(head.headers["location"])
    assert f"{location.scheme}://{location.netloc}" == hub.cdn_url != hub.url
    query = parse_qs(location.query)
    assert {"Expires", "Policy", "Signature", "Key-Pair-Id", "X-Amz-Signature",
            "X-Amz-Expires"} <= set(query)
    assert f.path in query["response-content-disposition"][0]
    part = http.get(head.headers["location"], headers={"Range": "bytes=0-3"})
    assert (part.status_code, part.content) == (206, b"GGUF")
    assert part.headers["content-range"] == f"bytes 0-3/{f.size}"
    tail = http.get(head.headers["location"], headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == f.data[-10:]
    whole = http.get(head.headers["location"])
    assert whole.status_code == 200 and sha256(whole.content) == f.sha256
    beyond = http.get(head.headers["location"], headers={"Range": f"bytes={f.size}-"})
    assert beyond.status_code == 416


def test_cdn_refuses_authorization_and_bad_signatures(hub: HubReplay,
                                                      http: httpx.Client) -> None:
    location = http.head(f"{hub.url}/{UNSLOTH}/resolve/main/mmproj-F16.gguf").headers["location"]
    key = hub.repo(UNSLOTH).files["mmproj-F16.gguf"].cdn_key
    sent = hub.cdn.bytes_sent
    with_token = http.get(location, headers={"Authorization": "Bearer hf_secret"})
    assert with_token.status_code == 400 and "<Code>InvalidArgument</Code>" in with_token.text
    assert "Only one auth mechanism allowed" in with_token.text
    forged = http.get(location.replace("X-Amz-Signature=", "X-Amz-Signature=0"))
    assert forged.status_code == 403 and "SignatureDoesNotMatch" in forged.text
    unsigned = http.get(location.split("?")[0])
    assert unsigned.status_code == 403
    expired = http.get(hub.cdn.sign(key, "mmproj-F16.gguf", ttl=-1))
    assert expired.status_code == 403 and "Request has expired" in expired.text
    # Nothing but the error documents was sent.
    answers = [with_token, forged, unsigned, expired]
    assert hub.cdn.bytes_sent - sent == sum(len(a.content) for a in answers)
    assert not any(a.content.startswith(b"GGUF") for a in answers)


def test_older_cdn_url_style(tmp_path: Path) -> None:
    with HubReplay([UNSLOTH], tmp_path, cdn_style="lfs") as replay, httpx.Client() as c:
        f = replay.repo(UNSLOTH).files["mmproj-F32.gguf"]
        location = c.head(f"{replay.url}/{UNSLOTH}/resolve/main/{f.path}").headers["location"]
        assert urlsplit(location).path.startswith("/repos/")
        assert urlsplit(location).path.endswith(f"/{f.sha256}")
        query = parse_qs(urlsplit(location).query)
        assert {"Expires", "Policy", "Signature", "Key-Pair-Id"} <= set(query)
        assert not any(k.startswith("X-Amz-") for k in query)
        assert sha256(c.get(location).content) == f.sha256


def test_an_entry_added_to_the_listing_has_nothing_behind_it(tmp_path: Path) -> None:
    with HubReplay([UNSLOTH], tmp_path) as replay, httpx.Client() as c:
        replay.repo(UNSLOTH).add_entry({"type": "file", "oid": "0" * 40, "size": 5,
                                        "path": "../outside.gguf"})
        listed = [e for p in all_pages(c, tree_url(replay, UNSLOTH, recursive="true")) for e in p]
        assert listed[-1]["path"] == "../outside.gguf"
        r = c.get(f"{replay.url}/{UNSLOTH}/resolve/main/%2E%2E/outside.gguf")
        assert (r.status_code, r.headers["x-error-code"]) == (404, "EntryNotFound")


def test_small_files_directly_or_through_the_resolve_cache(tmp_path: Path) -> None:
    with HubReplay([UNSLOTH], tmp_path, small_files="resolve-cache") as replay, \
            httpx.Client() as c:
        readme = replay.repo(UNSLOTH).files["README.md"]
        first = c.head(f"{replay.url}/{UNSLOTH}/resolve/main/README.md")
        assert first.status_code == 307
        assert first.headers["location"].startswith(f"/api/resolve-cache/models/{UNSLOTH}/")
        final = c.get(replay.url + first.headers["location"])
        assert final.status_code == 200 and final.content == readme.data
        assert final.headers["etag"] == f'"{git_blob_id(readme.data)}"'
    with HubReplay([UNSLOTH], tmp_path / "direct") as replay, httpx.Client() as c:
        direct = c.get(f"{replay.url}/{UNSLOTH}/resolve/main/params")
        assert direct.status_code == 200
        assert direct.content == replay.repo(UNSLOTH).files["params"].data


def test_gated_repository_wants_the_token(tmp_path: Path) -> None:
    with HubReplay([UNSLOTH], tmp_path, token="secret") as replay, httpx.Client() as c:
        url = tree_url(replay, UNSLOTH, recursive="true")
        anonymous = c.get(url)
        assert (anonymous.status_code, anonymous.headers["x-error-code"]) == (401, "GatedRepo")
        wrong = c.get(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "Invalid credentials" in wrong.json()["error"]
        assert c.get(url, headers={"Authorization": "Bearer secret"}).status_code == 200
        resolve = f"{replay.url}/{UNSLOTH}/resolve/main/mmproj-F16.gguf"
        assert c.head(resolve).status_code == 401
        ok = c.head(resolve, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 302
        assert c.get(ok.headers["location"]).status_code == 200  # the signed URL is enough


# -- the bytes are real GGUF files ---------------------------------------------------------------


def _reader(tmp_path: Path, name: str, data: bytes) -> GGUFReader:
    p = tmp_path / name.replace("/", "_")
    p.write_bytes(data)
    return GGUFReader(p)


def _value(r: GGUFReader, key: str) -> Any:
    f = r.fields.get(key)
    return None if f is None else f.contents()


@pytest.mark.parametrize("repo,path,file_type,arch", [
    (UNSLOTH, "gemma-3-4b-it-UD-Q4_K_XL.gguf", 15, "llama"),  # Q4_K_M: the mix's base type
    (UNSLOTH, "gemma-3-4b-it-IQ4_NL.gguf", 25, "llama"),
    (UNSLOTH, "gemma-3-4b-it-Q2_K_L.gguf", 10, "llama"),
    (BARTOWSKI, "Meta-Llama-3-8B-Instruct-f16.gguf", 1, "llama"),
    (UNSLOTH, "mmproj-F16.gguf", 1, "clip"),
    (UNSLOTH, "mmproj-BF16.gguf", 32, "clip"),
    (UNSLOTH, "mmproj-F32.gguf", 0, "clip"),
])
def test_files_are_gguf_of_the_named_type(hub: HubReplay, tmp_path: Path, repo: str, path: str,
                                          file_type: int, arch: str) -> None:
    r = _reader(tmp_path, path, hub.repo(repo).files[path].data)
    assert _value(r, "general.architecture") == arch
    assert _value(r, "general.file_type") == file_type
    if arch == "clip":
        assert _value(r, "clip.has_vision_encoder") is True
        assert any(t.name.startswith("mm.") for t in r.tensors)


def test_shards_are_a_real_split(hub: HubReplay, tmp_path: Path) -> None:
    files = hub.repo(UNSLOTH).files
    names = ["BF16/gemma-3-4b-it-BF16-00001-of-00002.gguf",
             "BF16/gemma-3-4b-it-BF16-00002-of-00002.gguf"]
    first, second = (_reader(tmp_path, n, files[n].data) for n in names)
    assert [_value(first, "split.no"), _value(second, "split.no")] == [0, 1]
    assert _value(first, "split.count") == _value(second, "split.count") == 2
    total = _value(first, "split.tensors.count")
    assert total == len(first.tensors) + len(second.tensors) and len(second.tensors) > 0
    # Only the first shard has the model's metadata, as llama.cpp's gguf-split writes it.
    assert _value(first, "general.file_type") == 32
    assert _value(second, "general.architecture") is None
    assert {t.tensor_type.name for t in first.tensors if len(t.shape) == 2} == {"BF16"}


def test_llama_cpp_loads_the_split_model(hub: HubReplay, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    files = hub.repo(BARTOWSKI).files
    for p, f in files.items():
        if p.startswith("Meta-Llama-3-8B-Instruct-Q8_0/"):
            (tmp_path / p.rsplit("/", 1)[1]).write_bytes(f.data)
    llm = llama_cpp.Llama(str(tmp_path / "Meta-Llama-3-8B-Instruct-Q8_0-00001-of-00002.gguf"),
                          n_ctx=64, verbose=False)
    try:
        assert llm.n_vocab() == 256
        assert len(llm.tokenize(b"hello")) > 0
    finally:
        llm.close()


# -- the Hub's own client -------------------------------------------------------------------------


@pytest.fixture
def hf_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # In the test extra: missing, it is an error, not a skip.
    import huggingface_hub

    return huggingface_hub


def test_huggingface_hub_lists_the_replay(hf_hub: Any, tmp_path: Path) -> None:
    with HubReplay([BARTOWSKI, UNSLOTH], tmp_path / "scratch", page_size=7) as replay:
        api = hf_hub.HfApi(endpoint=replay.url)
        tree = list(api.list_repo_tree(UNSLOTH, recursive=True))
        assert [t.path for t in tree] == [e["path"] for e in replay.repo(UNSLOTH).entries()]
        folders = {t.path for t in tree if isinstance(t, hf_hub.hf_api.RepoFolder)}
        assert folders == {"BF16", "images"}
        files = {t.path: t for t in tree if isinstance(t, hf_hub.hf_api.RepoFile)}
        served = replay.repo(UNSLOTH).files
        assert files["mmproj-F16.gguf"].lfs.sha256 == served["mmproj-F16.gguf"].sha256
        assert files["mmproj-F16.gguf"].xet_hash is not None
        assert files["params"].lfs is None and files["params"].size == served["params"].size
        sub = list(api.list_repo_tree(UNSLOTH, path_in_repo="images"))
        assert {t.path for t in sub} == {"images/Screenshot (1).png",
                                         "images/gemma 3 [chat template].png"}
        info = api.model_info(UNSLOTH, files_metadata=True)
        assert info.sha == replay.repo(UNSLOTH).commit
        assert {s.rfilename for s in info.siblings} == set(served)


def test_huggingface_hub_downloads_through_the_cdn(hf_hub: Any, tmp_path: Path) -> None:
    with HubReplay([UNSLOTH], tmp_path / "scratch", token="secret") as replay:
        served = replay.repo(UNSLOTH).files
        for name in ("mmproj-F16.gguf", "images/Screenshot (1).png", "README.md",
                     "BF16/gemma-3-4b-it-BF16-00002-of-00002.gguf"):
            path = hf_hub.hf_hub_download(UNSLOTH, name, endpoint=replay.url, token="secret",
                                          cache_dir=tmp_path / "cache")
            assert sha256(Path(path).read_bytes()) == served[name].sha256, name
        meta = hf_hub.get_hf_file_metadata(
            hf_hub.hf_hub_url(UNSLOTH, "mmproj-F16.gguf", endpoint=replay.url), token="secret")
        assert (meta.etag, meta.size, meta.commit_hash) == (
            served["mmproj-F16.gguf"].sha256, served["mmproj-F16.gguf"].size,
            replay.repo(UNSLOTH).commit)
        # The client sent its token to the Hub and dropped it for the CDN's signed URLs.
        assert all(r.header("Authorization") == "Bearer secret" for r in replay.requests)
        assert replay.cdn.requests and not any(r.header("Authorization")
                                               for r in replay.cdn.requests)
        with pytest.raises(hf_hub.errors.GatedRepoError):
            hf_hub.hf_hub_download(UNSLOTH, "params", endpoint=replay.url, token=False,
                                   cache_dir=tmp_path / "other")


# -- the Ollama registry -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaReplay]:
    with OllamaReplay() as replay:
        yield replay


def test_ollama_manifest_keeps_the_recorded_layers(ollama: OllamaReplay,
                                                   http: httpx.Client) -> None:
    for name in OllamaReplay.MODELS:
        repo, tag = name.split(":")
        recorded = json.loads((OLLAMA_FIXTURES / repo / tag / "manifest.json").read_text())
        r = http.get(f"http://{ollama.host}/v2/{repo}/manifests/{tag}",
                     headers={"Accept": MANIFEST_TYPE})
        assert r.status_code == 200 and r.headers["content-type"] == MANIFEST_TYPE
        served = r.json()
        assert r.headers["docker-content-digest"] == f"sha256:{sha256(r.content)}"
        assert [x["mediaType"] for x in served["layers"]] == [
            x["mediaType"] for x in recorded["layers"]]
        assert served["config"]["mediaType"] == recorded["config"]["mediaType"]
    llava = ollama.models["library/llava:latest"]
    recorded = json.loads((OLLAMA_FIXTURES / "library/llava/latest/manifest.json").read_text())
    # The template and params texts are the recorded bytes: their digests are the recorded ones.
    for media in (TEMPLATE_TYPE, PARAMS_TYPE):
        [layer] = [x for x in recorded["layers"] if x["mediaType"] == media]
        assert layer["digest"] == f"sha256:{llava.digest(media)}"


def test_ollama_blobs_redirect_to_the_cdn(ollama: OllamaReplay, http: httpx.Client,
                                          tmp_path: Path) -> None:
    llava = ollama.models["library/llava:latest"]
    for media, arch in ((MODEL_TYPE, "llama"), (PROJECTOR_TYPE, "clip")):
        digest = llava.digest(media)
        r = http.get(f"http://{ollama.host}/v2/library/llava/blobs/sha256:{digest}")
        assert r.status_code == 307
        location = r.headers["location"]
        assert urlsplit(location).path.endswith(f"/sha256/{digest[:2]}/{digest}/data")
        assert "X-Amz-Signature" in parse_qs(urlsplit(location).query)
        blob = http.get(location)
        assert blob.status_code == 200 and sha256(blob.content) == digest
        assert _value(_reader(tmp_path, media, blob.content), "general.architecture") == arch
        assert http.get(location, headers={"Authorization": "Bearer x"}).status_code == 400
    config = http.get(http.get(f"http://{ollama.host}/v2/library/llava/blobs/"
                               f"{llava.manifest['config']['digest']}").headers["location"]).json()
    assert config["file_type"] == "Q4_0" and config["model_families"] == ["llama", "clip"]
    assert config["rootfs"]["diff_ids"] == [x["digest"] for x in llava.manifest["layers"]]
