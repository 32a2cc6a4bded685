"""OpenAI's HTTP API over the models qmgr catalogs, as OpenAI's own clients use it.

Shapes follow OpenAI's API reference: ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/chat/completions`` and ``POST /v1/completions`` (one object, or with ``"stream":
true`` Server-Sent Events ending in ``data: [DONE]``). Errors are OpenAI's ``{"error":
{"message", "type", "param", "code"}}`` with the status of qmgr's code (an unknown model:
``not_found``, 404), answered here rather than by the app, whose errors are Ollama's. Model
names are the ones Ollama's routes take (:func:`qmgr.serve.ollama.resolve`).

Defaults are qmgr's, not OpenAI's: ``temperature`` 0 (greedy) and ``max_tokens`` 256 when a
request leaves them out.

``tools`` are shown to the model and its calls read back (:mod:`qmgr.serve.tools`);
``tool_choice`` ``"required"`` or a named function forces a call (the sampler is held to the
calls' JSON schema), ``"none"`` leaves the tools out. ``response_format`` ``json_object`` or
``json_schema`` constrains the sampler the same way. ``/v1/embeddings`` answers
L2-normalised vectors (floats, or base64 float32 as OpenAI's client asks by default).

Not here: ``logprobs``, ``n`` > 1, token-array inputs.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Variant
from qmgr.errors import Busy, QmgrError, status_of
from qmgr.plugin.backend import GenParams
from qmgr.run.loading import Running
from qmgr.run.manager import ModelManager, Runner
from qmgr.run.routes import answering, embedded, whole
from qmgr.serve import tools as tooling
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
            if isinstance(e, Busy):
                final = {"retry-after": str(e.retry_after)}
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
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        params["format"] = "json"
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise QmgrError("response_format json_schema needs json_schema.schema (an "
                            "object)", code="bad_request")
        params["format"] = schema
    elif fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise QmgrError("response_format: {\"type\": \"text\"}, \"json_object\" or "
                        "\"json_schema\"", code="bad_request")
    return params


def tools_of(body: dict[str, Any], params: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The request's tools as the model is shown them, with ``tool_choice`` applied:
    ``"none"`` shows none; ``"required"`` or a named function holds the sampler to a call."""
    tools = tooling.check_tools(body.get("tools"))
    choice = body.get("tool_choice")
    if not tools or choice in (None, "auto"):
        return tools
    if choice == "none":
        return None
    if choice == "required":
        params["format"] = tooling.call_schema(tools)
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        params["format"] = tooling.call_schema(tools, choice["function"].get("name"))
    else:
        raise QmgrError('tool_choice: "none", "auto", "required" or {"type": "function", '
                        '"function": {"name": ...}}', code="bad_request")
    return tools


def _content(message: Any) -> dict[str, Any]:
    """A chat message as qmgr's runner takes it: text content (a list of text parts joined),
    an assistant's ``tool_calls`` (their JSON-text arguments as objects) and a tool result's
    ``tool_call_id``."""
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
    out: dict[str, Any] = {"role": role, "content": content}
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [_call_in(c) for c in calls]
    if role == "tool" and message.get("name"):
        out["tool_name"] = message["name"]
    return out


def _call_in(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise QmgrError("a tool call must be {\"type\": \"function\", \"function\": "
                        "{\"name\", \"arguments\"}}", code="bad_request")
    args = function.get("arguments") or "{}"
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise QmgrError("a tool call's arguments must be JSON", code="bad_request") from None
    return {"function": {"name": function.get("name"), "arguments": args}}


def _calls_out(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls in OpenAI's shape: ids, and arguments as JSON text."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
            for c in calls]


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
        params = params_of(body)
        tools = tools_of(body, params)
        req: dict[str, Any] = {"op": "chat", "messages": [_content(m) for m in messages],
                               "params": params}
        if tools:
            req["tools"] = tools
        ref, runner = await run_in_threadpool(_load, body.get("model"))
        return await _respond(ref, runner, req, body, chat=True, tools=tools)

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

    @_answers_errors
    async def embeddings(request: Request) -> Response:
        body = await body_of(request)
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not inputs or not all(
                isinstance(i, str) for i in inputs):
            raise QmgrError("input must be a string or a non-empty list of strings (token "
                            "arrays are not taken)", code="bad_request")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise QmgrError("encoding_format: float or base64", code="bad_request")
        ref, runner = await run_in_threadpool(_load, body.get("model"))
        vectors, tokens = await embedded(runner, inputs)
        encoded: list[Any] = vectors
        if encoding == "base64":
            import base64
            import struct

            encoded = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
                       for v in vectors]
        return JSONResponse({"object": "list", "model": ref, "data": [
            {"object": "embedding", "index": i, "embedding": v}
            for i, v in enumerate(encoded)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", complete, methods=["POST"]),
    ]


async def _respond(model: str, runner: Runner, req: dict[str, Any], body: dict[str, Any],
                   chat: bool, tools: list[dict[str, Any]] | None = None) -> Response:
    """One completion object, or its chunks as Server-Sent Events. The runner's first answer
    is awaited before the status is sent, so that a refusal (no chat template) is an HTTP
    error like any other rather than an event in a 200 stream."""
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

    messages = await answering(runner, req)

    if not body.get("stream"):
        try:
            text, stats = await whole(messages)
        finally:
            await messages.aclose()
        calls = tooling.tool_calls(text, tools)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message.update(content=None, tool_calls=_calls_out(calls))
        choice = ({"index": 0, "message": message} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        return JSONResponse({**head, "choices": [{
            **choice, "finish_reason": "tool_calls" if calls else finish(stats)}],
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
        text: list[str] = []  # with tools: sent whole, once it is known to be a call or not
        try:
            if chat:
                yield event({"delta": {"role": "assistant", "content": ""},
                             "finish_reason": None})
            async for msg in messages:
                if "error" in msg:
                    err = msg["error"]
                    yield f"data: {json.dumps(error_body(err['code'], err['message']))}\n\n"
                    return
                if msg.get("text") and tools:
                    text.append(msg["text"])
                elif msg.get("text"):
                    yield event(piece(msg["text"]))
                if "done" in msg:
                    stats = msg["done"]
                    calls = tooling.tool_calls("".join(text), tools)
                    if calls:
                        deltas = [{**c, "index": i} for i, c in enumerate(_calls_out(calls))]
                        yield event({"delta": {"tool_calls": deltas}, "finish_reason": None})
                        yield event({"delta": {}, "finish_reason": "tool_calls"})
                        if with_usage:
                            yield event(None, usage=usage(stats))
                        continue
                    if text:
                        yield event(piece("".join(text)))
                    yield event(piece("", finish(stats)))
                    if with_usage:
                        yield event(None, usage=usage(stats))
            yield "data: [DONE]\n\n"
        finally:
            await messages.aclose()  # a client that left stops its generation

    return StreamingResponse(events(), media_type=SSE, headers={"Cache-Control": "no-cache"})

