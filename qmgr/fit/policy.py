"""The fit policy: which variant to take on this machine, and why.

Given the variants a source offers (their headers), a context length, a KV cache type and a
headroom margin, take the highest-quality variant that fits entirely on the fastest device
pool (the GPUs, or RAM on a machine without one); otherwise the best one that fits with part
of its layers on the GPUs; otherwise the best that fits in RAM; otherwise refuse, naming the
smallest requirement and what is missing.

Every option says where its quality figure comes from (``quality_source``):

- ``measured``: ΔPPL of this very variant, measured on this model with ``qmgr eval`` against
  an unquantized base;
- ``published`` (or ``estimated``, interpolated by bits per weight): the Llama-3-8B ladder of
  :mod:`qmgr.fit.ladder`, the same scale for every option;
- ``inherited``: the variant was quantized from an already-quantized one, so it carries its
  ancestor's losses at least: it is rated no better than the worst rung of its lineage;
- ``unknown``: a type the ladder does not know, never measured.

Ranking: the ladder's figures put every option in order (lineage-capped, a re-quantized variant
after its ancestor when they tie). Where options were measured, the measurements decide the
order among them, in the places the ladder gave the measured ones: a measured figure is only
ever compared with another measured figure (a small model's ΔPPL is on another scale than
Llama-3-8B's), and an option without one keeps its place. A measured variant with an
unmeasured quantized ancestor keeps the ancestor's ladder figure: it cannot be shown better
than the ancestor on any common scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qmgr.fit.estimate import GiB, ModelShape, Placement, place
from qmgr.fit.ladder import CLIFF_BPW, REFERENCE_TYPES, rung

TIERS = ("gpu", "partial", "cpu")
UNRATED = float("inf")


@dataclass
class Ancestor:
    """A variant the candidate was quantized from (nearest first in ``Candidate.ancestors``)."""

    ref: str
    quant: str | None  # None: the parent is not cataloged any more
    measured_delta_ppl: float | None = None


@dataclass
class Candidate:
    """One variant on offer: what it is, and its header's shape."""

    quant: str | None
    size: int
    shape: ModelShape
    info: dict[str, Any] = field(default_factory=dict)  # source_ref, sha256, files...
    measured_delta_ppl: float | None = None  # this variant, measured on this model
    ancestors: list[Ancestor] = field(default_factory=list)
    remarks: list[str] = field(default_factory=list)  # said with the quality note


def _ladder_loss(quant: str | None) -> float:
    r = rung(quant)
    return r.delta_ppl if r is not None else UNRATED


def _lossless(quant: str | None) -> bool:
    r = rung(quant)
    return r is not None and r.basis in REFERENCE_TYPES


@dataclass
class Rating:
    """How good an option is, and on what evidence."""

    loss: float  # ΔPPL as rated (measured, or the ladder's), lineage-capped
    ladder_loss: float  # on the ladder's scale, lineage-capped: what orders everything
    source: str  # measured / published / estimated / inherited / unknown
    basis: str | None  # the type whose ladder figure is used (a variant's own or an ancestor's)
    note: str
    by_measure: bool  # ordered among the measured ones by its measurement
    generations: int  # quantizations from already-quantized files in its lineage
    below_cliff: bool


def rate(c: Candidate) -> Rating:
    own = rung(c.quant)
    own_loss = own.delta_ppl if own else UNRATED
    lossy = [a for a in c.ancestors if not _lossless(a.quant)]
    worst = max(lossy, key=lambda a: _ladder_loss(a.quant), default=None)
    ladder_loss = max(own_loss, _ladder_loss(worst.quant) if worst else own_loss)
    by_measure = c.measured_delta_ppl is not None and all(
        a.measured_delta_ppl is not None for a in lossy)
    # The ancestor that bounds the rating, on the scale the option is ranked on.
    bound: Ancestor | None = None
    if by_measure and c.measured_delta_ppl is not None:
        loss = c.measured_delta_ppl
        top = max(lossy, key=lambda a: a.measured_delta_ppl or 0.0, default=None)
        if top is not None and top.measured_delta_ppl is not None \
                and top.measured_delta_ppl >= loss:
            loss, bound = top.measured_delta_ppl, top
    else:
        loss = ladder_loss
        if worst is not None and _ladder_loss(worst.quant) >= own_loss:
            bound = worst
    if bound is not None:
        source, basis = "inherited", bound.quant
    elif by_measure:
        source, basis = "measured", own.basis if own else None
    else:
        source, basis = (own.source, own.basis) if own else ("unknown", None)

    measured = (f"+{c.measured_delta_ppl:.4f} ΔPPL measured on this model"
                if c.measured_delta_ppl is not None else "")
    parts = {"measured": [measured], "unknown": ["unknown quant type: quality not rated"],
             "inherited": []}.get(source, [own.note if own else ""])
    if worst is not None:
        named = bound or worst
        parent = c.ancestors[0]
        text = f"re-quantized from {parent.quant or parent.ref}"
        if named is not parent:
            text += f" (itself made from {named.quant or named.ref})"
        if named.quant is None:
            text += ", which is not cataloged: quality not rated"
        else:
            text += f": no better than {named.quant}"
            named_rung = rung(named.quant)
            if bound is not None and by_measure:
                text += f", +{loss:.4f} ΔPPL measured on this model"
            elif bound is not None and named_rung is not None:
                text += f", {named_rung.note}"
        parts.append(text)
        if measured and not by_measure:
            parts.append(f"{measured} (not ranked by it: an ancestor was not measured)")
    parts.extend(c.remarks)
    note = "; ".join(p for p in parts if p)
    bpw = own.bits_per_weight if own else 8 * c.shape.weight_bytes / max(1, _params(c) or 1)
    worst_rung = rung(worst.quant) if worst else None
    below = bpw < CLIFF_BPW or bool(worst_rung and worst_rung.below_cliff)
    if below and "cliff" not in note:
        note += "; below 4 bits: quality cliff"
    return Rating(loss, ladder_loss, source, basis, note, by_measure, len(lossy), below)


@dataclass
class Option:
    candidate: Candidate
    placement: Placement
    rating: Rating
    rank: int = 0  # 1 = the best quality on offer; equal ratings share a rank

    @property
    def need(self) -> int:
        return sum(d.total for d in self.placement.devices)

    @property
    def quality_loss(self) -> float:
        return self.rating.loss

    @property
    def quality_note(self) -> str:
        return self.rating.note

    @property
    def below_cliff(self) -> bool:
        return self.rating.below_cliff

    def to_dict(self) -> dict[str, Any]:
        c, r = self.candidate, self.rating
        return {"quant": c.quant, "size": c.size, **c.info,
                "bits_per_weight": round(8 * c.shape.weight_bytes / max(1, _params(c)), 3),
                "fit": self.placement.kind if self.placement.fits else "no",
                "placement": self.placement.to_dict(), "memory": self.need,
                # JSON has no infinity: an unrated option's loss is null.
                "quality_loss": None if r.loss == UNRATED else r.loss,
                "quality_note": r.note, "quality_source": r.source,
                "quality_basis": r.basis, "quality_rank": self.rank,
                "below_cliff": r.below_cliff,
                "measured": c.measured_delta_ppl is not None,
                "measured_delta_ppl": c.measured_delta_ppl,
                "lineage": [a.ref for a in c.ancestors]}


def _params(c: Candidate) -> int:
    return int(c.info.get("parameter_count") or 0)


@dataclass
class Decision:
    options: list[Option]
    pick: Option | None
    reason: str
    notes: list[str]
    ctx: int
    kv_type: str
    headroom: float

    def to_dict(self) -> dict[str, Any]:
        return {"ctx": self.ctx, "kv_type": self.kv_type, "headroom": self.headroom,
                "options": [o.to_dict() for o in self.options],
                "pick": self.pick.candidate.quant if self.pick else None,
                "pick_source_ref": self.pick.candidate.info.get("source_ref")
                if self.pick else None,
                "reason": self.reason, "notes": self.notes}


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / 2**20:.0f} MiB"


def option(c: Candidate, devices: list[Any], ctx: int, kv_type: str, headroom: float) -> Option:
    return Option(c, place(c.shape, devices, ctx, kv_type, headroom), rate(c))


def rank(options: list[Option]) -> list[Option]:
    """Best quality first (the rule in this module's docstring), each option's ``rank`` set."""
    def ladder_key(o: Option) -> tuple[float, int, int]:
        return (o.rating.ladder_loss, o.rating.generations, -o.candidate.size)

    ordered = sorted(options, key=ladder_key)
    slots = [i for i, o in enumerate(ordered) if o.rating.by_measure]
    measured = sorted((ordered[i] for i in slots),
                      key=lambda o: (o.rating.loss, *ladder_key(o)))
    for i, o in zip(slots, measured, strict=True):
        ordered[i] = o

    def same(a: Option, b: Option) -> bool:
        if a.rating.by_measure != b.rating.by_measure:
            return False
        figure = "loss" if a.rating.by_measure else "ladder_loss"
        return (getattr(a.rating, figure) == getattr(b.rating, figure)
                and a.rating.generations == b.rating.generations)

    for i, o in enumerate(ordered):
        o.rank = ordered[i - 1].rank if i and same(ordered[i - 1], o) else i + 1
    return ordered


def _name(o: Option) -> str:
    """The pick as the reason names it: a re-quantized one says what it is no better than."""
    r, c = o.rating, o.candidate
    if r.generations and r.source == "inherited":
        parent = c.ancestors[0].quant or c.ancestors[0].ref
        return (f"{c.quant} (re-quantized from {parent}: "
                + (f"no better than {r.basis})" if r.basis else "not rated)"))
    return str(c.quant)


def decide(candidates: list[Candidate], devices: list[Any], ctx: int = 4096,
           kv_type: str = "f16", headroom: float = 0.10) -> Decision:
    options = rank([option(c, devices, ctx, kv_type, headroom) for c in candidates])
    notes: list[str] = []
    has_gpu = any(d.kind in ("cuda", "rocm", "metal") for d in devices)
    pick = None
    for tier in TIERS:
        fitting = [o for o in options if o.placement.fits and o.placement.kind == tier]
        if fitting:
            pick = fitting[0]
            break
    if pick is None:
        smallest = min(options, key=lambda o: o.need) if options else None
        if smallest is None:
            return Decision(options, None, "the source offers no variant", notes, ctx, kv_type,
                            headroom)
        cpu = next((d for d in smallest.placement.devices if d.kind == "cpu"), None)
        have = cpu.budget if cpu else 0
        reason = (f"nothing fits: the smallest variant ({smallest.candidate.quant}) needs "
                  f"{_gib(smallest.need)} at --ctx {ctx}, and this machine has {_gib(have)} "
                  f"usable ({headroom:.0%} of each device kept free); "
                  f"{_gib(smallest.need - have)} more memory, or a smaller --ctx, would do")
        return Decision(options, None, reason, notes, ctx, kv_type, headroom)
    p = pick.placement
    used = ", ".join(f"{_gib(d.total)} of {_gib(d.budget)} usable on {d.kind}"
                     + (f" {d.index}" if d.kind != "cpu" else "") for d in p.devices
                     if d.total)
    where = {
        "gpu": "fits entirely in GPU memory",
        "partial": f"fits with {p.gpu_layers} of {p.n_layer} layers on the GPU"
                   + ("s" if sum(d.kind != "cpu" for d in p.devices) > 1 else ""),
        "cpu": "fits in RAM" + (" (too large for the GPU)" if has_gpu else ""),
    }[p.kind]
    better = [o for o in options if o.rank < pick.rank]
    reason = (f"{_name(pick)}: the best quality that {where} ({used})"
              if pick.rating.loss != UNRATED else
              f"{_name(pick)}: nothing rated {where}; this does ({used})")
    if better:
        b = better[-1]
        reason += f"; {b.candidate.quant} would need {_gib(b.need)}"
    if pick.below_cliff:
        notes.append(f"{pick.candidate.quant} is below 4 bits per weight: expect a clear loss "
                     f"of quality ({pick.quality_note}); nothing larger fits")
    if pick.rating.generations:
        notes.append(f"{pick.candidate.quant} carries the losses of the quantized file it was "
                     f"made from ({pick.quality_note})")
    by_measure = [o for o in options if o.rating.by_measure]
    if by_measure and len(by_measure) < len(options):
        notes.append("ranked by the measurements on this model where variants have them ("
                     + ", ".join(str(o.candidate.quant) for o in by_measure)
                     + "), by the published Llama-3-8B figures otherwise")
    for o in better:
        cpu = next((d for d in o.placement.devices if d.kind == "cpu"), None)
        if cpu and cpu.repacked_originals and cpu.total - cpu.repacked_originals <= cpu.budget \
                and all(d.total <= d.budget for d in o.placement.devices if d is not cpu):
            notes.append(f"{o.candidate.quant} would fit but for {_gib(cpu.repacked_originals)}"
                         ": llama.cpp's CPU backend copies its Q4_0/Q4_K/IQ4_NL weights into a "
                         "repacked layout, and the memory-mapped originals stay resident")
            break
    if better:
        # Would a smaller context have let a better variant fit? Then context is the limit.
        for smaller in (ctx // 2, ctx // 4, 2048, 1024, 512):
            if smaller >= ctx or smaller < 256:
                continue
            for o in better:
                alt = place(o.candidate.shape, devices, smaller, kv_type, headroom)
                if alt.fits and alt.kind in TIERS[: TIERS.index(p.kind) + 1]:
                    notes.append(f"context is the limit: at --ctx {smaller}, {o.candidate.quant} "
                                 f"would fit ({_gib(sum(d.total for d in alt.devices))})")
                    break
            else:
                continue
            break
    return Decision(options, pick, reason, notes, ctx, kv_type, headroom)
