"""A fleet's endpoints: ``GET /v1/fleet`` on the daemon's socket (``qmgr fleet``), and the
blobs this node serves its peers on its API listener (:class:`PeerBlobs`)."""

from __future__ import annotations

import hmac
import json
import os
import re
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Blob, BlobCopy
from qmgr.errors import QmgrError
from qmgr.store import SHA256_RE
from qmgr.work.api import Call, Endpoint, Table


def routes(catalog: Catalog, name: str | None) -> list[Endpoint]:
    api = Table()

    @api.endpoint("GET", "/v1/fleet", "The fleet's nodes: devices, free memory, loaded models, "
                  "blobs held, heartbeat")
    def fleet(call: Call) -> dict[str, Any]:
        if catalog.node_id is None:
            raise QmgrError("this daemon is no fleet node: start it with `node` (QMGR_NODE) "
                            "and a PostgreSQL database_url (docs/fleet.md)", code="bad_request")
        from qmgr.fleet.node import fleet_view

        with catalog.reading() as session:
            return {"node": name, "nodes": fleet_view(session)}

    return api.endpoints


def authorized(authorization: str, fleet_key: str | None) -> bool:
    """Whether an ``Authorization`` header carries the fleet's key."""
    return bool(fleet_key) and hmac.compare_digest(authorization.encode(),
                                                   f"Bearer {fleet_key}".encode())


CHUNK = 4 << 20  # bytes per read of a served blob: few thread hops per GiB
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class PeerBlobs:
    """The blobs this node serves its peers (``GET``/``HEAD /fleet/blobs/sha256:HEX``, the
    fleet key required), as a plain ASGI layer in front of the listener's app: a blob is
    gigabytes, and it goes out in 4 MiB reads without the app's middleware in between. One
    byte range per request (``Range: bytes=A-B``: a resumed or parallel fetch), answered 206.
    Only this node's verified copies are served; one whose size changed since it was
    verified is refused."""

    def __init__(self, app: Any, catalog: Catalog, fleet_key: str):
        self.app = app
        self.catalog = catalog
        self.fleet_key = fleet_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/fleet/blobs/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}

        async def answer(status: int, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        if not authorized(headers.get("authorization", ""), self.fleet_key):
            await answer(401, "missing or wrong fleet key (Authorization: Bearer FLEET_KEY)")
            return
        if scope["method"] not in ("GET", "HEAD"):
            await answer(405, f"{scope['method']} is not allowed on {scope['path']}")
            return
        digest = scope["path"].removeprefix("/fleet/blobs/").removeprefix("sha256:")
        if not SHA256_RE.match(digest):
            await answer(400, "not a sha256 digest")
            return
        found = await run_in_threadpool(self.locate, digest)
        if found is None:
            await answer(404, f"sha256:{digest} is not on this node")
            return
        path, size = found
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            await answer(404, f"sha256:{digest} is gone from this node")
            return
        try:
            if os.fstat(fd).st_size != size:
                await answer(409, f"sha256:{digest} changed on this node since it was "
                                  "verified")
                return
            start, end, status = 0, size, 200
            wanted = RANGE_RE.match(headers.get("range", "").strip())
            if wanted and (wanted[1] or wanted[2]):
                if wanted[1]:
                    start = int(wanted[1])
                    end = min(int(wanted[2]) + 1, size) if wanted[2] else size
                else:  # the last N bytes
                    start = max(size - int(wanted[2]), 0)
                if start >= end:
                    await send({"type": "http.response.start", "status": 416,
                                "headers": [(b"content-range", f"bytes */{size}".encode()),
                                            (b"content-length", b"0")]})
                    await send({"type": "http.response.body", "body": b""})
                    return
                status = 206
            out = [(b"content-type", b"application/octet-stream"),
                   (b"content-length", str(end - start).encode()),
                   (b"accept-ranges", b"bytes"),
                   # One validator for every node's copy: a fetch resumed from another peer
                   # goes on.
                   (b"etag", f'"sha256:{digest}"'.encode())]
            if status == 206:
                out.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
            await send({"type": "http.response.start", "status": status, "headers": out})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            at = start
            while at < end:
                chunk = await run_in_threadpool(os.pread, fd, min(CHUNK, end - at), at)
                if not chunk:
                    break  # truncated under us: the peer's digest check catches it
                at += len(chunk)
                await send({"type": "http.response.body", "body": chunk,
                            "more_body": at < end})
            if at < end:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(fd)

    def locate(self, digest: str) -> tuple[str, int] | None:
        with self.catalog.reading() as session:
            row = session.execute(
                select(BlobCopy.path, Blob.size).join(Blob, BlobCopy.blob_id == Blob.id)
                .where(Blob.sha256 == digest, BlobCopy.node_id == self.catalog.node_id)).first()
        return (row[0], row[1]) if row else None
