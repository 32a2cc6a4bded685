"""A small, real OCI distribution v2 registry serving Ollama-style models, for tests.

Standard library only: a threading HTTP/1.1 server on 127.0.0.1 (port 0, plain http) that
answers the two endpoints an Ollama client uses:

- ``GET|HEAD /v2/{namespace}/{model}/manifests/{tag}``: a Docker v2 manifest whose ``config``
  blob is the Ollama model config (``model_format``, ``file_type``...) and whose ``layers`` hold
  the GGUF file (``application/vnd.ollama.image.model``) plus template and license layers, as
  registry.ollama.ai serves them;
- ``GET|HEAD /v2/{namespace}/{model}/blobs/sha256:{hex}``: the blob, with one ``Range``
  (206 + ``Content-Range``), ``Docker-Content-Digest`` and ``Content-Length``.

It misbehaves on request, per model (see :meth:`OCIRegistry.add_model`): a manifest that names
the model layer by a malformed digest, or a model blob whose bytes do not match its digest.
:meth:`OCIRegistry.add_layers` serves any list of layers (projector, params, system...), and
``blob_redirect`` makes blob requests a 307 to another server, as registry.ollama.ai sends
them to its storage (``tests/hubreplay.py``'s ``OllamaReplay`` uses both).
``bytes_sent`` counts body bytes served (``blob_bytes_sent`` per blob digest) and ``requests``
records (method, path, headers) of every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL_TYPE = "application/vnd.ollama.image.model"
TEMPLATE_TYPE = "application/vnd.ollama.image.template"
LICENSE_TYPE = "application/vnd.ollama.image.license"
PROJECTOR_TYPE = "application/vnd.ollama.image.projector"
PARAMS_TYPE = "application/vnd.ollama.image.params"
SYSTEM_TYPE = "application/vnd.ollama.image.system"

_NAME = r"[a-z0-9][a-z0-9._-]*"
_MANIFEST_PATH = re.compile(rf"^/v2/({_NAME})/({_NAME})/manifests/([A-Za-z0-9_][A-Za-z0-9._-]*)$")
_BLOB_PATH = re.compile(rf"^/v2/({_NAME})/({_NAME})/blobs/sha256:([0-9a-f]{{64}})$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Pushed:
    """What :meth:`OCIRegistry.add_model` put in the registry."""

    manifest: dict[str, Any]
    model_sha256: str  # the true digest of the GGUF bytes
    model_size: int
    config: dict[str, Any]


class OCIRegistry(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, blob_redirect: Callable[[str, str, str], str] | None = None) -> None:
        """``blob_redirect(namespace, model, digest_hex)``: where a blob request is sent (307)
        instead of being served here."""
        self.blob_redirect = blob_redirect
        self.manifests: dict[tuple[str, str, str], bytes] = {}
        self.blobs: dict[tuple[str, str, str], bytes] = {}  # (ns, model, hex) -> bytes
        self.corrupt: set[str] = set()  # digests served with wrong bytes of the right length
        self.bytes_sent = 0
        self.blob_bytes_sent: dict[str, int] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as an ``ollama://HOST/...`` reference names it."""
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def add_model(self, namespace: str, model: str, tag: str, gguf: Path, *,
                  file_type: str = "Q8_0", model_digest: str | None = None,
                  corrupt: bool = False) -> Pushed:
        """Serve ``gguf`` as ``namespace/model:tag``.

        ``model_digest`` replaces the model layer's digest in the manifest (e.g.
        ``sha256:../../x``); ``corrupt`` serves the model blob with its bytes altered.
        """
        data = gguf.read_bytes()
        sha = sha256_hex(data)
        template = b"{{ .System }}\n{{ .Prompt }}"
        license_text = b"Test license: do what you like."
        config = {
            "model_format": "gguf",
            "model_family": "llama",
            "model_families": ["llama"],
            "model_type": "tiny",
            "file_type": file_type,
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha}"]},
        }
        config_bytes = json.dumps(config).encode()
        for blob in (data, template, license_text, config_bytes):
            self.blobs[(namespace, model, sha256_hex(blob))] = blob
        if corrupt:
            self.corrupt.add(sha)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": f"sha256:{sha256_hex(config_bytes)}",
                       "size": len(config_bytes)},
            "layers": [
                {"mediaType": MODEL_TYPE, "digest": model_digest or f"sha256:{sha}",
                 "size": len(data)},
                {"mediaType": TEMPLATE_TYPE, "digest": f"sha256:{sha256_hex(template)}",
                 "size": len(template)},
                {"mediaType": LICENSE_TYPE, "digest": f"sha256:{sha256_hex(license_text)}",
                 "size": len(license_text)},
            ],
        }
        self.manifests[(namespace, model, tag)] = json.dumps(manifest).encode()
        return Pushed(manifest, sha, len(data), config)

    def add_layers(self, namespace: str, model: str, tag: str,
                   layers: Sequence[tuple[str, bytes]], config: dict[str, Any]) -> dict[str, Any]:
        """Serve ``namespace/model:tag`` as a manifest of ``layers`` (media type, bytes), in that
        order, with ``config`` as its config blob (``rootfs.diff_ids`` set to the layers')."""
        digests = [f"sha256:{sha256_hex(data)}" for _media, data in layers]
        config = {**config, "rootfs": {"type": "layers", "diff_ids": digests}}
        config_bytes = json.dumps(config).encode()
        for _media, data in [*layers, ("config", config_bytes)]:
            self.blobs[(namespace, model, sha256_hex(data))] = data
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": f"sha256:{sha256_hex(config_bytes)}",
                       "size": len(config_bytes)},
            "layers": [{"mediaType": media, "digest": digest, "size": len(data)}
                       for (media, data), digest in zip(layers, digests, strict=True)],
        }
        self.manifests[(namespace, model, tag)] = json.dumps(manifest).encode()
        return manifest

    def paths_requested(self) -> list[str]:
        with self.lock:
            return [path for _method, path, _headers in self.requests]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: OCIRegistry

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.requests.append((self.command, path, dict(self.headers.items())))
        try:
            if m := _MANIFEST_PATH.match(path):
                body = self.server.manifests.get((m[1], m[2], m[3]))
                if body is None:
                    return self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
                return self._send(200, body, head, {
                    "Content-Type": MANIFEST_TYPE,
                    "Docker-Content-Digest": f"sha256:{sha256_hex(body)}"})
            if m := _BLOB_PATH.match(path):
                blob = self.server.blobs.get((m[1], m[2], m[3]))
                if blob is None:
                    return self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")
                if self.server.blob_redirect is not None:
                    location = self.server.blob_redirect(m[1], m[2], m[3])
                    return self._send(307, b"", head, {"Location": location})
                if m[3] in self.server.corrupt:
                    blob = bytes(b ^ 0xFF for b in blob)
                return self._blob(blob, m[3], head)
            self._error(404, "NAME_UNKNOWN", "repository name not known to registry")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _blob(self, blob: bytes, digest_hex: str, head: bool) -> None:
        headers = {"Content-Type": "application/octet-stream",
                   "Docker-Content-Digest": f"sha256:{digest_hex}", "Accept-Ranges": "bytes"}
        spec = self.headers.get("Range")
        if not spec:
            return self._send(200, blob, head, headers, digest_hex)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
        if not m or not (m[1] or m[2]):
            return self._send(200, blob, head, headers, digest_hex)  # several ranges: all
        size = len(blob)
        if m[1]:
            start = int(m[1])
            end = min(int(m[2]), size - 1) if m[2] else size - 1
        else:
            start, end = max(0, size - int(m[2])), size - 1
        if start >= size or start > end:
            return self._send(416, b"", head, {"Content-Range": f"bytes */{size}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(206, blob[start:end + 1], head, headers, digest_hex)

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(status, body, self.command == "HEAD", {"Content-Type": "application/json"})

    def _send(self, status: int, body: bytes, head: bool, headers: dict[str, str],
              blob: str | None = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
            with self.server.lock:
                self.server.bytes_sent += len(body)
                if blob is not None:
                    sent = self.server.blob_bytes_sent
                    sent[blob] = sent.get(blob, 0) + len(body)
