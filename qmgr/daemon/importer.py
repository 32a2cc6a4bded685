"""Cataloging GGUF files that are already on disk: ``qmgr import`` and watched folders.

Untrusted input: the header is read with qmgr's bounded reader before anything else, the bytes
are hashed before a row is written, and a variant becomes ``ready`` in the same transaction that
records its blobs.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from qmgr import gguf
from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Origin
from qmgr.catalog.record import ShardFile, combined_facts, record_variant
from qmgr.errors import GGUFError, NotFound, QmgrError
from qmgr.gguf.names import SHARD_RE, strip_quant_suffix
from qmgr.store import Store, hash_file, identity

log = logging.getLogger(__name__)

# Names with control characters or newlines would corrupt logs and listings.
BAD_NAME_RE = re.compile(r"[\x00-\x1f\x7f]")


def model_name_for(path: Path, facts: gguf.ModelFacts) -> str:
    """A model name from the file name, without shard and quant suffixes: the name users see
    on the model page (``gemma-3-270m-it-Q4_K_M.gguf`` -> ``gemma-3-270m-it``)."""
    base = path.name
    m = SHARD_RE.match(base)
    stem = m.group("stem") if m else base.removesuffix(".gguf")
    stem = strip_quant_suffix(stem)
    slug = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    if not slug and facts.name:
        slug = re.sub(r"[^a-z0-9._-]+", "-", facts.name.lower()).strip("-._")
    return slug[:128] or "model"


def check_file(path: Path) -> Path:
    if BAD_NAME_RE.search(str(path)):
        raise QmgrError(f"refusing a path with control characters: {str(path)!r}", code="bad_path")
    if not path.is_absolute():
        raise QmgrError(f"path must be absolute: {path}", code="bad_path")
    if not path.exists():
        raise NotFound(f"no such file: {path}")
    if not path.is_file():
        raise QmgrError(f"not a regular file: {path}", code="bad_path")
    if not os.access(path, os.R_OK):
        raise QmgrError(f"the daemon (uid {os.getuid()}) cannot read {path}", code="forbidden")
    return path


def shard_paths(first: Path, facts: gguf.ModelFacts) -> list[Path]:
    """All shard files of a split model, given its first shard."""
    count = facts.split_count or 1
    if count <= 1:
        return [first]
    m = SHARD_RE.match(first.name)
    if not m or int(m.group("no")) != 1 or (facts.split_no or 0) != 0:
        raise QmgrError(
            f"{first.name} is shard {(facts.split_no or 0) + 1} of {count}: import the first "
            "shard (NAME-00001-of-NNNNN.gguf)", code="not_first_shard")
    stem = m.group("stem")
    paths = [first.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise QmgrError(f"shards missing beside {first.name}: {', '.join(missing)}",
                        code="missing_shards")
    return paths


def read_files(path: Path) -> list[ShardFile]:
    """Read and check the header of a file (and of its shards); hash nothing yet."""
    check_file(path)
    facts = gguf.inspect(path)
    shards = [ShardFile(path, facts)]
    for i, p in enumerate(shard_paths(path, facts)[1:], start=1):
        f = gguf.inspect(check_file(p))
        if f.split_no != i or f.split_count != facts.split_count:
            raise GGUFError(f"{p.name} says it is shard {(f.split_no or 0) + 1} of "
                            f"{f.split_count}, expected {i + 1} of {facts.split_count}")
        shards.append(ShardFile(p, f))
    return shards


def catalog_file(catalog: Catalog, store: Store, path: Path, *, copy: bool = False,
                 name: str | None = None) -> tuple[dict[str, Any], bool]:
    """Inspect, hash and catalog a GGUF file (in place, or copied into the store).

    Returns the variant (as the API shows it) and whether it is new. Importing the same bytes
    again under the same model returns the existing variant.
    """
    seen = {path: identity(check_file(path))}  # what was checked is what gets read
    shards = read_files(path)
    for s in shards:
        st = seen.get(s.path) or identity(s.path)
        s.mtime_ns = st.mtime_ns
        if copy:
            s.sha256, s.size, s.path = store.copy_in(s.path, same_as=st)
        else:
            s.sha256, s.size = hash_file(s.path, same_as=st)
            if s.path.stat().st_mtime_ns != s.mtime_ns:
                raise QmgrError(f"{s.path} changed while it was being hashed; try again",
                                code="file_changed")
    facts = combined_facts(shards)
    model_name = queries.check_name(name) if name else model_name_for(path, shards[0].facts)
    return record_variant(catalog, model_name, shards, facts, origin=Origin.IMPORTED,
                          source_ref=str(path), in_store=copy)
