"""The real test model end to end, through the daemon: the quant ladder of Gemma 3 270M made by
`qmgr quantize` (with an importance matrix for IQ2_XS), then run and evaluated.

The ladder is built once for the module (a minute or two on 2 cores). Skipped with a reason
when llama-cpp-python (the qmgr[llama] extra) is missing; without the Gemma package (the test
extra) it fails.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Env

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (qmgr[llama])")

from badmirror import sha256_of  # noqa: E402
from testmodel import gemma_f16  # noqa: E402

DATA = Path(__file__).parent / "data"
LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"]


@pytest.fixture(scope="module")
def ladder() -> Iterator[Env]:
    base = gemma_f16()
    root = Path(tempfile.mkdtemp(prefix="qm-", dir="/tmp"))
    env = Env(root)
    try:
        env.start()
        env.qmgr("import", "--name", "gemma3-270m", str(base))
        env.qmgr("quantize", "-q", "gemma3-270m:F16", "--to", ",".join(LADDER), timeout=900)
        out = env.qmgr("imatrix", "-q", "gemma3-270m:F16", "--text",
                       str(DATA / "calibration.txt"), timeout=900)
        env.imatrix = out.stdout.strip()  # type: ignore[attr-defined]
        env.qmgr("quantize", "-q", "gemma3-270m:F16", "--to", "IQ2_XS,Q2_K", "--imatrix",
                 timeout=900)
        yield env
    finally:
        env.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_the_ladder_is_cataloged_with_sizes_and_lineage(ladder: Env) -> None:
    rows = {r["ref"]: r for r in ladder.json("list")}
    expected = {f"gemma3-270m:{t}" for t in ["F16", *LADDER, "IQ2_XS", "Q2_K-2"]}
    assert set(rows) == expected, set(rows)
    for ref, r in rows.items():
        assert r["state"] == "ready" and r["size"] > 0 and r["bits_per_weight"] > 1, r
        if ref != "gemma3-270m:F16":
            assert r["origin"] == "quantized"
            assert ladder.json("show", ref)["lineage"] == ["gemma3-270m:F16"]
            # Hashed while llama.cpp wrote it (llama_digest), so checked here from the bytes.
            assert r["sha256"] == sha256_of(Path(r["paths"][0])), ref
    # Smaller types make smaller files (the tied Q8_0 embedding keeps the spread narrow).
    sizes = [rows[f"gemma3-270m:{t}"]["size"] for t in ["F16", "Q8_0", "Q6_K", "Q4_K_M", "Q2_K"]]
    assert sizes == sorted(sizes, reverse=True)
    listing = ladder.qmgr("list").stdout
    assert "gemma3-270m:IQ2_XS" in listing and "BPW" in listing


def test_imatrix_variants_record_their_matrix(ladder: Env) -> None:
    digest = ladder.imatrix.removeprefix("sha256:")  # type: ignore[attr-defined]
    for ref in ("gemma3-270m:IQ2_XS", "gemma3-270m:Q2_K-2"):
        recipe = ladder.json("show", ref)["recipe"]
        assert recipe["imatrix_sha256"] == digest and recipe["quantizer"] == "llama.cpp"
    assert ladder.json("show", "gemma3-270m:Q2_K")["recipe"]["imatrix_sha256"] is None
    r = ladder.qmgr("quantize", "gemma3-270m:F16", "--to", "IQ1_S", check=False)
    assert r.returncode == 1 and "qmgr imatrix" in r.stderr


def test_every_rung_loads_and_generates(ladder: Env) -> None:
    for r in ladder.json("list"):
        llm = llama_cpp.Llama(r["paths"][0], n_ctx=256, verbose=False, n_threads=2)
        out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0)
        assert out["choices"][0]["text"].strip(), r["ref"]
        del llm


def test_run_answers_like_llama_cpp_called_directly(ladder: Env) -> None:
    prompt = "Write one sentence about the sea."
    path = next(r["paths"][0] for r in ladder.json("list") if r["ref"] == "gemma3-270m:Q8_0")
    llm = llama_cpp.Llama(path, n_ctx=4096, verbose=False)
    direct = llm.create_completion(prompt, max_tokens=32, temperature=0, seed=0)
    del llm
    r = ladder.qmgr("run", "gemma3-270m:Q8_0", prompt, "--max-tokens", "32")
    assert r.stdout.rstrip("\n") == direct["choices"][0]["text"]
    ps = ladder.json("ps")
    assert [p["ref"] for p in ps] == ["gemma3-270m:Q8_0"] and ps[0]["rss"] > 0
    assert ladder.qmgr("stop", "gemma3-270m:Q8_0").stdout.strip() == "stopped gemma3-270m:Q8_0"
    assert ladder.json("ps") == []


def test_chat_uses_the_models_template(ladder: Env) -> None:
    r = ladder.qmgr("chat", "gemma3-270m:Q8_0", "--max-tokens", "24",
                    input="Say hello in French.\n\n")
    assert r.stdout.strip()


@pytest.mark.timeout(1200)
def test_eval_ranks_the_ladder(ladder: Env) -> None:
    # The first 1024 tokens of the built-in text: two chunks, 510 scored positions.
    out = ladder.qmgr("eval", "gemma3-270m", "--variants",
                      "Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K,Q2_K-2,IQ2_XS", "--max-tokens", "1024",
                      "--json", timeout=1200).stdout.splitlines()
    result = json.loads(out[-1])["result"]
    by = {v["ref"].split(":")[1]: v for v in result["eval"]["variants"]}
    assert result["base"] == "gemma3-270m:F16"
    for v in by.values():
        assert v["ppl"] > 1 and 0 <= v["top_agreement"] <= 1 and v["kld"] >= 0
    # Sub-4-bit rungs lose clearly more than Q8_0 and Q6_K.
    for low in ("Q3_K_M", "Q2_K", "IQ2_XS"):
        assert by[low]["kld"] > 3 * by["Q6_K"]["kld"] > 0, (low, by[low], by["Q6_K"])
        assert by[low]["kld"] > by["Q8_0"]["kld"]
    # The importance matrix reduces Q2_K's loss.
    assert by["Q2_K-2"]["kld"] < by["Q2_K"]["kld"]
    assert by["Q2_K-2"]["ppl"] < by["Q2_K"]["ppl"]
    # Stored: shown by `qmgr show` and used by `qmgr fit`.
    shown = ladder.json("show", "gemma3-270m:Q4_K_M")["measured"]
    assert shown["kld"]["value"] == pytest.approx(by["Q4_K_M"]["kld"])
    fit = ladder.json("fit", "gemma3-270m")
    q4 = next(o for o in fit["options"] if o.get("ref") == "gemma3-270m:Q4_K_M")
    assert q4["measured"] and q4["quality_loss"] == pytest.approx(by["Q4_K_M"]["delta_ppl"])
    # Each figure says where it comes from; the measured ones are ranked by their measurements.
    sources = {o["ref"].split(":")[1]: o["quality_source"] for o in fit["options"]}
    assert {t for t, src in sources.items() if src == "measured"} == set(by)
    assert sources["F16"] == sources["Q5_K_M"] == "published"
    assert sources["IQ4_XS"] == "estimated"
    measured = [o["quality_loss"] for o in fit["options"] if o["quality_source"] == "measured"]
    assert measured == sorted(measured)
    assert "ranked by the measurements on this model" in ladder.qmgr("fit", "gemma3-270m").stdout


@pytest.mark.timeout(900)
def test_bench_shows_speed_rising_as_bits_fall(ladder: Env) -> None:
    out = ladder.qmgr("bench", "gemma3-270m", "--variants", "F16,Q8_0,Q4_K_M", "--tokens", "48",
                      "--json", timeout=1200).stdout.splitlines()
    rows = {r["ref"].split(":")[1]: r for r in json.loads(out[-1])["result"]["bench"]}
    assert rows["F16"]["tg_tps"] < rows["Q8_0"]["tg_tps"]
    assert rows["F16"]["tg_tps"] < rows["Q4_K_M"]["tg_tps"]
