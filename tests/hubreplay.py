"""Replays of the Hugging Face Hub and of the Ollama registry, built from recorded answers.

Standard library servers on 127.0.0.1 (port 0, plain http) that answer what the real services
answer, from the recordings in ``tests/fixtures/hub`` and ``tests/fixtures/ollama`` (their
READMEs say where each one comes from). Every GGUF file a recording names is served as a real,
tiny GGUF file (tests/ggufmake.py), and the listing's sizes and digests are rewritten to match
the bytes served; other files get small deterministic bytes.

- :class:`HubReplay`: the Hub (``.url``) and the CDN it sends downloads to (``.cdn``, a
  :class:`SignedCDN` on a second port). ``GET /api/models/O/R/tree/REV[/PATH]`` (``recursive``,
  ``expand``, ``cursor`` pages with ``Link: <...>; rel="next"``), ``GET /api/models/O/R``
  (``/revision/REV``, ``blobs=true``), ``GET|HEAD /O/R/resolve/REV/PATH``: an LFS file is a 302
  to a signed CDN URL with ``X-Linked-Etag``, ``X-Linked-Size``, ``X-Repo-Commit``; a small file
  is answered directly (or, with ``small_files="resolve-cache"``, by a 307 to
  ``/api/resolve-cache/...`` as the Hub does today). Errors carry ``X-Error-Code`` as the Hub's
  do; with ``token=`` every repository is gated.
- :class:`SignedCDN`: serves objects at signed URLs only, with one ``Range``; like a signed-URL
  store it refuses (400, an S3-style XML error) a request that carries ``Authorization``, and
  answers 403 to a bad or expired signature.
- :class:`OllamaReplay`: an :class:`ociregistry.OCIRegistry` serving the recorded manifests
  (model, projector, template, params, license, system layers) whose blob requests are
  redirected (307) to its own :class:`SignedCDN`, as registry.ollama.ai sends them to R2.

Every server records each request (:class:`Request`: method, path, query, headers, status) in
``.requests`` and counts body bytes in ``.bytes_sent``.
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import email.utils
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quantize
from ggufmake import _add_llama_metadata, _llama_shapes, make_tiny_gguf
from ociregistry import OCIRegistry, sha256_hex

FIXTURES = Path(__file__).parent / "fixtures"
HUB_FIXTURES = FIXTURES / "hub"
OLLAMA_FIXTURES = FIXTURES / "ollama"

BARTOWSKI = "bartowski/Meta-Llama-3-8B-Instruct-GGUF"
UNSLOTH = "unsloth/gemma-3-4b-it-GGUF"

# The header list the Hub exposes on its answers (recorded on a resolve, 2026-06).
EXPOSE_HEADERS = ("X-Repo-Commit,X-Request-Id,X-Error-Code,X-Error-Message,X-Total-Count,ETag,"
                  "Link,Accept-Ranges,Content-Range,X-Linked-Size,X-Linked-ETag,X-Xet-Hash")
# The Hub's pages (huggingface_hub's list_repo_tree: 1000 entries, 50 with expand=true).
HUB_PAGE = 1000
HUB_EXPAND_PAGE = 50


@dataclass
class Request:
    """One request as a server received it (``path`` unquoted; ``status`` of its answer)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int | None = None
    sent: int = 0  # body bytes of the answer
    raw_path: str = ""  # as sent, before unquoting (a segment may hold an encoded "/")

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        u = urlsplit(self.path)
        req = Request(self.command, unquote(u.path), parse_qs(u.query, keep_blank_values=True),
                      dict(self.headers.items()), raw_path=u.path)
        with self.server.lock:
            self.server.requests.append(req)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.server.app(self, req)

    def reply(self, req: Request, status: int, body: bytes = b"",
              headers: dict[str, str] | None = None) -> None:
        req.status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if req.method != "HEAD" and body:
            self.wfile.write(body)
            req.sent = len(body)
            with self.server.lock:
                self.server.bytes_sent += len(body)


def tls_for_loopback(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a self-signed certificate for 127.0.0.1, and the certificate's
    path (for ``QMGR_CA_BUNDLE``): the Hub and its CDN speak https, as the real ones do."""
    key, cert = folder / "replay-key.pem", folder / "replay-cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, app: Callable[[_Handler, Request], None],
                 tls: ssl.SSLContext | None = None):
        self.app = app
        self.requests: list[Request] = []
        self.bytes_sent = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        self.scheme = "http"
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up between requests is no error of ours (socketserver would
        # print its traceback).
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Unsatisfiable(Exception):
    pass


def _byte_range(spec: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) of one ``Range``; None for the whole body."""
    if not spec:
        return None
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
    if not m or not (m[1] or m[2]):
        return None  # several ranges, or a form S3 ignores: the whole object
    if m[1]:
        start = int(m[1])
        end = min(int(m[2]), size - 1) if m[2] else size - 1
    else:
        start, end = max(0, size - int(m[2])), size - 1
    if start >= size or start > end:
        raise _Unsatisfiable
    return start, end


def _serve_bytes(h: _Handler, req: Request, data: bytes, headers: dict[str, str],
                 status: int = 200) -> None:
    """``data`` with one ``Range`` honoured (206), as the Hub and S3 do."""
    headers = {"Accept-Ranges": "bytes", **headers}
    try:
        rng = _byte_range(req.header("Range"), len(data))
    except _Unsatisfiable:
        h.reply(req, 416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
        return
    if rng is None:
        h.reply(req, status, data, headers)
        return
    start, end = rng
    h.reply(req, 206, data[start:end + 1],
            {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})


# -- the CDN ------------------------------------------------------------------------------------


def _s3_error(code: str, message: str, **extra: str) -> bytes:
    fields = "".join(f"<{k}>{v}</{k}>" for k, v in extra.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message>{fields}<RequestId>{secrets.token_hex(8)}</RequestId>"
            f"</Error>").encode()


class SignedCDN:
    """A store that serves objects at signed URLs only (S3 presigned or CloudFront style).

    ``put(key, data)`` stores an object at path ``key``; ``sign(key, ...)`` gives a URL that
    is valid for ``ttl`` seconds. ``style``: ``"xet"`` (the Hub's cas-bridge URLs today: a
    CloudFront ``Expires``/``Policy``/``Signature``/``Key-Pair-Id`` and an S3 ``X-Amz-*``
    signature together), ``"lfs"`` (the Hub's older cdn-lfs URLs: CloudFront only), ``"s3"``
    (the Ollama registry's R2 URLs: ``X-Amz-*`` only).
    """

    KEY_PAIR_ID = "K1LYXO563TGWFU"  # as in the recorded URLs; the secret below is ours

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.secret = secrets.token_bytes(32)
        self.objects: dict[str, bytes] = {}
        self.server = _Server(self._app, tls)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    @property
    def bytes_sent(self) -> int:
        return self.server.bytes_sent

    def stop(self) -> None:
        self.server.stop()

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = data

    def _mac(self, key: str, query: Sequence[tuple[str, str]]) -> bytes:
        signed = sorted((k, v) for k, v in query if k not in ("Signature", "X-Amz-Signature"))
        return hmac.new(self.secret, (key + "?" + urlencode(signed)).encode(), "sha256").digest()

    def sign(self, key: str, filename: str, *, style: str = "xet", ttl: int = 3600,
             content_type: str | None = None) -> str:
        now = int(time.time())
        disposition = (f"inline; filename*=UTF-8''{quote(filename)}; "
                       f'filename="{filename}";')
        query: list[tuple[str, str]] = []
        if style in ("xet", "lfs"):
            policy = json.dumps({"Statement": [{"Resource": f"{self.url}{key}*", "Condition": {
                "DateLessThan": {"AWS:EpochTime": now + ttl}}}]}, separators=(",", ":"))
            query += [("Expires", str(now + ttl)),
                      ("Policy", base64.b64encode(policy.encode()).decode()),
                      ("Key-Pair-Id", self.KEY_PAIR_ID)]
            query.append(("response-content-disposition", disposition))
        if content_type:
            query.append(("response-content-type", content_type))
        if style == "xet":
            query.append(("X-Xet-Cas-Uid", "public"))
        if style in ("xet", "s3"):
            date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
            region = "auto" if style == "s3" else "us-east-1"
            query += [("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
                      ("X-Amz-Credential", f"cas/{date[:8]}/{region}/s3/aws4_request"),
                      ("X-Amz-Date", date), ("X-Amz-Expires", str(ttl)),
                      ("X-Amz-SignedHeaders", "host")]
        mac = self._mac(key, query)
        if style in ("xet", "lfs"):
            # CloudFront's URL-safe base64: + = / become - _ ~
            sig = base64.b64encode(mac).decode().translate(str.maketrans("+=/", "-_~"))
            query.insert(2, ("Signature", sig))
        if style in ("xet", "s3"):
            query.append(("X-Amz-Signature", mac.hex()))
        return f"{self.url}{quote(key)}?{urlencode(query, quote_via=quote)}"

    def _app(self, h: _Handler, req: Request) -> None:
        xml = {"Content-Type": "application/xml"}
        if req.header("Authorization") is not None:
            # What S3 (and R2, and CloudFront in front of S3) answers to a presigned URL that
            # also carries an Authorization header.
            h.reply(req, 400, _s3_error(
                "InvalidArgument", "Only one auth mechanism allowed; only the X-Amz-Algorithm "
                "query parameter, Signature query string parameter or the Authorization header "
                "should be specified", ArgumentName="Authorization",
                ArgumentValue=req.header("Authorization") or ""), xml)
            return
        pairs = [(k, v) for k, vs in req.query.items() for v in vs]
        q = dict(pairs)
        given = [q[k] for k in ("Signature", "X-Amz-Signature") if k in q]
        mac = self._mac(req.path, pairs)
        good = {base64.b64encode(mac).decode().translate(str.maketrans("+=/", "-_~")), mac.hex()}
        if not given or any(s not in good for s in given):
            h.reply(req, 403, _s3_error("SignatureDoesNotMatch", "The request signature we "
                                        "calculated does not match the signature you "
                                        "provided."), xml)
            return
        expires = int(q["Expires"]) if "Expires" in q else None
        if "X-Amz-Date" in q:
            start = calendar.timegm(time.strptime(q["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
            amz = start + int(q.get("X-Amz-Expires", "0"))
            expires = amz if expires is None else min(expires, amz)
        if expires is None or time.time() > expires:
            h.reply(req, 403, _s3_error("AccessDenied", "Request has expired"), xml)
            return
        data = self.objects.get(req.path)
        if data is None:
            h.reply(req, 404, _s3_error("NoSuchKey", "The specified key does not exist."), xml)
            return
        headers = {"Content-Type": q.get("response-content-type", "application/octet-stream"),
                   "ETag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"',
                   "Last-Modified": email.utils.formatdate(usegmt=True)}
        if "response-content-disposition" in q:
            headers["Content-Disposition"] = q["response-content-disposition"]
        _serve_bytes(h, req, data, headers)


# -- tiny GGUF files named like real ones --------------------------------------------------------

_QUANT_IN_NAME = re.compile(r"(?:^|[-._])((?:UD-)?(?:I?Q\d_[A-Za-z0-9_]+|Q\d_K|[bB][fF]16|"
                            r"[fF]16|[fF]32))$")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")
# Unsloth's and bartowski's own names, as the llama.cpp file type their header declares.
_BASE_TYPE = {"Q2_K_L": "Q2_K", "Q2_K_XL": "Q2_K", "Q3_K_XL": "Q3_K_M", "Q4_K_XL": "Q4_K_M",
              "Q5_K_XL": "Q5_K_M", "Q6_K_XL": "Q6_K", "Q8_K_XL": "Q8_0"}


def quant_in_name(path: str) -> str | None:
    """The quant a GGUF file name announces, as written (``UD-Q4_K_XL``, ``f16``), or None."""
    stem = _SHARD.sub("", path.rsplit("/", 1)[-1].removesuffix(".gguf"))
    m = _QUANT_IN_NAME.search(stem)
    return m.group(1) if m else None


def llama_file_type(quant: str) -> int:
    """``general.file_type`` of a file of that quant (Unsloth's ``UD-*`` and ``_XL``/``_L`` mixes
    declare their base type)."""
    q = quant.upper().removeprefix("UD-")
    q = _BASE_TYPE.get(q, q)
    if q == "F32":
        return int(LlamaFileType.ALL_F32)
    try:
        return int(LlamaFileType["MOSTLY_" + q])
    except KeyError:
        raise ValueError(f"no llama.cpp file type for quant {quant!r}") from None


def tensor_ftype(quant: str) -> str:
    """The closest tensor type ``ggufmake`` can write (it has no k- or i-quant encoder)."""
    q = quant.upper().removeprefix("UD-")
    return q if q in ("F32", "F16", "BF16") else "Q8_0"


def _tensor(w: GGUFWriter, name: str, data: np.ndarray, ftype: str) -> None:
    """One tensor in ``ftype``; 1D ones (norms, biases) stay F32, as llama.cpp keeps them."""
    if data.ndim == 1 or ftype == "F32":
        w.add_tensor(name, data.astype(np.float32))
    elif ftype == "F16":
        w.add_tensor(name, data.astype(np.float16))
    else:
        qtype = GGMLQuantizationType[ftype]
        w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)


def make_split_gguf(path: Path, n_split: int, *, ftype: str = "Q8_0", file_type: int = 7,
                    seed: int = 0, name: str = "tiny", n_layers: int = 2, n_embd: int = 64,
                    n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128, n_vocab: int = 256,
                    ctx: int = 256) -> list[Path]:
    """The tiny model of ``make_tiny_gguf`` as a llama.cpp split: ``{stem}-0000N-of-0000M.gguf``
    beside ``path``, written by the gguf package's own splitter (as ``convert_hf_to_gguf.py
    --split-max-tensors`` does): the first shard has all the metadata, every shard has
    ``split.no``/``split.count``/``split.tensors.count`` and its share of the tensors."""
    shapes = _llama_shapes(n_layers, n_embd, n_head, n_head_kv, n_ff, n_vocab)
    w = GGUFWriter(path, "llama", split_max_tensors=math.ceil(len(shapes) / n_split))
    _add_llama_metadata(w, name=name, n_layers=n_layers, n_embd=n_embd, n_head=n_head,
                        n_head_kv=n_head_kv, n_ff=n_ff, n_vocab=n_vocab, ctx=ctx,
                        file_type=file_type, extra_kv=None)
    rng = np.random.default_rng(seed)
    for tname, shape in shapes:
        data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        _tensor(w, tname, np.ones(shape, np.float32) if len(shape) == 1 else data, ftype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    paths = w.format_shard_names(path)
    if len(paths) != n_split:
        raise ValueError(f"{path.name}: {len(shapes)} tensors do not split in {n_split}")
    return paths


def make_tiny_projector(path: Path, *, ftype: str = "F16", seed: int = 0,
                        projector_type: str = "gemma3") -> Path:
    """A tiny vision projector (``mmproj-*.gguf``): ``general.architecture = "clip"`` and the
    ``clip.*`` keys and ``v.*``/``mm.*`` tensors llama.cpp's mtmd projectors have."""
    dim, ff, patch = 64, 128, 16
    w = GGUFWriter(path, "clip")
    w.add_name("mmproj")
    w.add_file_type(llama_file_type(ftype))
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", projector_type)
    w.add_bool("clip.use_gelu", True)
    for key, value in {"image_size": 64, "patch_size": patch, "embedding_length": dim,
                       "feed_forward_length": ff, "head_count": 4, "block_count": 1,
                       "projection_dim": dim}.items():
        w.add_uint32(f"clip.vision.{key}", value)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    shapes = [("v.patch_embd.weight", (dim, 3 * patch * patch)), ("v.patch_embd.bias", (dim,)),
              ("v.position_embd.weight", (16, dim))]
    for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
        shapes.append((f"v.blk.0.{t}.weight", (dim, dim)))
    shapes += [("v.blk.0.ln1.weight", (dim,)), ("v.blk.0.ln2.weight", (dim,)),
               ("v.blk.0.ffn_up.weight", (ff, dim)), ("v.blk.0.ffn_down.weight", (dim, ff)),
               ("v.post_ln.weight", (dim,)), ("mm.input_projection.weight", (dim, dim)),
               ("mm.soft_emb_norm.weight", (dim,))]
    rng = np.random.default_rng(seed)
    for tname, shape in shapes:
        _tensor(w, tname, (rng.standard_normal(shape, dtype=np.float32) * 0.02), ftype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _seed(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def filler(key: str, size: int, limit: int = 2048) -> bytes:
    """Small deterministic bytes standing in for a file that is not a GGUF model."""
    line = f"{key}: replayed bytes\n".encode()
    return (line * (min(size, limit) // len(line) + 1))[:min(size, limit)]


def gguf_bytes_for(key: str, path: str, scratch: Path) -> bytes | list[bytes]:
    """Bytes of a tiny GGUF named like ``path`` (all shards of its set for a shard)."""
    base = path.rsplit("/", 1)[-1]
    quant = quant_in_name(path) or "Q8_0"
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / f"{_seed(key):08x}-{base}"
    if base.lower().startswith("mmproj"):
        return make_tiny_projector(target, ftype=tensor_ftype(quant), seed=_seed(key)).read_bytes()
    stem = base.removesuffix(".gguf")
    m = _SHARD.search(stem)
    if m:
        whole = scratch / f"{_seed(key):08x}-{_SHARD.sub('', stem)}.gguf"
        shards = make_split_gguf(whole, int(m[2]), ftype=tensor_ftype(quant),
                                 file_type=llama_file_type(quant), seed=_seed(key),
                                 name=_SHARD.sub("", stem))
        return [p.read_bytes() for p in shards]
    return _tiny_model(target, quant, _seed(key), stem)


def _tiny_model(path: Path, quant: str, seed: int, name: str) -> bytes:
    """``make_tiny_gguf``'s model, its ``general.file_type`` the one ``quant`` declares."""
    ftype = tensor_ftype(quant)
    writer_log = logging.getLogger("gguf.gguf_writer")
    level = writer_log.level
    writer_log.setLevel(logging.ERROR)  # it warns that file_type is overwritten: on purpose
    try:
        make_tiny_gguf(path, ftype="F16" if ftype == "BF16" else ftype, seed=seed, name=name,
                       extra_kv={"general.file_type": (llama_file_type(quant),
                                                       GGUFValueType.UINT32)})
    finally:
        writer_log.setLevel(level)
    return path.read_bytes()


# -- the Hub -------------------------------------------------------------------------------------


def lfs_pointer(sha256: str, size: int) -> bytes:
    text = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    return text.encode()


def xet_stand_in(data: bytes) -> str:
    """Stands in for a file's Xet hash (a keyed merkle hash no client here computes)."""
    return sha256_hex(b"xet\0" + data)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class ReplayFile:
    """A file the replay serves: its bytes, and whether the Hub keeps it in LFS."""

    path: str
    data: bytes
    lfs: bool
    cdn_key: str = ""

    @property
    def sha256(self) -> str:
        return sha256_hex(self.data)

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class ReplayRepo:
    """One repository: the listing as served (``pages``, rewritten to the served bytes; edit
    it to make the Hub lie) and the files behind it."""

    name: str
    commit: str
    pages: list[list[dict[str, Any]]]
    files: dict[str, ReplayFile]
    model_info: dict[str, Any] = field(default_factory=dict)

    def entries(self) -> list[dict[str, Any]]:
        return [e for page in self.pages for e in page]

    def entry(self, path: str) -> dict[str, Any]:
        return next(e for e in self.entries() if e.get("path") == path)

    def patch(self, path: str, /, **changes: Any) -> dict[str, Any]:
        """Change the listing entry of ``path`` (``lfs=`` is merged into its ``lfs``; ``path=``
        renames it in the listing only)."""
        e = self.entry(path)
        if "lfs" in changes and isinstance(e.get("lfs"), dict):
            e["lfs"] = {**e["lfs"], **changes.pop("lfs")}
        e.update(changes)
        return e

    def add_entry(self, entry: dict[str, Any]) -> None:
        """A listing entry with nothing behind it (resolving it answers 404)."""
        self.pages[-1].append(entry)

    def gguf_files(self) -> list[ReplayFile]:
        return [f for p, f in self.files.items() if p.endswith(".gguf")]


def _lfs_entry(e: dict[str, Any], f: ReplayFile) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "file"}
    if f.lfs:
        pointer = lfs_pointer(f.sha256, f.size)
        out.update(oid=git_blob_id(pointer), size=f.size,
                   lfs={"oid": f.sha256, "size": f.size, "pointerSize": len(pointer)})
        if "xetHash" in e:
            out["xetHash"] = xet_stand_in(f.data)
    else:
        out.update(oid=git_blob_id(f.data), size=f.size)
    out["path"] = f.path
    return out


def load_repo(name: str, scratch: Path, root: Path = HUB_FIXTURES) -> ReplayRepo:
    """A recorded repository, its GGUF files made real and its listing rewritten to them."""
    d = root / name
    meta = json.loads((d / "repo.json").read_text())
    pages = [json.loads((d / p).read_text()) for p in meta["pages"]]
    files: dict[str, ReplayFile] = {}
    recorded = [e for page in pages for e in page if e.get("type") == "file"]
    by_path = {e["path"]: e for e in recorded}
    for e in recorded:
        path = e["path"]
        if path in files:
            continue
        if path.endswith(".gguf"):
            made = gguf_bytes_for(f"{name}/{path}", path, scratch / name.replace("/", "--"))
            if isinstance(made, list):  # a shard: the whole set at once
                base = _SHARD.sub("", path.removesuffix(".gguf"))
                for i, data in enumerate(made):
                    p = f"{base}-{i + 1:05d}-of-{len(made):05d}.gguf"
                    if p not in by_path:
                        raise ValueError(f"{name}: {path} is one of {len(made)} shards, but "
                                         f"{p} is not listed")
                    files[p] = ReplayFile(p, data, lfs="lfs" in by_path[p])
            else:
                files[path] = ReplayFile(path, made, lfs="lfs" in e)
        else:
            files[path] = ReplayFile(path, filler(f"{name}/{path}", e.get("size", 0)),
                                     lfs="lfs" in e)
    served = [[(_lfs_entry(e, files[e["path"]]) if e.get("type") == "file" else dict(e))
               for e in page] for page in pages]
    return ReplayRepo(name, meta["sha"], served, files, meta.get("model_info", {}))


def _cursor(offset: int, last: str) -> str:
    # Opaque to clients; shaped like the Hub's (base64 of a JSON position and an index).
    raw = base64.b64encode(json.dumps({"file_name": last}).encode()).decode() + f":{offset}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _offset(cursor: str) -> int:
    return int(base64.urlsafe_b64decode(cursor.encode()).decode().rsplit(":", 1)[1])


class HubReplay:
    """The Hugging Face Hub, replayed from ``tests/fixtures/hub/<owner>/<repo>/``.

    ``repos``: fixture names (``HubReplay.REPOS`` by default). ``tmpdir``: scratch space for the
    generated GGUF files (by default a temporary folder removed by :meth:`stop`).
    ``page_size``: entries per tree page (None: the recorded pages for the full recursive
    listing, the Hub's 1000 (50 with ``expand``) otherwise). ``token``: every repository is
    gated behind ``Authorization: Bearer TOKEN``. ``cdn_style``: "xet" or "lfs"
    (see :class:`SignedCDN`). ``small_files``: "direct" (200) or "resolve-cache" (a 307 to
    ``/api/resolve-cache/...`` first, as the Hub answers small files today). ``tls``: both
    servers speak https, as the real ones do, with a certificate for 127.0.0.1 that
    :attr:`ca_bundle` names (for ``QMGR_CA_BUNDLE``).
    """

    REPOS = (BARTOWSKI, UNSLOTH)

    def __init__(self, repos: Iterable[str] = REPOS, tmpdir: Path | None = None, *,
                 page_size: int | None = None, token: str | None = None,
                 cdn_style: str = "xet", small_files: str = "direct", tls: bool = False):
        self._own_scratch: tempfile.TemporaryDirectory[str] | None = None
        if tmpdir is None:
            self._own_scratch = tempfile.TemporaryDirectory(prefix="hub-")
            tmpdir = Path(self._own_scratch.name)
        scratch = Path(tmpdir)
        self.page_size = page_size
        self.token = token
        self.cdn_style = cdn_style
        self.small_files = small_files
        self.repos = {name: load_repo(name, scratch) for name in repos}
        context, self.ca_bundle = tls_for_loopback(scratch) if tls else (None, None)
        self.cdn = SignedCDN(context)
        for repo in self.repos.values():
            self._publish(repo)
        self.server = _Server(self._app, context)

    def _publish(self, repo: ReplayRepo) -> None:
        bucket = hashlib.sha256(repo.name.encode()).hexdigest()
        for f in repo.files.values():
            if not f.lfs:
                continue
            if self.cdn_style == "lfs":
                f.cdn_key = f"/repos/{bucket[:2]}/{bucket[2:4]}/{bucket}/{f.sha256}"
            else:
                f.cdn_key = f"/xet-bridge-us/{bucket[:24]}/{xet_stand_in(f.data)}"
            self.cdn.put(f.cdn_key, f.data)

    # -- for tests --

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def cdn_url(self) -> str:
        return self.cdn.url

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    @property
    def bytes_sent(self) -> int:
        """Body bytes served by the Hub and the CDN together."""
        return self.server.bytes_sent + self.cdn.bytes_sent

    def repo(self, name: str) -> ReplayRepo:
        return self.repos[name]

    def resolved(self, name: str | None = None, since: int = 0) -> list[str]:
        """Repository paths asked for through ``resolve`` (any method), in order, from request
        number ``since`` on."""
        out = []
        for r in self.requests[since:]:
            parts = r.path.split("/")
            if len(parts) > 5 and parts[3] == "resolve" and (
                    name is None or "/".join(parts[1:3]) == name):
                out.append("/".join(parts[5:]))
        return out

    def served(self, name: str, since: int = 0) -> dict[str, int]:
        """Body bytes the CDN served of each LFS file of repository ``name`` (from its request
        number ``since`` on)."""
        keys = {f.cdn_key: p for p, f in self.repo(name).files.items() if f.lfs}
        out: dict[str, int] = {}
        for r in self.cdn.requests[since:]:
            if r.path in keys and r.sent:
                out[keys[r.path]] = out.get(keys[r.path], 0) + r.sent
        return out

    def stop(self) -> None:
        self.server.stop()
        self.cdn.stop()
        if self._own_scratch is not None:
            self._own_scratch.cleanup()

    def __enter__(self) -> HubReplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the Hub's answers --

    def _json(self, h: _Handler, req: Request, value: Any, status: int = 200,
              headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value, separators=(",", ":")).encode()
        h.reply(req, status, body, {"Content-Type": "application/json; charset=utf-8",
                                    "Access-Control-Expose-Headers": EXPOSE_HEADERS,
                                    **(headers or {})})

    def _error(self, h: _Handler, req: Request, status: int, code: str | None,
               message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(h, req, {"error": message}, status, headers)

    def _app(self, h: _Handler, req: Request) -> None:
        parts = [unquote(p) for p in req.raw_path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self._open(h, req, f"{parts[2]}/{parts[3]}")
            if repo is None:
                return
            if len(parts) == 4 or (len(parts) == 6 and parts[4] == "revision"):
                if self._revision(h, req, repo, parts[5] if len(parts) == 6 else "main"):
                    self._info(h, req, repo)
                return
            if len(parts) >= 6 and parts[4] == "tree":
                if self._revision(h, req, repo, parts[5]):
                    self._tree(h, req, repo, "/".join(parts[6:]).strip("/"))
                return
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo = self._open(h, req, f"{parts[0]}/{parts[1]}")
            if repo is not None and self._revision(h, req, repo, parts[3]):
                self._resolve(h, req, repo, "/".join(parts[4:]))
            return
        elif parts[:3] == ["api", "resolve-cache", "models"] and len(parts) >= 7:
            repo = self._open(h, req, f"{parts[3]}/{parts[4]}")
            if repo is not None and self._revision(h, req, repo, parts[5]):
                self._small_file(h, req, repo, "/".join(parts[6:]))
            return
        self._error(h, req, 404, None, "Not Found")

    def _open(self, h: _Handler, req: Request, name: str) -> ReplayRepo | None:
        auth = req.header("Authorization")
        repo = self.repos.get(name)
        if repo is None:
            # The Hub says 401 to an anonymous caller whether a repo is missing or private.
            self._error(h, req, 404 if auth else 401, "RepoNotFound", "Repository not found")
            return None
        if self.token is not None and auth != f"Bearer {self.token}":
            if auth:
                self._error(h, req, 401, None, "Invalid credentials in Authorization header")
            else:
                self._error(h, req, 401, "GatedRepo",
                            f"Access to model {name} is restricted. You must have access to it "
                            "and be authenticated to access it. Please log in.")
            return None
        return repo

    def _revision(self, h: _Handler, req: Request, repo: ReplayRepo, rev: str) -> bool:
        if rev in ("main", repo.commit):
            return True
        self._error(h, req, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return False

    def _info(self, h: _Handler, req: Request, repo: ReplayRepo) -> None:
        blobs = req.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for e in repo.entries():
            if e.get("type") != "file":
                continue
            s: dict[str, Any] = {"rfilename": e["path"]}
            if blobs:
                s.update(size=e.get("size"), blobId=e.get("oid"))
                if isinstance(e.get("lfs"), dict):
                    lfs = e["lfs"]
                    s["lfs"] = {"sha256": lfs.get("oid"), "size": lfs.get("size"),
                                "pointerSize": lfs.get("pointerSize")}
            siblings.append(s)
        self._json(h, req, {**repo.model_info, "sha": repo.commit, "siblings": siblings})

    def _tree(self, h: _Handler, req: Request, repo: ReplayRepo, sub: str) -> None:
        recursive = req.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = req.query.get("expand", ["false"])[0].lower() in ("1", "true")
        entries = repo.entries()
        if sub and not any(e.get("type") == "directory" and e.get("path") == sub
                           for e in entries):
            self._error(h, req, 404, "EntryNotFound", f"{sub} does not exist on \"main\"")
            return
        prefix = f"{sub}/" if sub else ""
        chosen = [e for e in entries if str(e.get("path", "")).startswith(prefix)
                  and (recursive or "/" not in str(e["path"])[len(prefix):])]
        if self.page_size is not None:
            size = self.page_size
            bounds = list(range(0, len(chosen), size)) or [0]
        elif recursive and not sub and not expand:
            bounds, at = [], 0
            for page in repo.pages:
                bounds.append(at)
                at += len(page)
        else:
            size = HUB_EXPAND_PAGE if expand else HUB_PAGE
            bounds = list(range(0, len(chosen), size)) or [0]
        try:
            start = _offset(req.query["cursor"][0]) if "cursor" in req.query else 0
        except (ValueError, IndexError, UnicodeDecodeError):
            self._error(h, req, 400, None, "Invalid cursor")
            return
        later = [b for b in bounds if b > start]
        end = later[0] if later else len(chosen)
        page = [dict(e) for e in chosen[start:end]]
        if expand:
            for e in page:
                e["lastCommit"] = {"id": repo.commit, "title": "Upload folder using "
                                   "huggingface_hub", "date": "2025-05-13T09:12:02.000Z"}
        headers = {}
        if end < len(chosen):
            query = {k: v[0] for k, v in req.query.items() if k != "cursor"}
            query["cursor"] = _cursor(end, str(chosen[end - 1].get("path")))
            headers["Link"] = f'<{self.url}{req.raw_path}?{urlencode(query)}>; rel="next"'
        self._json(h, req, page, headers=headers)

    def _resolve(self, h: _Handler, req: Request, repo: ReplayRepo, path: str) -> None:
        f = repo.files.get(path)
        if f is None:
            self._error(h, req, 404, "EntryNotFound", "Entry not found")
            return
        if not f.lfs:
            if self.small_files == "resolve-cache":
                target = (f"/api/resolve-cache/models/{repo.name}/{repo.commit}/{quote(path)}"
                          f"?etag=%22{git_blob_id(f.data)}%22")
                h.reply(req, 307, f"Temporary Redirect. Redirecting to {target}".encode(),
                        {"Location": target, "X-Repo-Commit": repo.commit,
                         "Access-Control-Expose-Headers": EXPOSE_HEADERS,
                         "Content-Type": "text/plain; charset=utf-8"})
                return
            self._small_file(h, req, repo, path)
            return
        name = path.rsplit("/", 1)[-1]
        location = self.cdn.sign(f.cdn_key, name, style=self.cdn_style)
        body = f"Found. Redirecting to {location}".encode()
        h.reply(req, 302, body, {
            "Location": location, "Content-Type": "text/plain; charset=utf-8",
            "X-Repo-Commit": repo.commit, "ETag": f'"{f.sha256}"',
            "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
            "Accept-Ranges": "bytes", "Vary": "Origin, Accept",
            "Access-Control-Expose-Headers": EXPOSE_HEADERS})

    def _small_file(self, h: _Handler, req: Request, repo: ReplayRepo, path: str) -> None:
        f = repo.files.get(path)
        if f is None or f.lfs:
            self._error(h, req, 404, "EntryNotFound", "Entry not found")
            return
        _serve_bytes(h, req, f.data, {"Content-Type": "text/plain; charset=utf-8",
                                      "ETag": f'"{git_blob_id(f.data)}"',
                                      "X-Repo-Commit": repo.commit,
                                      "Access-Control-Expose-Headers": EXPOSE_HEADERS})


# -- the Ollama registry -------------------------------------------------------------------------


@dataclass
class OllamaModel:
    """A replayed model: its manifest as served and each layer's bytes by media type."""

    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: dict[str, bytes]

    def digest(self, media_type: str) -> str:
        """The sha256 (hex) of the layer of that media type."""
        return sha256_hex(self.layers[media_type])


class OllamaReplay(OCIRegistry):
    """The Ollama registry, replayed from ``tests/fixtures/ollama/<namespace>/<model>/<tag>/``.

    ``fixtures``: names like ``library/llava:latest`` (``OllamaReplay.MODELS`` by default),
    served under the same name. The model and projector layers are tiny GGUF files (the model
    in the quant the config's ``file_type`` names, the projector a ``clip`` file), the others
    the fixture's ``layers.json`` texts; manifests and configs keep the recorded layer order,
    media types and fields, with digests and sizes rewritten. Blob requests are answered with a
    307 to ``.cdn`` (S3-style signed URLs), which serves the bytes.
    """

    MODELS = ("library/llava:latest", "library/llama3:8b")

    def __init__(self, fixtures: Iterable[str] = MODELS, tmpdir: Path | None = None):
        self._own_scratch: tempfile.TemporaryDirectory[str] | None = None
        if tmpdir is None:
            self._own_scratch = tempfile.TemporaryDirectory(prefix="oll-")
            tmpdir = Path(self._own_scratch.name)
        scratch = Path(tmpdir)
        self.cdn = SignedCDN()
        self.models: dict[str, OllamaModel] = {}
        super().__init__(blob_redirect=self._signed)
        for name in fixtures:
            self.load(name, scratch)

    @staticmethod
    def _key(digest_hex: str) -> str:
        return f"/ollama/docker/registry/v2/blobs/sha256/{digest_hex[:2]}/{digest_hex}/data"

    def _signed(self, namespace: str, model: str, digest_hex: str) -> str:
        return self.cdn.sign(self._key(digest_hex), "data", style="s3", ttl=86400)

    def load(self, name: str, scratch: Path, root: Path = OLLAMA_FIXTURES) -> OllamaModel:
        repo, tag = name.split(":", 1)
        namespace, model = repo.split("/", 1)
        d = root / namespace / model / tag
        recorded = json.loads((d / "manifest.json").read_text())
        config = json.loads((d / "config.json").read_text())
        texts = json.loads((d / "layers.json").read_text())
        layers: list[tuple[str, bytes]] = []
        quant = str(config.get("file_type") or "Q8_0")
        for layer in recorded["layers"]:
            media = layer["mediaType"]
            key = f"ollama/{name}/{media}"
            if media.endswith(".model"):
                data = _tiny_model(scratch / f"{_seed(key):08x}-{model}.gguf", quant,
                                   _seed(key), model)
            elif media.endswith(".projector"):
                data = make_tiny_projector(scratch / f"{_seed(key):08x}-mmproj.gguf",
                                           seed=_seed(key), projector_type="llava").read_bytes()
            else:
                data = texts[media].encode()
            layers.append((media, data))
        manifest = self.add_layers(namespace, model, tag, layers, config)
        for _media, data in layers:
            self.cdn.put(self._key(sha256_hex(data)), data)
        config_digest = manifest["config"]["digest"].removeprefix("sha256:")
        self.cdn.put(self._key(config_digest), self.blobs[(namespace, model, config_digest)])
        served = OllamaModel(manifest, json.loads(self.blobs[(namespace, model, config_digest)]),
                             dict(layers))
        self.models[name] = served
        return served

    def stop(self) -> None:
        super().stop()
        self.cdn.stop()
        if self._own_scratch is not None:
            self._own_scratch.cleanup()

    def __enter__(self) -> OllamaReplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
