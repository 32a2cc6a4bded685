"""``qmgr fit`` and ``qmgr pull --fit``: hardware, candidates, decision.

Candidates come from the source (each variant's headers read with HTTP Range requests, before
anything is downloaded: ``header_bytes`` says how much that took) or, for a name that is no
alias but a cataloged model, from the local files, with their lineage (the variants each was
quantized from). Measured ΔPPL from ``qmgr eval`` rates the variant it was measured on, when
it was measured against an unquantized base (a ΔPPL against a quantized base is relative to
that base's own loss, so it is shown but not used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from qmgr import gguf
from qmgr.catalog import queries
from qmgr.catalog.models import Blob, BlobCopy, Eval, Model, Node, Variant
from qmgr.errors import NotFound, QmgrError
from qmgr.fetch import aliases
from qmgr.fetch.pull import Puller
from qmgr.fetch.remote_header import RangeReader
from qmgr.fit import hardware
from qmgr.fit.estimate import ModelShape
from qmgr.fit.ladder import REFERENCE_TYPES
from qmgr.fit.policy import Ancestor, Candidate, Decision, decide
from qmgr.plugin.http import make_client
from qmgr.plugin.source import FetchContext, RemoteVariant
from qmgr.refs import parse
from qmgr.settings import Settings, knob

DEFAULT_CTX = 4096


@dataclass
class FitRequest:
    ref: str
    ctx: int = DEFAULT_CTX
    kv_type: str = "f16"
    headroom: float = 0.10
    insecure: bool = False
    hw: str | None = None  # a QMGR_HW declaration sent by the client (wins over the daemon's)
    # For a name that is both cataloged and an alias: the source's variants (what to pull)
    # rather than the cataloged ones (what you have).
    remote: bool = False
    # In a fleet: decide for every up node's devices, and name the node (docs/fleet.md).
    fleet: bool = False

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> FitRequest:
        req = cls(str(args["ref"]))
        try:
            if args.get("ctx") is not None:
                req.ctx = int(args["ctx"])
            if args.get("kv_type"):
                req.kv_type = str(args["kv_type"]).lower()
            if args.get("headroom") is not None:
                req.headroom = float(args["headroom"])
        except (TypeError, ValueError) as e:
            raise QmgrError(f"bad fit parameter: {e}", code="bad_request") from e
        if not 128 <= req.ctx <= 1 << 22:
            raise QmgrError(f"--ctx {req.ctx} is out of range (128 to 4194304)",
                            code="bad_request")
        if not 0 <= req.headroom < 0.9:
            raise QmgrError("headroom must be a fraction from 0 to 0.9", code="bad_request")
        req.insecure = bool(args.get("insecure"))
        if args.get("hw"):
            req.hw = str(args["hw"])
        req.remote = args.get("remote") in (True, "1", "true")
        req.fleet = args.get("fleet") in (True, "1", "true")
        return req


class Fitter:
    def __init__(self, puller: Puller, settings: Settings):
        self.puller = puller
        self.settings = settings

    def hardware(self, declared: str | None = None) -> hardware.Snapshot:
        """Declared hardware (from the client's QMGR_HW, else the daemon's, else the config
        file), or what the probes find."""
        env = dict(self.puller.env)
        if declared:
            env["QMGR_HW"] = declared
        config = {"hw": self.settings.hw} if getattr(self.settings, "hw", None) else None
        return hardware.snapshot(self.puller.plugins.probes(), env, config)

    def evidence(self, model_name: str) -> dict[int, tuple[float | None, str | None]]:
        """Per variant id of a model: its latest ΔPPL measured against an unquantized base
        (``qmgr eval``), or None with a remark saying why a measurement is not used."""
        out: dict[int, tuple[float | None, str | None]] = {}
        with self.puller.catalog.reading() as session:
            rows = session.execute(
                select(Eval.variant_id, Eval.value, Eval.base_variant_id)
                .join(Variant, Eval.variant_id == Variant.id)
                .join(Model, Variant.model_id == Model.id)
                .where(Model.name == model_name, Eval.metric == "delta_ppl")
                .order_by(Eval.id)).all()
            for variant_id, value, base_id in rows:
                base = session.get(Variant, base_id) if base_id is not None else None
                lossy = [] if base is None else [
                    a for a in [base, *_parents(session, base)] if not _lossless_variant(a)]
                if base is not None and lossy:
                    out[variant_id] = (None, (
                        f"+{value:.4f} ΔPPL measured against {_ref(base)}, which "
                        + ("is" if lossy[0] is base else "was made from")
                        + f" a quantized file ({lossy[0].quant_type or '?'}): relative to "
                        "its loss, not used"))
                else:
                    out[variant_id] = (value, None)
        return out

    def remote_candidates(self, raw: str, insecure: bool
                          ) -> tuple[str, list[tuple[Candidate, RemoteVariant]], int]:
        _typed, ref = self.puller.resolve(raw)
        env = self.puller.env
        out = []
        header_bytes = 0
        with make_client(self.puller.stall_timeout(), knob("QMGR_CA_BUNDLE", env)) as client:
            ctx = FetchContext(client, insecure=insecure, env=env)
            offered = self.puller.listing(ref, ctx).variants  # as pull lists it
            if ref.quant and ref.kind == "hf":
                offered = [v for v in offered if v.quant and v.quant.upper() == ref.quant.upper()]
            for v in offered:
                headers = []
                for f in v.files:
                    src = RangeReader(client, f, insecure)
                    headers.append(gguf.read_header_from(src))
                    header_bytes += src.bytes_read
                facts = gguf.facts_from_header(headers[0])
                params = sum(gguf.facts_from_header(h).parameter_count for h in headers)
                shape = ModelShape.from_headers(headers)
                quant = v.quant or facts.quant_type
                info = {"source_ref": v.source_ref, "model": v.model_name,
                        "sha256": v.files[0].sha256, "files": len(v.files),
                        "parameter_count": params,
                        "header_bytes": sum(h.header_bytes for h in headers)}
                out.append((Candidate(quant, v.size or shape.file_size, shape, info), v))
        return ref.canonical, out, header_bytes

    def local_candidates(self, name: str) -> list[Candidate]:
        measured = self.evidence(name)
        with self.puller.catalog.reading() as session:
            model = session.scalar(select(Model).where(Model.name == name))
            if model is None:
                return []
            rows = [(v.quant_type, v.size, v.tag, [(queries.local_path(f.blob), f.blob.sha256)
                                                   for f in v.files], v.state,
                     measured.get(v.id, (None, None)), _lineage(session, v, measured), v.sha256)
                    for v in model.variants]
        out = []
        for quant, size, tag, paths, state, (delta, remark), ancestors, sha in rows:
            if state != "ready":
                continue
            found = [self._header(path, digest) for path, digest in paths]
            headers = [h for h in found if h is not None]
            if len(headers) < len(found):
                continue  # in a fleet, on no node that could be asked
            shape = ModelShape.from_headers(headers)
            params = sum(gguf.facts_from_header(h).parameter_count for h in headers)
            out.append(Candidate(quant, size, shape, {"ref": f"{name}:{tag}",
                                                      "parameter_count": params,
                                                      "files": len(paths), "sha256": sha},
                                 measured_delta_ppl=delta, ancestors=ancestors,
                                 remarks=[remark] if remark else []))
        return out

    def _header(self, path: str | None, sha256: str) -> gguf.GGUFHeader | None:
        """A cataloged file's GGUF header: from this node's copy, else (a fleet node without
        one) read by HTTP Range from a peer that holds it."""
        if path is not None:
            return gguf.read_header(path)
        with make_client(self.puller.stall_timeout(), knob("QMGR_CA_BUNDLE",
                                                           self.puller.env)) as client:
            for peer in self.puller.peers_with(sha256):
                try:
                    return gguf.read_header_from(RangeReader(client, peer, False))
                except (QmgrError, OSError, httpx.HTTPError):
                    continue
        return None

    def measure_remote(self, model: str, candidates: list[Candidate]) -> None:
        """A remote variant is rated by the measurement of its cataloged copy: the same bytes
        (sha256) or, where the source gives no digest, the same source reference."""
        measured = self.evidence(model)
        if not measured:
            return
        with self.puller.catalog.reading() as session:
            copies = session.execute(
                select(Variant.id, Variant.sha256, Variant.source_ref)
                .join(Model, Variant.model_id == Model.id)
                .where(Model.name == model)).all()
        for c in candidates:
            for variant_id, sha256, source_ref in copies:
                same = (sha256 == c.info.get("sha256") if c.info.get("sha256")
                        else source_ref is not None and source_ref == c.info.get("source_ref"))
                if same and variant_id in measured:
                    c.measured_delta_ppl, remark = measured[variant_id]
                    c.remarks = [remark] if remark else []

    def fit(self, req: FitRequest) -> tuple[dict[str, Any], Decision,
                                            dict[str, RemoteVariant]]:
        """The decision for a reference, with the hardware it was made for."""
        if req.fleet and self.puller.catalog.node_id is None:
            raise QmgrError("--fleet: this daemon is no fleet node (docs/fleet.md)",
                            code="bad_request")
        snap = self.hardware(req.hw)
        typed = self.puller.parse(req.ref)
        remote: dict[str, RemoteVariant] = {}
        with self.puller.catalog.reading() as session:
            target = aliases.lookup(session, typed.name) if typed.kind == "alias" else None
            if target is not None and parse(target).kind == "alias":
                # An alias of a cataloged variant (`alias add mine llama3:Q4_K_M`): its model.
                typed, target = parse(target.partition(":")[0]), None
            is_alias = target is not None
            cataloged = typed.kind == "alias" and session.scalar(
                select(Model.id).where(Model.name == typed.name)) is not None
        if typed.kind == "alias" and (not is_alias or (cataloged and not req.remote)):
            candidates = self.local_candidates(typed.name)
            if not candidates:
                raise NotFound(f"{req.ref!r} is neither a known model name nor cataloged")
            where, header_bytes, model = f"catalog:{typed.name}", 0, typed.name
        else:
            where, pairs, header_bytes = self.remote_candidates(req.ref, req.insecure)
            candidates = [c for c, _ in pairs]
            remote = {c.info["source_ref"]: v for c, v in pairs}
            model = typed.name if typed.kind == "alias" else (
                pairs[0][1].model_name if pairs else "")
        if remote and model:
            self.measure_remote(model, candidates)
        if req.fleet:
            return (*self._fleet_fit(req, candidates, where, header_bytes), remote)
        decision = decide(candidates, snap.devices, req.ctx, req.kv_type, req.headroom)
        out = decision.to_dict()
        out.update(ref=req.ref, source=where, header_bytes=header_bytes,
                   hardware=snap.to_dict())
        return out, decision, remote

    def _fleet_fit(self, req: FitRequest, candidates: list[Candidate], where: str,
                   header_bytes: int) -> tuple[dict[str, Any], Decision]:
        """The decision for every up node, from its heartbeat's devices, and the node to put
        the pick on: the best quality that fits anywhere; among equals, the node that already
        holds those bytes, then the one with the most free memory."""
        digests = {str(c.info["sha256"]) for c in candidates if c.info.get("sha256")}
        with self.puller.catalog.reading() as session:
            nodes = [(n.name, n.id, n.hardware) for n in session.scalars(
                select(Node).where(Node.state == "up").order_by(Node.name))]
            held = set(session.execute(
                select(Node.name, Blob.sha256).join(BlobCopy, BlobCopy.node_id == Node.id)
                .join(Blob, BlobCopy.blob_id == Blob.id).where(Blob.sha256.in_(digests))).all())
        per_node = []
        for name, node_id, hw in nodes:
            devices = [hardware.Device.from_dict(d) for d in (hw or {}).get("devices", [])]
            decision = decide(candidates, devices, req.ctx, req.kv_type, req.headroom)
            pick = decision.pick
            per_node.append(_NodeFit(
                name, node_id, decision, devices, sum(d.memory_free or 0 for d in devices),
                bool(pick and (name, pick.candidate.info.get("sha256")) in held)))
        fitting = [n for n in per_node if n.rank is not None]
        chosen = min(fitting, key=lambda n: (n.rank, not n.has_blob, -n.free, n.name)) \
            if fitting else None
        # Nothing fits anywhere: why, as on one machine, for the largest node.
        shown = chosen or (max(per_node, key=lambda n: n.free) if per_node else _NodeFit(
            "", 0, decide(candidates, [], req.ctx, req.kv_type, req.headroom), [], 0, False))
        out = shown.decision.to_dict()
        out.update(ref=req.ref, source=where, header_bytes=header_bytes,
                   hardware={"source": "fleet", "devices": [d.to_dict() for d in shown.devices],
                             "errors": []},
                   node=chosen.name if chosen else None,
                   node_id=chosen.node_id if chosen else None,
                   nodes=[{"name": n.name, "pick": n.decision.pick.candidate.quant
                           if n.decision.pick else None, "rank": n.rank,
                           "has_blob": n.has_blob, "free": n.free, "reason": n.decision.reason}
                          for n in per_node])
        if chosen:
            tied = sum(n.rank == chosen.rank for n in fitting) > 1
            why = "holds those bytes already" if chosen.has_blob else (
                "has the most free memory" if tied else "is where it fits best")
            out["reason"] = f"on node {chosen.name} ({why}): {chosen.decision.reason}"
        return out, shown.decision


@dataclass
class _NodeFit:
    """One node's decision in a fleet fit."""

    name: str
    node_id: int
    decision: Decision
    devices: list[hardware.Device]
    free: int  # bytes free on its devices, as its last heartbeat said
    has_blob: bool  # it holds the bytes of its pick

    @property
    def rank(self) -> int | None:
        return self.decision.pick.rank if self.decision.pick else None


def _ref(v: Variant) -> str:
    return f"{v.model.name}:{v.tag}"


def _lossless_variant(v: Variant) -> bool:
    return (v.quant_type or "").upper() in REFERENCE_TYPES


def _parents(session: Session, v: Variant) -> list[Variant]:
    """The cataloged variants ``v`` was quantized from, nearest first. A parent whose row is
    gone is found again by the digest its child's recipe kept, if its bytes are cataloged
    under another name."""
    out: list[Variant] = []
    seen = {v.id}
    while len(out) < 32:
        parent = v.parent
        if parent is None and v.recipe and v.recipe.get("parent_sha256"):
            parent = session.scalar(select(Variant).where(
                Variant.sha256 == v.recipe["parent_sha256"]).limit(1))
        if parent is None or parent.id in seen:
            break
        out.append(parent)
        seen.add(parent.id)
        v = parent
    return out


def _requantized(v: Variant) -> bool:
    """Whether a quantized variant's recipe says its source was already quantized."""
    recipe = v.recipe or {}
    details = recipe.get("details") or {}
    return bool((recipe.get("options") or {}).get("allow_requantize")
                or (isinstance(details, dict) and details.get("requantized_from")))


def _lineage(session: Session, v: Variant,
             measured: dict[int, tuple[float | None, str | None]]) -> list[Ancestor]:
    parents = _parents(session, v)
    out = [Ancestor(_ref(p), p.quant_type, measured.get(p.id, (None, None))[0])
           for p in parents]
    last = parents[-1] if parents else v
    if last.parent_variant_id is None and last.recipe and _requantized(last):
        # Made from an already-quantized file that is no longer cataloged: what it lost is
        # unknown.
        sha = str(last.recipe.get("parent_sha256") or "")
        out.append(Ancestor(f"sha256:{sha[:12]}" if sha else "a deleted variant", None))
    return out
