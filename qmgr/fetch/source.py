"""The protocol sources implement, and the context they are given."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from qmgr.fetch.remote import Listing, RemoteVariant
from qmgr.refs import Reference


@dataclass
class FetchContext:
    """What a source may use: an HTTP client, endpoints and credentials, the --insecure flag."""

    client: httpx.Client
    insecure: bool = False
    sha256: str | None = None  # a digest the user gave (--sha256), for sources without one
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


class Source(Protocol):
    """A registry qmgr can pull from. Registered with the ``register_sources`` hook."""

    #: Short name shown by ``qmgr plugins`` and in errors.
    name: str
    #: Reference kinds it handles (``hf``, ``ollama``, ``url``, or a plugin's own scheme).
    kinds: tuple[str, ...]

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
