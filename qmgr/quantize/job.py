"""The quantize and imatrix jobs, on the daemon's side.

For each target type: a worker process writes a partial file in the store; the daemon hashes
it, reads its header with qmgr's bounded reader (a quantizer's output is checked like any
download), publishes it, and catalogs it as a variant of the same model with its parent and
the full recipe. A failed, cancelled or killed quantization leaves no file behind: the partial
file is deleted here, or by start-up recovery if the daemon itself was killed.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from qmgr import gguf
from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import Imatrix, Model, Origin, Variant, VariantState
from qmgr.catalog.record import ShardFile, combined_facts, record_variant
from qmgr.errors import GGUFError, NotFound, QmgrError
from qmgr.plugin.quantizer import QuantizeOptions
from qmgr.store import Store, fsync_dir, hash_file
from qmgr.work.jobs import JobHandle, run_worker

log = logging.getLogger(__name__)


def _facts(d: dict[str, Any] | None) -> gguf.ModelFacts | None:
    """ModelFacts from the worker's ``to_dict()``; None (read the header) if they do not fit."""
    if not isinstance(d, dict):
        return None
    try:
        return gguf.ModelFacts(**d)
    except TypeError:
        return None


def _fsync(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())

DEFAULT_QUANTIZER = "llama.cpp"


@dataclass
class Parent:
    """The cataloged variant a quantization or an importance matrix starts from."""

    variant_id: int
    model: str
    ref: str
    path: Path
    sha256: str
    facts: dict[str, Any]


class Quantizing:
    def __init__(self, catalog: Catalog, store: Store, env: dict[str, str] | None = None):
        self.catalog = catalog
        self.store = store
        self.env = dict(os.environ) if env is None else env

    # -- helpers ----------------------------------------------------------------------------

    def parent(self, ref: str) -> Parent:
        with self.catalog.reading() as session:
            v = queries.resolve_one(session, ref)
            if v.state != VariantState.READY:
                raise QmgrError(f"{v.model.name}:{v.tag} is {v.state}: its file is not usable",
                                code="not_ready")
            if len(v.files) != 1:
                raise QmgrError(f"{v.model.name}:{v.tag} is split in {len(v.files)} shards; "
                                "quantizing split models is not supported yet",
                                code="unsupported_file")
            return Parent(v.id, v.model.name, f"{v.model.name}:{v.tag}",
                          Path(queries.local_paths(v)[0]), v.sha256, dict(v.facts or {}))

    def imatrix_for(self, model: str, spec: str | None) -> tuple[Path, str] | None:
        """The importance matrix to use: a file path, a digest prefix, or "latest" (the newest
        computed for the model)."""
        if not spec:
            return None
        with self.catalog.reading() as session:
            query = select(Imatrix).join(Model, Imatrix.model_id == Model.id)
            if spec == "latest":
                row = session.scalar(query.where(Model.name == model).order_by(
                    Imatrix.id.desc()))
                if row is None:
                    raise NotFound(f"no importance matrix for {model} yet: make one with "
                                    f"`qmgr imatrix {model}:TAG --text FILE`")
                return Path(row.path), row.sha256
            row = session.scalar(select(Imatrix).where(Imatrix.sha256.startswith(spec.lower())))
            if row is not None:
                return Path(row.path), row.sha256
        path = Path(spec)
        if not path.is_absolute() or not path.is_file():
            raise NotFound(f"--imatrix {spec!r}: neither a computed matrix nor a file")
        return path, hash_file(path)[0]

    def run_worker(self, handle: JobHandle, request: dict[str, Any], label: str,
                   more: bool = False) -> dict[str, Any]:
        return run_worker(handle, "qmgr.quantize.worker", request, label, self.env,
                          "quantize_failed", more)

    def publish(self, partial: Path, digest: tuple[str, int] | None = None,
                known: gguf.ModelFacts | None = None) -> tuple[str, int, Path, gguf.ModelFacts]:
        """fsync, hash and header check at once (disk, one core, the other core), then into
        the store. ``digest``: (sha256, size) when the worker hashed the file as it was
        written, ``known`` the facts of its header, parsed meanwhile by qmgr's reader (see
        qmgr.builtin.llama_digest): the size is checked here, the bytes are not read again."""
        with ThreadPoolExecutor(2, thread_name_prefix="qmgr-publish") as pool:
            synced = pool.submit(_fsync, partial)
            hashed = pool.submit(hash_file, partial) if digest is None else None
            try:
                facts = known if known is not None and digest is not None \
                    else gguf.inspect(partial)
            except GGUFError as e:
                raise QmgrError(f"the quantizer wrote an invalid GGUF file: {e.message}",
                                code="quantize_failed") from e
            if hashed is not None:
                sha, size = hashed.result()
            else:
                assert digest is not None
                sha, size = digest
            synced.result()
        if partial.stat().st_size != size:
            raise QmgrError(f"the quantizer's output changed after it was hashed ({size} bytes "
                            f"hashed, {partial.stat().st_size} on disk)", code="quantize_failed")
        return sha, size, self.store.publish(partial, sha, size), facts

    # -- jobs ---------------------------------------------------------------------------------

    def run(self, handle: JobHandle) -> dict[str, Any]:
        args = handle.arguments
        src = self.parent(args["ref"])
        quantizer = args.get("quantizer") or DEFAULT_QUANTIZER
        options = QuantizeOptions.from_dict(dict(args.get("options") or {}))
        matrix = self.imatrix_for(src.model, args.get("imatrix"))
        if matrix:
            options.imatrix = matrix[0]
        made = []
        for i, target in enumerate(args["targets"]):
            recipe = {"quantizer": quantizer, "target": target, "parent_sha256": src.sha256,
                      "options": {k: v for k, v in options.to_dict().items()
                                  if k in options.used() and k != "imatrix"},
                      "imatrix_sha256": matrix[1] if matrix else None}
            existing = self._existing(src.variant_id, recipe)
            if existing:
                made.append(existing)
                continue
            label = f"quantizing {target} ({i + 1}/{len(args['targets'])})"
            partial = self.store.new_partial()
            try:
                result = self.run_worker(handle, {
                    "quantizer": quantizer, "src": str(src.path), "dst": str(partial),
                    "target": target, "options": options.to_dict(), "src_facts": src.facts},
                    label, more=i + 1 < len(args["targets"]))
                digest = (result["sha256"], int(result["size"])) if result.get("sha256") \
                    else None
                sha, size, path, facts = self.publish(partial, digest,
                                                      _facts(result.get("facts")))
            finally:
                partial.unlink(missing_ok=True)
                fsync_dir(self.store.partial)
            recipe.update(version=result.get("version"), details=result.get("details"))
            shard = ShardFile(path, facts, sha, size)
            variant, _ = record_variant(
                self.catalog, src.model, [shard], combined_facts([shard]),
                origin=Origin.QUANTIZED, source_ref=None, in_store=True, tag=target,
                parent_id=src.variant_id, recipe=recipe)
            made.append(variant)
            log.info("quantized %s to %s as %s", src.ref, target, variant["ref"])
        handle.update(phase="done")
        return {"variants": made, "source": src.ref}

    def _existing(self, parent_id: int, recipe: dict[str, Any]) -> dict[str, Any] | None:
        """A variant already made from this parent with this recipe (a resumed job)."""
        with self.catalog.reading() as session:
            for v in session.scalars(select(Variant).where(Variant.parent_variant_id ==
                                                           parent_id)):
                r = dict(v.recipe or {})
                if all(r.get(k) == recipe[k] for k in ("quantizer", "target", "options",
                                                         "imatrix_sha256")) \
                        and v.state == VariantState.READY:
                    return queries.variant_dict(v)
        return None

    def run_imatrix(self, handle: JobHandle) -> dict[str, Any]:
        args = handle.arguments
        src = self.parent(args["ref"])
        text = Path(args["text"])
        text_digest = hash_file(text)[0]
        partial = self.store.new_partial()
        try:
            result = self.run_worker(handle, {"kind": "imatrix", "src": str(src.path),
                                              "dst": str(partial), "text": str(text),
                                              "n_ctx": args.get("n_ctx"),
                                              "quantizer": args.get("quantizer")},
                                     "computing imatrix")
            _fsync(partial)
            gguf.inspect(partial)  # what we publish must at least be a readable GGUF
            sha, size = hash_file(partial)
            folder = self.store.root / "imatrix"
            folder.mkdir(exist_ok=True)
            path = folder / f"sha256-{sha}.gguf"
            os.replace(partial, path)
            fsync_dir(folder)
        finally:
            partial.unlink(missing_ok=True)
        with self.catalog.writing() as session:
            model = session.scalar(select(Model).where(Model.name == src.model))
            assert model is not None
            row = Imatrix(model_id=model.id, variant_id=src.variant_id, sha256=sha,
                          path=str(path), size=size, text_digest=text_digest,
                          tokens=result.get("tokens"))
            session.add(row)
        handle.update(phase="done")
        return {"imatrix": {"sha256": sha, "path": str(path), "model": src.model,
                            "variant": src.ref, "tokens": result.get("tokens"),
                            "computed_by": result.get("imatrix_maker"),
                            "text_sha256": text_digest}}

