"""OpenAI's HTTP API over the models qmgr catalogs, as OpenAI's own clients use it.

Shapes follow OpenAI's API reference: ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/chat/completions`` and ``POST /v1/completions`` (one object, or with ``"stream":
true`` Server-Sent Events ending in ``data: [DONE]``). Errors are OpenAI's ``{"error":
{"message", "type", "param", "code"}}`` with the status of qmgr's code (an unknown model:
``not_found``, 404), answered here rather than by the app, whose errors are Ollama's. Model
names are the ones Ollama's routes take (:func:`qmgr.serve.ollama.resolve`).

Defaults are qmgr's, not OpenAI's: ``temperature`` 0 (greedy) and ``max_tokens`` 256 when a
request leaves them out.

Not yet here (issue #18): embeddings, tools, ``response_format``, ``logprobs``, ``n`` > 1.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Variant
from qmgr.errors import QmgrError, status_of
from qmgr.plugin.backend import GenParams
from qmgr.run.loading import Running
from qmgr.run.manager import ModelManager, Runner
from qmgr.run.routes import relay, whole
from qmgr.serve.ollama import body_of, ready_variants, resolve

log = logging.getLogger(__name__)

SSE = "text/event-stream"
# OpenAI's request fields -> qmgr's generation parameters (GenParams). top_k is not OpenAI's
# but llama.cpp's server takes it too (clients send it in extra_body).
PARAMS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
          "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
          "stop": "stop"}
NUMBERS = {"max_tokens": int, "top_k": int, "seed": int, "temperature": float, "top_p": float}

Handler = Callable[[Request], Awaitable[Response]]


def error_body(code: str, message: str) -> dict[str, Any]:
    status = status_of(code)
    kind = ("not_found_error" if status == 404 else "server_error" if status >= 500
            else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _answers_errors(handler: Handler) -> Handler:
    """The handler, with its failures in OpenAI's shape instead of the app's (Ollama's)."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except QmgrError as e:
            # OpenAI's clients retry 408, 409 and 5xx: a refusal that will not change on a
            # retry (no chat template, a context too large) says so, and comes back at once.
            final = {"x-should-retry": "false"} if e.http_status < 500 else None
            return JSONResponse(error_body(e.code, e.message), status_code=e.http_status,
                                headers=final)
        except Exception as e:
            log.exception("API request %s %s failed", request.method, request.url.path)
            return JSONResponse(error_body("internal", f"internal error: {type(e).__name__}"),
                                status_code=status_of("internal"))

    return wrapped


def _unix(when: datetime.datetime) -> int:
    """Seconds since the epoch (the catalog keeps naive UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp())


def _model(v: Variant) -> dict[str, Any]:
    return {"id": f"{v.model.name}:{v.tag}", "object": "model", "created": _unix(v.created_at),
            "owned_by": "qmgr"}


def params_of(body: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, qmgr_name in PARAMS.items():
        value = body.get(name)
        if value is None:
            continue
        kind = NUMBERS.get(qmgr_name)
        if kind is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                 or (kind is int and not float(value).is_integer())):
            raise QmgrError(f"{name} must be {'an integer' if kind is int else 'a number'}",
                            code="bad_request")
        params[qmgr_name] = kind(value) if kind is not None else value
    stop = params.get("stop")
    if isinstance(stop, str):
        params["stop"] = [stop]
    elif stop is not None and not (isinstance(stop, list)
                                   and all(isinstance(s, str) for s in stop)):
        raise QmgrError("stop must be a string or a list of strings", code="bad_request")
    if body.get("n", 1) != 1:
        raise QmgrError("n must be 1: one choice per request", code="bad_request")
    return params


def _content(message: Any) -> dict[str, str]:
    """A chat message as qmgr's runner takes it: text content (a list of text parts joined)."""
    if not isinstance(message, dict):
        raise QmgrError("messages must be a list of {role, content} objects",
                        code="bad_request")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise QmgrError("only text content parts ({\"type\": \"text\", \"text\": ...}) "
                            "are supported", code="bad_request")
        content = "".join(p["text"] for p in content)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise QmgrError("a message's content must be a string or a list of text parts",
                        code="bad_request")
    role = message.get("role", "user")
    if not isinstance(role, str):
        raise QmgrError("a message's role must be a string", code="bad_request")
    return {"role": role, "content": content}


def routes(catalog: Catalog, running: Running, models: ModelManager) -> list[Route]:
    def _list() -> dict[str, Any]:
        with catalog.reading() as session:
            return {"object": "list", "data": [_model(v) for v in ready_variants(session)]}

    @_answers_errors
    async def list_models(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(_list))

    def _retrieve(name: str) -> dict[str, Any]:
        with catalog.reading() as session:
            return _model(resolve(session, name))

    @_answers_errors
    async def retrieve_model(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(_retrieve, request.path_params["model"]))

    def _load(name: Any) -> tuple[str, Runner]:
        if not isinstance(name, str) or not name:
            raise QmgrError("model is required", code="bad_request")
        with catalog.reading() as session:
            v = resolve(session, name)
            ref = f"{v.model.name}:{v.tag}"
        return ref, running.runner(ref, None)

    @_answers_errors
    async def chat(request: Request) -> Response:
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise QmgrError("messages must be a non-empty list of {role, content} objects",
                            code="bad_request")
        req = {"op": "chat", "messages": [_content(m) for m in messages],
               "params": params_of(body)}
        ref, runner = await run_in_threadpool(_load, body.get("model"))
        return await _respond(ref, runner, req, body, chat=True)

    @_answers_errors
    async def complete(request: Request) -> Response:
        body = await body_of(request)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]  # clients that batch send one prompt as a list
        if not isinstance(prompt, str):
            raise QmgrError("prompt must be a string", code="bad_request")
        req = {"op": "generate", "prompt": prompt, "params": params_of(body)}
        ref, runner = await run_in_threadpool(_load, body.get("model"))
        return await _respond(ref, runner, req, body, chat=False)

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", complete, methods=["POST"]),
    ]


async def _respond(model: str, runner: Runner, req: dict[str, Any], body: dict[str, Any],
                   chat: bool) -> Response:
    """One completion object, or its chunks as Server-Sent Events. The runner's first answer
    is awaited before the status is sent, so that a refusal (no chat template) is an HTTP
    error like any other rather than an event in a 200 stream."""
    messages = relay(runner, req)
    max_tokens = GenParams.from_dict(req["params"]).max_tokens
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model}

    def finish(stats: dict[str, Any]) -> str:
        return "length" if stats.get("tokens", 0) >= max_tokens else "stop"

    def usage(stats: dict[str, Any]) -> dict[str, int]:
        prompt, completion = stats.get("prompt_tokens", 0), stats.get("tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    try:
        first = await anext(messages)
    except StopAsyncIteration:
        first = {"error": {"code": "runner_died", "message": "the runner answered nothing"}}
    if "error" in first:
        await messages.aclose()
        raise QmgrError(first["error"]["message"], code=first["error"]["code"])

    if not body.get("stream"):
        try:
            text, stats = await whole(_after(first, messages))
        finally:
            await messages.aclose()
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        return JSONResponse({**head, "choices": [{**choice, "finish_reason": finish(stats)}],
                             "usage": usage(stats)})

    options = body.get("stream_options") or {}
    with_usage = isinstance(options, dict) and options.get("include_usage") is True
    head["object"] = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict[str, Any] | None, **extra: Any) -> str:
        chunk = {**head, "choices": [{"index": 0, **choice}] if choice else [], **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    def piece(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        if chat:
            return {"delta": {"content": text} if text else {},
                    "finish_reason": finish_reason}
        return {"text": text, "logprobs": None, "finish_reason": finish_reason}

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                yield event({"delta": {"role": "assistant", "content": ""},
                             "finish_reason": None})
            async for msg in _after(first, messages):
                if "error" in msg:
                    err = msg["error"]
                    yield f"data: {json.dumps(error_body(err['code'], err['message']))}\n\n"
                    return
                if msg.get("text"):
                    yield event(piece(msg["text"]))
                if "done" in msg:
                    stats = msg["done"]
                    yield event(piece("", finish(stats)))
                    if with_usage:
                        yield event(None, usage=usage(stats))
            yield "data: [DONE]\n\n"
        finally:
            await messages.aclose()  # a client that left stops its generation

    return StreamingResponse(events(), media_type=SSE, headers={"Cache-Control": "no-cache"})


async def _after(first: dict[str, Any], rest: AsyncGenerator[dict[str, Any], None]
                 ) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for msg in rest:
        yield msg
