"""The eval worker: ``python -m qmgr.eval.worker`` compares a model's variants with its base
on one text, outside the daemon (native code that crashes costs this process only; a cancel
is a kill).

Request, JSON on stdin::

    {"backend": "llama.cpp", "text": "/path/eval.txt", "n_ctx": 512,
     "base": {"ref": "gemma-3-270m:F16", "path": "/blobs/..."},
     "variants": [{"ref": "gemma-3-270m:Q4_K_M", "path": "/blobs/..."}, ...],
     "max_tokens": 4096,                 # optional: use only the text's first tokens
     "options": {"n_gpu_layers": -1}}    # optional: LoadOptions for every model but n_ctx

Answer, JSON lines on stdout: ``{"progress": 0.42, "message": "Q4_K_M: chunk 3/8"}`` as it
goes, then one ``{"error": {"code": ..., "message": ...}}`` or::

    {"result": {"backend": "llama.cpp", "backend_version": "0.3.36",
                "text_sha256": "...", "text_tokens": 767, "tokens": 381, "n_ctx": 256,
                "chunks": 3, "seconds": 45.9,
                "base": {"ref": "gemma-3-270m:F16", "ppl": 8.259},
                "variants": [{"ref": "gemma-3-270m:Q4_K_M", "ppl": 8.417, "delta_ppl": 0.158,
                              "kld": 0.01905, "kld_p99": 0.22, "top_agreement": 0.958,
                              "tokens": 381}, ...]}}

``ppl`` is the variant's perplexity, ``delta_ppl`` the variant's minus the base's, ``kld`` the
mean of KL(base || variant) over the scored positions (nats), ``kld_p99`` its 99th
percentile, ``top_agreement`` the fraction (0..1) of positions where both models' most likely
token is the same. With no variants the result has the base's perplexity alone. Error codes:
``no_backend``, ``load_failed``, ``tokenizer_mismatch``, ``text_too_short``, ``eval_failed``
(anything else; the traceback goes to stderr).

The text is read with :func:`qmgr.eval.read_text` (a first '#' line is its source, not text);
``text_sha256`` is the digest of the file's bytes. It is tokenized once with the base's
tokenizer; every variant must tokenize it to the same ids (variants of one model do), or the
worker stops with ``tokenizer_mismatch``. Scoring is the backend's ``score`` (llama.cpp's
perplexity tool's chunking: only the second half of each ``n_ctx`` chunk is scored, ``tokens``
counts the scored positions); the metrics are :mod:`qmgr.eval.metrics`.

Memory: KL divergence needs both models' full distributions at each position (1 MiB each for
a 262k vocabulary), so they are never kept: the base stays loaded, each variant is loaded in
turn beside it, and the two are scored side by side, a piece of a chunk at a time (64
positions: 2 x 64 MiB for Gemma). The base is evaluated again for each variant (its scores
come out the same every time), which costs time (with a 16-bit base and three variants,
about half the run) but holds memory to two models and two pieces, however long the text;
keeping the base's distributions instead would take 512 KiB a scored position even in
float16 (5 GiB of temporary file for 10k positions).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from qmgr.errors import QmgrError
from qmgr.eval import read_text
from qmgr.eval.metrics import Comparison, perplexity
from qmgr.plugin.backend import Backend, LoadOptions
from qmgr.workerio import progress, serve


class EvalError(QmgrError):
    """An expected failure: a message a person can act on, with a stable code."""

    code = "eval_failed"


def find_backend(name: str) -> Backend:
    from qmgr.plugins import PluginSet

    return cast(Backend, PluginSet().find("register_backends", name))


def load(backend: Any, ref: str, path: str, options: LoadOptions) -> Any:
    try:
        return backend.load(Path(path), options)
    except Exception as e:
        raise EvalError(f"could not load {ref}: {e}", code="load_failed") from e


def check_tokens(base_ref: str, base_tokens: list[int], ref: str, tokens: list[int]) -> None:
    if tokens != base_tokens:
        pairs = zip(base_tokens, tokens, strict=False)
        at = next((i for i, (a, b) in enumerate(pairs) if a != b),
                  min(len(base_tokens), len(tokens)))
        raise EvalError(f"{ref} tokenizes the text differently from {base_ref} (from token "
                        f"{at} on): they are not variants of one model",
                        code="tokenizer_mismatch")


def too_short(tokens: list[int], n_ctx: int) -> EvalError:
    return EvalError(f"the text is {len(tokens)} tokens: not one chunk of {n_ctx} (a few "
                     "thousand tokens are better)", code="text_too_short")


def compare(base: Any, base_ref: str, variant: Any, ref: str, tokens: list[int], n_ctx: int,
            on_chunk: Callable[[int], None]) -> Comparison:
    """Score both models side by side, a piece at a time; ``on_chunk(chunks done)``."""
    comparison = Comparison()
    per_chunk = n_ctx - 1 - n_ctx // 2
    pieces = zip(base.score(tokens, n_ctx, True), variant.score(tokens, n_ctx, True),
                 strict=True)
    for b, v in pieces:
        if b.distributions.shape != v.distributions.shape:
            raise EvalError(f"{ref} has a vocabulary of {v.distributions.shape[1]} tokens and "
                            f"{base_ref} of {b.distributions.shape[1]}: they are not variants "
                            "of one model", code="tokenizer_mismatch")
        before = comparison.count // per_chunk
        comparison.add(b, v)
        if comparison.count // per_chunk > before:
            on_chunk(comparison.count // per_chunk)
    if comparison.count == 0:
        raise too_short(tokens, n_ctx)
    return comparison


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    backend = find_backend(request.get("backend") or "llama.cpp")
    n_ctx = int(request.get("n_ctx") or 512)
    options = LoadOptions(**{**(request.get("options") or {}), "n_ctx": n_ctx})
    text_path = Path(request["text"])
    digest = hashlib.sha256(text_path.read_bytes()).hexdigest()
    text = read_text(text_path)
    base_ref, variants = request["base"]["ref"], request.get("variants") or []

    progress(0.0, f"loading {base_ref}")
    base = load(backend, base_ref, request["base"]["path"], options)
    try:
        all_tokens = base.tokenize(text)
        tokens = all_tokens[:int(request["max_tokens"])] if request.get("max_tokens") else \
            all_tokens
        chunks = (len(tokens) + 1) // n_ctx  # + BOS, if the model adds one
        if chunks < 1:
            raise too_short(tokens, n_ctx)
        results = []
        for i, variant in enumerate(variants):
            ref = variant["ref"]

            def on_chunk(done: int, i: int = i, ref: str = ref) -> None:
                progress((i + done / chunks) / len(variants), f"{ref}: chunk {done}/{chunks}")

            progress(i / len(variants), f"loading {ref}")
            session = load(backend, ref, variant["path"], options)
            try:
                check_tokens(base_ref, all_tokens, ref, session.tokenize(text))
                result = compare(base, base_ref, session, ref, tokens, n_ctx, on_chunk).result()
            finally:
                session.close()
            results.append({"ref": ref, **result})
        if results:
            base_ppl, scored = results[0]["base_ppl"], results[0]["tokens"]
        else:  # the base's perplexity alone
            progress(0.0, f"scoring {base_ref}")
            logprobs = [x for s in base.score(tokens, n_ctx, False) for x in s.logprobs]
            if not logprobs:
                raise too_short(tokens, n_ctx)
            base_ppl, scored = perplexity(-math.fsum(logprobs), len(logprobs)), len(logprobs)
    finally:
        base.close()
    for r in results:
        del r["base_ppl"]  # the same for every variant: it is the base's
    return {"backend": backend.name, "backend_version": str(backend.version),
            "text_sha256": digest, "text_tokens": len(tokens), "tokens": scored,
            "n_ctx": n_ctx, "chunks": scored // (n_ctx - 1 - n_ctx // 2),
            "seconds": round(time.monotonic() - started, 2),
            "base": {"ref": base_ref, "ppl": base_ppl}, "variants": results}


def main() -> int:
    return serve(evaluate, QmgrError, "eval_failed")


if __name__ == "__main__":
    sys.exit(main())
