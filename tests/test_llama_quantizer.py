"""The built-in llama.cpp quantizer and importance matrices.

Refusals, options and log handling run on tiny random models (milliseconds). The rest runs on
the real Gemma 3 270M and is marked slow (about 4 minutes on 2 busy cores, most of it the
IQ2_XS quantization and the perplexities): the source is a 16-bit Gemma made once from the
Q4_K_M file (``testmodel.gemma_f16``); the importance matrix runs the model over the first
chapter of Alice's Adventures in Wonderland (tests/data/calibration.txt, ~2.7k tokens: 5 chunks
of 512); perplexities are measured on the opening of chapter II (tests/data/heldout.txt) and
printed at the end (``-s`` shows them).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python (the qmgr[llama] extra) is not installed")

from conftest import registered_by  # noqa: E402
from testmodel import gemma_f16, perplexity  # noqa: E402

from qmgr import gguf  # noqa: E402
from qmgr.builtin import imatrix as imx  # noqa: E402
from qmgr.builtin import llama_log, llama_quantizer  # noqa: E402
from qmgr.builtin.llama_quantizer import LlamaCppQuantizer  # noqa: E402
from qmgr.gguf.reader import read_header  # noqa: E402
from qmgr.plugin.quantizer import QuantizeError, QuantizeJob, QuantizeOptions  # noqa: E402

DATA = Path(__file__).parent / "data"
CHUNK = 512


def text(name: str) -> str:
    """A data file without its '#' source line."""
    lines = (DATA / name).read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith("#"))


@pytest.fixture(scope="module")
def f16() -> Path:
    return gemma_f16()


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantized")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    from ggufmake import make_tiny_gguf

    return make_tiny_gguf(tmp_path / "tiny.gguf", ftype="F16")


def quantize(src: Path, dst: Path, target: str, **options: Any) -> tuple[dict[str, Any], list]:
    events: list[tuple[float | None, str]] = []
    job = QuantizeJob(src=src, dst=dst, target=target, options=QuantizeOptions(**options),
                      progress=lambda fraction, message: events.append((fraction, message)))
    return LlamaCppQuantizer().quantize(job), events


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.type_name for t in read_header(path).tensors}


def generate(path: Path, n: int = 6) -> dict[str, Any]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    try:
        return llm.create_completion("Alice was beginning to get very tired of",
                                     max_tokens=n, temperature=0.0)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def made(f16: Path, out: Path) -> dict[str, Path]:
    """Q8_0 and Q4_0 of the 16-bit base, made once for the tests that read them."""
    paths = {}
    for target in ("Q8_0", "Q4_0"):
        paths[target] = out / f"gemma-{target}.gguf"
        result, _ = quantize(f16, paths[target], target)
        assert result["tensors"] == len(read_header(f16).tensors)
    return paths


@pytest.fixture(scope="module")
def imatrix_file(f16: Path, out: Path) -> Path:
    path = out / "gemma.imatrix.gguf"
    events: list[tuple[float | None, str]] = []
    result = imx.compute_imatrix(f16, text("calibration.txt"), path, n_ctx=CHUNK,
                                 dataset="calibration.txt",
                                 progress=lambda f, m: events.append((f, m)))
    assert result["chunks"] >= 4 and result["chunk_size"] == CHUNK
    assert events[-1][0] == 1.0
    return path


@pytest.fixture(scope="module")
def ppl() -> Iterator[dict[str, float]]:
    """Perplexities measured by the tests, printed at the end of the module (-s shows them)."""
    measured: dict[str, float] = {}
    yield measured
    print("\nheld-out perplexity:", ", ".join(f"{k} {v:.2f}" for k, v in measured.items()))


# -- the plugin ------------------------------------------------------------------------------


def test_registered_as_a_plugin_with_every_llama_cpp_file_type() -> None:
    [quantizer] = registered_by(llama_quantizer, "register_quantizers")
    assert quantizer.name == "llama.cpp"
    assert quantizer.version.startswith(llama_cpp.__version__)
    assert len(quantizer.targets()) == 32
    assert {"Q4_K_M", "IQ2_XS", "TQ2_0", "BF16"} <= set(quantizer.targets())
    assert set(QuantizeOptions().to_dict()) == quantizer.supported_options


def test_plugin_loads_no_native_code() -> None:
    """The daemon registers the plugin and lists targets without importing llama_cpp."""
    code = ("import sys; from qmgr.builtin.llama_quantizer import LlamaCppQuantizer as Q; "
            "q = Q(); q.targets(); q.version; assert 'llama_cpp' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- accumulation, against the obvious loops -------------------------------------------------


def test_dense_accumulation_matches_collect_imatrix() -> None:
    rng = np.random.default_rng(0)
    stats: dict[str, imx.Stats] = {}
    x = rng.standard_normal((1, 3, 20, 8)).astype(np.float32)  # 3 slices of 20 rows
    imx.accumulate_dense(stats, "blk.0.w", x, (8, 5, 3, 1))  # a 3D weight: 3 matrices
    imx.accumulate_dense(stats, "blk.0.w", x, (8, 5, 3, 1))
    e = stats["blk.0.w"]
    expected = np.stack([2 * (x[0, i].astype(np.float64) ** 2).sum(axis=0) for i in range(3)])
    np.testing.assert_allclose(e.values.reshape(3, 8), expected, rtol=1e-6)
    assert e.counts.tolist() == [2 * 20]  # one count for a dense weight: rows / n_mat


def test_expert_accumulation_matches_collect_imatrix() -> None:
    rng = np.random.default_rng(1)
    n_tokens, n_used, n_experts, ne0 = 7, 2, 4, 5
    x = rng.standard_normal((n_tokens, n_used, ne0)).astype(np.float32)
    ids = rng.integers(0, n_experts, (n_tokens, n_used)).astype(np.int32)
    stats: dict[str, imx.Stats] = {}
    imx.accumulate_experts(stats, "blk.0.ffn_up_exps.weight", x, ids, n_experts)
    values = np.zeros((n_experts, ne0))
    counts = np.zeros(n_experts, dtype=np.int64)
    for idx in range(n_used):
        for row in range(n_tokens):
            values[ids[row, idx]] += x[row, idx].astype(np.float64) ** 2
            counts[ids[row, idx]] += 1
    e = stats["blk.0.ffn_up_exps.weight"]
    np.testing.assert_allclose(e.values.reshape(n_experts, ne0), values, rtol=1e-6)
    assert e.counts.tolist() == counts.tolist()


def test_weight_names_lose_backend_prefixes() -> None:
    assert imx.weight_name(b"CUDA0#blk.0.attn_k.weight#0") == "blk.0.attn_k.weight"
    assert imx.weight_name(b"blk.3.ffn_down.weight") == "blk.3.ffn_down.weight"


# -- quantizing ------------------------------------------------------------------------------


@pytest.mark.slow
def test_q8_0_and_q4_0_load_and_generate(f16: Path, made: dict[str, Path],
                                         ppl: dict[str, float]) -> None:
    for target, path in made.items():
        header = read_header(path)
        assert header.metadata["general.file_type"] == llama_quantizer.FTYPE_IDS[target]
        assert tensor_types(path)["blk.0.ffn_down.weight"] == target
        assert generate(path)["usage"]["completion_tokens"] > 0
    held_out = text("heldout.txt")
    for name, path in (("F16", f16), *made.items()):
        ppl[name] = perplexity(path, held_out)
    assert ppl["Q8_0"] < ppl["F16"] * 1.02
    assert ppl["Q4_0"] < ppl["F16"] * 1.5


@pytest.mark.slow
def test_q4_k_m_reports_progress_for_every_tensor(f16: Path, out: Path) -> None:
    result, events = quantize(f16, out / "gemma-Q4_K_M.gguf", "Q4_K_M")
    names = {t.name for t in read_header(f16).tensors}
    assert {message for _, message in events} == names
    fractions = [f for f, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert result["tensors"] == len(names)
    # width 640 is not a multiple of 256: llama.cpp falls back from k-quants for many tensors
    assert result["fallback_tensors"] > 0


@pytest.mark.slow
def test_type_options_reach_llama_cpp(f16: Path, out: Path) -> None:
    dst = out / "gemma-Q4_0-options.gguf"
    quantize(f16, dst, "Q4_0", token_embedding_type="q4_0",
             tensor_types={r"ffn_down\.weight$": "Q8_0"})
    types = tensor_types(dst)
    assert types["token_embd.weight"] == "Q4_0"  # Q8_0 (the output's type) without the option
    assert types["blk.5.ffn_down.weight"] == "Q8_0"
    assert types["blk.5.ffn_up.weight"] == "Q4_0"


def test_bad_options_are_refused_before_llama_cpp_runs(tiny: Path, tmp_path: Path) -> None:
    dst = tmp_path / "x.gguf"
    with pytest.raises(QuantizeError, match="not a type llama.cpp quantizes to"):
        quantize(tiny, dst, "Q4_0", output_tensor_type="Q4_0_4_4")
    with pytest.raises(QuantizeError, match="not a regular expression"):
        quantize(tiny, dst, "Q4_0", tensor_types={"ffn_(": "Q8_0"})
    with pytest.raises(QuantizeError) as e:
        quantize(tiny, dst, "Q7_K")
    assert e.value.code == "bad_target"
    assert not dst.exists()


def test_requantizing_is_refused_without_allow_requantize(tmp_path: Path) -> None:
    from ggufmake import find_gemma_gguf

    q4 = find_gemma_gguf()
    with pytest.raises(QuantizeError) as e:
        quantize(q4, tmp_path / "requantized.gguf", "Q4_0")
    assert e.value.code == "requantize_refused"
    assert "already quantized (Q4_K_M)" in e.value.message
    assert "allow_requantize" in e.value.message
    assert not (tmp_path / "requantized.gguf").exists()


def test_the_catalogs_facts_spare_reading_the_source_header(tiny: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """In the daemon the job carries the source's facts; the decision is the same."""
    from ggufmake import find_gemma_gguf

    from qmgr import gguf

    def no_reading(path: Any) -> Any:
        raise AssertionError("the header was read again")

    monkeypatch.setattr(llama_quantizer, "_read_source", no_reading)
    job = QuantizeJob(tiny, tmp_path / "tiny-Q8_0.gguf", "Q8_0", QuantizeOptions(),
                      src_facts=gguf.inspect(tiny).to_dict())
    assert LlamaCppQuantizer().quantize(job)["tensors"] > 0
    q4 = find_gemma_gguf()
    job = QuantizeJob(q4, tmp_path / "requantized.gguf", "Q4_0", QuantizeOptions(),
                      src_facts=gguf.inspect(q4).to_dict())
    with pytest.raises(QuantizeError) as e:
        LlamaCppQuantizer().quantize(job)
    assert e.value.code == "requantize_refused" and "(Q4_K_M)" in e.value.message


def test_iq2_xs_without_imatrix_is_refused_with_how_to_make_one(tiny: Path,
                                                                tmp_path: Path) -> None:
    with pytest.raises(QuantizeError) as e:
        quantize(tiny, tmp_path / "iq2.gguf", "IQ2_XS")
    assert e.value.code == "imatrix_required"
    assert "qmgr imatrix REF --text FILE" in e.value.message
    assert "--to IQ2_XS --imatrix" in e.value.message


def test_llama_cpps_own_imatrix_refusal_gets_the_same_message(tmp_path: Path) -> None:
    """IQ3_XXS needs an imatrix only where a tensor keeps that type: 256 wide, all do."""
    from ggufmake import make_tiny_gguf

    tiny = make_tiny_gguf(tmp_path / "wide.gguf", ftype="F16", n_embd=256, n_ff=512)
    with pytest.raises(QuantizeError) as e:
        quantize(tiny, tmp_path / "wide-IQ3_XXS.gguf", "IQ3_XXS")
    assert e.value.code == "imatrix_required"
    assert "qmgr imatrix REF --text FILE" in e.value.message
    assert "requires an imatrix" in e.value.message  # llama.cpp's own words, from its log


def test_failures_carry_llama_cpp_log_and_the_log_callback_is_restored(tiny: Path,
                                                                       tmp_path: Path) -> None:
    from ggufmake import make_tiny_gguf

    def current() -> int | None:
        cb = llama_cpp.llama_log_callback()
        data = ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(cb), ctypes.byref(data))
        return ctypes.cast(cb, ctypes.c_void_p).value

    before = current()
    result, _ = quantize(tiny, tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    assert result["tensors"] == len(read_header(tiny).tensors)
    assert current() == before
    alien = make_tiny_gguf(tmp_path / "alien.gguf", ftype="F16", arch="nosucharch")
    with pytest.raises(QuantizeError) as e:
        quantize(alien, tmp_path / "alien-Q8_0.gguf", "Q8_0")
    assert "nosucharch" in e.value.message
    assert current() == before


# -- importance matrices ---------------------------------------------------------------------


@pytest.mark.slow
def test_imatrix_file_is_what_llama_imatrix_writes(f16: Path, imatrix_file: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(imatrix_file)
    fields = {name: f.contents() for name, f in reader.fields.items()
              if not name.startswith("GGUF.")}
    n_chunks = fields["imatrix.chunk_count"]
    assert fields == {"general.type": "imatrix", "imatrix.datasets": ["calibration.txt"],
                      "imatrix.chunk_count": n_chunks, "imatrix.chunk_size": CHUNK}
    tensors = {t.name: t for t in reader.tensors}
    model = {t.name: t for t in read_header(f16).tensors}
    weights = {n for n, t in model.items() if n.startswith("blk.") and len(t.shape) == 2}
    assert {n.rsplit(".", 1)[0] for n in tensors} == weights  # every layer matmul, nothing else
    for name in weights:
        sums, counts = tensors[name + ".in_sum2"], tensors[name + ".counts"]
        assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(sums.shape) == [model[name].shape[0], 1]  # ggml order: [n_in, n_counts]
        assert list(counts.shape) == [1, 1]
        assert counts.data[0, 0] == n_chunks * CHUNK
    means = imx.load_imatrix(imatrix_file)
    q = means["blk.0.attn_q.weight"]
    assert q.dtype == np.float32 and q.shape == (640,) and (q > 0).all()


def test_imatrix_file_round_trip(tmp_path: Path) -> None:
    """Means are sums / counts per matrix; a matrix no token reached gets 1, as in llama.cpp."""
    stats = {
        "blk.0.ffn_up.weight": imx.Stats(np.array([4.0, 8.0, 12.0]), np.array([4])),
        "blk.0.ffn_up_exps.weight": imx.Stats(np.array([2.0, 4.0, 0.0, 0.0]), np.array([2, 0])),
    }
    path = tmp_path / "m.imatrix.gguf"
    imx.write_imatrix(path, stats, datasets=["d.txt"], chunk_count=3, chunk_size=64)
    m = imx.read_imatrix(path)
    assert (m.datasets, m.chunk_count, m.chunk_size) == (["d.txt"], 3, 64)
    assert m.means["blk.0.ffn_up.weight"].tolist() == [1.0, 2.0, 3.0]
    assert m.means["blk.0.ffn_up_exps.weight"].tolist() == [1.0, 2.0, 1.0, 1.0]
    assert "general.architecture" not in read_header(path).metadata


def test_imatrix_from_a_tiny_model_drives_iq2_xs(tmp_path: Path) -> None:
    from ggufmake import make_tiny_gguf

    wide = make_tiny_gguf(tmp_path / "wide.gguf", ftype="F16", n_embd=256, n_ff=512)
    path = tmp_path / "wide.imatrix.gguf"
    result = imx.compute_imatrix(wide, text("calibration.txt")[:3000], path, n_ctx=64)
    assert result["chunks"] >= 2 and result["tokens"] == result["chunks"] * 64
    means = imx.load_imatrix(path)
    assert len(means) == 2 * 7  # every matmul of both layers
    assert means["blk.1.ffn_down.weight"].shape == (512,)
    assert means["blk.0.attn_q.weight"].shape == (256,)
    dst = tmp_path / "wide-IQ2_XS.gguf"
    quantize(wide, dst, "IQ2_XS", imatrix=path)
    assert tensor_types(dst)["blk.0.ffn_up.weight"] == "IQ2_XS"

    other = tmp_path / "other.imatrix.gguf"  # another model's: no blk.1 entries
    imx.write_imatrix(other, {"blk.0.ffn_up.weight": imx.Stats(np.ones(256), np.array([1]))},
                      datasets=["x"], chunk_count=1, chunk_size=64)
    with pytest.raises(QuantizeError) as e:
        quantize(wide, tmp_path / "wide-IQ2_XS-2.gguf", "IQ2_XS", imatrix=other)
    assert e.value.code == "imatrix_mismatch"
    assert not (tmp_path / "wide-IQ2_XS-2.gguf").exists()

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(QuantizeError) as e:
        imx.compute_imatrix(wide, text("calibration.txt")[:3000], tmp_path / "c.gguf",
                            n_ctx=64, cancel=cancel)
    assert e.value.code == "cancelled"


def test_unreadable_imatrix_is_refused(tiny: Path, tmp_path: Path) -> None:
    legacy = tmp_path / "old.dat"
    legacy.write_bytes(b"\x01\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(QuantizeError) as e:
        quantize(tiny, tmp_path / "x.gguf", "Q4_0", imatrix=legacy)
    assert e.value.code == "imatrix_invalid"


@pytest.mark.slow
def test_iq2_xs_with_imatrix_loads_and_generates(f16: Path, out: Path,
                                                 imatrix_file: Path) -> None:
    dst = out / "gemma-IQ2_XS.gguf"
    result, _ = quantize(f16, dst, "IQ2_XS", imatrix=imatrix_file)
    assert result["imatrix_entries"] == 18 * 7
    header = read_header(dst)
    assert header.metadata["quantize.imatrix.entries_count"] == 18 * 7
    assert header.metadata["quantize.imatrix.dataset"] == "calibration.txt"
    assert "IQ2_XS" in set(tensor_types(dst).values())
    assert generate(dst)["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_imatrix_lowers_q2_k_perplexity(f16: Path, out: Path, imatrix_file: Path,
                                        ppl: dict[str, float]) -> None:
    plain, weighted = out / "gemma-Q2_K.gguf", out / "gemma-Q2_K-imatrix.gguf"
    quantize(f16, plain, "Q2_K")
    quantize(f16, weighted, "Q2_K", imatrix=imatrix_file)
    held_out = text("heldout.txt")
    ppl["Q2_K"] = perplexity(plain, held_out)
    ppl["Q2_K+imatrix"] = perplexity(weighted, held_out)
    assert ppl["Q2_K+imatrix"] < ppl["Q2_K"]


# -- the output's sha256, computed while llama.cpp writes it ----------------------------------


def sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("target,options", [
    ("Q8_0", {}),
    ("Q4_K_M", {}),
    ("Q4_0", {"token_embedding_type": "q8_0", "tensor_types": {r"ffn_down": "Q8_0"}}),
    ("Q5_K_S", {"leave_output": True, "pure": True}),
    ("F16", {}),
], ids=["q8_0", "q4_k_m", "overrides", "leave-output-pure", "f16"])
def test_output_is_hashed_while_written(tiny: Path, tmp_path: Path, target: str,
                                        options: dict[str, Any]) -> None:
    dst = tmp_path / f"tiny-{target}.gguf"
    result, _ = quantize(tiny, dst, target, **options)
    assert result["output_sha256"] == sha256_file(dst)
    assert result["output_size"] == dst.stat().st_size
    # The facts of the predicted header, parsed during the quantization, are the file's; the
    # daemon rebuilds them from the worker's JSON.
    facts = gguf.inspect(dst)
    assert result["output_facts"] == facts.to_dict()
    assert gguf.ModelFacts(**json.loads(json.dumps(result["output_facts"]))) == facts


def test_output_hashed_while_written_with_an_imatrix(tmp_path: Path) -> None:
    from ggufmake import make_tiny_gguf

    wide = make_tiny_gguf(tmp_path / "wide.gguf", ftype="F16", n_embd=256, n_ff=512)
    matrix = tmp_path / "wide.imatrix.gguf"
    imx.compute_imatrix(wide, text("calibration.txt")[:3000], matrix, n_ctx=64,
                        dataset="a calibration text with a name longer than llama.cpp keeps " * 3)
    dst = tmp_path / "wide-IQ2_XS.gguf"
    result, _ = quantize(wide, dst, "IQ2_XS", imatrix=matrix)
    # The header carries the imatrix keys (set through key-value overrides, the dataset name
    # cut to 127 bytes): predicted exactly too.
    assert read_header(dst).metadata["quantize.imatrix.entries_count"] == 14
    assert result["output_sha256"] == sha256_file(dst)


def test_the_dry_run_reads_a_skeleton_without_the_vocabulary(tiny: Path, tmp_path: Path) -> None:
    import os

    from qmgr.builtin import llama_digest

    def dry_run(path: bytes, target: str) -> list[tuple[str, str]]:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_quantizer.FTYPE_IDS[target]
        params.dry_run = True
        text: list[str] = []
        with llama_log.LlamaLog(text.append):
            assert llama_cpp.llama_model_quantize(path, os.fsencode(tmp_path / "none.gguf"),
                                                  ctypes.byref(params)) == 0
        assert not (tmp_path / "none.gguf").exists()
        return llama_digest.parse_dry_run("".join(text).splitlines())

    g = llama_digest._ggml(llama_cpp)
    tensor_ctx = ctypes.c_void_p()
    source = g.gguf_init_from_file(os.fsencode(tiny),
                                   llama_digest._InitParams(True, ctypes.pointer(tensor_ctx)))
    try:
        with llama_digest._skeleton(g, source, tiny) as path:
            assert path.startswith(b"/proc/self/fd/")  # an anonymous memory file
            skeleton = Path(os.fsdecode(path))
            header = read_header(skeleton)
            vocab = read_header(tiny).metadata["tokenizer.ggml.tokens"]
            assert not [k for k in header.metadata if k.startswith("tokenizer.ggml.token")]
            assert header.metadata["llama.vocab_size"] == vocab.count
            assert skeleton.stat().st_size == tiny.stat().st_size  # a hole stands for the data
            for target in ("Q4_K_M", "Q2_K", "Q8_0"):
                types = dry_run(path, target)
                assert types == dry_run(os.fsencode(tiny), target)
                assert len(types) == len(read_header(tiny).tensors)
    finally:
        g.gguf_free(source)
        g.ggml_free(tensor_ctx)


def test_a_wrong_prediction_gives_no_digest(tiny: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from qmgr.builtin import llama_digest

    real = llama_digest.predict_header

    def off_by_one(*args: Any) -> tuple[bytes, int]:
        header, total = real(*args)
        wrong = bytearray(header)
        wrong[-1] ^= 1
        return bytes(wrong), total

    monkeypatch.setattr(llama_digest, "predict_header", off_by_one)
    dst = tmp_path / "tiny-Q8_0.gguf"
    result, _ = quantize(tiny, dst, "Q8_0")
    assert "output_sha256" not in result  # the daemon hashes the file itself then
    assert read_header(dst).metadata["general.file_type"] == llama_quantizer.FTYPE_IDS["Q8_0"]

    monkeypatch.setattr(llama_digest, "predict_header", real)
    monkeypatch.setenv("QMGR_HASH_WHILE_WRITING", "0")
    result, _ = quantize(tiny, tmp_path / "tiny-Q8_0-b.gguf", "Q8_0")
    assert "output_sha256" not in result
