"""Running's endpoints: generate (streamed), the loaded models, unloading them."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool

from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.errors import QmgrError, error_from
from qmgr.run.loading import Running
from qmgr.run.manager import ModelManager, Runner
from qmgr.work.api import NDJSON, Call, Endpoint, Table

GENERATE_BODY = {
    "type": "object", "required": ["ref"],
    "properties": {"ref": {"type": "string"}, "prompt": {"type": "string"},
                   "messages": {"type": "array", "items": {"type": "object"}},
                   "ctx": {"type": "integer"}, "kv_type": {"type": "string"},
                   "hw": {"type": "string"}, "params": {"type": "object"},
                   "backend": {"type": "string"}},
}
STOP_BODY = {"type": "object", "properties": {"ref": {"type": "string"}}}


def routes(catalog: Catalog, running: Running, models: ModelManager) -> list[Endpoint]:
    api = Table()

    @api.endpoint("POST", "/v1/generate", "Generate from a prompt, or chat from messages, "
                  "streaming newline-delimited JSON ({\"text\"} pieces, then {\"done\": stats})",
                  body=GENERATE_BODY, stream=NDJSON)
    async def generate(call: Call) -> AsyncIterator[str]:
        body = call.body
        if ("prompt" in body) == ("messages" in body):
            raise QmgrError("give either 'prompt' or 'messages'", code="bad_request")
        runner = await run_in_threadpool(running.runner, body["ref"], body.get("ctx"),
                                          body.get("kv_type") or "f16", body.get("hw"),
                                          body.get("backend"))
        req = ({"op": "generate", "prompt": body["prompt"]} if "prompt" in body
               else {"op": "chat", "messages": body["messages"]})
        req["params"] = body.get("params") or {}
        return _answers(runner, req)

    @api.endpoint("GET", "/v1/ps", "Loaded models: memory, placement, idle time")
    def ps(call: Call) -> list[dict[str, Any]]:
        return models.ps()

    @api.endpoint("POST", "/v1/stop", "Unload a model (all when 'ref' is absent)",
                  body=STOP_BODY)
    def stop(call: Call) -> dict[str, Any]:
        ref = call.body.get("ref")
        if ref:
            with catalog.reading() as session:
                v = queries.resolve_one(session, ref)
                ref = f"{v.model.name}:{v.tag}"
        return {"stopped": models.stop(ref)}

    return api.endpoints


def relay(runner: Runner, req: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    """The runner's answers to ``req`` (``{"text"}`` pieces, then ``{"done"}`` or
    ``{"error"}``), read in a thread; closing the iterator (a client that left: ``qmgr chat``'s
    Ctrl-C, an HTTP client that hung up) cancels the generation."""
    import asyncio
    import contextlib
    import threading

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = threading.Event()  # the client closed the stream

    def work() -> None:
        try:
            with contextlib.closing(runner.request(req)) as answers:
                for msg in answers:
                    if gone.is_set():
                        break  # closing the request cancels the generation in the runner
                    loop.call_soon_threadsafe(queue.put_nowait, msg)
        except QmgrError as e:
            loop.call_soon_threadsafe(queue.put_nowait, e.to_dict())
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=work, daemon=True).start()

    async def messages() -> AsyncGenerator[dict[str, Any], None]:
        try:
            while (msg := await queue.get()) is not None:
                yield msg
        finally:
            gone.set()

    return messages()


async def answering(runner: Runner, req: dict[str, Any]
                    ) -> AsyncGenerator[dict[str, Any], None]:
    """:func:`relay`, once the runner's first answer is there: a refusal (a full queue, no chat
    template) is raised before anything is sent, so the API answers it with an HTTP status
    rather than as a line of a 200 stream. Closing the result cancels the generation."""
    messages = relay(runner, req)
    try:
        first = await anext(messages)
    except StopAsyncIteration:
        first = {"error": {"code": "runner_died", "message": "the runner answered nothing"}}
    if "error" in first:
        await messages.aclose()
        raise error_from(first["error"])

    async def rest() -> AsyncGenerator[dict[str, Any], None]:
        try:
            yield first
            async for msg in messages:
                yield msg
        finally:
            await messages.aclose()

    return rest()


async def whole(messages: AsyncIterator[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """A relayed generation read to its end: its text and its final stats; the runner's error
    raised as it came."""
    text: list[str] = []
    stats: dict[str, Any] = {}
    async for msg in messages:
        if "error" in msg:
            raise error_from(msg["error"])
        if "text" in msg:
            text.append(msg["text"])
        stats = msg.get("done", stats)
    return "".join(text), stats


async def embedded(runner: Runner, inputs: list[str], truncate: bool = True
                   ) -> tuple[list[list[float]], int]:
    """The runner's embeddings of ``inputs`` (one L2-normalised vector each) and the tokens
    it read; its refusal raised as it came."""
    messages = relay(runner, {"op": "embed", "input": inputs, "truncate": truncate})
    try:
        _text, stats = await whole(messages)
    finally:
        await messages.aclose()
    return stats.get("embeddings") or [], int(stats.get("prompt_tokens") or 0)


async def _answers(runner: Runner, req: dict[str, Any]) -> AsyncIterator[str]:
    """The runner's answers as newline-delimited JSON."""
    import json

    messages = relay(runner, req)
    try:
        async for msg in messages:
            yield json.dumps(msg) + "\n"
    finally:
        await messages.aclose()
