"""Ollama's HTTP API over the models qmgr catalogs, as Ollama's own clients use it.

Shapes follow Ollama's docs/api.md: ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``, ``/api/generate`` and ``/api/chat`` (newline-delimited JSON by default,
one object with ``"stream": false``), errors ``{"error": "..."}`` with the status of
qmgr's code (``not_found``: 404, as Ollama answers for a model it does not have). Names are
qmgr's: every catalog name (``gemma3:Q4_K_M``, the bare model name for its default variant)
and every reference a variant was pulled with; a ``:latest`` that is not a tag means the
default, as Ollama's clients add it.

``format`` (``"json"`` or a JSON schema) constrains the sampler (a llama.cpp grammar);
``tools`` are shown to the model and its calls read back (:mod:`qmgr.serve.tools`): an answer
with tools, or with ``think``, is sent as one piece once it is whole, since a call or the
end of the thinking is only known then. ``/api/embed`` and ``/api/embeddings`` answer
L2-normalised vectors from the same loaded model.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from qmgr import __version__, gguf
from qmgr.catalog import queries, record
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Variant, VariantState
from qmgr.errors import NotFound, QmgrError
from qmgr.fetch import aliases
from qmgr.fetch.fitting import Fitter
from qmgr.fetch.pull import Puller
from qmgr.fetch.routes import submit_pull
from qmgr.plugin.backend import GenParams
from qmgr.run.loading import Running
from qmgr.run.manager import ModelManager, Runner
from qmgr.run.routes import answering, embedded, whole
from qmgr.serve import tools as tooling
from qmgr.work.jobs import JobRunner
from qmgr.work.routes import updates

NDJSON = "application/x-ndjson"
# Ollama's options -> qmgr's generation parameters (GenParams); num_ctx is the context.
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
           "num_predict": "max_tokens", "stop": "stop", "min_p": "min_p",
           "repeat_penalty": "repeat_penalty"}


def _iso(when: datetime.datetime) -> str:
    """RFC 3339 in UTC, as Ollama writes times (the catalog keeps naive UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def now() -> str:
    return _iso(datetime.datetime.now(datetime.UTC))


def _size_label(n: int | None) -> str:
    if not n:
        return ""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0", "")
    return str(n)


def details(v: Variant) -> dict[str, Any]:
    arch = v.model.architecture or ""
    return {"parent_model": "", "format": "gguf", "family": arch,
            "families": [arch] if arch else None,
            "parameter_size": _size_label(v.model.parameter_count),
            "quantization_level": v.quant_type or ""}


DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_of(value: Any) -> float | None:
    """Ollama's ``keep_alive``: seconds (a number), a Go duration (``"5m"``, ``"1h30m"``), a
    negative value (loaded until stopped); None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise QmgrError(f"keep_alive {value!r}: seconds or a duration such as \"5m\"",
                        code="bad_request")
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    try:
        return sign * float(text)  # a bare number: seconds
    except ValueError:
        pass
    parts = DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise QmgrError(f"keep_alive {value!r}: seconds or a duration such as \"5m\"",
                        code="bad_request")
    return sign * sum(float(n) * UNITS[u] for n, u in parts)


def resolve(session: Session, name: str, ready: bool = True) -> Variant:
    """The (ready) variant an Ollama ``model`` names, else ``not_found`` (404, as Ollama)."""
    v = queries.resolve_served(session, name)
    if ready and v.state != VariantState.READY:
        raise QmgrError(f"model '{name}' is {v.state}: its file is not usable",
                        code="not_ready")
    return v


def routes(catalog: Catalog, running: Running, models: ModelManager) -> list[Route]:
    def model_of(body: dict[str, Any]) -> str:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise QmgrError("model is required", code="bad_request")
        return name

    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    def _tags() -> dict[str, Any]:
        with catalog.reading() as session:
            out = []
            ready = ready_variants(session)
            by_ref = {f"{v.model.name}:{v.tag}": v for v in ready}
            named = [(ref, v) for ref, v in by_ref.items()]
            # A user's alias of a cataloged variant (what /api/copy makes) is a name too.
            for alias in aliases.all_aliases(session):
                target = by_ref.get(str(alias["reference"]))
                if not alias["builtin"] and target is not None:
                    named.append((f"{alias['name']}:latest", target))
            for name, v in named:
                out.append({"name": name, "model": name,
                            "modified_at": _iso(v.created_at),
                            "size": v.size, "digest": v.sha256, "details": details(v)})
            return {"models": out}

    async def tags(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(_tags))

    def _show(name: str) -> dict[str, Any]:
        with catalog.reading() as session:
            v = resolve(session, name)
            facts = dict(v.facts or {})
            arch = v.model.architecture or facts.get("architecture") or ""
            info: dict[str, Any] = {"general.architecture": arch,
                                    "general.parameter_count": v.model.parameter_count,
                                    "general.file_type": facts.get("file_type")}
            for key in ("context_length", "embedding_length", "block_count", "head_count",
                        "head_count_kv", "feed_forward_length", "vocab_size"):
                if facts.get(key) is not None:
                    info[f"{arch}.{key}"] = facts[key]
            path = queries.local_paths(v)[0]
            modified = _iso(v.created_at)
            out = {"license": "", "modelfile": f"FROM {path}\n", "parameters": "",
                   "details": details(v), "model_info": info, "modified_at": modified}
        template = out["template"] = template_of(path)
        # Ollama's names for what a model can do (chat is part of completion); tools and
        # thinking when the file's template renders them.
        out["capabilities"] = ["completion", *(["tools"] if "tools" in template else []),
                               *(["thinking"] if tooling.thinks(template) else [])]
        return out

    def _template(name: str) -> str:
        with catalog.reading() as session:
            path = queries.local_paths(resolve(session, name))[0]
        return template_of(path)

    async def show(request: Request) -> Response:
        body = await body_of(request)
        return JSONResponse(await run_in_threadpool(_show, model_of(body)))

    def _ps() -> dict[str, Any]:
        out = []
        loaded = models.ps()
        with catalog.reading() as session:
            for r in loaded:
                try:
                    v = queries.resolve_one(session, r["ref"])
                except NotFound:
                    continue
                keep = models.keep_alive if r["keep_alive"] is None else r["keep_alive"]
                # Loaded until stopped: Ollama shows a date far ahead.
                expires = (time.time() + max(0.0, keep - r["idle_s"]) if keep >= 0
                           else time.time() + 10 * 365 * 86400)
                out.append({"name": r["ref"], "model": r["ref"], "size": v.size,
                            "digest": v.sha256, "details": details(v),
                            "expires_at": _iso(datetime.datetime.fromtimestamp(
                                expires, datetime.UTC)),
                            # On the CPU nothing is in VRAM; with layers offloaded, their share.
                            "size_vram": int((v.size or 0) * _gpu_share(r)),
                            "context_length": r["ctx"]})
        return {"models": out}

    async def ps(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(_ps))

    def _load(name: str, options: dict[str, Any]) -> tuple[str, Runner]:
        with catalog.reading() as session:
            v = resolve(session, name)
            ref = f"{v.model.name}:{v.tag}"
        ctx = options.get("num_ctx")
        return ref, running.runner(ref, int(ctx) if ctx else None)

    def params_of(body: dict[str, Any]) -> dict[str, Any]:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise QmgrError("options must be an object", code="bad_request")
        params = {qmgr_name: options[name] for name, qmgr_name in OPTIONS.items()
                  if options.get(name) is not None}
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        fmt = tooling.check_format(body.get("format"))
        if fmt is not None:
            params["format"] = fmt
        return params

    async def thinking(name: str, body: dict[str, Any]) -> bool:
        """Whether to split the model's thinking from its answer: ``think`` asked of a model
        whose template has none is refused, as Ollama does."""
        think = body.get("think")
        if think is None or think is False:
            return False
        if not tooling.thinks(await run_in_threadpool(_template, name)):
            raise QmgrError(f'"{name}" does not support thinking', code="no_thinking")
        return True

    def _unload(name: str) -> None:
        with catalog.reading() as session:
            v = resolve(session, name)
            ref = f"{v.model.name}:{v.tag}"
        models.stop(ref)

    async def empty(name: str, body: dict[str, Any], keep: float | None,
                    piece: Callable[[str], dict[str, Any]]) -> Response:
        """A request with nothing to answer loads the model, or with keep_alive 0 unloads it
        (Ollama's way to preload and to free memory)."""
        if keep == 0:
            await run_in_threadpool(_unload, name)
        else:
            _ref, runner = await run_in_threadpool(_load, name, body.get("options") or {})
            if keep is not None:
                runner.keep_alive = keep
        return JSONResponse({"model": name, "created_at": now(), **piece(""), "done": True,
                             "done_reason": "unload" if keep == 0 else "load"})

    def kept(ref: str, runner: Runner, keep: float | None) -> Callable[[], None]:
        """Apply the request's keep_alive: 0 unloads once the answer is sent."""
        if keep is not None and keep != 0:
            runner.keep_alive = keep

        def after() -> None:
            if keep == 0:
                models.stop(ref)

        return after

    async def generate(request: Request) -> Response:
        body = await body_of(request)
        name = model_of(body)
        keep = keep_alive_of(body.get("keep_alive"))
        if not body.get("prompt") and not body.get("system"):
            return await empty(name, body, keep, _generate_piece)
        started = time.monotonic_ns()
        ref, runner = await run_in_threadpool(_load, name, body.get("options") or {})
        loaded = time.monotonic_ns()
        prompt = body.get("prompt") or ""
        if body.get("system"):
            prompt = f"{body['system']}\n\n{prompt}"
        req = {"op": "generate", "prompt": prompt, "params": params_of(body)}
        whole_text = None
        if await thinking(name, body):
            def whole_text(text: str) -> dict[str, Any]:
                thought, answer = tooling.split_thinking(text)
                return {"response": answer, "thinking": thought}
        return await _respond(name, runner, req, body, started, loaded, _generate_piece,
                              kept(ref, runner, keep), whole_text)

    async def chat(request: Request) -> Response:
        body = await body_of(request)
        name = model_of(body)
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content", ""), str)
                for m in messages):
            raise QmgrError("messages must be a list of {role, content} objects",
                            code="bad_request")
        keep = keep_alive_of(body.get("keep_alive"))
        if not messages:
            return await empty(name, body, keep, _chat_piece)
        tools = tooling.check_tools(body.get("tools"))
        think = await thinking(name, body)
        req: dict[str, Any] = {"op": "chat", "params": params_of(body),
                               "messages": [_message(m) for m in messages]}
        if tools:
            req["tools"] = tools
        started = time.monotonic_ns()
        ref, runner = await run_in_threadpool(_load, name, body.get("options") or {})
        loaded = time.monotonic_ns()
        whole_text = None
        if tools or think:
            def whole_text(text: str) -> dict[str, Any]:
                thought, answer = tooling.split_thinking(text) if think else ("", text)
                message: dict[str, Any] = {"role": "assistant", "content": answer}
                if thought:
                    message["thinking"] = thought
                calls = tooling.tool_calls(answer, tools)
                if calls:
                    message.update(content="", tool_calls=[{"function": c} for c in calls])
                return {"message": message}
        return await _respond(name, runner, req, body, started, loaded, _chat_piece,
                              kept(ref, runner, keep), whole_text)

    async def embeddings_of(body: dict[str, Any], inputs: list[str], truncate: bool
                            ) -> tuple[list[list[float]], int]:
        name = model_of(body)
        keep = keep_alive_of(body.get("keep_alive"))
        ref, runner = await run_in_threadpool(_load, name, body.get("options") or {})
        after = kept(ref, runner, keep)
        try:
            return await embedded(runner, inputs, truncate)
        finally:
            await run_in_threadpool(after)

    async def embed(request: Request) -> Response:
        """``/api/embed``: one L2-normalised vector per input (a string or a list of them)."""
        body = await body_of(request)
        inputs = body.get("input", "")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise QmgrError("input must be a string or a list of strings", code="bad_request")
        started = time.monotonic_ns()
        vectors, tokens = await embeddings_of(body, inputs, body.get("truncate", True) is not
                                              False)
        return JSONResponse({"model": model_of(body), "embeddings": vectors,
                             "total_duration": time.monotonic_ns() - started,
                             "load_duration": 0, "prompt_eval_count": tokens})

    async def embeddings(request: Request) -> Response:
        """``/api/embeddings`` (Ollama's older endpoint): one ``prompt``, one ``embedding``."""
        body = await body_of(request)
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise QmgrError("prompt must be a string", code="bad_request")
        vectors, _tokens = await embeddings_of(body, [prompt], True)
        return JSONResponse({"embedding": vectors[0] if vectors else []})

    def _delete(name: str) -> None:
        with catalog.reading() as session:
            v = resolve(session, name, ready=False)
            ref = f"{v.model.name}:{v.tag}"
        models.stop(ref)
        record.remove_variants(catalog, ref)

    async def delete(request: Request) -> Response:
        """``qmgr rm``: the variant, with the files no other variant uses."""
        await run_in_threadpool(_delete, model_of(await body_of(request)))
        return Response(status_code=200)

    def _copy(source: str, destination: str) -> None:
        with catalog.writing() as session:
            v = resolve(session, source, ready=False)
            aliases.set_alias(session, destination.removesuffix(":latest"),
                              f"{v.model.name}:{v.tag}")

    async def copy(request: Request) -> Response:
        """A new name for a variant: a qmgr alias (``qmgr alias add DEST SOURCE``); no bytes
        are copied."""
        body = await body_of(request)
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str):
            raise QmgrError("give source and destination", code="bad_request")
        await run_in_threadpool(_copy, source, destination)
        return Response(status_code=200)

    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/delete", delete, methods=["DELETE"]),
        Route("/api/copy", copy, methods=["POST"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/embeddings", embeddings, methods=["POST"]),
    ]


def pull_routes(puller: Puller, fitter: Fitter, jobs: JobRunner) -> list[Route]:
    """``POST /api/pull``: a verified qmgr pull job, its progress in Ollama's shape. Any
    reference qmgr knows; without a quant, the one ``qmgr pull --fit`` would choose."""

    def _submit(name: str, insecure: bool) -> dict[str, Any]:
        typed = puller.parse(name)
        fit = typed.kind in ("alias", "hf", "ollama") and not typed.quant and not typed.file
        return submit_pull(puller, fitter, jobs, {"ref": name, "insecure": insecure,
                                                  "fit": fit}, {})

    async def pull(request: Request) -> Response:
        body = await body_of(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise QmgrError("model is required", code="bad_request")
        job = await run_in_threadpool(_submit, name, bool(body.get("insecure")))
        events = updates(jobs, job["id"], job)

        async def statuses() -> AsyncIterator[dict[str, Any]]:
            last = None
            async for job in events:
                for status in _pull_status(job):
                    if status != last:
                        last = status
                        yield status

        if body.get("stream", True) is False:
            ended = job
            async for update in events:
                ended = update
            if ended["state"] != "succeeded":
                raise QmgrError(ended.get("error") or f"the pull was {ended['state']}",
                                code=ended.get("error_code") or "error")
            return JSONResponse({"status": "success"})

        async def lines() -> AsyncIterator[str]:
            async for status in statuses():
                yield json.dumps(status) + "\n"

        return StreamingResponse(lines(), media_type=NDJSON)

    return [Route("/api/pull", pull, methods=["POST"])]


def _pull_status(job: dict[str, Any]) -> list[dict[str, Any]]:
    """What Ollama's clients show for a pull job as it is now."""
    progress = job.get("progress") or {}
    if job["state"] == "failed" or job["state"] == "cancelled":
        return [{"error": job.get("error") or f"the pull was {job['state']}"}]
    if job["state"] == "succeeded":
        return [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                {"status": "success"}]
    phase = progress.get("phase")
    if phase == "downloading":
        name = progress.get("file") or progress.get("quant") or "model"
        return [{"status": f"pulling {name}", "digest": name,
                 "total": progress.get("total") or 0, "completed": progress.get("done") or 0}]
    if phase == "cataloging":
        return [{"status": "verifying sha256 digest"}]
    return [{"status": "pulling manifest"}]


def ready_variants(session: Session) -> list[Variant]:
    from sqlalchemy import select

    from qmgr.catalog.models import Model

    query = (select(Variant).join(Model).where(Variant.state == VariantState.READY)
             .order_by(Model.name, Variant.tag))
    return list(session.scalars(query))


def _gpu_share(loaded: dict[str, Any]) -> float:
    placement = loaded.get("placement") or {}
    layers = placement.get("n_layer") or 0
    return (loaded.get("gpu_layers") or 0) / layers if layers else 0.0


async def body_of(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise QmgrError("the body is not JSON", code="bad_request") from None
    if not isinstance(body, dict):
        raise QmgrError("the body must be a JSON object", code="bad_request")
    return body


def _generate_piece(text: str) -> dict[str, Any]:
    return {"response": text}


def _chat_piece(text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}}


def template_of(path: str) -> str:
    """The chat template in a GGUF file's header (bounded reader); empty when it has none."""
    template = gguf.read_header(path).metadata.get("tokenizer.chat_template")
    return template if isinstance(template, str) else ""


def _message(m: dict[str, Any]) -> dict[str, Any]:
    """An Ollama chat message as the runner takes it: role and content, and an assistant's
    ``tool_calls`` or a tool's result (``tool_name``) when there are."""
    out: dict[str, Any] = {"role": m.get("role", "user"), "content": m.get("content") or ""}
    for key in ("tool_calls", "tool_name"):
        if m.get(key):
            out[key] = m[key]
    return out


async def _respond(name: str, runner: Runner, req: dict[str, Any], body: dict[str, Any],
                   started: int, loaded: int, piece: Callable[[str], dict[str, Any]],
                   after: Callable[[], None],
                   whole_text: Callable[[str], dict[str, Any]] | None = None) -> Response:
    """Ollama's answer: NDJSON chunks then the final one with the timings (integer ns), or,
    with ``"stream": false``, one object with the whole text. ``whole_text`` makes the
    answer's fields from the whole text (tool calls, thinking): the stream then sends them
    as one chunk at the end. The runner's first answer is awaited before the status is sent,
    so a refusal (a full queue, no chat template) is an HTTP error, not a line of a 200."""
    try:
        messages = await answering(runner, req)
    except QmgrError:
        await run_in_threadpool(after)
        raise

    def final(stats: dict[str, Any]) -> dict[str, Any]:
        total = time.monotonic_ns() - started
        return {"model": name, "created_at": now(), **piece(""), "done": True,
                # The runner's default limit applies when the request set none (GenParams).
                "done_reason": "length" if stats.get("tokens", 0) >= req["params"].get(
                    "max_tokens", GenParams().max_tokens) else "stop",
                "total_duration": total, "load_duration": loaded - started,
                "prompt_eval_count": stats.get("prompt_tokens", 0),
                "prompt_eval_duration": int(stats.get("prompt_s", 0) * 1e9),
                "eval_count": stats.get("tokens", 0),
                "eval_duration": int(stats.get("eval_s", 0) * 1e9)}

    if body.get("stream", True) is False:
        try:
            text, stats = await whole(messages)
        finally:
            await messages.aclose()
            await run_in_threadpool(after)
        answer = final(stats)
        answer.update(whole_text(text) if whole_text else piece(text))
        return JSONResponse(answer)

    async def lines() -> AsyncIterator[str]:
        text: list[str] = []
        try:
            async for msg in messages:
                if "error" in msg:
                    yield json.dumps({"error": msg["error"]["message"]}) + "\n"
                    return
                if whole_text is not None:
                    text.append(msg.get("text", ""))
                    if "done" in msg:
                        yield json.dumps({"model": name, "created_at": now(),
                                          **whole_text("".join(text)), "done": False}) + "\n"
                        yield json.dumps(final(msg["done"])) + "\n"
                    continue
                if "text" in msg:
                    yield json.dumps({"model": name, "created_at": now(),
                                      **piece(msg["text"]), "done": False}) + "\n"
                if "done" in msg:
                    yield json.dumps(final(msg["done"])) + "\n"
        finally:
            await messages.aclose()
            await run_in_threadpool(after)

    return StreamingResponse(lines(), media_type=NDJSON)

