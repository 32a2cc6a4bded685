"""Fit's quality figures: where each comes from, how measured and published ones are ranked, and
lineage (a variant re-quantized from a lower quant is rated no better than it).

The policy is tested on the Llama-3-8B ladder's real headers (tests/ladder.py); lineage and
measurements end to end with a real daemon: a Q4_K_M file imported, re-quantized to Q8_0 by the
numpy quantizer, measurements recorded in the catalog as `qmgr eval` stores them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Env
from ggufmake import make_sparse_gguf
from ladder import make_ladder_gguf

from qmgr.fit.estimate import GiB, ModelShape
from qmgr.fit.ladder import Rung, basis_of, rung
from qmgr.fit.policy import Ancestor, Candidate, decide
from qmgr.gguf import read_header

PARAMS = 8_030_261_248


def ram(gib: float) -> list[SimpleNamespace]:
    return [SimpleNamespace(kind="cpu", index=0, name="ram", memory_total=int(gib * GiB),
                            memory_free=int(gib * GiB))]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelShape]:
    d = tmp_path_factory.mktemp("ladder")
    return {t: ModelShape.from_header(read_header(make_ladder_gguf(d / f"m-{t}.gguf", t)))
            for t in ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")}


def cand(shapes: dict[str, ModelShape], quant: str, shape: str | None = None,
         **kw: Any) -> Candidate:
    s = shapes[shape or quant]
    return Candidate(quant, s.file_size, s, {"parameter_count": PARAMS, "ref": f"m:{quant}"},
                     **kw)


def published(quant: str) -> Rung:
    r = rung(quant)
    assert r is not None
    return r


def order(d: Any) -> list[str]:
    return [o.candidate.quant for o in d.options]


# -- the ladder's labels ------------------------------------------------------------------------


def test_uploaders_labels_take_a_neighbours_figure_and_say_so() -> None:
    xl = rung("UD-Q4_K_XL")
    assert xl is not None and xl.basis == "Q4_K_M" and xl.source == "published"
    assert xl.delta_ppl == published("Q4_K_M").delta_ppl
    assert "rated as Q4_K_M (UD-Q4_K_XL is a mix at least as good)" in xl.note
    assert basis_of("Q6_K_L") == "Q6_K" and basis_of("UD-Q8_K_XL") == "Q8_0"
    assert basis_of("Q3_K_L") == "Q3_K_L"  # llama.cpp's own type, with its own figure
    assert basis_of("q4_k") == "Q4_K_M" and "is the same type" in published("Q4_K").note
    bf16, f16 = rung("BF16"), rung("F16")
    assert bf16 is not None and f16 is not None and bf16.delta_ppl == f16.delta_ppl == 0
    assert bf16.note == f16.note == "16-bit reference (no loss)"
    nl = rung("IQ4_NL")
    assert nl is not None and nl.source == "estimated" and nl.note.startswith("~")
    ud_iq = rung("UD-IQ2_M")
    assert ud_iq is not None and ud_iq.basis == "IQ2_M" and ud_iq.below_cliff
    assert rung("Q9_Z") is None


def test_every_option_says_where_its_figure_comes_from(shapes: dict[str, ModelShape]) -> None:
    ud = cand(shapes, "UD-Q4_K_XL", "Q4_K_M")
    ud.size += 300 << 20  # the dynamic mix keeps more bits: a larger file
    d = decide([cand(shapes, "Q4_K_M"), cand(shapes, "IQ4_XS"), cand(shapes, "F16"), ud,
                cand(shapes, "Q9_Z", "Q2_K"), cand(shapes, "Q6_K", measured_delta_ppl=0.05)],
               ram(64))
    by = {o.candidate.quant: o.to_dict() for o in d.options}
    assert {q: o["quality_source"] for q, o in by.items()} == {
        "Q4_K_M": "published", "IQ4_XS": "estimated", "F16": "published",
        "UD-Q4_K_XL": "published", "Q9_Z": "unknown", "Q6_K": "measured"}
    assert by["UD-Q4_K_XL"]["quality_basis"] == "Q4_K_M"
    assert by["Q6_K"]["quality_note"] == "+0.0500 ΔPPL measured on this model"
    assert "on Llama-3-8B (published)" in by["Q4_K_M"]["quality_note"]
    assert by["Q9_Z"]["quality_note"].startswith("unknown quant type")
    # The UD mix ties with Q4_K_M (same rank), listed first as the larger file.
    assert by["UD-Q4_K_XL"]["quality_rank"] == by["Q4_K_M"]["quality_rank"]
    assert order(d).index("UD-Q4_K_XL") < order(d).index("Q4_K_M")
    assert order(d)[-1] == "Q9_Z"


# -- measured and published figures ---------------------------------------------------------------


def test_measured_figures_order_the_measured_ones_in_their_places(
        shapes: dict[str, ModelShape]) -> None:
    # A small model's ΔPPL is on another scale than Llama-3-8B's: Q4_K_M's 0.9 measured must not
    # rank it below an unmeasured Q3_K_M (published 0.66), nor Q2_K's 0.02 above unmeasured Q8_0.
    d = decide([cand(shapes, "Q8_0"), cand(shapes, "Q6_K", measured_delta_ppl=0.30),
                cand(shapes, "Q4_K_M", measured_delta_ppl=0.90), cand(shapes, "Q3_K_M"),
                cand(shapes, "Q2_K", measured_delta_ppl=0.02)], ram(64))
    # Published order: Q8_0 Q6_K Q4_K_M Q3_K_M Q2_K; the measured slots (2nd, 3rd, 5th) are
    # filled by the measured ones in measured order.
    assert order(d) == ["Q8_0", "Q2_K", "Q6_K", "Q3_K_M", "Q4_K_M"]
    assert [o.rank for o in d.options] == [1, 2, 3, 4, 5]
    assert d.pick is not None and d.pick.candidate.quant == "Q8_0"
    assert any(n.startswith("ranked by the measurements on this model where variants have "
                            "them (Q2_K, Q6_K, Q4_K_M)") for n in d.notes), d.notes
    # All measured: the measurements alone decide.
    d = decide([cand(shapes, "Q8_0", measured_delta_ppl=0.4),
                cand(shapes, "Q6_K", measured_delta_ppl=0.3)], ram(64))
    assert order(d) == ["Q6_K", "Q8_0"] and not any("ranked by" in n for n in d.notes)


def test_the_pick_is_the_best_measured_that_fits(shapes: dict[str, ModelShape]) -> None:
    # 7 GiB: Q8_0 (8.5 GiB) does not fit; among the rest, the measurements put Q5_K_M first.
    d = decide([cand(shapes, "Q8_0", measured_delta_ppl=0.01),
                cand(shapes, "Q6_K", measured_delta_ppl=0.20),
                cand(shapes, "Q5_K_M", measured_delta_ppl=0.10)], ram(7))
    assert d.pick is not None and d.pick.candidate.quant == "Q5_K_M", d.reason
    assert d.reason.startswith("Q5_K_M: the best quality that fits in RAM")
    assert "Q8_0 would need" in d.reason


# -- lineage ------------------------------------------------------------------------------------


def test_a_requantized_variant_is_no_better_than_its_ancestor(
        shapes: dict[str, ModelShape]) -> None:
    parent = cand(shapes, "Q4_K_M")
    child = cand(shapes, "Q8_0", ancestors=[Ancestor("m:Q4_K_M", "Q4_K_M")])
    child.info["ref"] = "m:Q8_0-2"
    d = decide([child, parent, cand(shapes, "Q5_K_M")], ram(64))
    by = {o.candidate.info["ref"]: o for o in d.options}
    o = by["m:Q8_0-2"]
    assert o.rating.source == "inherited" and o.rating.basis == "Q4_K_M"
    assert o.quality_loss == by["m:Q4_K_M"].quality_loss == published("Q4_K_M").delta_ppl
    assert o.quality_note.startswith("re-quantized from Q4_K_M: no better than Q4_K_M, "
                                     "+0.1754 ΔPPL on Llama-3-8B (published)"), o.quality_note
    # Ranked after its parent though bigger, and never picked while the parent fits.
    assert [x.candidate.info["ref"] for x in d.options] == ["m:Q5_K_M", "m:Q4_K_M", "m:Q8_0-2"]
    assert o.rank > by["m:Q4_K_M"].rank
    assert o.to_dict()["lineage"] == ["m:Q4_K_M"]
    # Only the child fits (a 12 GiB machine without the parent): picked, and it says what it is.
    d = decide([child, cand(shapes, "F16")], ram(12))
    assert d.pick is not None and d.pick.candidate is child
    assert d.reason.startswith("Q8_0 (re-quantized from Q4_K_M: no better than Q4_K_M): the best "
                               "quality that fits in RAM"), d.reason
    assert any(n.startswith("Q8_0 carries the losses of the quantized file it was made from "
                            "(re-quantized from Q4_K_M") for n in d.notes), d.notes


def test_the_worst_rung_of_the_chain_bounds_it(shapes: dict[str, ModelShape]) -> None:
    # F16 dequantized from a Q2_K, then Q6_K from that: Q2_K's figure, and its cliff.
    c = cand(shapes, "Q6_K", ancestors=[Ancestor("m:F16-2", "F16"), Ancestor("m:Q2_K", "Q2_K")])
    r = decide([c], ram(64)).options[0].rating
    assert r.source == "inherited" and r.basis == "Q2_K" and r.below_cliff
    assert r.loss == published("Q2_K").delta_ppl
    assert r.note.startswith("re-quantized from F16 (itself made from Q2_K): no better than Q2_K")
    # A lower quant from a higher one keeps its own (worse) figure and names the lineage.
    c = cand(shapes, "Q2_K", ancestors=[Ancestor("m:Q8_0", "Q8_0")])
    r = decide([c], ram(64)).options[0].rating
    assert r.source == "published" and r.basis == "Q2_K"
    assert "re-quantized from Q8_0: no better than Q8_0" in r.note
    # A parent no longer cataloged: not rated at all, so after every rated option.
    c = cand(shapes, "Q8_0", ancestors=[Ancestor("sha256:0123456789ab", None)])
    d = decide([c, cand(shapes, "Q2_K")], ram(64))
    assert order(d) == ["Q2_K", "Q8_0"]
    o = d.options[1]
    assert o.rating.source == "inherited" and o.to_dict()["quality_loss"] is None
    assert o.quality_note.startswith("re-quantized from sha256:0123456789ab, which is not "
                                     "cataloged: quality not rated")


def test_measured_lineage(shapes: dict[str, ModelShape]) -> None:
    # The child is measured but its parent is not: no common scale, so the parent's figure.
    child = cand(shapes, "Q8_0", measured_delta_ppl=0.01,
                 ancestors=[Ancestor("m:Q4_K_M", "Q4_K_M")])
    r = decide([child], ram(64)).options[0].rating
    assert not r.by_measure and r.source == "inherited"
    assert r.loss == published("Q4_K_M").delta_ppl
    assert "+0.0100 ΔPPL measured on this model (not ranked by it" in r.note
    # Both measured: the child is rated no better than its parent's measurement.
    child = dataclasses.replace(child, ancestors=[Ancestor("m:Q4_K_M", "Q4_K_M", 0.5)])
    parent = cand(shapes, "Q4_K_M", measured_delta_ppl=0.5)
    d = decide([child, parent], ram(64))
    assert [o.candidate.quant for o in d.options] == ["Q4_K_M", "Q8_0"]
    r = d.options[1].rating
    assert r.by_measure and r.source == "inherited" and r.loss == 0.5
    assert "no better than Q4_K_M, +0.5000 ΔPPL measured on this model" in r.note


# -- end to end: catalog rows made by `qmgr quantize`, measurements as `qmgr eval` stores them ----


def record_eval(env: Env, ref: str, value: float, base: str | None) -> None:
    """An Eval row, as qmgr.eval.jobs.Measuring.store writes it."""
    from qmgr.catalog import queries
    from qmgr.catalog.db import Catalog
    from qmgr.catalog.models import Eval

    catalog = Catalog(f"sqlite:///{env.home / 'catalog.db'}")
    with catalog.writing() as session:
        variant = queries.resolve_one(session, ref)
        base_id = queries.resolve_one(session, base).id if base else None
        session.add(Eval(variant_id=variant.id, base_variant_id=base_id, metric="delta_ppl",
                         value=value, backend="llama.cpp"))


@pytest.fixture
def requantized(qenv: Env, tmp_path: Path) -> Env:
    qenv.env["QMGR_HW"] = "ram=8GiB"
    qenv.start()
    # A Q4_K_M file (Q4_K weights, Q6_K output; data a sparse hole of zeros), re-quantized.
    src = make_sparse_gguf(tmp_path / "sparse-Q4_K_M.gguf", 4 << 20, n_embd=256, n_head=4,
                           n_head_kv=2)
    qenv.qmgr("import", "--copy", str(src))
    r = qenv.qmgr("quantize", "-q", "sparse:Q4_K_M", "--to", "Q8_0,Q4_0", "--quantizer", "numpy",
                  "--allow-requantize")
    assert r.stdout.split() == ["sparse:Q8_0", "sparse:Q4_0"]
    return qenv


def test_fit_rates_a_requantized_variant_by_its_lineage(requantized: Env) -> None:
    out = requantized.json("fit", "sparse")
    by = {o["ref"]: o for o in out["options"]}
    q8 = by["sparse:Q8_0"]
    assert q8["lineage"] == ["sparse:Q4_K_M"] and q8["quality_source"] == "inherited"
    assert q8["quality_basis"] == "Q4_K_M"
    assert q8["quality_loss"] == by["sparse:Q4_K_M"]["quality_loss"]
    assert "re-quantized from Q4_K_M: no better than Q4_K_M" in q8["quality_note"]
    assert q8["quality_rank"] > by["sparse:Q4_K_M"]["quality_rank"]
    assert out["pick"] == "Q4_K_M"
    assert [o["ref"] for o in out["options"]] == ["sparse:Q4_K_M", "sparse:Q8_0", "sparse:Q4_0"]
    table = requantized.qmgr("fit", "sparse").stdout
    assert "RATED" in table and "inherited" in table and "published" in table
    row = next(line for line in table.splitlines() if line.lstrip(" *").startswith("Q8_0"))
    assert "inherited" in row and "no better than Q4_K_M" in row


def test_fit_uses_measurements_against_an_unquantized_base_only(requantized: Env) -> None:
    # The only base eval could use here is a quantized one: such a ΔPPL is relative to its loss.
    record_eval(requantized, "sparse:Q4_0", 0.02, base="sparse:Q8_0")
    out = requantized.json("fit", "sparse")
    q4_0 = next(o for o in out["options"] if o["ref"] == "sparse:Q4_0")
    assert not q4_0["measured"] and q4_0["quality_source"] == "published"
    assert ("+0.0200 ΔPPL measured against sparse:Q8_0, which is a quantized file (Q8_0): "
            "relative to its loss, not used") in q4_0["quality_note"]
    # Against a base whose record is gone it is taken as measured (eval took the best there was).
    record_eval(requantized, "sparse:Q4_K_M", 0.3, base=None)
    record_eval(requantized, "sparse:Q8_0", 0.1, base=None)
    out = requantized.json("fit", "sparse")
    by = {o["ref"]: o for o in out["options"]}
    assert by["sparse:Q4_K_M"]["quality_source"] == "measured"
    assert by["sparse:Q4_K_M"]["quality_loss"] == 0.3
    # The child measured better than its parent: still no better than it.
    assert by["sparse:Q8_0"]["quality_source"] == "inherited"
    assert by["sparse:Q8_0"]["quality_loss"] == 0.3
    assert out["pick"] == "Q4_K_M"


def test_a_deleted_parent_leaves_its_children_unrated(requantized: Env) -> None:
    requantized.qmgr("rm", "sparse:Q4_K_M")
    out = requantized.json("fit", "sparse")
    q8 = next(o for o in out["options"] if o["ref"] == "sparse:Q8_0")
    assert q8["quality_source"] == "inherited" and q8["quality_loss"] is None
    assert "which is not cataloged: quality not rated" in q8["quality_note"]
    assert q8["lineage"][0].startswith("sha256:")
    assert out["pick"] == "Q8_0"
    assert out["reason"].startswith("Q8_0 (re-quantized from sha256:") and "not rated)" in \
        out["reason"] and "best quality" not in out["reason"]
