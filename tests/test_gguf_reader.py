"""The GGUF header reader: facts of valid files, agreement with gguf.GGUFReader, what it reads
of huge sparse files and of the real Gemma 3 270M, and a clear GGUFError for every kind of
malformed file.

What it reads is counted, not timed: the speed targets are bench/bench_inspect.py's."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import gguf
import pytest
from ggufmake import (
    CountingReader,
    find_gemma_gguf,
    gguf_bytes,
    gguf_kv,
    gguf_string,
    gguf_tensor_info,
    make_sparse_gguf,
    make_tiny_gguf,
)

from qmgr.errors import GGUFError
from qmgr.gguf import (
    GGML_TYPES,
    LLAMA_FILE_TYPES,
    ArraySummary,
    BytesReader,
    FileReader,
    GGUFHeader,
    facts_from_header,
    inspect,
    read_header,
    read_header_from,
)
from qmgr.gguf.types import VALUE_TYPE_NAMES

T_UINT32, T_FLOAT32, T_STRING, T_ARRAY = 4, 6, 8, 9
F32, Q8_0 = 0, 8


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def array(etype: int, count: int, body: bytes = b"") -> bytes:
    return u32(etype) + u64(count) + body


def counted_read(path: Path) -> tuple[GGUFHeader, CountingReader]:
    """The header of the file at ``path``, and every read it took (all of them forward)."""
    with FileReader(path) as f:
        source = CountingReader(f)
        header = read_header_from(source)
    source.assert_reads_go_forward()
    return header, source


# -- tables ---------------------------------------------------------------------------------


def test_ggml_type_table_matches_gguf() -> None:
    for q in gguf.GGMLQuantizationType:
        ours = GGML_TYPES[q.value]
        assert ours.name == q.name
        assert (ours.block_size, ours.type_size) == gguf.GGML_QUANT_SIZES[q]


def test_llama_file_type_table_matches_gguf() -> None:
    for ft in gguf.LlamaFileType:
        if ft is gguf.LlamaFileType.GUESSED:
            continue
        expected = "F32" if ft.name == "ALL_F32" else ft.name.removeprefix("MOSTLY_")
        assert LLAMA_FILE_TYPES[ft.value] == expected
    assert LLAMA_FILE_TYPES[15] == "Q4_K_M"
    assert LLAMA_FILE_TYPES[19] == "IQ2_XXS"


def test_value_type_table_matches_gguf() -> None:
    assert {t.value: t.name for t in gguf.GGUFValueType} == VALUE_TYPE_NAMES


def test_reader_modules_import_neither_gguf_nor_numpy() -> None:
    import ast

    import qmgr.gguf.types as types_module

    for path in sorted(Path(types_module.__file__).parent.glob("*.py")):  # renames included
        tree = ast.parse(path.read_text())
        imported = {
            (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.Import | ast.ImportFrom)
            for a in n.names
        }
        assert not {m.split(".")[0] for m in imported} & {"gguf", "numpy"}, path.name


# -- facts of valid files -------------------------------------------------------------------

TINY_PARAMS = 256 * 64 * 2 + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 128 * 64 + 2 * 64) + 64
TINY_WEIGHT_PARAMS = TINY_PARAMS - 5 * 64  # without the five 1D norm tensors


@pytest.mark.parametrize(
    ("ftype", "file_type", "weight_type", "weight_bpw"),
    [("F32", 0, "F32", 32.0), ("F16", 1, "F16", 16.0), ("Q8_0", 7, "Q8_0", 8.5)],
)
def test_tiny_facts(
    tmp_path: Path, ftype: str, file_type: int, weight_type: str, weight_bpw: float
) -> None:
    f = inspect(make_tiny_gguf(tmp_path / "t.gguf", ftype=ftype))
    assert (f.architecture, f.name, f.version) == ("llama", "tiny", 3)
    assert (f.file_type, f.quant_type) == (file_type, ftype)
    assert (f.block_count, f.context_length, f.embedding_length) == (2, 256, 64)
    assert (f.feed_forward_length, f.head_count, f.head_count_kv) == (128, 4, 2)
    assert (f.key_length, f.value_length) == (16, 16)
    assert f.vocab_size == 256
    assert f.parameter_count == TINY_PARAMS
    if ftype == "F32":
        assert f.tensor_types == {"F32": 21}
    else:
        assert f.tensor_types == {weight_type: 16, "F32": 5}
        assert f.tensor_bytes["F32"] == 5 * 64 * 4
        assert 8 * f.tensor_bytes[weight_type] / TINY_WEIGHT_PARAMS == weight_bpw
    assert f.bits_per_weight == pytest.approx(weight_bpw, abs=0.1)
    assert f.tensor_data_bytes == sum(f.tensor_bytes.values())
    assert (f.sliding_window, f.sliding_window_pattern) == (None, None)
    assert (f.split_no, f.split_count, f.split_tensors_count) == (None, None, None)
    assert f.file_size == (tmp_path / "t.gguf").stat().st_size
    assert 0 < f.header_bytes <= f.file_size
    d = f.to_dict()
    assert json.loads(json.dumps(d)) == d


def test_tiny_header(tmp_path: Path) -> None:
    h = read_header(make_tiny_gguf(tmp_path / "t.gguf", ftype="Q8_0"))
    assert (h.version, h.tensor_count, h.alignment) == (3, 21, 32)
    assert h.data_offset % 32 == 0
    assert [t.name for t in h.tensors[:3]] == [
        "token_embd.weight",
        "blk.0.attn_norm.weight",
        "blk.0.attn_q.weight",
    ]
    embd = h.tensors[0]
    assert (embd.shape, embd.type_name, embd.ggml_type, embd.offset) == ((64, 256), "Q8_0", 8, 0)
    assert embd.n_elements == 64 * 256 and embd.n_bytes == 64 * 256 // 32 * 34
    # Long arrays are summarised, short ones decoded.
    assert h.metadata["tokenizer.ggml.tokens"] == ArraySummary("STRING", 256)
    assert h.metadata["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]
    assert h.metadata["general.file_type"] == 7


def test_version_2_and_3(tmp_path: Path) -> None:
    for version in (2, 3):
        path = make_tiny_gguf(tmp_path / f"v{version}.gguf", version=version)
        f = inspect(path)
        assert f.version == version
        assert (f.architecture, f.vocab_size, f.parameter_count) == ("llama", 256, TINY_PARAMS)


def test_deterministic(tmp_path: Path) -> None:
    a = make_tiny_gguf(tmp_path / "a.gguf", ftype="Q8_0", seed=3).read_bytes()
    b = make_tiny_gguf(tmp_path / "b.gguf", ftype="Q8_0", seed=3).read_bytes()
    c = make_tiny_gguf(tmp_path / "c.gguf", ftype="Q8_0", seed=4).read_bytes()
    assert a == b != c


def test_per_layer_arrays_sliding_window_and_split_keys(tmp_path: Path) -> None:
    path = make_tiny_gguf(
        tmp_path / "t.gguf",
        extra_kv={
            "llama.attention.head_count": [4, 8],
            "llama.attention.head_count_kv": [2, 1],
            "llama.feed_forward_length": [128, 256],
            "llama.attention.sliding_window": 128,
            "llama.attention.sliding_window_pattern": [True, False],
            "llama.attention.key_length": 32,
            "split.no": (1, gguf.GGUFValueType.UINT16),
            "split.count": (3, gguf.GGUFValueType.UINT16),
            "split.tensors.count": (63, gguf.GGUFValueType.INT32),
        },
    )
    f = inspect(path)
    assert (f.head_count, f.head_count_kv, f.feed_forward_length) == ([4, 8], [2, 1], [128, 256])
    assert (f.key_length, f.value_length) == (32, 16)  # value length from n_embd / head_count[0]
    assert (f.sliding_window, f.sliding_window_pattern) == (128, [True, False])
    assert (f.split_no, f.split_count, f.split_tensors_count) == (1, 3, 63)
    json.dumps(f.to_dict())
    hybrid = {"llama.attention.head_count": [0, 8], "llama.attention.head_count_kv": [0, 2]}
    f = inspect(make_tiny_gguf(tmp_path / "h.gguf", extra_kv=hybrid))
    assert (f.head_count, f.head_count_kv, f.key_length) == ([0, 8], [0, 2], 8)


def _raw_header(kvs: list[bytes], tensor_infos: list[bytes], data_size: int) -> GGUFHeader:
    return read_header_from(BytesReader(gguf_bytes(kvs, tensor_infos, data_size=data_size)))


def test_quant_type_guessed_from_tensors_when_file_type_absent_or_unknown() -> None:
    tensors = [gguf_tensor_info("a", [64], F32, 0), gguf_tensor_info("b", [64, 4], Q8_0, 256)]
    arch = gguf_kv("general.architecture", T_STRING, gguf_string("llama"))
    f = facts_from_header(_raw_header([arch], tensors, 256 + 4 * 2 * 34))
    assert (f.file_type, f.quant_type) == (None, "Q8_0")
    unknown = gguf_kv("general.file_type", T_UINT32, u32(999))
    f = facts_from_header(_raw_header([arch, unknown], tensors, 256 + 4 * 2 * 34))
    assert (f.file_type, f.quant_type) == (999, "Q8_0")
    f = facts_from_header(_raw_header([], tensors[:1], 256))
    assert (f.architecture, f.quant_type, f.block_count) == (None, "F32", None)
    f = facts_from_header(_raw_header([], [], 0))
    assert (f.quant_type, f.parameter_count, f.bits_per_weight) == (None, 0, 0.0)


def test_wrongly_typed_fact_key_is_a_gguf_error() -> None:
    kvs = [
        gguf_kv("general.architecture", T_STRING, gguf_string("llama")),
        gguf_kv("llama.block_count", T_STRING, gguf_string("two")),
    ]
    with pytest.raises(GGUFError, match="llama.block_count"):
        facts_from_header(_raw_header(kvs, [], 0))


def test_missing_file_is_oserror_and_a_non_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="not a regular file"):
        read_header(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(GGUFError, match="not a regular file"):
        read_header(tmp_path / "fifo")


def test_long_string_array_walk_across_buffer_refills() -> None:
    # 300k strings of varied length, with a few longer than the largest read-ahead chunk, must
    # be counted exactly and leave the reader positioned on the next key.
    strings = [b"x" * (i % 23) for i in range(300_000)]
    strings[1000] = b"y" * (5 << 20)
    strings[200_000] = b"z" * 70_000
    body = b"".join(gguf_string(s) for s in strings)
    kvs = [
        gguf_kv("tokenizer.ggml.tokens", T_ARRAY, array(T_STRING, len(strings), body)),
        gguf_kv("after", T_UINT32, u32(7)),
    ]
    h = _raw_header(kvs, [], 0)
    assert h.metadata == {
        "tokenizer.ggml.tokens": ArraySummary("STRING", 300_000),
        "after": 7,
    }
    assert facts_from_header(h).vocab_size == 300_000


# -- agreement with gguf.GGUFReader ---------------------------------------------------------


@pytest.mark.parametrize(("ftype", "version"), [("F32", 3), ("F16", 3), ("Q8_0", 3), ("F16", 2)])
def test_agrees_with_gguf_reader(tmp_path: Path, ftype: str, version: int) -> None:
    path = make_tiny_gguf(
        tmp_path / "t.gguf",
        ftype=ftype,
        version=version,
        extra_kv={"general.tags": ["a", "b"], "x.f64": (0.1, gguf.GGUFValueType.FLOAT64)},
    )
    ours = read_header(path)
    theirs = gguf.GGUFReader(path)
    fields = {k: v for k, v in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        value, expected = ours.metadata[key], field.contents()
        if isinstance(value, ArraySummary):
            assert (value.element_type, value.count) == (field.types[-1].name, len(expected))
        else:
            assert value == expected, key
    assert ours.version == theirs.fields["GGUF.version"].contents()
    assert ours.tensor_count == len(theirs.tensors)
    for t, r in zip(ours.tensors, theirs.tensors, strict=True):
        assert t.name == r.name
        assert t.shape == tuple(int(d) for d in r.shape)
        assert t.ggml_type == int(r.tensor_type)
        assert (t.n_elements, t.n_bytes) == (int(r.n_elements), int(r.n_bytes))
        assert ours.data_offset + t.offset == r.data_offset


# -- size does not matter -------------------------------------------------------------------


def test_sparse_multi_gb_file_reads_only_the_header(tmp_path: Path) -> None:
    small = make_tiny_gguf(tmp_path / "small.gguf")
    big = make_sparse_gguf(tmp_path / "big.gguf", 6 << 30)
    assert big.stat().st_size > 5 << 30
    f = inspect(big)
    assert f.tensor_data_bytes > 5 << 30
    assert (f.block_count, f.vocab_size, f.quant_type) == (2, 256, "Q4_K_M")
    assert f.tensor_types == {"Q4_K": 15, "Q6_K": 1, "F32": 5}
    assert f.bits_per_weight == pytest.approx(4.5, abs=0.01)
    h, big_reads = counted_read(big)
    assert h.header_bytes <= max(64 << 10, h.data_offset)  # the header plus one read-ahead
    # Same header shape, so the same cost whatever the file size: one read of the first
    # 64 KiB, none of the 6 GiB of tensor data.
    _, small_reads = counted_read(small)
    assert big_reads.reads == small_reads.reads == [(0, 64 << 10)]


def test_real_gemma_3_270m() -> None:
    path = find_gemma_gguf()
    f = inspect(path)
    assert f.architecture == "gemma3"
    assert (f.vocab_size, f.block_count, f.embedding_length) == (262144, 18, 640)
    assert f.sliding_window is not None and f.sliding_window > 0
    assert f.quant_type == "Q4_K_M"
    assert (f.head_count, f.head_count_kv, f.key_length) == (4, 1, 256)
    assert 260e6 < f.parameter_count < 280e6
    assert f.header_bytes < 16 << 20
    # What keeps it fast: the 262,144 tokens are stepped over, not decoded into a list, and
    # the 6.5 MB header takes 7 reads (64 KiB, doubling up to 4 MiB), each byte read once.
    h, source = counted_read(path)
    assert h.metadata["tokenizer.ggml.tokens"] == ArraySummary("STRING", 262144)
    assert len(source.reads) <= 8
    assert source.bytes_read == h.header_bytes < h.data_offset + (4 << 20)


# -- malformed files ------------------------------------------------------------------------

ARCH = gguf_kv("general.architecture", T_STRING, gguf_string("llama"))
TOKENS = gguf_kv(
    "tokenizer.ggml.tokens",
    T_ARRAY,
    array(T_STRING, 100, b"".join(gguf_string(f"t{i}") for i in range(100))),
)
FFN = gguf_kv("llama.feed_forward_length", T_ARRAY, array(T_UINT32, 2, u32(8) + u32(16)))
TENSOR_A = gguf_tensor_info("a", [8, 4], F32, 0)  # 128 bytes
TENSOR_B = gguf_tensor_info("b", [32, 2], Q8_0, 128)  # 68 bytes
DATA_SIZE = 128 + 68
BASE_KVS = [ARCH, TOKENS, FFN]
BASE_TENSORS = [TENSOR_A, TENSOR_B]
LONG_ARRAY_WITH_MAX_LENGTH = gguf_string("x") * 50 + u64(2**64 - 1) + gguf_string("x") * 49


def raw(
    kvs: list[bytes] = BASE_KVS,
    tensors: list[bytes] = BASE_TENSORS,
    data_size: int = DATA_SIZE,
    **kw: int,
) -> bytes:
    return gguf_bytes(kvs, tensors, data_size=data_size, **kw)


HEADER_ONLY = raw()[: 24 + len(b"".join(BASE_KVS + BASE_TENSORS))]


def assert_gguf_error(data: bytes, match: str | None = None) -> GGUFError:
    """Refused with a GGUFError, having read each byte at most once (a hang is pytest-timeout's
    to catch)."""
    source = CountingReader(BytesReader(data))
    with pytest.raises(GGUFError, match=match) as info:
        read_header_from(source)
    source.assert_reads_go_forward()
    assert info.value.code == "gguf_invalid"
    return info.value


def test_raw_base_file_is_valid() -> None:
    h = read_header_from(BytesReader(raw()))
    assert h.metadata["tokenizer.ggml.tokens"] == ArraySummary("STRING", 100)
    assert h.metadata["llama.feed_forward_length"] == [8, 16]
    assert [(t.name, t.n_bytes) for t in h.tensors] == [("a", 128), ("b", 68)]


def _kv_after_base(extra: bytes) -> bytes:
    return raw([*BASE_KVS, extra])


MALFORMED: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "not a GGUF file"),
    "three bytes": (b"GGU", "not a GGUF file"),
    "bad magic": (b"GGML" + raw()[4:], "not a GGUF file"),
    "magic only": (b"GGUF", "version"),
    "version 1": (raw(version=1), "version 1"),
    "version 4": (raw(version=4), "version 4"),
    "big-endian": (raw(version=0x03000000), "big-endian"),
    "huge tensor count": (raw(n_tensors=2**64 - 1), "tensors"),
    "tensor count beyond the bytes": (raw(n_tensors=5000), "5000 tensors"),
    "huge kv count": (raw(n_kv=2**63), "metadata entries"),
    "kv count beyond the bytes": (raw(n_kv=5000), "5000 metadata entries"),
    "kv count one too many": (raw(n_kv=4), "past the end"),
    "huge key length": (raw([u64(2**63) + b"k" + u32(4) + u32(1)]), "past the end"),
    "huge string value": (_kv_after_base(gguf_kv("s", T_STRING, u64(2**62) + b"ab")), "'s'"),
    "string value past EOF": (_kv_after_base(gguf_kv("s", T_STRING, u64(10**6))), "past the end"),
    "huge fixed array": (_kv_after_base(gguf_kv("a", T_ARRAY, array(T_UINT32, 2**61))), "'a'"),
    "huge u8 array": (_kv_after_base(gguf_kv("a", T_ARRAY, array(0, 2**64 - 1))), "'a'"),
    "huge string array": (_kv_after_base(gguf_kv("a", T_ARRAY, array(T_STRING, 2**62))), "'a'"),
    "array count beyond bytes": (_kv_after_base(gguf_kv("a", T_ARRAY, array(0, 10**6))), "'a'"),
    "long string array, last string past EOF": (
        raw([ARCH, gguf_kv("v", T_ARRAY, array(T_STRING, 100, gguf_string("x") * 99 + u64(9**9)))]),
        "string #99",
    ),
    "long string array, length 2**64-1": (
        raw([gguf_kv("v", T_ARRAY, array(T_STRING, 100, LONG_ARRAY_WITH_MAX_LENGTH))]),
        "string #50",
    ),
    "short string array past EOF": (
        raw([gguf_kv("v", T_ARRAY, array(T_STRING, 3, gguf_string("x") + u64(9**9)))]),
        "string #1",
    ),
    "too many nested arrays": (
        _kv_after_base(gguf_kv("k", T_ARRAY, array(T_ARRAY, 70_000, array(0, 0) * 70_000))),
        "the limit is 65536",
    ),
    "unknown value type 13": (_kv_after_base(gguf_kv("k", 13, u32(0))), "unknown value type 13"),
    "unknown value type 2**32-1": (_kv_after_base(gguf_kv("k", 2**32 - 1, u32(0))), "'k'"),
    "unknown array element type": (
        _kv_after_base(gguf_kv("k", T_ARRAY, array(13, 1, b"\0"))),
        "unknown element type 13",
    ),
    "arrays nested three deep": (
        _kv_after_base(
            gguf_kv("k", T_ARRAY, array(T_ARRAY, 1, array(T_ARRAY, 1, array(T_UINT32, 1, u32(7)))))
        ),
        "nests arrays",
    ),
    "5 dimensions": (raw(tensors=[gguf_tensor_info("a", [1] * 5, F32, 0)]), "5 dimensions"),
    "2**32-1 dimensions": (raw(tensors=[gguf_string("a") + u32(2**32 - 1)]), "dimensions"),
    "element count overflows": (
        raw(tensors=[gguf_tensor_info("a", [2**32, 2**32], F32, 0)]),
        "overflows",
    ),
    "dimension above int64": (raw(tensors=[gguf_tensor_info("a", [2**63], F32, 0)]), "overflows"),
    "unknown ggml type": (raw(tensors=[gguf_tensor_info("a", [8], 99, 0)]), "GGML type 99"),
    "removed ggml type 4": (raw(tensors=[gguf_tensor_info("a", [32], 4, 0)]), "GGML type 4"),
    "row not a multiple of the block": (
        raw(tensors=[gguf_tensor_info("a", [33, 1], Q8_0, 0)]),
        "block size 32",
    ),
    "tensor name too long": (raw(tensors=[gguf_tensor_info("n" * 64, [8], F32, 0)]), "limit"),
    "tensor offset past EOF": (
        raw(tensors=[TENSOR_A, gguf_tensor_info("b", [32, 2], Q8_0, 2**40)]),
        "'b' claims bytes",
    ),
    "tensor offset near 2**64": (
        raw(tensors=[gguf_tensor_info("a", [8], F32, 2**64 - 32)]),
        "'a' claims bytes",
    ),
    "tensor data past EOF": (raw(data_size=DATA_SIZE - 1), "'b' claims bytes"),
    "header ends the file, unpadded": (HEADER_ONLY, "past the end"),
    "misaligned offset": (
        raw(tensors=[TENSOR_A, gguf_tensor_info("b", [32, 2], Q8_0, 136)], data_size=512),
        "not a multiple of the alignment",
    ),
    "overlapping tensors": (
        raw(tensors=[TENSOR_A, gguf_tensor_info("b", [32, 2], Q8_0, 96)]),
        "overlap",
    ),
    "alignment 0": (_kv_after_base(gguf_kv("general.alignment", T_UINT32, u32(0))), "alignment"),
    "alignment 3": (
        _kv_after_base(gguf_kv("general.alignment", T_UINT32, u32(3))),
        "power of two",
    ),
    "alignment is a string": (
        _kv_after_base(gguf_kv("general.alignment", T_STRING, gguf_string("32"))),
        "alignment",
    ),
    "duplicate keys": (raw([ARCH, TOKENS, ARCH]), "duplicate metadata key 'general.architecture'"),
    "duplicate tensor names": (
        raw(tensors=[TENSOR_A, gguf_tensor_info("a", [8, 4], F32, 128)], data_size=256),
        "duplicate tensor name 'a'",
    ),
    "invalid utf-8 key": (_kv_after_base(gguf_kv(b"\xff\xfe", T_UINT32, u32(1))), "UTF-8"),
    "invalid utf-8 value": (
        _kv_after_base(gguf_kv("k", T_STRING, gguf_string(b"ok\xc3\x28"))),
        "UTF-8",
    ),
    "invalid utf-8 in short string array": (
        _kv_after_base(gguf_kv("k", T_ARRAY, array(T_STRING, 1, gguf_string(b"\x80")))),
        "UTF-8",
    ),
    "invalid utf-8 tensor name": (
        raw(tensors=[gguf_tensor_info(b"\xe2\x82", [8, 4], F32, 0)]),
        "UTF-8",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_a_clear_gguf_error(case: str) -> None:
    data, match = MALFORMED[case]
    assert_gguf_error(data, match)


def test_error_messages_say_where() -> None:
    err = assert_gguf_error(raw([ARCH, TOKENS, ARCH]))
    assert f"offset {24 + len(ARCH) + len(TOKENS)}" in err.message
    err = assert_gguf_error(_kv_after_base(gguf_kv("s", T_STRING, u64(10**6))))
    assert "'s'" in err.message and "offset" in err.message


def test_too_many_strings_to_walk() -> None:
    n = (1 << 22) + 1
    assert_gguf_error(raw([gguf_kv("v", T_ARRAY, array(T_STRING, n, u64(0) * n))]), "limit")


class HugeSource:
    """A ByteReader of ``size`` bytes: ``prefix`` then zeros, never materialised."""

    def __init__(self, prefix: bytes, size: int) -> None:
        self.prefix, self.size = prefix, size

    def read_at(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        head = self.prefix[offset : offset + size]
        return head + bytes(size - len(head))


def test_header_beyond_256_mib_is_refused() -> None:
    # A 300 MiB array is skipped without reading it, but the key after it is too far out.
    kvs = [gguf_kv("blob", T_ARRAY, array(0, 300 << 20))]
    prefix = gguf_bytes(kvs, n_kv=2, alignment=1)
    with pytest.raises(GGUFError, match="256 MiB"):
        read_header_from(HugeSource(prefix, 1 << 40))


def test_custom_byte_source_reads_little() -> None:
    prefix = raw()
    source = HugeSource(prefix, 1 << 40)  # a 1 TiB "remote" file
    h = read_header_from(source)
    assert h.file_size == 1 << 40 and [t.name for t in h.tensors] == ["a", "b"]
    assert h.header_bytes == 64 << 10  # one read-ahead chunk


def test_real_big_endian_file_is_refused(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "be.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("llama.block_count", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_gguf_error((tmp_path / "be.gguf").read_bytes(), "big-endian")


def test_raw_file_truncated_anywhere() -> None:
    data = raw()
    for n in range(len(data)):
        assert_gguf_error(data[:n])


def test_tiny_model_truncated_anywhere_in_header_and_sampled_in_data(tmp_path: Path) -> None:
    data = make_tiny_gguf(tmp_path / "t.gguf", n_vocab=80, n_layers=1).read_bytes()
    data_offset = read_header_from(BytesReader(data)).data_offset
    for n in [*range(data_offset + 1), *range(data_offset + 1, len(data), 97), len(data) - 1]:
        assert_gguf_error(data[:n])


@pytest.mark.parametrize("field_offset", [8, 16])
def test_tiny_model_with_huge_counts(tmp_path: Path, field_offset: int) -> None:
    data = bytearray(make_tiny_gguf(tmp_path / "t.gguf").read_bytes())
    for value in (2**64 - 1, 2**63, 2**32, 10**6):
        data[field_offset : field_offset + 8] = u64(value)
        assert_gguf_error(bytes(data))
