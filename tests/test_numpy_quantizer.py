"""The built-in numpy quantizer: its Q8_0/Q4_0 bytes are ggml's, and its files are llama.cpp's.

Tiny models for the format and the file; the real Gemma 3 270M (as F16) for the cross-check
with llama.cpp's own quantizer, which needs llama-cpp-python and is skipped without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import testmodel
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize
from ggufmake import make_tiny_gguf

import qmgr
from qmgr.builtin import numpy_quantizer
from qmgr.builtin.numpy_quantizer import NumpyQuantizer, quantize_q4_0, quantize_q8_0
from qmgr.gguf import inspect, read_header
from qmgr.plugin.quantizer import QuantizeError, QuantizeJob, QuantizeOptions
from qmgr.plugins import PluginSet

Q8_0 = GGMLQuantizationType.Q8_0
Q4_0 = GGMLQuantizationType.Q4_0
TARGETS = {"Q8_0": (Q8_0, 7), "Q4_0": (Q4_0, 2)}


def run(src: Path, dst: Path, target: str, **options: Any) -> dict[str, Any]:
    """Quantize as the worker would, recording progress."""
    seen: list[tuple[float | None, str]] = []
    job = QuantizeJob(src, dst, target, QuantizeOptions(**options),
                      lambda fraction, message: seen.append((fraction, message)))
    result = NumpyQuantizer().quantize(job)
    assert seen[-1] == (1.0, "done")
    assert seen[0] == (None, f"reading {src.name}")
    fractions = [f for f, _ in seen[1:] if f is not None]
    assert len(fractions) == len(seen) - 1 and fractions == sorted(fractions)
    return result


def tensor_data(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """name -> (GGML type, raw bytes as rows), through qmgr's header reader and a memmap."""
    header = read_header(path)
    data = np.memmap(path, np.uint8, mode="r")
    out = {}
    for t in header.tensors:
        raw = data[header.data_offset + t.offset:][: t.n_bytes]
        out[t.name] = (t.ggml_type, raw.reshape(-1, t.n_bytes // (t.n_elements // t.shape[0])))
    return out


def values(ggml_type: int, raw: np.ndarray) -> np.ndarray:
    return dequantize(raw, GGMLQuantizationType(ggml_type))


# -- the block formats ---------------------------------------------------------------------------


def test_one_q4_0_block_by_hand() -> None:
    # m = -4 (largest magnitude): d = m / -8 = 0.5; 1.0 -> trunc(2 + 8.5) = 10, -4 -> 0.
    x = np.array([[1.0] * 31 + [-4.0]], np.float32)
    expected = b"\x00\x38" + b"\xaa" * 15 + b"\x0a"  # d = 0.5 in float16; q[j] | q[j+16] << 4
    assert quantize_q4_0(x).tobytes() == expected
    assert np.array_equal(dequantize(quantize_q4_0(x), Q4_0), x)


def test_one_q8_0_block_by_hand() -> None:
    # amax = 127: d = 1, and 62.5 rounds away from zero to 63 (np.round would say 62).
    x = np.array([[62.5] * 31 + [-127.0]], np.float32)
    expected = b"\x00\x3c" + b"\x3f" * 31 + b"\x81"  # d = 1.0 in float16; 63; -127
    assert quantize_q8_0(x).tobytes() == expected


def awkward_rows() -> np.ndarray:
    """Gaussian weights, and the blocks where a careless port differs from ggml."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    x[0, :32] = 0  # all zero: d = 0, and no division by it
    x[1, :32] = -0.25  # all equal, negative
    x[2, :32] = np.linspace(-1, 1, 32)  # -1 and +1: the first of equal magnitudes wins
    x[3, :32] = 0
    x[3, 0], x[3, 1] = 127, np.float32(0.49999997)  # floor(x + 0.5) would round this to 1
    x[4, :32] = np.arange(-16, 16) + 0.5  # halves everywhere
    x[5, :32] = 1e-6  # d is a float16 subnormal
    return x


@pytest.mark.parametrize("qtype", [Q8_0, Q4_0], ids=lambda t: t.name)
def test_bytes_equal_the_gguf_packages_reference(qtype: GGMLQuantizationType) -> None:
    x = awkward_rows()
    ours = numpy_quantizer.QUANTIZE_ROWS[qtype](x)
    assert ours.dtype == np.uint8 and ours.shape == quantize(x, qtype).shape
    assert np.array_equal(ours, quantize(x, qtype))
    # The same from float16 input, and from a 3-D array (rows are rows).
    assert np.array_equal(numpy_quantizer.QUANTIZE_ROWS[qtype](x.astype(np.float16)),
                          quantize(x.astype(np.float16).astype(np.float32), qtype))
    assert np.array_equal(numpy_quantizer.QUANTIZE_ROWS[qtype](x.reshape(4, 16, 256)),
                          quantize(x, qtype).reshape(4, 16, -1))


def test_rows_must_split_into_blocks() -> None:
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_q8_0(np.zeros((2, 48), np.float32))


# -- files -----------------------------------------------------------------------------------------


def write_model(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]],
                **kv: Any) -> Path:
    """A minimal GGUF file (not a model llama.cpp could load) with the given tensors."""
    w = GGUFWriter(path, "llama")
    w.add_name("handmade")
    for key, value in kv.items():
        w.add_key_value(key, value, GGUFValueType.UINT32)
    for name, (array, qtype) in tensors.items():
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(name, quantize(array, qtype))
        else:
            w.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("target", ["Q8_0", "Q4_0"])
def test_tiny_f16_model(tmp_path: Path, target: str) -> None:
    src = make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")
    dst = tmp_path / f"tiny-{target}.gguf"
    qtype, file_type = TARGETS[target]
    result = run(src, dst, target)
    assert result == {"tensors": 21, "quantized": 16, "copied": 5, "requantized_from": []}

    facts = inspect(dst)
    assert facts.file_type == file_type and facts.quant_type == target
    assert facts.tensor_types == {target: 16, "F32": 5}
    before, after = read_header(src), read_header(dst)
    assert [t.name for t in after.tensors] == [t.name for t in before.tensors]
    assert [t.shape for t in after.tensors] == [t.shape for t in before.tensors]
    assert {k: v for k, v in after.metadata.items() if k != "general.file_type"} == {
        k: v for k, v in before.metadata.items() if k != "general.file_type"}

    src_data, dst_data = tensor_data(src), tensor_data(dst)
    for name, (ggml_type, raw) in dst_data.items():
        src_type, src_raw = src_data[name]
        if src_type == GGMLQuantizationType.F32:  # norms: copied
            assert ggml_type == src_type and np.array_equal(raw, src_raw)
        else:
            assert ggml_type == qtype
            assert np.array_equal(raw, quantize(values(src_type, src_raw), qtype)), name


def test_source_types_and_what_is_left_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    F32, F16, BF16 = (GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                      GGMLQuantizationType.BF16)
    src = write_model(tmp_path / "src.gguf", {
        "a.weight": (w(64, 96), BF16),
        "b.weight": (w(64, 96), F32),
        "experts.weight": (w(4, 8, 64), F16),  # 3-D (MoE experts): rows are rows
        "odd.weight": (w(8, 48), F16),  # rows of 48: not whole blocks
        "norm.weight": (w(64), F32),
        "bias": (w(8, 64), F16),  # not a weight
    }, **{"general.alignment": 64})
    run(src, tmp_path / "dst.gguf", "Q4_0")
    header = read_header(tmp_path / "dst.gguf")
    assert header.alignment == 64
    types = {t.name: t.type_name for t in header.tensors}
    assert types == {"a.weight": "Q4_0", "b.weight": "Q4_0", "experts.weight": "Q4_0",
                     "odd.weight": "F16", "norm.weight": "F32", "bias": "F16"}
    src_data, dst_data = tensor_data(src), tensor_data(tmp_path / "dst.gguf")
    for name in types:
        src_type, src_raw = src_data[name]
        expected = (quantize(values(src_type, src_raw), Q4_0) if types[name] == "Q4_0"
                    else src_raw)
        assert np.array_equal(dst_data[name][1].reshape(-1), expected.reshape(-1)), name


def test_quantized_source_needs_allow_requantize(tmp_path: Path) -> None:
    src = make_tiny_gguf(tmp_path / "tiny-Q8_0.gguf", ftype="Q8_0")
    with pytest.raises(QuantizeError, match="already quantized \\(Q8_0\\).*allow_requantize") as e:
        run(src, tmp_path / "out.gguf", "Q4_0")
    assert e.value.code == "requantize_refused"

    result = run(src, tmp_path / "out.gguf", "Q4_0", allow_requantize=True)
    assert result["requantized_from"] == ["Q8_0"]
    src_data = tensor_data(src)
    for name, (ggml_type, raw) in tensor_data(tmp_path / "out.gguf").items():
        if ggml_type == Q4_0:
            assert np.array_equal(raw, quantize(values(*src_data[name]), Q4_0))


def test_leave_output(tmp_path: Path) -> None:
    src = make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")
    run(src, tmp_path / "out.gguf", "Q8_0", leave_output=True, pure=True)
    types = {t.name: t.type_name for t in read_header(tmp_path / "out.gguf").tensors}
    assert types["output.weight"] == "F16" and types["token_embd.weight"] == "Q8_0"


def test_registered_as_a_plugin() -> None:
    plugins = PluginSet(env={"QMGR_PLUGINS": ""}, load_builtins=False)
    plugins.register(numpy_quantizer, name="numpy_quantizer", version=qmgr.__version__)
    try:
        (quantizer,) = plugins.registered("register_quantizers")
        assert quantizer.name == "numpy" and quantizer.version == qmgr.__version__
        assert quantizer.targets() == ["Q8_0", "Q4_0"]
        assert quantizer.supported_options == {"allow_requantize", "leave_output", "pure"}
        assert plugins.info["numpy_quantizer"].errors == []
    finally:
        plugins.unregister("numpy_quantizer")


# -- against llama.cpp, on the real Gemma 3 270M ---------------------------------------------------


@pytest.fixture(scope="session")
def gemma_f16() -> Path:
    return testmodel.gemma_f16()


def llama_cpp_quantize(src: Path, dst: Path, target: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TARGETS[target][1]
    params.pure = True  # every weight of the target type, as the numpy quantizer does
    params.nthread = os.cpu_count() or 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0


def rmse(base: Path, quantized: Path, qtype: GGMLQuantizationType) -> float:
    """Root mean square error of the weights of type ``qtype``, against the base."""
    base_data, data = tensor_data(base), tensor_data(quantized)
    squares, count = 0.0, 0
    for name, (ggml_type, raw) in data.items():
        if ggml_type == qtype:
            error = values(ggml_type, raw) - values(*base_data[name])
            squares += float(np.square(error, dtype=np.float64).sum())
            count += error.size
    return (squares / count) ** 0.5


def generate(path: Path) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
    try:
        out = llm("The capital of France is", max_tokens=8, temperature=0.0)
        assert isinstance(out, dict)  # not a stream
        return out["choices"][0]["text"]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def quantized_gemma(gemma_f16: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, tuple[Path, Path]]:
    """target -> (numpy's file, llama.cpp's file), both from the same F16 base."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    tmp = tmp_path_factory.mktemp("gemma")
    files = {}
    for target in TARGETS:
        ours, theirs = tmp / f"numpy-{target}.gguf", tmp / f"llama.cpp-{target}.gguf"
        run(gemma_f16, ours, target)
        llama_cpp_quantize(gemma_f16, theirs, target)
        files[target] = (ours, theirs)
    return files


def differing_bytes(a: Path, b: Path) -> int:
    """Bytes of tensor data that differ between two files with the same tensors."""
    a_data, b_data = tensor_data(a), tensor_data(b)
    assert a_data.keys() == b_data.keys()
    return sum(int((a_data[n][1] != b_data[n][1]).sum()) for n in a_data)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["Q8_0", "Q4_0"])
def test_same_type_similar_error_as_llama_cpp(quantized_gemma: dict[str, tuple[Path, Path]],
                                              gemma_f16: Path, target: str) -> None:
    ours, theirs = quantized_gemma[target]
    qtype = TARGETS[target][0]
    facts = inspect(ours)
    assert facts.tensor_types == inspect(theirs).tensor_types
    assert facts.file_type == inspect(theirs).file_type
    ours_error, theirs_error = rmse(gemma_f16, ours, qtype), rmse(gemma_f16, theirs, qtype)
    differing = differing_bytes(ours, theirs)
    print(f"{target} RMSE: numpy {ours_error:.8g}, llama.cpp {theirs_error:.8g}; "
          f"{differing} of {facts.tensor_data_bytes} tensor bytes differ")
    assert ours_error == pytest.approx(theirs_error, rel=0.01)
    # Both follow ggml's reference code, so the bytes should be the same; a compiler that
    # fuses x * id + 8.5 into one FMA could flip a rare rounding, hence not exactly zero.
    assert differing < facts.tensor_data_bytes * 1e-5, (
        "llama.cpp no longer quantizes like ggml's quantize_row_*_ref: update the docstring "
        "of qmgr/builtin/numpy_quantizer.py")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["Q8_0", "Q4_0"])
def test_loads_and_generates_in_llama_cpp(quantized_gemma: dict[str, tuple[Path, Path]],
                                          target: str) -> None:
    ours, theirs = quantized_gemma[target]
    text = generate(ours)
    print(f"{target}: {text!r}")
    assert text.strip()
    if differing_bytes(ours, theirs) == 0:  # the same weights: the same greedy tokens
        assert generate(theirs) == text
