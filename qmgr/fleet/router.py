"""Requests for a model another node of the fleet serves, passed to that node.

Wraps the API listener's app (under its guard): a POST to one of the model endpoints
(Ollama's generate, chat, embed, embeddings; OpenAI's chat completions, completions,
embeddings) whose ``model`` this node holds no copy of goes to a peer, and the peer's answer
(NDJSON or SSE as it streams, or one JSON body) comes back as it is sent. The peer is the
node that has the model loaded, else an up node that holds its bytes (most free memory first).
The forwarded request carries the fleet key and ``X-Qmgr-Routed``: a peer answers it itself,
never passes it on. Anything else, and a model this node holds or nobody does, is this node's
to answer (a model nobody holds gets the usual error).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Node, VariantState
from qmgr.errors import QmgrError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MODEL_PATHS = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
                         "/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
ROUTED = b"x-qmgr-routed"
MAX_BODY = 64 << 20  # a request body this large is this node's to refuse


class Router:
    def __init__(self, app: ASGIApp, catalog: Catalog, fleet_key: str):
        self.app = app
        self.catalog = catalog
        self.fleet_key = fleet_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or \
                scope["path"] not in MODEL_PATHS or \
                any(k == ROUTED for k, _ in scope.get("headers", [])):
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False) and size <= MAX_BODY
        body = b"".join(chunks)
        peer = None
        if size <= MAX_BODY:
            try:
                model = json.loads(body).get("model")
            except (ValueError, AttributeError):
                model = None
            if isinstance(model, str) and model:
                peer = await run_in_threadpool(self.peer_for, model)
        if peer is None:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.forward(peer, scope, body, send)

    def peer_for(self, model: str) -> str | None:
        """The address of the peer to serve ``model``, or None: this node's to answer."""
        with self.catalog.reading() as session:
            try:
                v = queries.resolve_served(session, model)
            except QmgrError:
                return None  # unknown or ambiguous: the local answer says so
            if v.state != VariantState.READY or all(queries.local_path(f.blob)
                                                    for f in v.files):
                return None  # not ready (the local answer says so), or here
            ref = f"{v.model.name}:{v.tag}"
            ids = [f.blob_id for f in v.files]
            holding = queries.on_every(queries.holders(session, ids), ids)
            nodes = session.execute(select(Node.address, Node.loaded, Node.hardware).where(
                Node.name.in_(holding), Node.address.is_not(None),
                Node.id != self.catalog.node_id)).all()

        def free(hw: dict[str, Any] | None) -> int:
            return sum(d.get("memory_free") or 0 for d in (hw or {}).get("devices", []))

        loaded = [n for n in nodes if any(m.get("ref") == ref for m in n.loaded or [])]
        choice = loaded or sorted(nodes, key=lambda n: -free(n.hardware))
        return str(choice[0].address) if choice else None

    async def forward(self, address: str, scope: Scope, body: bytes, send: Send) -> None:
        import httpx

        headers = {k.decode("latin-1"): v.decode("latin-1")
                   for k, v in scope.get("headers", [])
                   if k.lower() not in (b"host", b"authorization", b"content-length",
                                        b"connection")}
        headers.update({"authorization": f"Bearer {self.fleet_key}",
                        ROUTED.decode(): "1"})
        url = address + scope["path"] + (
            "?" + scope["query_string"].decode() if scope.get("query_string") else "")
        log.info("routing %s to %s", scope["path"], url)
        started = False
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10)) as client:
            try:
                async with client.stream("POST", url, content=body, headers=headers) as r:
                    started = True
                    await send({"type": "http.response.start", "status": r.status_code,
                                "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                            for k, v in r.headers.items()
                                            if k.lower() not in ("content-length",
                                                                 "transfer-encoding",
                                                                 "connection")]})
                    async for chunk in r.aiter_raw():
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                    await send({"type": "http.response.body", "body": b"",
                                "more_body": False})
            except httpx.HTTPError as e:
                if started:  # cut off mid-answer: the client sees the stream end early
                    log.warning("routed answer from %s cut off: %s", address, e)
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                message = json.dumps({"error": f"the node at {address} that serves this "
                                      f"model did not answer: {e}"}).encode()
                await send({"type": "http.response.start", "status": 502,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": message})
