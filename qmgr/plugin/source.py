"""What a source plugin implements, and what it returns: variants made of files with sizes
and digests, and the context it is given (registered with ``register_sources``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qmgr.gguf.names import SHARD_RE, quant_from_name
from qmgr.refs import Reference

if TYPE_CHECKING:  # httpx costs ~140 ms to import here (-X importtime): the client must not pay
    import httpx


@dataclass
class RemoteFile:
    """One file to fetch. ``headers`` (auth) go to the URL's own host only."""

    name: str
    url: str
    size: int | None = None
    sha256: str | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    # Plain http allowed for this file: its source was configured by the user to speak http
    # (a mirror on the local network), as opposed to a redirect or a registry's whim.
    allow_http: bool = False


@dataclass
class RemoteVariant:
    quant: str | None
    files: list[RemoteFile]
    source_ref: str  # canonical reference of this very variant
    model_name: str  # the catalog name a pull gives it
    # Files pulled with the variant and recorded beside it (a vision projector), by kind.
    attachments: list[tuple[str, RemoteFile]] = field(default_factory=list)

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant": self.quant,
            "size": self.size,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
            "sha256": self.files[0].sha256 if self.files else None,
            "source_ref": self.source_ref,
            "model": self.model_name,
            "attachments": [{"kind": kind, "name": f.name, "size": f.size, "sha256": f.sha256}
                            for kind, f in self.attachments],
        }


@dataclass
class Listing:
    """All a source found for a reference: the variants, and what else the repository holds.

    ``projectors`` are vision projectors (each variant carries the one it is pulled with);
    ``extras`` are files that are not model weights (never fetched); ``skipped`` are entries
    left out, each with why: odd but harmless ones, and refused ones (a path that climbs out,
    a digest that is not one), which fail a pull only when they are what was asked for.
    """

    variants: list[RemoteVariant]
    projectors: list[RemoteFile] = field(default_factory=list)
    extras: list[RemoteFile] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variants": [v.to_dict() for v in self.variants],
            "projectors": [{"name": f.name, "size": f.size, "sha256": f.sha256}
                           for f in self.projectors],
            "extras": [{"name": f.name, "size": f.size} for f in self.extras],
            "skipped": [{"name": s.name, "why": s.why, "refused": s.refused}
                        for s in self.skipped],
        }


@dataclass
class Skipped:
    name: str
    why: str
    refused: bool = False  # dangerous, not just odd: a clear error if it is what was wanted
    quant: str | None = None  # the quant its name announces, to say so when it is wanted


def group_gguf_files(files: list[RemoteFile]) -> dict[str, list[RemoteFile]]:
    """GGUF files grouped into variants: shards ``-0000N-of-0000M`` of one stem together, in
    order; an incomplete shard set is left out."""
    groups: dict[str, list[RemoteFile]] = {}
    numbers: dict[str, list[tuple[int, int]]] = {}
    for f in files:
        if not f.name.endswith(".gguf"):
            continue
        m = SHARD_RE.match(f.name)
        key = m.group("stem") if m else f.name
        if m:
            numbers.setdefault(key, []).append((int(m.group("no")), int(m.group("count"))))
        groups.setdefault(key, []).append(f)
    out = {}
    for key, group in groups.items():
        group.sort(key=lambda f: f.name)
        if key in numbers:
            counts = {c for _, c in numbers[key]}
            # Complete only if every shard agrees on the count and 1..count are all there.
            if len(counts) != 1 or sorted(n for n, _ in numbers[key]) != list(
                    range(1, counts.pop() + 1)):
                continue
        out[key] = group
    return out


# llama.cpp's own projector files come in F16 (the usual, what `llama-server -hf` takes),
# BF16 and F32; quantized ones lose vision quality for little memory.
PROJECTOR_PREFERENCE = ("F16", "BF16", "F32", "Q8_0")


def preferred_projector(projectors: list[RemoteFile]) -> RemoteFile | None:
    """The projector a model is pulled with: F16 if there is one, else the next best."""
    def rank(f: RemoteFile) -> tuple[int, int]:
        quant = quant_from_name(f.name)
        order = (PROJECTOR_PREFERENCE.index(quant) if quant in PROJECTOR_PREFERENCE
                 else len(PROJECTOR_PREFERENCE))
        return order, f.size or 0

    return min(projectors, key=rank) if projectors else None


@dataclass
class FetchContext:
    """What a source may use: an HTTP client, endpoints and credentials, the --insecure flag."""

    client: httpx.Client
    insecure: bool = False
    sha256: str | None = None  # a digest the user gave (--sha256), for sources without one
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


class Source(Protocol):
    """A registry qmgr can pull from. Registered with the ``register_sources`` hook."""

    @property
    def name(self) -> str:
        """Short name shown by ``qmgr plugins`` and in errors."""
        ...

    @property
    def kinds(self) -> tuple[str, ...]:
        """Reference kinds it handles (``hf``, ``ollama``, ``url``, or a scheme of its own:
        ``s3`` for ``s3://...`` references)."""
        ...

    def variants(self, ref: Reference, ctx: FetchContext) -> list[RemoteVariant]:
        """Everything the reference's repository offers, one entry per variant (shards
        grouped), with sizes and sha256 digests where the registry gives them."""
        ...


def listing_of(source: Source, ref: Reference, ctx: FetchContext) -> Listing:
    """What a source offers for a reference. A source may define ``listing(ref, ctx)`` to say
    what else the repository holds (projectors, extras, entries it skipped); one that only
    has ``variants`` offers just those."""
    listing = getattr(source, "listing", None)
    if callable(listing):
        found = listing(ref, ctx)
        if isinstance(found, Listing):
            return found
    return Listing(source.variants(ref, ctx))
