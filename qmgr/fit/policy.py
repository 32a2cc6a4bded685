"""The fit policy: which variant to take on this machine, and why.

Given the variants a source offers (their headers), a context length, a KV cache type and a
headroom margin, take the highest-quality variant that fits entirely on the fastest device
pool (the GPUs, or RAM on a machine without one); otherwise the best one that fits with part
of its layers on the GPUs; otherwise the best that fits in RAM; otherwise refuse, naming the
smallest requirement and what is missing. Quality comes from the ladder
(:mod:`qmgr.fit.ladder`), or from the user's own measurements of this model when there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qmgr.fit.estimate import GiB, ModelShape, Placement, place
from qmgr.fit.ladder import CLIFF_BPW, rung

TIERS = ("gpu", "partial", "cpu")


@dataclass
class Candidate:
    """One variant on offer: what it is, and its header's shape."""

    quant: str | None
    size: int
    shape: ModelShape
    info: dict[str, Any] = field(default_factory=dict)  # source_ref, sha256, files...
    measured_delta_ppl: float | None = None  # from the user's own evals, when there are


@dataclass
class Option:
    candidate: Candidate
    placement: Placement
    quality_loss: float
    quality_note: str
    below_cliff: bool

    @property
    def need(self) -> int:
        return sum(d.total for d in self.placement.devices)

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {"quant": c.quant, "size": c.size, **c.info,
                "bits_per_weight": round(8 * c.shape.weight_bytes / max(1, _params(c)), 3),
                "fit": self.placement.kind if self.placement.fits else "no",
                "placement": self.placement.to_dict(), "memory": self.need,
                "quality_loss": self.quality_loss, "quality_note": self.quality_note,
                "below_cliff": self.below_cliff,
                "measured": c.measured_delta_ppl is not None}


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
    r = rung(c.quant)
    bpw = r.bits_per_weight if r else 8 * c.shape.weight_bytes / max(1, _params(c) or 1)
    below = bpw < CLIFF_BPW
    if c.measured_delta_ppl is not None:
        loss = c.measured_delta_ppl
        note = f"+{loss:.4f} ΔPPL measured on this model"
    elif r is not None:
        loss, note = r.delta_ppl, r.note
    else:
        loss, note = float("inf"), "unknown quant type: quality not rated"
    if below and "cliff" not in note:
        note += "; below 4 bits: quality cliff"
    return Option(c, place(c.shape, devices, ctx, kv_type, headroom), loss, note, below)


def decide(candidates: list[Candidate], devices: list[Any], ctx: int = 4096,
           kv_type: str = "f16", headroom: float = 0.10) -> Decision:
    options = [option(c, devices, ctx, kv_type, headroom) for c in candidates]
    options.sort(key=lambda o: (o.quality_loss, -o.candidate.size))
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
    better = [o for o in options if o.quality_loss < pick.quality_loss]
    reason = f"{pick.candidate.quant}: the best quality that {where} ({used})"
    if better:
        b = better[-1]
        reason += f"; {b.candidate.quant} would need {_gib(b.need)}"
    if pick.below_cliff:
        notes.append(f"{pick.candidate.quant} is below 4 bits per weight: expect a clear loss "
                     f"of quality ({pick.quality_note}); nothing larger fits")
    if better:
        # Would a smaller context have let a better variant fit? Then context is the limit.
        for smaller in (ctx // 2, ctx // 4, 2048, 1024, 512):
            if smaller >= ctx or smaller < 256:
                continue
            for o in better:
                alt = option(o.candidate, devices, smaller, kv_type, headroom)
                if alt.placement.fits and alt.placement.kind in TIERS[: TIERS.index(p.kind) + 1]:
                    notes.append(f"context is the limit: at --ctx {smaller}, {o.candidate.quant} "
                                 f"would fit ({_gib(alt.need)})")
                    break
            else:
                continue
            break
    return Decision(options, pick, reason, notes, ctx, kv_type, headroom)
