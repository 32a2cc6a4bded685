"""The ``eval`` and ``bench`` jobs: measure what each quant of a model costs and gains.

``bench``: prompt processing and generation speed of each variant, through the same runners
``qmgr run`` uses. ``eval``: perplexity, ΔPPL, KL divergence and top-token agreement of each
variant against the model's highest-precision variant, on the same tokens, in a worker
process (``python -m qmgr.eval.worker``). Results are stored in ``evals`` with the text's
digest, the token count, the backend and the hardware, and the fit policy ranks by them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Eval, Model, Variant, VariantState
from qmgr.errors import NotFound, QmgrError
from qmgr.eval import read_text
from qmgr.fit.hardware import Snapshot
from qmgr.run.crash import crash_error
from qmgr.run.loading import Running, check_ctx
from qmgr.work.jobs import JobHandle, run_worker

log = logging.getLogger(__name__)

BUILTIN_TEXT = Path(__file__).resolve().parents[1] / "data" / "eval.txt"
BENCH_RUNS = 3
WORKER_DIED = re.compile(r"the worker died \(exit (-?\d+)\); see the daemon log")


def precision_rank(v: Variant) -> float:
    """Higher is closer to the original weights: 16/32-bit first, then by bits per weight."""
    q = (v.quant_type or "").upper()
    if q in ("F32", "F16", "BF16"):
        return 100.0 + (32 if q == "F32" else 16)
    return float(v.bits_per_weight or 0)


class Measuring:
    def __init__(self, catalog: Catalog, running: Running, hardware: Callable[[], Snapshot],
                 env: dict[str, str] | None = None):
        self.catalog = catalog
        self.running = running
        self.hardware = hardware
        self.env = dict(os.environ) if env is None else env

    def variants(self, ref: str, tags: list[str] | None) -> list[tuple[str, str]]:
        """(ref, path) of the variants to measure: those named, else every ready one."""
        name = ref.partition(":")[0]
        with self.catalog.reading() as session:
            found = queries.resolve(session, name)
            ready = [v for v in found if v.state == VariantState.READY and len(v.files) == 1]
            if tags:
                by_tag = {v.tag.upper(): v for v in ready}
                missing = [t for t in tags if t.upper() not in by_tag]
                if missing:
                    raise NotFound(f"{name} has no ready variant {', '.join(missing)} (see "
                                    "`qmgr list`)")
                ready = [by_tag[t.upper()] for t in tags]
            elif ":" in ref:
                ready = [queries.resolve_one(session, ref)]
            ready.sort(key=precision_rank, reverse=True)
            return [(f"{v.model.name}:{v.tag}", queries.local_paths(v)[0]) for v in ready]

    def base_of(self, name: str) -> tuple[str, str]:
        with self.catalog.reading() as session:
            found = [v for v in queries.resolve(session, name)
                     if v.state == VariantState.READY and len(v.files) == 1]
            best = max(found, key=precision_rank)
            return f"{best.model.name}:{best.tag}", queries.local_paths(best)[0]

    def store(self, rows: list[dict[str, Any]]) -> None:
        hw = self.hardware().to_dict()
        with self.catalog.writing() as session:
            for r in rows:
                variant = queries.resolve_one(session, r["ref"])
                base_id = None
                if r.get("base"):
                    base_id = queries.resolve_one(session, r["base"]).id
                session.add(Eval(variant_id=variant.id, base_variant_id=base_id,
                                 metric=r["metric"], dataset_digest=r.get("digest"),
                                 tokens=r.get("tokens"), value=float(r["value"]),
                                 backend=r["backend"], hardware=hw))

    # -- bench --------------------------------------------------------------------------------

    def run_bench(self, handle: JobHandle) -> dict[str, Any]:
        args = handle.arguments
        targets = self.variants(args["ref"], args.get("variants"))
        words = read_text(BUILTIN_TEXT).split()
        prompt = " ".join(words[: int(args.get("prompt_words") or 96)])
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        gen = int(args.get("tokens") or 64)
        results = []
        for i, (ref, _path) in enumerate(targets):
            handle.update(phase=f"bench {ref} ({i + 1}/{len(targets)})",
                          fraction=i / len(targets), message=ref)
            runner = self.running.runner(ref, ctx=int(args.get("ctx") or 1024))
            try:
                runs = []
                for _ in range(BENCH_RUNS):
                    stats: dict[str, Any] = {}
                    for msg in runner.request({"op": "generate", "prompt": prompt, "params": {
                            "max_tokens": gen, "temperature": 0.0, "seed": 0}}):
                        if "error" in msg:
                            raise QmgrError(msg["error"]["message"], code="backend_failed")
                        stats = msg.get("done", stats)
                    runs.append(stats)
            finally:
                self.running.manager.stop(ref)
            # A repeated prompt is served from the cache: count only the tokens processed.
            pp = statistics.median((r["prompt_tokens"] - r.get("prompt_cached", 0)) /
                                   r["prompt_s"] for r in runs)
            tg = statistics.median(r["tokens_per_s"] for r in runs)
            results.append({"ref": ref, "backend": runner.backend,
                            "prompt_tokens": runs[0]["prompt_tokens"],
                            "tokens": runs[0]["tokens"], "pp_tps": pp, "tg_tps": tg})
        self.store([{"ref": r["ref"], "metric": m, "value": r[m], "digest": digest,
                     "tokens": r["tokens"], "backend": r["backend"]}
                    for r in results for m in ("pp_tps", "tg_tps")])
        handle.update(phase="done", fraction=1.0)
        return {"bench": results, "runs": BENCH_RUNS}

    # -- eval ---------------------------------------------------------------------------------

    def run_eval(self, handle: JobHandle) -> dict[str, Any]:
        args = handle.arguments
        name = args["ref"].partition(":")[0]
        base_ref, base_path = self.base_of(name)
        targets = [t for t in self.variants(args["ref"], args.get("variants"))
                   if t[0] != base_ref]
        text_path = Path(args.get("text") or BUILTIN_TEXT)
        n_ctx = int(args.get("ctx") or 512)
        base_facts = self.running.variant(base_ref)[2]
        check_ctx(base_ref, base_facts, n_ctx)
        request = {"backend": self.running.backend_for(base_facts), "text": str(text_path),
                   "n_ctx": n_ctx,
                   "base": {"ref": base_ref, "path": base_path},
                   "variants": [{"ref": r, "path": p} for r, p in targets],
                   "max_tokens": args.get("max_tokens")}
        result = self._worker(handle, request)
        rows = []
        for v in result["variants"]:
            for metric in ("ppl", "delta_ppl", "kld", "top_agreement"):
                rows.append({"ref": v["ref"], "base": base_ref, "metric": metric,
                             "value": v[metric], "digest": result["text_sha256"],
                             "tokens": result["tokens"], "backend": request["backend"]})
        rows.append({"ref": base_ref, "metric": "ppl", "value": result["base"]["ppl"],
                     "digest": result["text_sha256"], "tokens": result["tokens"],
                     "backend": request["backend"]})
        self.store(rows)
        handle.update(phase="done", fraction=1.0)
        return {"eval": result, "base": base_ref, "text": str(text_path),
                "builtin_text": text_path == BUILTIN_TEXT}

    def _worker(self, handle: JobHandle, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return run_worker(handle, "qmgr.eval.worker", request, "evaluating", self.env,
                              "eval_failed")
        except QmgrError as e:
            # run_worker tells a worker that died without an answer by its exit status only.
            died = WORKER_DIED.fullmatch(e.message) if e.code == "eval_failed" else None
            if died is None or int(died[1]) >= 0:
                raise
            step = handle.progress.get("message")  # the worker's last: "loading gemma:F16"
            doing = f"evaluating {handle.arguments['ref']}" + (f" ({step})" if step else "")
            raise crash_error(request["backend"], int(died[1]), doing) from None


def measured(catalog: Catalog, model: str) -> dict[str, dict[str, float]]:
    """Latest stored measurements per variant tag of a model: {tag: {metric: value}}."""
    out: dict[str, dict[str, float]] = {}
    with catalog.reading() as session:
        rows = session.execute(
            select(Variant.tag, Eval.metric, Eval.value).join(Eval, Eval.variant_id == Variant.id)
            .join(Model, Variant.model_id == Model.id).where(Model.name == model)
            .order_by(Eval.id))
        for tag, metric, value in rows:
            out.setdefault(tag, {})[metric] = value
    return out
