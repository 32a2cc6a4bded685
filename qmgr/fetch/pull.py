"""The pull job: reference -> source -> chosen variant -> verified files -> catalog row.

Order: expand the alias; if a ready variant from the same source reference is cataloged, reuse
its bytes without touching the network; otherwise ask the source what it offers, pick the
variant, reuse any file whose digest the store already holds, download the rest (resumable,
verified), check each header with qmgr's bounded reader, and only then catalog the variant.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from sqlalchemy import select

from qmgr import gguf
from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Blob, BlobCopy, Node, Origin, Variant, VariantState
from qmgr.catalog.record import AttachedFile, ShardFile, combined_facts, record_variant
from qmgr.errors import GGUFError, NotFound, QmgrError
from qmgr.fetch import aliases
from qmgr.fetch.download import Cancelled, Download, Options
from qmgr.plugin.http import Busy, make_client
from qmgr.plugin.source import FetchContext, Listing, RemoteFile, RemoteVariant, Source, listing_of
from qmgr.plugins import PluginSet
from qmgr.refs import Reference, parse
from qmgr.settings import knob
from qmgr.store import Store
from qmgr.work.jobs import JobHandle

log = logging.getLogger(__name__)

DEFAULT_QUANT = "Q4_K_M"
# Kinds qmgr parses itself; any other is the scheme of a source plugin.
BUILTIN_KINDS = frozenset({"alias", "hf", "ollama", "url"})


@dataclass
class Puller:
    catalog: Catalog
    store: Store
    plugins: PluginSet
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    # One download per file at a time (by expected digest, else by URL), shared by every
    # per-request copy of this puller: a second pull of the same bytes waits for the first
    # and then finds them in the store, instead of writing the same partial file.
    fetching: _FileLocks = field(default_factory=lambda: _FileLocks())
    # In a fleet: the key its nodes send each other for blobs (None: no peers are asked).
    fleet_key: str | None = None

    def options(self, insecure: bool) -> Options:
        e = self.env
        return Options(
            parts=knob("QMGR_DOWNLOAD_PARTS", e),
            part_threshold=knob("QMGR_PART_THRESHOLD", e),
            retries=knob("QMGR_RETRIES", e),
            backoff=knob("QMGR_RETRY_BACKOFF", e),
            insecure=insecure,
            stall_timeout=self.stall_timeout(),
            min_speed=knob("QMGR_MIN_SPEED", e),
            ca_bundle=self.ca_bundle(),
            direct_io=knob("QMGR_DIRECT_IO", e),
        )

    def stall_timeout(self) -> float:
        return float(knob("QMGR_STALL_TIMEOUT", self.env))

    def ca_bundle(self) -> str | None:
        return knob("QMGR_CA_BUNDLE", self.env)

    # -- resolving ------------------------------------------------------------------------------

    def resolve(self, raw: str) -> tuple[Reference, Reference]:
        """(what the user typed, what it stands for)."""
        ref = self.parse(raw)
        with self.catalog.reading() as session:
            if ref.kind == "alias" and self.catalog.node_id is not None:
                # In a fleet, a cataloged name (a variant another node pulled, imported or
                # made) is pulled from the peers that hold it.
                try:
                    queries.resolve_one(session, raw)
                    return ref, ref
                except QmgrError:
                    pass
            expanded = aliases.expand(session, ref)
        if expanded is not ref and expanded.kind not in BUILTIN_KINDS:
            expanded = self.parse(expanded.canonical)  # by the source that owns it, too
        return ref, expanded

    def parse(self, raw: str) -> Reference:
        """A reference, parsed by the source that owns its scheme when that source says how
        (its ``parse``), else by qmgr's rules."""
        ref = parse(raw)
        if ref.kind in BUILTIN_KINDS:
            return ref
        source = self.source_for(ref)
        own = getattr(source, "parse", None)
        if callable(own):
            try:
                ref = own(raw)
            except QmgrError:
                raise
            # A plugin's bug in parsing is its own, said as such, not the daemon's 500.
            except Exception as e:
                raise QmgrError(f"the {source.name} source failed to parse {raw!r}: "
                                f"{type(e).__name__}: {e}", code="bad_source") from e
            if not isinstance(ref, Reference):
                raise QmgrError(f"the source for {raw!r} parsed it into "
                                f"{type(ref).__name__}, not a Reference", code="bad_source")
        return ref

    def source_for(self, ref: Reference) -> Source:
        sources = self.plugins.sources()
        for source in sources:
            if ref.kind in getattr(source, "kinds", ()):
                return source
        kinds = sorted({k for s in sources for k in getattr(s, "kinds", ())})
        raise QmgrError(f"no source plugin handles {ref.kind} references (installed: "
                        f"{', '.join(kinds) or 'none'}; see `qmgr plugins`)", code="no_source")

    def with_env(self, env: dict[str, str] | None) -> Puller:
        """This puller for one request: the client's settings (its ``QMGR_HF_ENDPOINT``,
        ``HF_TOKEN``...) over the daemon's."""
        if not env:
            return self
        return dataclasses.replace(self, env={**self.env, **env})

    def listing(self, ref: Reference, ctx: FetchContext) -> Listing:
        return listing_of(self.source_for(ref), ref, ctx)

    def describe_remote(self, raw: str, insecure: bool = False,
                        headers: bool = True) -> dict[str, Any]:
        """What a reference's source offers; with ``headers``, each variant's first header is
        read by HTTP Range to give parameters and bits per weight before any download."""
        from qmgr.fetch.remote_header import remote_facts

        _typed, ref = self.resolve(raw)
        if ref.kind == "alias":
            raise QmgrError(f"{raw!r} stands for the cataloged {ref.raw}: `qmgr show {ref.raw}`",
                            code="bad_ref")
        with make_client(self.stall_timeout(), self.ca_bundle()) as client:
            ctx = FetchContext(client, insecure=insecure, env=self.env)
            listing = self.listing(ref, ctx)
            out = listing.to_dict()
            for v, row in zip(listing.variants, out["variants"], strict=True):
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
        return {"ref": ref.canonical, **out}

    @staticmethod
    def choose(ref: Reference, listing: Listing) -> RemoteVariant:
        offered = listing.variants
        refused = [s for s in listing.skipped if s.refused]
        if not offered:
            why = f" (refused: {'; '.join(f'{s.name}: {s.why}' for s in refused)})" \
                if refused else ""
            raise NotFound(f"{ref.canonical} offers no GGUF model files{why}")
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
            bad = [s for s in refused if s.quant and s.quant.upper() == ref.quant.upper()]
            if bad:
                raise QmgrError(f"{ref.canonical}: the registry's listing of the {ref.quant} file "
                                f"cannot be trusted: {bad[0].name}: {bad[0].why}",
                                code="bad_registry")
            raise NotFound(f"{ref.canonical} has no {ref.quant} variant; it offers: {names}")
        if len(offered) == 1:
            return offered[0]
        for v in offered:
            if v.quant == DEFAULT_QUANT:
                return v
        raise QmgrError(f"{ref.canonical} offers {len(offered)} variants ({names}): name one, "
                        f"e.g. {ref.raw}:{offered[0].quant}", code="ambiguous_ref")

    # -- the job ------------------------------------------------------------------------------

    def cached(self, source_ref: str | None, handle: JobHandle | None = None,
               variant_id: int | None = None) -> list[ShardFile] | None:
        """Files of a ready variant pulled from this very source reference (or of variant
        ``variant_id``), if any. In a fleet, files this node lacks are fetched from the peers
        that hold them (verified by their digests): the origin is not asked at all; None if
        no peer could serve them."""
        with self.catalog.reading() as session:
            variant = session.get(Variant, variant_id) if variant_id is not None else \
                session.scalar(select(Variant).where(Variant.source_ref == source_ref,
                                                     Variant.state == VariantState.READY))
            if variant is None or variant.state != VariantState.READY:
                return None
            blobs = [(queries.local_path(f.blob), f.blob.sha256, f.blob.size)
                     for f in variant.files]
        out = []
        for where, sha, size in blobs:
            path = Path(where) if where else self.have_blob(sha)
            if (path is None or not path.is_file()) and handle is not None:
                with self.fetching.hold(sha, handle):
                    path = self.have_blob(sha) or self.from_peers(sha, handle,
                                                                  _Counter(handle, 0))
            if path is None or not path.is_file() or path.stat().st_size != size:
                return None
            out.append(ShardFile(path, gguf.inspect(path), sha, size))
        return out

    def peers_with(self, sha256: str) -> list[RemoteFile]:
        """The blob at each up peer of this fleet node that holds it (none outside a fleet,
        or without a fleet key): URLs of their API listeners, most recently heard first."""
        if self.catalog.node_id is None or not self.fleet_key:
            return []
        with self.catalog.reading() as session:
            rows = session.execute(
                select(Node.name, Node.address, Blob.size)
                .join(BlobCopy, BlobCopy.node_id == Node.id)
                .join(Blob, BlobCopy.blob_id == Blob.id)
                .where(Blob.sha256 == sha256, Node.state == "up",
                       Node.id != self.catalog.node_id, Node.address.is_not(None))
                .order_by(Node.heartbeat_at.desc())).all()
        return [RemoteFile(f"sha256-{sha256[:12]} from {name}",
                           f"{address}/fleet/blobs/sha256:{sha256}", size, sha256,
                           headers={"Authorization": f"Bearer {self.fleet_key}"},
                           allow_http=True)
                for name, address, size in rows if address]

    def from_peers(self, sha256: str, handle: JobHandle, progress: _Counter) -> Path | None:
        """The blob fetched from a peer that holds it (each tried in turn: one that is down,
        or that serves bytes other than their name, is skipped), or None. The caller holds
        the blob's fetching lock."""
        peers = self.peers_with(sha256)
        if not peers:
            return None
        with make_client(self.stall_timeout(), self.ca_bundle()) as client:
            for peer in peers:
                try:
                    path = self._download(client, peer, False, handle, progress)
                except Cancelled:
                    raise
                except QmgrError as e:
                    if handle.cancel.is_set():
                        raise
                    log.warning("%s: %s", peer.name, e.message)
                    handle.update(peer_failures=[*handle.progress.get("peer_failures", []),
                                                 f"{peer.name}: {e.message}"])
                    continue
                log.info("%s: verified", peer.name)
                handle.update(from_peer=peer.name.rpartition(" from ")[2])
                return path
        return None

    def have_blob(self, sha256: str) -> Path | None:
        with self.catalog.reading() as session:
            blob = session.scalar(select(Blob).where(Blob.sha256 == sha256))
            where = queries.local_path(blob) if blob else None
            path = Path(where) if where else self.store.blob_path(sha256)
        if path.is_file():
            return path
        # An orphan blob kept by recovery (bytes verified against its name) is as good.
        candidate = self.store.blob_path(sha256)
        return candidate if candidate.is_file() else None

    def run(self, handle: JobHandle) -> dict[str, Any]:
        """The pull job, with the settings the client sent (``env`` in its arguments, secrets
        on the handle) over the daemon's."""
        env = {**(handle.arguments.get("env") or {}), **handle.secrets}
        return self.with_env(env)._run(handle)

    def _run(self, handle: JobHandle) -> dict[str, Any]:
        args = handle.arguments
        typed, ref = self.resolve(args["ref"])
        if ref.kind == "alias":  # an alias of a cataloged variant: nothing to fetch
            with self.catalog.reading() as session:
                found = queries.resolve_one(session, ref.raw)
                variant = queries.variant_dict(found)
                local = all(queries.local_path(f.blob) for f in found.files)
            if not local:  # in a fleet, on other nodes only: from them
                fetched = self.cached(None, handle, variant_id=variant["id"])
                if fetched is None:
                    raise QmgrError(f"{variant['ref']}: no peer that holds it could serve it",
                                    code="not_here")
                variant, _ = record_variant(
                    self.catalog, variant["model"], fetched, combined_facts(fetched),
                    origin=Origin(variant["origin"]), source_ref=variant["source_ref"],
                    in_store=True)
            handle.update(phase="done", done=0, total=variant["size"], downloaded=0)
            return {"variant": variant, "downloaded": 0}
        # `pull llama3 --fit` decided first, then asked for the variant it chose (``ref``),
        # to be cataloged under the name typed (``name``) and be what it means (``default``).
        model_name = args.get("name") or (typed.name if typed.kind == "alias" else None)
        # Pulled without naming a quant (`pull llama3`): the bare name means this one.
        default = bool(args.get("default", not typed.quant and not ref.file))
        handle.update(phase="resolving", ref=ref.canonical)
        if args.get("decision"):
            handle.update(decision=args["decision"])
        if ref.quant and ref.kind == "hf" and not ref.file:
            cached = self.cached(ref.canonical, handle)
            if cached is not None:
                name = model_name or _model_of(self, ref.canonical)
                variant, _ = record_variant(
                    self.catalog, name, cached, combined_facts(cached), origin=Origin.PULLED,
                    source_ref=ref.canonical, in_store=True, default=default)
                handle.update(phase="done", done=0, total=variant["size"], downloaded=0)
                return {"variant": variant, "downloaded": 0}
        insecure = bool(args.get("insecure"))
        with make_client(self.stall_timeout(), self.ca_bundle()) as client:
            ctx = FetchContext(client, insecure=insecure, sha256=args.get("sha256"), env=self.env)
            handle.update(phase="listing")
            chosen = self.choose(ref, self._listing_when_ready(ref, ctx, handle))
            progress = _Counter(handle, 0)
            extra = [f for _kind, f in chosen.attachments]
            total = sum(f.size or 0 for f in [*chosen.files, *extra]) if chosen.size else None
            handle.update(phase="downloading", quant=chosen.quant, total=total, done=0)
            shards: list[ShardFile] = []
            for remote_file in chosen.files:
                path, fresh = self._fetch(client, remote_file, insecure, handle, progress)
                shards.append(ShardFile(path, _inspect(path, remote_file.name, fresh)))
                shards[-1].sha256 = _digest_of(path, remote_file)
                shards[-1].size = path.stat().st_size
            attached = []
            for kind, remote_file in chosen.attachments:
                path, fresh = self._fetch(client, remote_file, insecure, handle, progress)
                _check_attachment(path, remote_file.name, fresh)
                attached.append(AttachedFile(kind, remote_file.name, path,
                                             _digest_of(path, remote_file), path.stat().st_size))
        if any(not s.sha256 for s in shards):
            raise QmgrError("internal: a file without a digest", code="internal")
        handle.update(phase="cataloging")
        variant, created = record_variant(
            self.catalog, model_name or chosen.model_name, shards, combined_facts(shards),
            origin=Origin.PULLED, source_ref=chosen.source_ref, in_store=True,
            tag=chosen.quant if ref.kind != "ollama" else None, attachments=attached,
            default=default, verified=all(f.sha256 for f in chosen.files))
        handle.update(phase="done", done=progress.done, downloaded=progress.received)
        return {"variant": variant, "downloaded": progress.received,
                "decision": args.get("decision")}

    def _listing_when_ready(self, ref: Reference, ctx: FetchContext,
                            handle: JobHandle) -> Listing:
        """The listing, waiting (as the job's phase says) while the registry answers that it
        is busy (a mirror still hashing its files): up to ``QMGR_BUSY_WAIT`` seconds."""
        deadline = time.monotonic() + knob("QMGR_BUSY_WAIT", self.env)
        while True:
            try:
                return until_cancelled(handle, lambda: self.listing(ref, ctx))
            except Busy as e:
                pause = min(max(e.retry_after, 0.5), 30.0)
                if time.monotonic() + pause > deadline:
                    raise
                handle.update(phase="waiting", message=e.message)
                if handle.cancel.wait(pause):
                    raise Cancelled("cancelled while waiting for the registry") from None
                handle.update(phase="listing")

    def _fetch(self, client: httpx.Client, remote: RemoteFile, insecure: bool, handle: JobHandle,
               progress: _Counter) -> tuple[Path, bool]:
        """One file into the store (or found there by its digest): (path, downloaded now)."""
        with self.fetching.hold(remote.sha256 or f"url:{remote.url}", handle):
            return self._fetch_alone(client, remote, insecure, handle, progress)

    def _fetch_alone(self, client: httpx.Client, remote: RemoteFile, insecure: bool,
                     handle: JobHandle, progress: _Counter) -> tuple[Path, bool]:
        path = self.have_blob(remote.sha256) if remote.sha256 else None
        if path is None and remote.sha256:
            # A peer of the fleet has these bytes: from it, before the origin.
            path = self.from_peers(remote.sha256, handle, progress)
            if path is not None:
                return path, True
        fresh = path is None
        if path is None:
            path = self._download(client, remote, insecure, handle, progress)
        else:
            log.info("%s: bytes already in the store (%s)", remote.name, path.name)
            progress.done += path.stat().st_size
        handle.update(done=progress.done)
        return path, fresh


    def _download(self, client: httpx.Client, remote: RemoteFile, insecure: bool,
                  handle: JobHandle, progress: _Counter) -> Path:
        dl = Download(client, self.store, remote, self.options(insecure),
                      progress=progress, cancel=handle.cancel)
        progress.done += dl.bytes_on_disk(remote.size) if remote.size else 0
        handle.update(file=remote.name, done=progress.done)
        try:
            with handle.interrupted_by_cancel(dl.hang_up):
                return dl.run()[2]
        except BaseException:
            if handle.cancel_reason == "user":
                dl.discard()
            raise


T = TypeVar("T")


def until_cancelled(handle: JobHandle, work: Callable[[], T]) -> T:
    """Run a network phase (a listing, a manifest, headers read by Range) in a thread of its
    own, so that cancelling or stopping the job ends it within a fraction of a second whatever
    the network does; an abandoned phase ends by itself at its own deadline."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as e:  # handed to the job's thread, raised there
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name=f"qmgr-job-{handle.id}-net").start()
    while not done.wait(0.1):
        if handle.cancel.is_set():
            raise Cancelled("cancelled while waiting for the registry")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _digest_of(path: Path, remote: RemoteFile) -> str:
    """A store file's sha256: its name says it (``sha256-HEX``), else the registry's."""
    name = path.name
    return name.removeprefix("sha256-") if name.startswith("sha256-") else (remote.sha256 or "")


def _check_attachment(path: Path, name: str, fresh: bool) -> None:
    """An attachment is a GGUF file too (a projector): read its header with the bounded
    reader before it is recorded."""
    try:
        gguf.read_header(path)
    except GGUFError as e:
        if fresh:
            path.unlink(missing_ok=True)
        raise GGUFError(f"{name}: downloaded bytes match the registry's digest but are not a "
                        f"GGUF file: {e.message}") from e


def _model_of(puller: Puller, source_ref: str) -> str:
    with puller.catalog.reading() as session:
        v = session.scalar(select(Variant).where(Variant.source_ref == source_ref))
        return v.model.name if v else "model"


def _inspect(path: Path, name: str, fresh: bool) -> gguf.ModelFacts:
    try:
        return gguf.inspect(path)
    except GGUFError as e:
        if fresh:
            path.unlink(missing_ok=True)  # verified bytes of something that is not a model
        raise GGUFError(f"{name}: downloaded bytes match the registry's digest but are not a "
                        f"usable GGUF file: {e.message}") from e


class _FileLocks:
    """A lock per key, made on demand and forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str, handle: JobHandle) -> Iterator[None]:
        with self.lock:
            lock, users = self.held.get(key, (threading.Lock(), 0))
            self.held[key] = (lock, users + 1)
        try:
            waited = False
            while not lock.acquire(timeout=0.2):
                if not waited:
                    handle.update(phase="waiting", message="another pull is fetching this file")
                    waited = True
                if handle.cancel.is_set():
                    raise Cancelled("cancelled while another pull fetched the same file")
            if waited:
                handle.update(phase="downloading", message=None)
            try:
                yield
            finally:
                lock.release()
        finally:
            with self.lock:
                lock, users = self.held[key]
                if users == 1:
                    del self.held[key]
                else:
                    self.held[key] = (lock, users - 1)


class _Counter:
    """Turns a download's byte increments into job progress."""

    def __init__(self, handle: JobHandle, start: int = 0):
        self.handle = handle
        self.done = start
        self.received = 0

    def __call__(self, n: int) -> None:
        self.done += n
        self.received += n
        self.handle.update(done=self.done)
