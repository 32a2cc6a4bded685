"""References as users type them, file names as registries list them, and redirect rules.

``qmgr.refs.parse`` is the gate every reference goes through before a part of it reaches a
URL, a file name or a log line; the redirect rules of ``qmgr.plugin.http.request`` are tested
against real servers on 127.0.0.1.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from badmirror import BadMirror

from qmgr.errors import QmgrError
from qmgr.gguf.names import quant_from_name
from qmgr.plugin.http import FetchError, make_client, next_link, redact, request
from qmgr.plugin.source import RemoteFile, group_gguf_files
from qmgr.refs import MAX_REF, BadReference, Reference, parse

# -- accepted forms ---------------------------------------------------------------------------

ACCEPTED = [
    # (typed, kind, name, quant, file, host, canonical)
    ("llama3", "alias", "llama3", None, None, None, "llama3"),
    ("Llama3:Q4_K_M", "alias", "llama3", "Q4_K_M", None, None, "llama3:Q4_K_M"),
    ("qwen2.5-coder:q8_0", "alias", "qwen2.5-coder", "q8_0", None, None, "qwen2.5-coder:q8_0"),
    ("hf.co/bartowski/Phi-3.5-GGUF", "hf", "bartowski/Phi-3.5-GGUF", None, None, None,
     "hf.co/bartowski/Phi-3.5-GGUF"),
    ("hf.co/bartowski/Phi-3.5-GGUF:IQ4_XS", "hf", "bartowski/Phi-3.5-GGUF", "IQ4_XS", None, None,
     "hf.co/bartowski/Phi-3.5-GGUF:IQ4_XS"),
    ("huggingface.co/owner/repo:Q8_0", "hf", "owner/repo", "Q8_0", None, None,
     "hf.co/owner/repo:Q8_0"),
    ("hf://owner/repo", "hf", "owner/repo", None, None, None, "hf.co/owner/repo"),
    ("hf://owner/repo/model-Q8_0.gguf", "hf", "owner/repo", None, "model-Q8_0.gguf", None,
     "hf://owner/repo/model-Q8_0.gguf"),
    ("hf://owner/repo/Q4_K_M/big-Q4_K_M-00001-of-00002.gguf", "hf", "owner/repo", None,
     "Q4_K_M/big-Q4_K_M-00001-of-00002.gguf", None,
     "hf://owner/repo/Q4_K_M/big-Q4_K_M-00001-of-00002.gguf"),
    ("ollama://tiny", "ollama", "library/tiny", "latest", None, "registry.ollama.ai",
     "ollama://registry.ollama.ai/library/tiny:latest"),
    ("ollama://Tiny:1B", "ollama", "library/tiny", "1B", None, "registry.ollama.ai",
     "ollama://registry.ollama.ai/library/tiny:1B"),
    ("ollama://someone/model:v2", "ollama", "someone/model", "v2", None, "registry.ollama.ai",
     "ollama://registry.ollama.ai/someone/model:v2"),
    ("ollama://127.0.0.1:8080/library/tiny", "ollama", "library/tiny", "latest", None,
     "127.0.0.1:8080", "ollama://127.0.0.1:8080/library/tiny:latest"),
    ("ollama://127.0.0.1:8080/tiny:q8", "ollama", "library/tiny", "q8", None, "127.0.0.1:8080",
     "ollama://127.0.0.1:8080/library/tiny:q8"),
    ("ollama://localhost/ns/m", "ollama", "ns/m", "latest", None, "localhost",
     "ollama://localhost/ns/m:latest"),
    ("ollama://Registry.Example.COM/ns/m:t", "ollama", "ns/m", "t", None,
     "registry.example.com", "ollama://registry.example.com/ns/m:t"),
]


@pytest.mark.parametrize("typed,kind,name,quant,file,host,canonical", ACCEPTED,
                         ids=[a[0] for a in ACCEPTED])
def test_accepted_forms(typed: str, kind: str, name: str, quant: str | None, file: str | None,
                        host: str | None, canonical: str) -> None:
    ref = parse(typed)
    assert (ref.kind, ref.raw, ref.name, ref.quant, ref.file, ref.host) == (
        kind, typed, name, quant, file, host)
    assert ref.canonical == canonical
    # The canonical form is itself a reference that means the same thing.
    again = parse(canonical)
    assert (again.kind, again.name, again.file, again.host, again.canonical) == (
        kind, name, file, host, canonical)


@pytest.mark.parametrize("url", [
    "https://example.com/models/tiny-Q8_0.gguf",
    "https://cdn.example.com:8443/a/b/c/model.gguf?download=true",
    "http://127.0.0.1:8000/test/tiny/resolve/main/tiny-Q8_0.gguf",
])
def test_accepted_urls(url: str) -> None:
    ref = parse(url)
    assert (ref.kind, ref.url, ref.canonical) == ("url", url, url)
    assert ref.name == urlsplit(url).path.rsplit("/", 1)[-1].removesuffix(".gguf")


def test_bounds_are_inclusive() -> None:
    assert parse("a" * 96).name == "a" * 96
    assert parse("hf.co/o/r:" + "Q" * 64).quant == "Q" * 64
    url = "https://h.example/" + "d/" * ((MAX_REF - 30) // 2)
    url += "x" * (MAX_REF - len(url) - len(".gguf")) + ".gguf"
    assert len(url) == MAX_REF and parse(url).kind == "url"
    with pytest.raises(BadReference, match=f"longer than {MAX_REF}"):
        parse(url.replace("https://h", "https://hh"))


# -- refusals ---------------------------------------------------------------------------------

REFUSED = [
    # (typed, part of the message)
    ("", "it is empty"),
    ("../x", "a path is not a reference"),
    ("./model.gguf", "a path is not a reference"),
    ("~/model.gguf", "a path is not a reference"),
    ("/etc/passwd", "a path is not a reference"),
    ("tiny:..", "tag '..'"),
    ("tiny:../x", "tag '../x'"),
    ("hf.co/test/..", "repo '..'"),
    ("hf.co/../tiny", "owner '..'"),
    ("hf.co/a/b:../../x", "tag"),
    ("hf://test/tiny/../x.gguf", "contains '..'"),
    ("hf://test/tiny/sub/./x.gguf", "contains '.'"),
    ("hf://test/tiny//etc/passwd", "must be relative"),
    ("hf://test/tiny/a//x.gguf", "an empty part"),
    ("hf://test/tiny/a\\x.gguf", "backslash"),
    ("hf://test/tiny/" + "/".join("d" * 8) + "/x.gguf", "nested too deep"),
    ("ollama://library/..", "model '..'"),
    ("ollama://library/../tiny", "expected ollama://"),
    ("ollama://a/b/c/d", "expected ollama://"),
    ("ollama://library//tiny", "expected ollama://"),
    ("ollama://h:port/a/b", "bad host"),
    ("ollama://host/ns/m:a/b", "expected ollama://"),
    ("ollama://h.example:80/ns/m:a/b", "tag 'a/b'"),
    ("https://h/a/../b.gguf", "contains '..'"),
    ("https://h/../b.gguf", "contains '..'"),
    ("https://h/a/..", "must name a .gguf file"),
    ("https://h/x.bin", "must name a .gguf file"),
    ("https://h/x.gguf/", "must name a .gguf file"),
    ("https://h/.gguf", "file name '.gguf'"),
    ("https://h/a\\b.gguf", "backslash"),
    ("https:///x.gguf", "no valid host"),
    ("https://h_o_s_t/x.gguf", "no valid host"),
    ("https://user:secret@h/x.gguf", "credentials"),
    ("https://token@h/x.gguf", "credentials"),
    ("file:///etc/x.gguf", "unknown scheme"),
    ("s3:///x.gguf", "path part ''"),
    ("S3://bucket/x.gguf", "unknown scheme"),
    ("url://foo/bar", "unknown scheme"),  # qmgr's own kinds are no plugin's scheme
    ("alias://llama:Q4_K_M", "unknown scheme"),
    ("s3://bucket/../x.gguf", "path part '..'"),
    ("s3://bucket/x:Q4/0", "tag 'Q4/0'"),
    ("hf.co/a/b/c", "expected hf.co/OWNER/REPO"),
    ("hf.co/a", "expected hf.co/OWNER/REPO"),
    ("hf.co/a/", "repo ''"),
    ("hf://a", "expected hf://OWNER/REPO"),
    ("hf://a//x.gguf", "repo ''"),
    ("owner/repo", "a name has no '/'"),
    ("tiny:Q8_0:x", "tag 'Q8_0:x'"),
    ("-rf", "name '-rf'"),
    ("a" * 97, "at most 96"),
    ("hf.co/" + "o" * 97 + "/r", "at most 96"),
    ("hf.co/o/r:" + "Q" * 65, "tag"),
    ("x" * (MAX_REF + 1), f"longer than {MAX_REF}"),
    ("https://h/" + "d/" * 260 + "x.gguf", f"longer than {MAX_REF}"),
    ("tïny", "name"),
]
CONTROL = ["tiny\x00", "tiny:Q4\x1b[31m", "hf.co/a/b\n", "ollama://a/b\t", "https://h/\x7f/x.gguf",
           "hf://a/b/x\r.gguf"]


@pytest.mark.parametrize("typed,message", REFUSED, ids=[r[0][:40] for r in REFUSED])
def test_refused(typed: str, message: str) -> None:
    with pytest.raises(BadReference) as e:
        parse(typed)
    assert message in e.value.message
    assert e.value.code == "bad_ref"
    assert len(e.value.message) < 400  # a long reference is shown cut short


@pytest.mark.parametrize(("typed", "name", "quant"), [
    ("s3://bucket/x.gguf", "bucket/x.gguf", None),
    ("ftp://h/models/tiny:Q8_0", "h/models/tiny", "Q8_0"),
])
def test_a_scheme_of_a_source_plugin_parses_generically(typed: str, name: str,
                                                         quant: str | None) -> None:
    """A scheme qmgr does not know is a source plugin's to own (the puller asks which
    plugin does, and fails with ``no_source`` when none: tests/test_plugin_contracts.py)."""
    ref = parse(typed)
    assert (ref.kind, ref.name, ref.quant) == (typed.split("://")[0], name, quant)
    assert ref.canonical == typed


@pytest.mark.parametrize("typed", CONTROL, ids=[repr(c) for c in CONTROL])
def test_control_characters_are_refused(typed: str) -> None:
    with pytest.raises(BadReference, match="control characters"):
        parse(typed)


@pytest.mark.parametrize("typed", ["https://h/\x9b31m/x.gguf", "https://h/\x85/x.gguf",
                                   "https://h/a b/x.gguf"])
def test_c1_controls_and_spaces_in_urls_are_refused(typed: str) -> None:
    with pytest.raises(BadReference):
        parse(typed)


@pytest.mark.parametrize("typed", ["ollama://../tiny", "ollama://..:80/a/b", "https://../x.gguf",
                                   "https://-.-/x.gguf"])
def test_dot_dot_as_a_host_is_refused(typed: str) -> None:
    with pytest.raises(BadReference):
        parse(typed)


def test_backslash_in_url_path_is_refused() -> None:
    with pytest.raises(BadReference):
        parse("https://h/a\\..\\b/x.gguf")


def test_a_bad_reference_message_never_carries_control_characters() -> None:
    with pytest.raises(BadReference) as e:
        parse("tiny:\x1b]0;pwned\x07")
    assert "\x1b" not in e.value.message and "\\x1b" in e.value.message


# -- file names from registries ---------------------------------------------------------------

@pytest.mark.parametrize("name,quant", [
    ("Meta-Llama-3-8B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
    ("Meta-Llama-3-8B-Instruct-Q4_K_S.gguf", "Q4_K_S"),
    ("model-q8_0.gguf", "Q8_0"),
    ("model.Q5_K_M.gguf", "Q5_K_M"),
    ("model_IQ4_XS.gguf", "IQ4_XS"),
    ("model-IQ2_XXS.gguf", "IQ2_XXS"),
    ("tiny-F16.gguf", "F16"),
    ("tiny-bf16.gguf", "BF16"),
    ("gpt-oss-20b-MXFP4_MOE.gguf", "MXFP4_MOE"),
    ("big-Q8_0-00001-of-00003.gguf", "Q8_0"),
    ("Q4_0/model-Q6_K.gguf", "Q6_K"),  # the file's own name, not its folder
    ("Q4_0-model-f16.gguf", "F16"),  # the last one named
    ("model-Q4_K_M-imat.gguf", "Q4_K_M"),
    ("model.gguf", None),
    ("modelQ4_0.gguf", None),  # glued to a word: not a quant
    ("model-Q4_0x.gguf", None),
    ("README.md", None),
])
def test_quant_from_name(name: str, quant: str | None) -> None:
    assert quant_from_name(name) == quant


def _files(*names: str) -> list[RemoteFile]:
    return [RemoteFile(n, f"https://h/{n}", 1) for n in names]


def _grouped(*names: str) -> dict[str, list[str]]:
    return {k: [f.name for f in v] for k, v in group_gguf_files(_files(*names)).items()}


def test_group_gguf_files() -> None:
    got = _grouped(
        "README.md",
        "m-Q8_0.gguf",
        "big-Q4_K_M-00003-of-00003.gguf",
        "big-Q4_K_M-00001-of-00003.gguf",
        "big-Q4_K_M-00002-of-00003.gguf",
        "part-Q2_K-00001-of-00002.gguf",  # its second shard is missing
        "sub/m-Q8_0.gguf",
        "model.safetensors",
    )
    assert got == {
        "m-Q8_0.gguf": ["m-Q8_0.gguf"],
        "sub/m-Q8_0.gguf": ["sub/m-Q8_0.gguf"],
        "big-Q4_K_M": ["big-Q4_K_M-00001-of-00003.gguf", "big-Q4_K_M-00002-of-00003.gguf",
                       "big-Q4_K_M-00003-of-00003.gguf"],
    }
    # Shards sort by number, also beyond nine.
    names = [f"x-{i:05d}-of-00011.gguf" for i in range(11, 0, -1)]
    assert _grouped(*names)["x"] == sorted(names)
    assert _grouped() == {}


@pytest.mark.parametrize("names", [
    ("x-00001-of-00002.gguf", "x-00003-of-00002.gguf"),
    ("x-00001-of-00003.gguf", "x-00001-of-00003.gguf", "x-00003-of-00003.gguf"),
    ("x-00001-of-00002.gguf", "x-00002-of-00003.gguf", "x-00003-of-00003.gguf"),
], ids=["out-of-range", "duplicate", "mixed-counts"])
def test_incomplete_shard_sets_are_left_out(names: tuple[str, ...]) -> None:
    assert _grouped(*names) == {}


@pytest.mark.parametrize("link,expected", [
    ('<https://h/api/models/a/b/tree/main?cursor=xyz>; rel="next"',
     "https://h/api/models/a/b/tree/main?cursor=xyz"),
    ('<https://h/p?c=1>; rel="prev", <https://h/n?c=3>; rel="next"', "https://h/n?c=3"),
    ("<https://h/n>; rel=next", "https://h/n"),
    ('<https://h/n> ; rel="next"', "https://h/n"),
    ('<https://h/p>; rel="prev"', None),
    ("", None),
])
def test_next_link(link: str, expected: str | None) -> None:
    headers = httpx.Headers({"Link": link} if link else {})
    assert next_link(headers) == expected


@pytest.mark.parametrize("link,expected", [
    ('<https://h/n?cursor=a,b>; rel="next"', "https://h/n?cursor=a,b"),
    ('<https://h/x>; rel="nextpage"', None),
], ids=["comma-in-url", "rel-prefix"])
def test_next_link_parses_like_rfc8288(link: str, expected: str | None) -> None:
    assert next_link(httpx.Headers({"Link": link})) == expected


def test_redact_drops_credentials_and_query() -> None:
    assert redact("https://u:p@cdn.example/a/x.gguf?X-Amz-Signature=s3cret#f") == (
        "https://cdn.example/a/x.gguf")


# -- redirects against real servers -----------------------------------------------------------


class Recorder(ThreadingHTTPServer):
    """Records each request's path and headers. ``/hop/N`` redirects to ``/hop/N-1`` (``/hop/0``
    answers 200); ``/to?url=U`` redirects to U; anything else answers 200 ``ok``."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        super().__init__(("127.0.0.1", 0), _RecorderHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def paths(self) -> list[str]:
        return [p for p, _h in self.seen]


class _RecorderHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        u = urlsplit(self.path)
        location = None
        if u.path.startswith("/hop/") and int(u.path[5:]) > 0:
            location = f"/hop/{int(u.path[5:]) - 1}" + (f"?{u.query}" if u.query else "")
        elif u.path == "/to":
            location = parse_qs(u.query)["url"][0]
        if location is not None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with make_client(stall_timeout=5) as c:
        yield c


def fetch(client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> bytes:
    with request(client, "GET", url, headers, insecure=True) as r:
        assert r.status_code == 200
        return r.read()


def test_five_redirects_are_followed_six_are_not(client: httpx.Client,
                                                 recorder: Recorder) -> None:
    assert fetch(client, f"{recorder.url}/hop/5") == b"ok"
    assert recorder.paths() == [f"/hop/{n}" for n in range(5, -1, -1)]
    recorder.seen.clear()
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch(client, f"{recorder.url}/hop/6")
    assert recorder.paths() == [f"/hop/{n}" for n in range(6, 0, -1)]  # /hop/0 never asked


def test_a_redirect_loop_ends(client: httpx.Client, tmp_path: Path) -> None:
    mirror = BadMirror(tmp_path)
    try:
        mirror.behavior["redirect_to"] = mirror.url  # to the very same URL, forever
        with pytest.raises(FetchError, match="more than 5 redirects"):
            fetch(client, f"{mirror.url}/test/tiny/resolve/main/tiny-Q8_0.gguf")
        assert mirror.requests == 6
    finally:
        mirror.stop()


def test_authorization_stays_with_its_host(client: httpx.Client, recorder: Recorder,
                                           tmp_path: Path) -> None:
    token = {"Authorization": "Bearer s3cret"}
    # Redirects within the host keep the token.
    fetch(client, f"{recorder.url}/hop/2", token)
    assert [h.get("authorization") for _p, h in recorder.seen] == ["Bearer s3cret"] * 3
    # A redirect to another host (here: another port) drops it, and it stays dropped even if
    # a later redirect comes back.
    other = Recorder()
    try:
        recorder.seen.clear()
        back = f"{recorder.url}/hop/0"
        fetch(client, f"{recorder.url}/to?url={other.url}/to?url={back}", token)
        assert recorder.seen[0][1]["authorization"] == "Bearer s3cret"
        assert [h.get("authorization") for _p, h in other.seen] == [None]
        assert recorder.seen[1][0] == "/hop/0" and "authorization" not in recorder.seen[1][1]
    finally:
        other.shutdown()
        other.server_close()
    # The same through the mirror a registry would redirect downloads from.
    mirror = BadMirror(tmp_path)
    try:
        recorder.seen.clear()
        mirror.behavior["redirect_to"] = recorder.url
        fetch(client, f"{mirror.url}/test/tiny/resolve/main/tiny-Q8_0.gguf", token)
        [(path, headers)] = recorder.seen
        assert path == "/test/tiny/resolve/main/tiny-Q8_0.gguf"
        assert "authorization" not in headers
    finally:
        mirror.stop()


def test_redirect_rules_on_schemes(client: httpx.Client, recorder: Recorder) -> None:
    # Plain http needs --insecure, checked before anything is sent.
    with (pytest.raises(QmgrError, match="refusing plain http") as e,
          request(client, "GET", f"{recorder.url}/hop/0")):
        pass
    assert e.value.code == "insecure" and recorder.seen == []
    # A redirect may not change to another scheme.
    with pytest.raises(QmgrError, match="unsupported URL scheme") as e:
        fetch(client, f"{recorder.url}/to?url=file:///etc/passwd")
    assert e.value.code == "bad_url"
    # A signed URL's query never shows in the error.
    with pytest.raises(FetchError) as fe:
        fetch(client, f"{recorder.url}/to?url={recorder.url}/hop/9%3Ftoken%3Ds3cret")
    assert "s3cret" not in fe.value.message


def test_reference_is_frozen() -> None:
    ref = parse("llama3:Q8_0")
    with pytest.raises(AttributeError):
        ref.name = "other"  # type: ignore[misc]
    assert ref == Reference("alias", "llama3:Q8_0", "llama3", quant="Q8_0")
