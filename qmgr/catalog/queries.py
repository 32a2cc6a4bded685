"""Catalog queries and updates. Functions take a session; the caller owns the transaction."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session, selectinload

from qmgr.catalog.models import (
    Alias,
    Attachment,
    Blob,
    BlobCopy,
    Eval,
    Model,
    Node,
    Variant,
    VariantFile,
    VariantState,
    WatchedFolder,
)
from qmgr.errors import Conflict, NotFound, QmgrError
from qmgr.refs import BUILTIN_ALIASES, BadReference, parse, redact_url

T = TypeVar("T")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise QmgrError(
            f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' and '-' "
            "(at most 128 characters, starting with a letter or digit)",
            code="bad_name",
        )
    return name


def _row(v: Any, m: Any, paths: list[str]) -> dict[str, Any]:
    return {
        "id": v.id,
        "ref": f"{m.name}:{v.tag}",
        "model": m.name,
        "tag": v.tag,
        "quant_type": v.quant_type,
        "size": v.size,
        "bits_per_weight": v.bits_per_weight,
        "parameter_count": m.parameter_count,
        "architecture": m.architecture,
        "state": v.state,
        "origin": v.origin,
        "sha256": v.sha256,
        "source_ref": v.source_ref,
        "verified": v.verified,
        "default": m.default_tag == v.tag,
        "paths": paths,
        "created_at": v.created_at.isoformat(),
    }


# -- where the bytes are: one path per blob, or one per node of a fleet ------------------------


def node_of(session: Session) -> int | None:
    """The fleet node the session's daemon is (``Catalog.node_id``), None outside a fleet."""
    node_id = session.info.get("node_id")
    return int(node_id) if node_id is not None else None


def local_path(blob: Blob) -> str | None:
    """Where this daemon reads the blob's bytes: its path, or in a fleet this node's copy
    (None: the bytes are on other nodes only)."""
    session = object_session(blob)
    node_id = node_of(session) if session is not None else None
    if node_id is None:
        return blob.path
    return next((c.path for c in blob.copies if c.node_id == node_id), None)


def record_copy(session: Session, blob: Blob, path: str, in_store: bool,
                mtime_ns: int | None) -> None:
    """In a fleet: this node holds the blob's bytes at ``path`` (verified, modified at
    ``mtime_ns``). Outside a fleet, nothing: the blob's own path says it."""
    node_id = node_of(session)
    if node_id is None:
        return
    if blob.id is None:
        session.flush()
    copy = session.get(BlobCopy, (blob.id, node_id), with_for_update=True)
    if copy is None:
        session.add(BlobCopy(blob_id=blob.id, node_id=node_id, path=path, in_store=in_store,
                             mtime_ns=mtime_ns))
        session.flush()
        session.expire(blob, ["copies"])
    else:
        copy.path, copy.in_store, copy.mtime_ns = path, in_store, mtime_ns


def holders(session: Session, blob_ids: list[int]) -> dict[int, list[str]]:
    """Per blob id: the up nodes that hold a copy, by name."""
    out: dict[int, list[str]] = {}
    for blob_id, name in session.execute(
            select(BlobCopy.blob_id, Node.name).join(Node, BlobCopy.node_id == Node.id)
            .where(BlobCopy.blob_id.in_(blob_ids), Node.state == "up").order_by(Node.name)):
        out.setdefault(blob_id, []).append(name)
    return out


def local_paths(v: Variant) -> list[str]:
    """The paths of a variant's files on this node, in shard order; a ``not_here`` error
    naming the nodes that hold them when this node of a fleet does not."""
    paths = [local_path(f.blob) for f in v.files]
    if all(p is not None for p in paths):
        return [p for p in paths if p is not None]
    session = object_session(v)
    ids = [f.blob_id for f in v.files]
    nodes = on_every(holders(session, ids), ids) if session is not None else []
    where = f"on {', '.join(nodes)}" if nodes else "on no node that is up"
    raise QmgrError(f"{v.model.name}:{v.tag} is {where}, not on this node: `qmgr pull "
                    f"{v.model.name}:{v.tag}` here fetches it from its peers",
                    code="not_here")


def variant_dict(v: Variant) -> dict[str, Any]:
    """The API's view of a variant (one row of ``qmgr list``); in a fleet, with ``nodes``."""
    row = _row(v, v.model, [p for f in v.files if (p := local_path(f.blob)) is not None])
    session = object_session(v)
    if session is not None and node_of(session) is not None:
        ids = [f.blob_id for f in v.files]
        row["nodes"] = on_every(holders(session, ids), ids)
    return row


def on_every(held: dict[int, list[str]], blob_ids: list[int]) -> list[str]:
    """The nodes holding every one of ``blob_ids``."""
    sets = [set(held.get(b, [])) for b in blob_ids]
    return sorted(set.intersection(*sets)) if sets else []


def list_rows(session: Session) -> list[dict[str, Any]]:
    """Every variant as :func:`variant_dict` shows it, in two plain queries (no ORM objects:
    ``qmgr list`` on a catalog of thousands of variants must stay fast); in a fleet, the
    paths are this node's and ``nodes`` says which nodes hold each variant."""
    paths: dict[int, list[str]] = {}
    node_id = node_of(session)
    files: dict[int, list[int]] = {}
    if node_id is None:
        query = select(VariantFile.variant_id, Blob.path, VariantFile.blob_id).join(
            Blob, VariantFile.blob_id == Blob.id)
    else:
        query = select(VariantFile.variant_id, BlobCopy.path, VariantFile.blob_id).outerjoin(
            BlobCopy, (BlobCopy.blob_id == VariantFile.blob_id) & (BlobCopy.node_id == node_id))
    for variant_id, path, blob_id in session.execute(
            query.order_by(VariantFile.variant_id, VariantFile.shard)):
        files.setdefault(variant_id, []).append(blob_id)
        if path is not None:
            paths.setdefault(variant_id, []).append(path)
    held = holders(session, sorted({b for ids in files.values() for b in ids})) \
        if node_id is not None else {}
    v, m = Variant.__table__.c, Model.__table__.c
    query = (
        select(v.id, v.tag, v.quant_type, v.size, v.bits_per_weight, v.state, v.origin,
               v.sha256, v.source_ref, v.verified, v.created_at, m.name, m.parameter_count,
               m.architecture, m.default_tag)
        .join_from(Variant.__table__, Model.__table__, v.model_id == m.id)
        .order_by(m.name, v.tag)
    )
    rows = [_row(r, r, paths.get(r.id, [])) for r in session.execute(query)]
    if node_id is not None:
        for row in rows:
            row["nodes"] = on_every(held, files.get(row["id"], []))
    return rows


def variant_detail(session: Session, v: Variant) -> dict[str, Any]:
    """Everything ``qmgr show`` prints: the row, the header facts, the lineage."""
    out = variant_dict(v)
    out["facts"] = v.facts
    out["recipe"] = v.recipe
    out["attachments"] = [{"kind": a.kind, "name": a.name, "sha256": a.blob.sha256,
                           "size": a.blob.size, "path": local_path(a.blob)} for a in v.attachments]
    lineage: list[str] = []
    parent = v.parent
    while parent is not None and len(lineage) < 32:
        lineage.append(f"{parent.model.name}:{parent.tag}")
        parent = parent.parent
    out["lineage"] = lineage
    out["children"] = [
        f"{c.model.name}:{c.tag}"
        for c in session.scalars(select(Variant).where(Variant.parent_variant_id == v.id))
    ]
    measured: dict[str, Any] = {}
    for e in session.scalars(select(Eval).where(Eval.variant_id == v.id).order_by(Eval.id)):
        measured[e.metric] = {"value": e.value, "tokens": e.tokens, "backend": e.backend,
                              "dataset": e.dataset_digest, "at": e.created_at.isoformat()}
    out["measured"] = measured
    return out


def _variants_query():
    return select(Variant).options(
        selectinload(Variant.model), selectinload(Variant.files).selectinload(VariantFile.blob)
    )


def alias_target(session: Session, name: str) -> str | None:
    """What a short name stands for: the user's alias, else the built-in one."""
    user = session.scalar(select(Alias).where(Alias.name == name))
    return user.reference if user else BUILTIN_ALIASES.get(name)


def resolve(session: Session, ref: str, _depth: int = 0) -> list[Variant]:
    """Variants a reference names: ``NAME`` (all of a model), ``NAME:TAG``, ``sha256:PREFIX``,
    the reference a variant was pulled with (``hf.co/OWNER/REPO:QUANT``, ``ollama://...``,
    a URL), or an alias (a name with no model of its own) for any of these."""
    if ref.startswith("sha256:"):
        prefix = ref[len("sha256:") :].lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", prefix):
            raise QmgrError("a sha256 reference needs at least 8 hex digits", code="bad_ref")
        found = list(session.scalars(_variants_query().where(Variant.sha256.startswith(prefix))))
    elif "/" in ref:
        found = _pulled_with(session, ref)
    else:
        name, _, tag = ref.partition(":")
        found = _by_name(session, name.lower(), tag)
        target = alias_target(session, name.lower()) if not found and _depth < 4 else None
        if target is not None:
            if tag and "/" in target and ":" not in target.rpartition("/")[2]:
                target = f"{target}:{tag}"  # llama3:Q8_0 -> hf.co/...-GGUF:Q8_0
            found = _resolve_quietly(session, target, _depth + 1)
    if not found:
        raise NotFound(f"{ref!r} is not in the catalog (see `qmgr list`)")
    return found


def _resolve_quietly(session: Session, ref: str, depth: int) -> list[Variant]:
    try:
        return resolve(session, ref, depth)
    except (NotFound, BadReference):
        return []


def _by_name(session: Session, name: str, tag: str) -> list[Variant]:
    query = _variants_query().join(Variant.model).where(Model.name == name)
    if tag:
        query = query.where(Variant.tag == tag)
    return list(session.scalars(query.order_by(Variant.tag)))


def _pulled_with(session: Session, raw: str) -> list[Variant]:
    """Variants pulled with this source reference (the quant compared without case), or,
    for a repository without a quant, every variant pulled from it."""
    ref = parse(raw)
    if ref.kind == "url":
        wanted = [redact_url(ref.url or raw)]
    elif ref.kind == "hf" and not ref.file and not ref.quant:
        # Hub repository names do not depend on case: compared in lower case (SQLite's LIKE
        # would ignore ASCII case, PostgreSQL's does not); "_" in a name is itself.
        ref_lower = func.lower(Variant.source_ref)
        query = _variants_query().where(
            ref_lower.startswith(f"hf.co/{ref.name}:".lower(), autoescape=True)
            | ref_lower.startswith(f"hf://{ref.name}/".lower(), autoescape=True))
        return list(session.scalars(query.order_by(Variant.tag)))
    else:
        wanted = [ref.canonical]
    query = _variants_query().where(Variant.source_ref.is_not(None))
    if ref.kind == "hf" and ref.quant:
        query = query.where(func.lower(Variant.source_ref).startswith(
            f"hf.co/{ref.name}:".lower(), autoescape=True))
        return [v for v in session.scalars(query)
                if (v.source_ref or "").lower() == ref.canonical.lower()]
    return list(session.scalars(query.where(Variant.source_ref.in_(wanted))))


def resolve_served(session: Session, name: str) -> Variant:
    """The variant a served API's ``model`` names: the name, else the name without Ollama's
    ``:latest``; ``not_found`` otherwise."""
    for candidate in (name, name.removesuffix(":latest")):
        try:
            return resolve_one(session, candidate)
        except NotFound:
            continue
    raise NotFound(f"model '{name}' not found")


def resolve_one(session: Session, ref: str) -> Variant:
    found = resolve(session, ref)
    if len(found) > 1:
        # A model's bare name means its default variant, when it has one (Ollama's latest).
        models = {v.model_id for v in found}
        if len(models) == 1 and ":" not in ref.rpartition("/")[2]:
            default = found[0].model.default_tag
            chosen = [v for v in found if v.tag == default]
            if chosen:
                return chosen[0]
        tags = ", ".join(f"{v.model.name}:{v.tag}" for v in found)
        raise Conflict(f"{ref!r} names {len(found)} variants ({tags}): name one of them",
                       code="ambiguous_ref")
    return found[0]


def locked_or_created(session: Session, query: Select[T], make: Callable[[], T]
                      ) -> tuple[T, bool]:
    """The row ``query`` finds, locked for this write transaction (``FOR UPDATE``: another
    daemon's writer that wants it waits for this commit), else a new one from ``make`` (and
    True). Two writers creating the same row at once: the second one's insert fails on the
    unique key once the first commits, and it takes the first one's row instead. SQLite
    ignores ``FOR UPDATE``: its write transactions are serialized from BEGIN."""
    found = session.scalar(query.with_for_update())
    if found is not None:
        return found, False
    try:
        with session.begin_nested():
            created = make()
            session.add(created)
            session.flush()
        return created, True
    except IntegrityError:
        found = session.scalar(query.with_for_update())
        if found is None:
            raise
        return found, False


def get_or_create_model(session: Session, name: str, facts: dict[str, Any]) -> Model:
    """The model ``name``, locked (its tags are chosen under the lock), or a new one."""
    model, _ = locked_or_created(session, select(Model).where(Model.name == name), lambda: Model(
        name=check_name(name), architecture=facts.get("architecture"),
        parameter_count=facts.get("parameter_count")))
    return model


def free_tag(session: Session, model: Model, wanted: str) -> str:
    """``wanted`` if the model has no variant with that tag, else ``wanted-2``, ``-3``..."""
    taken = set(session.scalars(select(Variant.tag).where(Variant.model_id == model.id)))
    if wanted not in taken:
        return wanted
    n = 2
    while f"{wanted}-{n}" in taken:
        n += 1
    return f"{wanted}-{n}"


def get_or_create_blob(session: Session, sha256: str, size: int, path: str, in_store: bool,
                       mtime_ns: int | None) -> Blob:
    blob, created = locked_or_created(
        session, select(Blob).where(Blob.sha256 == sha256),
        lambda: Blob(sha256=sha256, size=size, path=path, in_store=in_store, mtime_ns=mtime_ns))
    if not created and in_store and not blob.in_store:
        # The store's copy is the one qmgr can vouch for: prefer it over an outside file.
        blob.path, blob.in_store, blob.mtime_ns = path, True, mtime_ns
    record_copy(session, blob, path, in_store, mtime_ns)
    return blob


def blobs_only_used_by(session: Session, variants: list[Variant]) -> list[Blob]:
    """Blobs that no variant other than ``variants`` uses (safe to delete with them)."""
    ids = {v.id for v in variants}
    out = []
    for v in variants:
        files: list[VariantFile | Attachment] = [*v.files, *v.attachments]
        for f in files:
            users = set(session.scalars(
                select(VariantFile.variant_id).where(VariantFile.blob_id == f.blob_id)
            )) | set(session.scalars(
                select(Attachment.variant_id).where(Attachment.blob_id == f.blob_id)
            ))
            if users <= ids and f.blob not in out:
                out.append(f.blob)
    return out


def set_state_for_blob(session: Session, blob: Blob, state: VariantState) -> int:
    variants = session.scalars(
        select(Variant).join(Variant.files).where(VariantFile.blob_id == blob.id)
    ).unique()
    n = 0
    for v in variants:
        if v.state != state:
            v.state = state
            n += 1
    return n


def watched_folders(session: Session) -> list[WatchedFolder]:
    return list(session.scalars(select(WatchedFolder).order_by(WatchedFolder.path)))
