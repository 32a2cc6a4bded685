"""Recording verified files as a variant: the one way every path into the catalog (pull,
import, a watched folder, quantize) makes a variant ready, in one transaction with its blobs
and attachments; and the one way variants leave it (:func:`remove_variants`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from qmgr import gguf
from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Attachment, Model, Origin, Variant, VariantFile, VariantState

log = logging.getLogger(__name__)


@dataclass
class ShardFile:
    path: Path
    facts: gguf.ModelFacts
    sha256: str = ""
    size: int = 0
    mtime_ns: int = 0


@dataclass
class AttachedFile:
    """A verified file recorded beside a variant (a vision projector): its kind, its name at
    the source, where its bytes are."""

    kind: str
    name: str
    path: Path
    sha256: str
    size: int


def combined_facts(shards: list[ShardFile]) -> dict[str, Any]:
    facts = shards[0].facts.to_dict()
    if len(shards) > 1:
        # Tensors are spread over the shards; the model's totals are their sums.
        params = sum(s.facts.parameter_count for s in shards)
        data = sum(s.facts.tensor_data_bytes for s in shards)
        facts["parameter_count"] = params
        facts["tensor_data_bytes"] = data
        facts["bits_per_weight"] = 8 * data / params if params else None
        types: dict[str, int] = {}
        for s in shards:
            for k, n in s.facts.tensor_types.items():
                types[k] = types.get(k, 0) + n
        facts["tensor_types"] = types
    return facts


def record_variant(catalog: Catalog, model_name: str, shards: list[ShardFile],
                   facts: dict[str, Any], *, origin: Origin, source_ref: str | None,
                   in_store: bool, tag: str | None = None, parent_id: int | None = None,
                   recipe: dict[str, Any] | None = None,
                   attachments: list[AttachedFile] | None = None,
                   default: bool = False, verified: bool = True) -> tuple[dict[str, Any], bool]:
    """Catalog verified files as a ready variant of ``model_name`` in one transaction.

    The same bytes already cataloged under that model make no second variant; the same bytes
    under another model share the blob. ``attachments`` are recorded beside the variant (one
    per kind); ``default`` makes it what the model's bare name means.
    """
    quant = tag or facts.get("quant_type") or "unknown"
    with catalog.writing() as session:
        model = queries.get_or_create_model(session, model_name, facts)
        for v in model.variants:
            if v.sha256 == shards[0].sha256 and len(v.files) == len(shards):
                if v.state != VariantState.READY:
                    v.state = VariantState.READY
                v.verified = v.verified or verified
                for f, s in zip(v.files, shards, strict=True):
                    if f.blob.path == str(s.path):
                        # Same bytes, re-verified now: remember the current mtime, or the next
                        # start would think the file changed.
                        f.blob.mtime_ns = s.path.stat().st_mtime_ns
                    # In a fleet: this node has them now (fetched from a peer, or found).
                    queries.record_copy(session, f.blob, str(s.path), in_store,
                                        s.path.stat().st_mtime_ns)
                _attach(session, v, attachments or [], in_store)
                if default:
                    model.default_tag = v.tag
                return queries.variant_dict(v), False
        variant = Variant(
            model=model,
            tag=queries.free_tag(session, model, quant),
            quant_type=facts.get("quant_type"),
            file_type=facts.get("file_type"),
            bits_per_weight=facts.get("bits_per_weight"),
            size=sum(s.size for s in shards),
            sha256=shards[0].sha256,
            state=VariantState.READY,
            origin=origin,
            facts=facts,
            source_ref=source_ref,
            parent_variant_id=parent_id,
            recipe=recipe,
            verified=verified,
        )
        session.add(variant)
        for i, s in enumerate(shards):
            blob = queries.get_or_create_blob(
                session, s.sha256, s.size, str(s.path), in_store=in_store,
                mtime_ns=s.path.stat().st_mtime_ns,
            )
            variant.files.append(VariantFile(shard=i, blob=blob))
        _attach(session, variant, attachments or [], in_store)
        if default:
            model.default_tag = variant.tag
        session.flush()
        log.info("cataloged %s:%s (%s, %d bytes)", model.name, variant.tag, source_ref,
                 variant.size)
        return queries.variant_dict(variant), True


def remove_variants(catalog: Catalog, ref: str, every: bool = False) -> dict[str, list[str]]:
    """Remove the variant ``ref`` names (``every``: all it matches, the variants of a model),
    with the blobs no other variant uses and the models left empty. Store files of those
    blobs are deleted; files imported in place never are."""
    deleted_files: list[str] = []
    with catalog.writing() as session:
        found = queries.resolve(session, ref) if every else [queries.resolve_one(session, ref)]
        # Their models locked first, as record_variant locks them: a variant another daemon
        # adds meanwhile is not deleted with a model thought empty.
        session.scalars(select(Model).where(Model.id.in_({v.model_id for v in found}))
                        .order_by(Model.id).with_for_update()).all()
        removed = [f"{v.model.name}:{v.tag}" for v in found]
        blobs = queries.blobs_only_used_by(session, found)
        models = {v.model for v in found}
        for v in found:
            session.delete(v)
        session.flush()
        for blob in blobs:
            # In a fleet, this node's copy (its peers' copies are left to them: files without
            # a row, that their next start keeps if their bytes match their names).
            path = queries.local_path(blob)
            copy_in_store = blob.in_store if queries.node_of(session) is None else any(
                c.in_store and c.path == path for c in blob.copies)
            if copy_in_store and path is not None:
                deleted_files.append(path)
            session.delete(blob)
        for m in models:
            session.refresh(m)
            if not m.variants:
                session.delete(m)
    # Rows first, files after the commit: a crash in between leaves an orphan blob that
    # recovery keeps or quarantines, never a row without its file.
    for path in deleted_files:
        Path(path).unlink(missing_ok=True)
    return {"removed": removed, "deleted_files": deleted_files}


def _attach(session: Session, variant: Variant, attachments: list[AttachedFile],
            in_store: bool) -> None:
    """Record (or replace) a variant's attachments, one per kind."""
    for f in attachments:
        blob = queries.get_or_create_blob(session, f.sha256, f.size, str(f.path),
                                          in_store=in_store, mtime_ns=f.path.stat().st_mtime_ns)
        current = next((a for a in variant.attachments if a.kind == f.kind), None)
        if current is None:
            variant.attachments.append(Attachment(kind=f.kind, name=f.name, blob=blob))
        else:
            current.name, current.blob = f.name, blob
