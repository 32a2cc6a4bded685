"""Fuzz the GGUF header reader with mutations of valid tiny files.

Every mutated file must either parse, with invariants that keep later code safe, or raise
GGUFError, having read each byte at most once. Any other exception (IndexError, struct.error,
UnicodeDecodeError, OverflowError, MemoryError, RecursionError, ...) fails the test. Not timed
(a hang is pytest-timeout's to catch; bench/bench_inspect.py times hostile headers).
Derandomized, so CI runs the same 2000 cases every time.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import gguf
import pytest
from ggufmake import CountingReader, make_tiny_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmgr.errors import GGUFError
from qmgr.gguf import BytesReader, facts_from_header, read_header_from

pytestmark = pytest.mark.reliability  # the reliability suite: docs/operations.md


def _field_offsets(path: Path) -> list[int]:
    """Where each header field (length, type, count, dim, offset...) starts, per the trusted
    gguf.GGUFReader: its parts are views into the file, so their addresses give the offsets."""
    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    return sorted({p.ctypes.data - base for f in fields for p in f.parts})


def _seed_files() -> list[tuple[bytes, int, list[int]]]:
    """Small valid files (bytes, data offset, field offsets): a vocabulary long enough to take
    the skipping path (> 64 strings), a per-layer array, quantized and plain tensors."""
    seeds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (ftype, version) in enumerate([("Q8_0", 3), ("F16", 2)]):
            path = make_tiny_gguf(
                Path(tmp) / f"seed{i}.gguf",
                n_layers=1,
                n_embd=32,
                n_head=2,
                n_head_kv=1,
                n_ff=32,
                n_vocab=70,
                ftype=ftype,
                version=version,
                extra_kv={"llama.attention.sliding_window_pattern": [True, False, True]},
            )
            data = path.read_bytes()
            offset = read_header_from(BytesReader(data)).data_offset
            seeds.append((data, offset, _field_offsets(path)))
    return seeds


SEEDS = _seed_files()

# Values that tend to break length, count, type and offset fields.
INTERESTING = [
    0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 63, 64, 65, 255, 256, 1023, 1024, 1025,
    2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1,
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    seed, data_offset, fields = draw(st.sampled_from(SEEDS))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        # Most mutations hit the start of a header field, the others anywhere in the header
        # or, rarely, the data section. (Hypothesis favours small integers, so a plain
        # integers(0, n) would mostly hit the magic.)
        where = draw(st.integers(0, 9))
        if where < 6:
            pos = draw(st.sampled_from(fields))
        else:
            end = data_offset if where < 9 else len(data)
            pos = draw(st.integers(0, 2**32)) % max(1, min(end, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "u64", "u32"]))
        if kind == "flip":
            if pos < len(data):
                data[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[pos:]
        else:
            size = 8 if kind == "u64" else 4
            value = draw(st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1))
            data[pos : pos + size] = struct.pack("<Q", value)[:size]
        if not data:
            break
    return bytes(data)


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated())
def test_mutated_files_parse_or_raise_gguf_error(data: bytes) -> None:
    source = CountingReader(BytesReader(data))
    try:
        header = read_header_from(source)
    except GGUFError:
        return
    finally:
        source.assert_reads_go_forward()
    size = len(data)
    assert header.file_size == size
    assert 0 < header.header_bytes <= size
    assert header.alignment > 0 and header.alignment & (header.alignment - 1) == 0
    assert header.tensor_count == len(header.tensors)
    assert len({t.name for t in header.tensors}) == len(header.tensors)
    if header.tensors:
        assert header.data_offset <= size
    for t in header.tensors:
        assert len(t.shape) <= 4
        assert t.offset % header.alignment == 0
        assert header.data_offset + t.offset + t.n_bytes <= size
    try:
        facts = facts_from_header(header)
    except GGUFError:
        return
    json.dumps(facts.to_dict())
