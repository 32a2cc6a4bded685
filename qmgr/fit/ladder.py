"""The quality ladder: quant types ordered by the quality they cost.

Published figures: the increase in perplexity (ΔPPL) over the 16-bit model on Llama-3-8B
(wikitext-2), as llama.cpp's quantize tool lists them (``tools/quantize/quantize.cpp``,
``QUANT_OPTIONS``; ``llama-quantize --help`` prints them). Types llama.cpp lists only with their
bits per weight (the IQ family, TQ) get an estimate interpolated from those measured
rungs by bits per weight, and say so (``estimated``). The names uploaders give their own mixes
(Unsloth's ``UD-Q4_K_XL``, bartowski's ``Q4_K_L``, llama.cpp's short ``Q4_K``, the ARM repacks
``Q4_0_4_4``) take the figure of the published type they build on, and say which.
Measurements from the catalog (``qmgr eval``) override the table for the model they were made
on (:mod:`qmgr.fit.policy` decides how the two kinds of figure are ranked).

Below 4 bits quality falls off a cliff (Q3_K_M costs ~4x what Q4_K_M does, Q2_K ~20x): the
ladder marks those rungs, and the fit policy says so when it has to pick one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SOURCE = "llama.cpp tools/quantize/quantize.cpp QUANT_OPTIONS (ΔPPL on Llama-3-8B, wikitext-2)"
REFERENCE_TYPES = frozenset({"F32", "F16", "BF16"})  # the unquantized reference: ΔPPL 0

# type -> (ΔPPL on Llama-3-8B, nominal bits per weight)
_PUBLISHED: dict[str, tuple[float, float]] = {
    "F32": (0.0, 32.0),
    "F16": (0.0, 16.0),  # listed as +0.0020 on Mistral-7B: within noise of the reference
    "BF16": (0.0, 16.0),
    "Q8_0": (0.0026, 8.5),
    "Q6_K": (0.0217, 6.56),
    "Q5_K_M": (0.0569, 5.68),
    "Q5_K_S": (0.1049, 5.52),
    "Q5_1": (0.1062, 6.0),
    "Q5_0": (0.1316, 5.5),
    "Q4_K_M": (0.1754, 4.84),
    "Q4_K_S": (0.2689, 4.58),
    "Q4_1": (0.4511, 5.0),
    "Q4_0": (0.4685, 4.5),
    "Q3_K_L": (0.5562, 4.27),
    "Q3_K_M": (0.6569, 3.91),
    "Q3_K_S": (1.6321, 3.5),
    "Q2_K_S": (3.1836, 3.0),
    "Q2_K": (3.5199, 3.35),
}

# Listed by llama.cpp with bits per weight only.
_NOMINAL_BPW: dict[str, float] = {
    "IQ4_NL": 4.50, "IQ4_XS": 4.25, "IQ3_M": 3.66, "IQ3_S": 3.44, "IQ3_XS": 3.3,
    "IQ3_XXS": 3.06, "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06,
    "IQ1_M": 1.75, "IQ1_S": 1.56, "TQ2_0": 2.06, "TQ1_0": 1.69,
}

# Names that are not llama.cpp file types, and the published type whose figure they take:
# llama.cpp's short names and the ARM repacks are that type; the uploaders' larger mixes
# (more bits for embeddings, output or chosen layers) are at least as good as it, so its figure
# is a bound, never flattery.
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M",
            "Q4_0_4_4": "Q4_0", "Q4_0_4_8": "Q4_0", "Q4_0_8_8": "Q4_0"}
_MIX = re.compile(r"^Q(\d)_K_X?L$")  # Q4_K_L (bartowski), Q4_K_XL (Unsloth)
_MIX_BASE = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}

CLIFF_BPW = 4.0  # below this, quality falls off a cliff


@dataclass(frozen=True)
class Rung:
    quant: str  # the label as offered (UD-Q4_K_XL)
    basis: str  # the type whose figure this is (Q4_K_M)
    delta_ppl: float
    bits_per_weight: float
    estimated: bool  # interpolated from bits per weight, not published
    below_cliff: bool

    @property
    def source(self) -> str:
        return "estimated" if self.estimated else "published"

    @property
    def note(self) -> str:
        if self.basis in REFERENCE_TYPES:
            text = "16-bit reference (no loss)" if self.basis != "F32" else "32-bit reference"
        elif self.estimated:
            text = f"~{self.delta_ppl:.4f} ΔPPL on Llama-3-8B (estimated from bits per weight)"
        else:
            text = f"+{self.delta_ppl:.4f} ΔPPL on Llama-3-8B (published)"
        if self.basis != self.quant:
            same = self.quant in _ALIASES
            text += (f"; rated as {self.basis} ({self.quant} is "
                     + ("the same type)" if same else "a mix at least as good)"))
        if self.below_cliff:
            text += "; below 4 bits: quality cliff"
        return text


def _interpolate(bpw: float) -> float:
    """ΔPPL at ``bpw`` from a least-squares fit of log(ΔPPL) against bits per weight over the
    measured k-quant and Q8_0 rungs: monotone, so fewer bits never look better. IQ quants do
    better than this with an importance matrix; this is a conservative, no-matrix estimate."""
    points = [(b, math.log(d)) for q, (d, b) in _PUBLISHED.items()
              if d > 0 and ("_K" in q or q == "Q8_0")]
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_l = sum(lg for _, lg in points) / n
    slope = (sum((b - mean_b) * (lg - mean_l) for b, lg in points)
             / sum((b - mean_b) ** 2 for b, _ in points))
    return math.exp(mean_l + slope * (bpw - mean_b))


def basis_of(quant: str) -> str:
    """The published (or bits-per-weight) type a label is rated as: ``UD-Q4_K_XL`` ->
    ``Q4_K_M``, ``UD-IQ2_M`` -> ``IQ2_M``, ``Q4_K`` -> ``Q4_K_M``; a known type is itself."""
    q = quant.upper().removeprefix("UD-")
    if q in _ALIASES:
        return _ALIASES[q]
    m = _MIX.match(q)
    if m and q not in _PUBLISHED and int(m.group(1)) in _MIX_BASE:
        return _MIX_BASE[int(m.group(1))]
    return q


def rung(quant: str | None) -> Rung | None:
    if quant is None:
        return None
    label = quant.upper()
    q = basis_of(label)
    if q in _PUBLISHED:
        d, b = _PUBLISHED[q]
        return Rung(label, q, d, b, False, b < CLIFF_BPW)
    if q in _NOMINAL_BPW:
        b = _NOMINAL_BPW[q]
        return Rung(label, q, _interpolate(b), b, True, b < CLIFF_BPW)
    return None


def ladder() -> list[Rung]:
    """Every known rung, best quality first."""
    rungs = [r for q in [*_PUBLISHED, *_NOMINAL_BPW] if (r := rung(q)) is not None]
    return sorted(rungs, key=lambda r: (r.delta_ppl, -r.bits_per_weight))
