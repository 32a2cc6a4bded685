"""The pull job: reference -> source -> chosen variant -> verified files -> catalog row.

Order: expand the alias; if a ready variant from the same source reference is cataloged, reuse
its bytes without touching the network; otherwise ask the source what it offers, pick the
variant, reuse any file whose digest the store already holds, download the rest (resumable,
verified), check each header with qmgr's bounded reader, and only then catalog the variant.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from qmgr import gguf
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Blob, Origin, Variant, VariantState
from qmgr.daemon.importer import ShardFile, combined_facts, record_variant
from qmgr.daemon.jobs import JobHandle
from qmgr.errors import GGUFError, QmgrError
from qmgr.fetch import aliases
from qmgr.fetch.download import Download, Options
from qmgr.fetch.http import make_client
from qmgr.fetch.remote import RemoteVariant
from qmgr.fetch.source import FetchContext, Source
from qmgr.plugins import PluginSet
from qmgr.refs import Reference, parse
from qmgr.store import Store

log = logging.getLogger(__name__)

DEFAULT_QUANT = "Q4_K_M"


@dataclass
class Puller:
    catalog: Catalog
    store: Store
    plugins: PluginSet
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    fitter: Any = None  # qmgr.fit.service.Fitter, for `pull --fit`

    def options(self, insecure: bool) -> Options:
        e = self.env
        return Options(
            parts=int(e["QMGR_DOWNLOAD_PARTS"]) if e.get("QMGR_DOWNLOAD_PARTS") else None,
            part_threshold=int(e.get("QMGR_PART_THRESHOLD", 256 << 20)),
            retries=int(e.get("QMGR_RETRIES", 5)),
            backoff=float(e.get("QMGR_RETRY_BACKOFF", 1.0)),
            insecure=insecure,
            stall_timeout=self.stall_timeout(),
            ca_bundle=e.get("QMGR_CA_BUNDLE") or None,
            direct_io=e.get("QMGR_DIRECT_IO", "1") != "0",
        )

    def stall_timeout(self) -> float:
        return float(self.env.get("QMGR_STALL_TIMEOUT", 30))

    # -- resolving ------------------------------------------------------------------------------

    def resolve(self, raw: str) -> tuple[Reference, Reference]:
        """(what the user typed, what it stands for)."""
        ref = parse(raw)
        with self.catalog.reading() as session:
            return ref, aliases.expand(session, ref)

    def source_for(self, ref: Reference) -> Source:
        for source in self.plugins.registered("register_sources"):
            if ref.kind in getattr(source, "kinds", ()):
                return source
        raise QmgrError(f"no source plugin handles {ref.kind} references (see `qmgr plugins`)",
                        code="no_source")

    def describe_remote(self, raw: str, insecure: bool = False,
                        headers: bool = True) -> dict[str, Any]:
        """What a reference's source offers; with ``headers``, each variant's first header is
        read by HTTP Range to give parameters and bits per weight before any download."""
        from qmgr.fetch.remote_header import remote_facts

        _typed, ref = self.resolve(raw)
        with make_client(self.stall_timeout(), self.env.get("QMGR_CA_BUNDLE")) as client:
            ctx = FetchContext(client, insecure=insecure, env=self.env)
            offered = self.source_for(ref).variants(ref, ctx)
            rows = []
            for v in offered:
                row = v.to_dict()
                first = v.files[0]
                if headers and first.size is not None:
                    try:
                        facts, nbytes = remote_facts(client, first, insecure)
                        row.update(header_bytes=nbytes, parameter_count=facts.parameter_count,
                                   architecture=facts.architecture,
                                   bits_per_weight=facts.bits_per_weight)
                        if not row["quant"]:
                            row["quant"] = facts.quant_type
                    except QmgrError as e:
                        row["header_error"] = e.message
                rows.append(row)
        return {"ref": ref.canonical, "variants": rows}

    @staticmethod
    def choose(ref: Reference, offered: list[RemoteVariant]) -> RemoteVariant:
        if not offered:
            raise QmgrError(f"{ref.canonical} offers no GGUF files", code="not_found",
                            http_status=404)
        if ref.kind in ("url", "ollama") or ref.file:
            return offered[0]
        names = ", ".join(sorted({v.quant or "?" for v in offered}))
        if ref.quant:
            matches = [v for v in offered if v.quant and v.quant.upper() == ref.quant.upper()]
            if len(matches) == 1:
                return matches[0]
            if matches:
                files = ", ".join(v.files[0].name for v in matches)
                raise QmgrError(f"{ref.canonical} has {len(matches)} {ref.quant} files ({files}): "
                                f"name one, e.g. hf://{ref.name}/{matches[0].files[0].name}",
                                code="ambiguous_ref")
            raise QmgrError(f"{ref.canonical} has no {ref.quant} variant; it offers: {names}",
                            code="not_found", http_status=404)
        if len(offered) == 1:
            return offered[0]
        for v in offered:
            if v.quant == DEFAULT_QUANT:
                return v
        raise QmgrError(f"{ref.canonical} offers {len(offered)} variants ({names}): name one, "
                        f"e.g. {ref.raw}:{offered[0].quant}", code="ambiguous_ref")

    # -- the job ------------------------------------------------------------------------------

    def cached(self, source_ref: str) -> list[ShardFile] | None:
        """Files of a ready variant pulled from this very source reference, if any."""
        with self.catalog.reading() as session:
            variant = session.scalar(select(Variant).where(
                Variant.source_ref == source_ref, Variant.state == VariantState.READY))
            if variant is None:
                return None
            blobs = [(Path(f.blob.path), f.blob.sha256, f.blob.size) for f in variant.files]
        if not all(p.is_file() and p.stat().st_size == size for p, _sha, size in blobs):
            return None
        return [ShardFile(p, gguf.inspect(p), sha, size) for p, sha, size in blobs]

    def have_blob(self, sha256: str) -> Path | None:
        with self.catalog.reading() as session:
            blob = session.scalar(select(Blob).where(Blob.sha256 == sha256))
            path = Path(blob.path) if blob else self.store.blob_path(sha256)
        if path.is_file():
            return path
        # An orphan blob kept by recovery (bytes verified against its name) is as good.
        candidate = self.store.blob_path(sha256)
        return candidate if candidate.is_file() else None

    def run(self, handle: JobHandle) -> dict[str, Any]:
        args = handle.arguments
        typed, ref = self.resolve(args["ref"])
        model_name = typed.name if typed.kind == "alias" else None
        handle.update(phase="resolving", ref=ref.canonical)
        if ref.quant and ref.kind == "hf" and not ref.file and not args.get("fit"):
            cached = self.cached(ref.canonical)
            if cached is not None:
                name = model_name or _model_of(self, ref.canonical)
                variant, _ = record_variant(
                    self.catalog, name, cached, combined_facts(cached), origin=Origin.PULLED,
                    source_ref=ref.canonical, in_store=True)
                handle.update(phase="done", done=0, total=variant["size"], downloaded=0)
                return {"variant": variant, "downloaded": 0}
        insecure = bool(args.get("insecure"))
        decision = None
        if args.get("fit"):
            from qmgr.fit.service import FitRequest

            handle.update(phase="fitting")
            decision, fit, remote = self.fitter.fit(FitRequest.from_args({**args,
                                                                          "remote": True}))
            if fit.pick is None:
                raise QmgrError(decision["reason"], code="does_not_fit", http_status=507)
            handle.update(decision=decision)
        with make_client(self.stall_timeout(), self.env.get("QMGR_CA_BUNDLE")) as client:
            ctx = FetchContext(client, insecure=insecure, sha256=args.get("sha256"), env=self.env)
            handle.update(phase="listing")
            if decision is not None:
                chosen = remote[decision["pick_source_ref"]]
            else:
                chosen = self.choose(ref, self.source_for(ref).variants(ref, ctx))
            total = chosen.size
            handle.update(phase="downloading", quant=chosen.quant, total=total, done=0)
            shards: list[ShardFile] = []
            fresh: list[Path] = []
            done_before = 0
            downloaded = 0
            for remote in chosen.files:
                path = self.have_blob(remote.sha256) if remote.sha256 else None
                if path is None:
                    counter = _Counter(handle, done_before)
                    dl = Download(client, self.store, remote, self.options(insecure),
                                  progress=counter, cancel=handle.cancel)
                    counter.done += dl.bytes_on_disk(remote.size) if remote.size else 0
                    handle.update(file=remote.name, done=counter.done)
                    try:
                        sha, size, path = dl.run()
                    except BaseException:
                        if handle.cancel_reason == "user":
                            dl.discard()
                        raise
                    downloaded += counter.received
                    fresh.append(path)
                else:
                    log.info("%s: bytes already in the store (%s)", remote.name, path.name)
                done_before += path.stat().st_size
                handle.update(done=done_before)
                shards.append(ShardFile(path, _inspect(path, remote.name, fresh)))
                shards[-1].sha256 = path.name.removeprefix("sha256-") if path.name.startswith(
                    "sha256-") else (remote.sha256 or "")
                shards[-1].size = path.stat().st_size
        if any(not s.sha256 for s in shards):
            raise QmgrError("internal: a file without a digest", code="internal")
        handle.update(phase="cataloging")
        variant, created = record_variant(
            self.catalog, model_name or chosen.model_name, shards, combined_facts(shards),
            origin=Origin.PULLED, source_ref=chosen.source_ref, in_store=True,
            tag=chosen.quant if ref.kind != "ollama" else None)
        handle.update(phase="done", done=done_before, downloaded=downloaded)
        return {"variant": variant, "downloaded": downloaded, "decision": decision}


def _model_of(puller: Puller, source_ref: str) -> str:
    with puller.catalog.reading() as session:
        v = session.scalar(select(Variant).where(Variant.source_ref == source_ref))
        return v.model.name if v else "model"


def _inspect(path: Path, name: str, fresh: list[Path]) -> gguf.ModelFacts:
    try:
        return gguf.inspect(path)
    except GGUFError as e:
        if path in fresh:
            path.unlink(missing_ok=True)  # verified bytes of something that is not a model
        raise GGUFError(f"{name}: downloaded bytes match the registry's digest but are not a "
                        f"usable GGUF file: {e.message}") from e


class _Counter:
    """Turns a download's byte increments into job progress."""

    def __init__(self, handle: JobHandle, start: int):
        self.handle = handle
        self.done = start
        self.received = 0

    def __call__(self, n: int) -> None:
        self.done += n
        self.received += n
        self.handle.update(done=self.done)
