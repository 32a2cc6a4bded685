"""The catalog's tables, as SQLAlchemy 2 typed models.

The same models run on SQLite (the default) and PostgreSQL: portable column types only, JSON
through SQLAlchemy's ``JSON`` type, timestamps stored as timezone-aware UTC.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints keep migrations deterministic and let SQLite batch mode alter tables.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class VariantState(enum.StrEnum):
    """Where a variant's bytes stand. Only ``ready`` variants were verified and may be used."""

    READY = "ready"
    MISSING = "missing"  # a file the catalog knows is gone from disk
    MODIFIED = "modified"  # a file changed size since it was verified


class Origin(enum.StrEnum):
    PULLED = "pulled"
    QUANTIZED = "quantized"
    IMPORTED = "imported"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Model(Base):
    """A model family member (e.g. ``llama3``): the thing users name. Owns its quant variants."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    family: Mapped[str | None] = mapped_column(String(128))
    architecture: Mapped[str | None] = mapped_column(String(64))
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    source_ref: Mapped[str | None] = mapped_column(String(1024))
    # The variant the bare name means when there are several (``qmgr run llama3``): the one
    # last pulled without naming a quant (``qmgr pull llama3 --fit``), as Ollama's ``latest``.
    default_tag: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    variants: Mapped[list[Variant]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="Variant.id"
    )


class Variant(Base):
    """One quantization of a model: a GGUF file (or a set of shards) with its measured facts."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("model_id", "tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    # The name users type after the colon (``llama3:Q4_K_M``); the quant type unless taken.
    tag: Mapped[str] = mapped_column(String(64))
    quant_type: Mapped[str | None] = mapped_column(String(32))
    file_type: Mapped[int | None] = mapped_column(Integer)
    bits_per_weight: Mapped[float | None] = mapped_column(Float)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default=VariantState.READY)
    origin: Mapped[str] = mapped_column(String(16))
    parent_variant_id: Mapped[int | None] = mapped_column(
        ForeignKey("variants.id", ondelete="SET NULL")
    )
    # How a quantized variant was made: quantizer, version, options, imatrix digest.
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The header facts read from the GGUF file (architecture, dims, tensor histogram...).
    facts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source_ref: Mapped[str | None] = mapped_column(String(1024))
    # Whether the bytes matched a digest known before they came (the registry's, or the
    # user's --sha256). False for a URL pulled without one: hashed, but vouched for by nobody.
    verified: Mapped[bool] = mapped_column(default=True, server_default=true())
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    model: Mapped[Model] = relationship(back_populates="variants")
    parent: Mapped[Variant | None] = relationship(remote_side=[id])
    files: Mapped[list[VariantFile]] = relationship(
        back_populates="variant", cascade="all, delete-orphan", order_by="VariantFile.shard"
    )
    attachments: Mapped[list[Attachment]] = relationship(
        cascade="all, delete-orphan", order_by="Attachment.kind"
    )


class Blob(Base):
    """A file's bytes, by sha256. Variants with identical bytes share one blob."""

    __tablename__ = "blobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(4096))
    # True when the file lives in qmgr's store (qmgr may delete it); False for a file imported
    # in place or found in a watched folder (qmgr never deletes those).
    in_store: Mapped[bool] = mapped_column(default=False)
    # Modification time (ns) when the bytes were verified: a cheap check at start-up.
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    # Where each node of a fleet keeps these bytes (none outside a fleet: ``path`` is it).
    copies: Mapped[list[BlobCopy]] = relationship(cascade="all, delete-orphan",
                                                  passive_deletes=True)


class Node(Base):
    """A daemon of a fleet (``node`` set, the catalog on PostgreSQL): what it is, where its
    API listener is, what it holds and has loaded, and when it last said so."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # The URL its peers reach its API listener at (``http://10.0.0.5:11434``); None: none.
    address: Mapped[str | None] = mapped_column(String(1024))
    state: Mapped[str] = mapped_column(String(16), default="up")  # "up", "gone"
    # Its devices as its probes (or QMGR_HW) see them: fit.hardware.Hardware.to_dict().
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The models its runners hold: [{"name", "size", "vram", "expires"}...].
    loaded: Mapped[list[Any]] = mapped_column(JSON, default=list)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BlobCopy(Base):
    """One node's copy of a blob: the path on that node (its store, or a file it imported
    in place) and the modification time it was verified with."""

    __tablename__ = "blob_copies"

    blob_id: Mapped[int] = mapped_column(ForeignKey("blobs.id", ondelete="CASCADE"),
                                         primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"),
                                         primary_key=True, index=True)
    path: Mapped[str] = mapped_column(String(4096))
    in_store: Mapped[bool] = mapped_column(default=True)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)

    node: Mapped[Node] = relationship()


class VariantFile(Base):
    """The files of a variant in shard order (one row for an unsharded file)."""

    __tablename__ = "variant_files"

    variant_id: Mapped[int] = mapped_column(
        ForeignKey("variants.id", ondelete="CASCADE"), primary_key=True
    )
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_id: Mapped[int] = mapped_column(ForeignKey("blobs.id", ondelete="RESTRICT"), index=True)

    variant: Mapped[Variant] = relationship(back_populates="files")
    blob: Mapped[Blob] = relationship()


class Attachment(Base):
    """A file a variant needs beside its weights (a vision projector), pulled with it."""

    __tablename__ = "attachments"

    variant_id: Mapped[int] = mapped_column(
        ForeignKey("variants.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)  # "projector"
    name: Mapped[str] = mapped_column(String(1024))  # the file's name at its source
    blob_id: Mapped[int] = mapped_column(ForeignKey("blobs.id", ondelete="RESTRICT"), index=True)

    blob: Mapped[Blob] = relationship()


class Job(Base):
    """Long work the daemon does (pull, quantize, eval); survives restarts."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    arguments: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    # In a fleet: the node that runs it (or, queued, the one it is for; None: any node).
    node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id", ondelete="SET NULL"),
                                                index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Eval(Base):
    """A measurement of a variant (perplexity, KL divergence, speed) on a given text."""

    __tablename__ = "evals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_id: Mapped[int] = mapped_column(
        ForeignKey("variants.id", ondelete="CASCADE"), index=True
    )
    base_variant_id: Mapped[int | None] = mapped_column(
        ForeignKey("variants.id", ondelete="SET NULL")
    )
    metric: Mapped[str] = mapped_column(String(32))
    dataset_digest: Mapped[str | None] = mapped_column(String(64))
    tokens: Mapped[int | None] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    backend: Mapped[str | None] = mapped_column(String(64))
    hardware: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Imatrix(Base):
    """An importance matrix computed for a model (``qmgr imatrix``), kept in the store."""

    __tablename__ = "imatrices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    # The variant whose activations were measured.
    variant_id: Mapped[int | None] = mapped_column(ForeignKey("variants.id", ondelete="SET NULL"))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(4096))
    size: Mapped[int] = mapped_column(BigInteger)
    text_digest: Mapped[str | None] = mapped_column(String(64))
    tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Alias(Base):
    """A short name users type, standing for a source reference."""

    __tablename__ = "aliases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    reference: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WatchedFolder(Base):
    """A folder whose GGUF files the daemon catalogs in place as they appear."""

    __tablename__ = "watched_folders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(4096), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
