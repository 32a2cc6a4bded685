"""A fleet's endpoints: ``GET /v1/fleet`` on the daemon's socket (``qmgr fleet``), and the
blobs this node serves its peers on its API listener (``GET /fleet/blobs/sha256:HEX``, with
the fleet key; byte ranges for resumed and parallel fetches)."""

from __future__ import annotations

import hmac
import os
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

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


def authorized(request: Request, fleet_key: str | None) -> bool:
    given = request.headers.get("authorization", "")
    return bool(fleet_key) and hmac.compare_digest(given.encode(),
                                                   f"Bearer {fleet_key}".encode())


def peer_routes(catalog: Catalog) -> list[Route]:
    """The blob endpoint (the listener's guard checks the fleet key before it runs)."""

    def locate(digest: str) -> tuple[str, int] | None:
        with catalog.reading() as session:
            row = session.execute(
                select(BlobCopy.path, Blob.size).join(Blob, BlobCopy.blob_id == Blob.id)
                .where(Blob.sha256 == digest, BlobCopy.node_id == catalog.node_id)).first()
        return (row[0], row[1]) if row else None

    async def blob(request: Request) -> Response:
        digest = str(request.path_params["digest"]).removeprefix("sha256:")
        if not SHA256_RE.match(digest):
            return JSONResponse({"error": "not a sha256 digest"}, status_code=400)
        found = await run_in_threadpool(locate, digest)
        if found is None:
            return JSONResponse({"error": f"sha256:{digest} is not on this node"},
                                status_code=404)
        path, size = found
        try:
            st = os.stat(path)
        except OSError:
            return JSONResponse({"error": f"sha256:{digest} is gone from this node"},
                                status_code=404)
        if st.st_size != size:  # changed since it was verified: not served as these bytes
            return JSONResponse({"error": f"sha256:{digest} changed on this node"},
                                status_code=409)
        # One validator for every node's copy: a fetch resumed from another peer goes on.
        return FileResponse(path, stat_result=st, media_type="application/octet-stream",
                            headers={"etag": f'"sha256:{digest}"'})

    return [Route("/fleet/blobs/{digest}", blob, methods=["GET", "HEAD"])]
