"""A bounded reader for GGUF headers (metadata and tensor infos), for untrusted files.

Every count, length and offset is checked against the bytes the file actually has before
anything is allocated or looped over, so a malformed file ends in a :class:`GGUFError` quickly
instead of a hang, a huge allocation or a stray ``struct.error``. Tensor data is never read;
only its claimed extent is checked against the file size. Long arrays are skipped rather than
decoded: fixed-size ones by arithmetic, string arrays by walking their lengths in a buffer.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from itertools import repeat
from operator import length_hint
from typing import Any

from qmgr.errors import GGUFError
from qmgr.gguf.byteio import ByteReader, FileReader
from qmgr.gguf.types import GGML_TYPES, VALUE_TYPE_NAMES, VT_ARRAY, VT_STRING

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Limits far above any real model (the biggest have a few thousand tensors, ~50 keys and a
# header of tens of MB) that keep the work on a hostile file bounded. GGML itself allows 4 dims
# and 63-byte tensor names.
MAX_HEADER_BYTES = 256 << 20
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 24
MAX_TENSOR_NAME_BYTES = 63
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 2
# Arrays whose elements have variable size must be walked element by element: 4M strings is
# ~15x the largest vocabularies and still under a second; nobody nests arrays at scale.
MAX_WALKED_STRINGS = 1 << 22
MAX_NESTED_ARRAYS = 1 << 16
# Arrays up to these lengths are decoded to lists (per-layer values, small lists of strings);
# longer ones become an ArraySummary.
DECODE_FIXED_MAX = 1024
DECODE_VARIABLE_MAX = 64
# Elements decoded into Python objects over the whole header (the rest is summarized): a
# Python int costs ~36 bytes for an int32's 4, so without a budget a crafted header of many
# small arrays costs 10x its size in memory. Real models decode a few thousand.
DECODE_BUDGET = 1 << 18

_INT64_MAX = (1 << 63) - 1
_FIRST_CHUNK = 64 << 10
_MAX_CHUNK = 4 << 20
# Smallest possible encodings, used to refuse counts the remaining bytes cannot hold.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims=0, type, offset
_MIN_ARRAY_BYTES = 4 + 8

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# struct codes of the fixed-size value types, by GGUF value type id
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"}
_SCALAR_CODES |= {10: "Q", 11: "q", 12: "d"}
_SCALARS: dict[int, struct.Struct] = {vt: struct.Struct("<" + c) for vt, c in _SCALAR_CODES.items()}


@dataclass(frozen=True, slots=True)
class ArraySummary:
    """A metadata array too long to be worth decoding: its element type and length."""

    element_type: str
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"array_of": self.element_type, "count": self.count}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as described in the header. ``shape`` is in GGUF order (ne[0] first) and
    ``offset`` is relative to the start of the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    n_elements: int
    n_bytes: int


@dataclass(slots=True)
class GGUFHeader:
    version: int
    tensor_count: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int  # absolute offset of the data section
    file_size: int
    header_bytes: int  # bytes actually read from the source (includes read-ahead)


class _Cursor:
    """Sequential reads over a ByteReader through a growing read-ahead buffer."""

    def __init__(self, source: ByteReader) -> None:
        self.source = source
        self.size = source.size
        self.buf = b""
        self.buf_off = 0  # absolute offset of buf[0]
        self.pos = 0  # absolute offset of the next byte to parse
        self.bytes_read = 0
        self._chunk = _FIRST_CHUNK
        self.decoded = 0  # array elements decoded so far (see DECODE_BUDGET)

    def may_decode(self, count: int, most: int) -> bool:
        """Whether an array of ``count`` elements is decoded (else summarized)."""
        if count > most or self.decoded + count > DECODE_BUDGET:
            return False
        self.decoded += count
        return True

    def need(self, n: int, what: str) -> int:
        """Make bytes [pos, pos+n) available; return where they start in ``buf``."""
        start = self.pos - self.buf_off
        if start >= 0 and start + n <= len(self.buf):
            return start
        if self.pos + n > self.size:
            raise GGUFError(
                f"truncated GGUF file: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file ends at {self.size}"
            )
        if self.pos + n > MAX_HEADER_BYTES:
            raise GGUFError(
                f"{what} lies at offset {self.pos}, beyond the {MAX_HEADER_BYTES >> 20} MiB that "
                f"qmgr reads of a GGUF header"
            )
        # Grow the read size so a multi-MB vocabulary takes a handful of reads, while a small
        # header costs a single small one.
        want = min(max(n, self._chunk), self.size - self.pos)
        self._chunk = min(self._chunk * 2, _MAX_CHUNK)
        tail = self.buf[start:] if 0 <= start < len(self.buf) else b""
        read_from = self.pos + len(tail)
        data = self.source.read_at(read_from, want - len(tail))
        if len(data) != want - len(tail):
            raise GGUFError(
                f"short read at offset {read_from}: the file is smaller than its reported "
                f"size {self.size} (did it change while being read?)"
            )
        self.bytes_read += len(data)
        self.buf = tail + data
        self.buf_off = self.pos
        return 0

    def u32(self, what: str) -> int:
        i = self.need(4, what)
        self.pos += 4
        return _U32.unpack_from(self.buf, i)[0]

    def u64(self, what: str) -> int:
        i = self.need(8, what)
        self.pos += 8
        return _U64.unpack_from(self.buf, i)[0]

    def string(self, what: str, limit: int) -> str:
        at = self.pos
        n = self.u64(f"length of {what}")
        if at + 8 + n > self.size:
            raise GGUFError(
                f"{what} at offset {at} claims {n} bytes, past the end of the file "
                f"({self.size} bytes)"
            )
        if n > limit:
            raise GGUFError(f"{what} at offset {at} is {n} bytes long; the limit is {limit}")
        i = self.need(n, what)
        self.pos += n
        try:
            return self.buf[i : i + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(
                f"{what} at offset {at} is not valid UTF-8 (bad byte at offset {at + 8 + e.start})"
            ) from None

    def skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` strings without decoding them (the hot path for vocabularies).

        The inner loop is as lean as Python allows: it does not bounds-check, but lets
        ``unpack_from`` fail at the end of the buffer, then refills and resumes.
        """
        unpack = _U64.unpack_from
        left = count
        while left:
            p = self.need(8, f"length of string #{count - left} of {what}")
            buf, base = self.buf, self.buf_off
            todo = repeat(None, left)
            try:
                for _ in todo:
                    p += 8 + unpack(buf, p)[0]
                left = 0
            except (struct.error, OverflowError):
                # The length at p lies beyond the buffer: that string and the rest remain.
                left = length_hint(todo) + 1
            self.pos = base + p
            if self.pos > self.size:
                raise GGUFError(
                    f"string #{count - left - 1} of {what} runs past the end of the file"
                )


def _value(cur: _Cursor, vtype: int, key: str, at: int) -> Any:
    scalar = _SCALARS.get(vtype)
    if scalar is not None:
        i = cur.need(scalar.size, f"value of key {key!r}")
        cur.pos += scalar.size
        return scalar.unpack_from(cur.buf, i)[0]
    if vtype == VT_STRING:
        return cur.string(f"string value of key {key!r}", MAX_STRING_BYTES)
    if vtype == VT_ARRAY:
        return _array(cur, key, 1)
    raise GGUFError(f"key {key!r} (entry at offset {at}) has unknown value type {vtype}")


def _array(cur: _Cursor, key: str, depth: int) -> list[Any] | ArraySummary:
    at = cur.pos
    etype = cur.u32(f"element type of array {key!r}")
    count = cur.u64(f"length of array {key!r}")
    name = VALUE_TYPE_NAMES.get(etype)
    if name is None:
        raise GGUFError(f"array {key!r} at offset {at} has unknown element type {etype}")
    if etype == VT_ARRAY and depth >= MAX_ARRAY_DEPTH:
        raise GGUFError(
            f"array {key!r} at offset {at} nests arrays more than {MAX_ARRAY_DEPTH} deep"
        )
    remaining = cur.size - cur.pos
    scalar = _SCALARS.get(etype)
    if scalar is not None:
        n_bytes = count * scalar.size
        if n_bytes > remaining:
            raise GGUFError(
                f"array {key!r} at offset {at} claims {count} {name} elements ({n_bytes} bytes), "
                f"but only {remaining} bytes are left in the file"
            )
        if cur.may_decode(count, DECODE_FIXED_MAX):
            i = cur.need(n_bytes, f"elements of array {key!r}")
            cur.pos += n_bytes
            return list(struct.unpack_from(f"<{count}{scalar.format[-1]}", cur.buf, i))
        cur.pos += n_bytes
        return ArraySummary(name, count)

    min_size = 8 if etype == VT_STRING else _MIN_ARRAY_BYTES
    if count * min_size > remaining:
        raise GGUFError(
            f"array {key!r} at offset {at} claims {count} {name} elements, but only "
            f"{remaining} bytes are left in the file"
        )
    limit = MAX_WALKED_STRINGS if etype == VT_STRING else MAX_NESTED_ARRAYS
    if count > limit:
        raise GGUFError(
            f"array {key!r} at offset {at} has {count} {name} elements; the limit is {limit}"
        )
    if etype == VT_STRING:
        if cur.may_decode(count, DECODE_VARIABLE_MAX):
            return [
                cur.string(f"string #{j} of array {key!r}", MAX_STRING_BYTES) for j in range(count)
            ]
        cur.skip_strings(count, f"array {key!r} at offset {at}")
        return ArraySummary(name, count)
    if cur.may_decode(count, DECODE_VARIABLE_MAX):
        return [_array(cur, key, depth + 1) for _ in range(count)]
    for _ in range(count):
        _array(cur, key, depth + 1)
    return ArraySummary(name, count)


def _read_preamble(cur: _Cursor) -> tuple[int, int, int]:
    if cur.size < 4:
        raise GGUFError(f"not a GGUF file: it is only {cur.size} bytes long")
    i = cur.need(4, "magic")
    magic = cur.buf[i : i + 4]
    cur.pos += 4
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}")
    version = cur.u32("version")
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in SUPPORTED_VERSIONS and swapped in (1, 2, 3):
        raise GGUFError(
            f"big-endian GGUF file (version {swapped}); only little-endian files are supported"
        )
    if version == 1:
        raise GGUFError(
            "GGUF version 1 (2023) is not supported; re-convert the model with a current llama.cpp"
        )
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"unsupported GGUF version {version}; qmgr reads versions 2 and 3")
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("metadata entry count")
    if tensor_count > MAX_TENSORS:
        raise GGUFError(f"header claims {tensor_count} tensors; the limit is {MAX_TENSORS}")
    if kv_count > MAX_KV:
        raise GGUFError(f"header claims {kv_count} metadata entries; the limit is {MAX_KV}")
    least = kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES
    if least > cur.size - cur.pos:
        raise GGUFError(
            f"header claims {tensor_count} tensors and {kv_count} metadata entries, which need "
            f"at least {least} bytes, but only {cur.size - cur.pos} bytes follow offset {cur.pos}"
        )
    return version, tensor_count, kv_count


def _read_metadata(cur: _Cursor, kv_count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for k in range(kv_count):
        at = cur.pos
        key = cur.string(f"key of metadata entry #{k}", MAX_KEY_BYTES)
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {key!r} at offset {at}")
        vtype = cur.u32(f"value type of key {key!r}")
        metadata[key] = _value(cur, vtype, key, at)
    return metadata


def _alignment(metadata: dict[str, Any]) -> int:
    value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GGUFError(f"general.alignment must be a positive integer, got {value!r}")
    if value & (value - 1):
        raise GGUFError(f"general.alignment must be a power of two, got {value}")
    return value


def _read_tensor_info(cur: _Cursor, t: int, seen: set[str]) -> TensorInfo:
    at = cur.pos
    name = cur.string(f"name of tensor #{t}", MAX_TENSOR_NAME_BYTES)
    if name in seen:
        raise GGUFError(f"duplicate tensor name {name!r} at offset {at}")
    seen.add(name)
    n_dims = cur.u32(f"n_dims of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise GGUFError(
            f"tensor {name!r} at offset {at} has {n_dims} dimensions; GGML supports at most "
            f"{MAX_DIMS}"
        )
    i = cur.need(8 * n_dims, f"dimensions of tensor {name!r}")
    cur.pos += 8 * n_dims
    shape = struct.unpack_from(f"<{n_dims}Q", cur.buf, i)
    n_elements = 1
    for d in shape:
        n_elements *= d
        if d > _INT64_MAX or n_elements > _INT64_MAX:
            raise GGUFError(
                f"tensor {name!r} at offset {at} has shape {list(shape)}, whose element count "
                f"overflows 64 bits"
            )
    ggml_type = cur.u32(f"type of tensor {name!r}")
    gt = GGML_TYPES.get(ggml_type)
    if gt is None:
        raise GGUFError(f"tensor {name!r} at offset {at} has unknown GGML type {ggml_type}")
    row = shape[0] if shape else 1
    if row % gt.block_size:
        raise GGUFError(
            f"tensor {name!r} ({gt.name}) has rows of {row} elements, not a multiple of the "
            f"block size {gt.block_size}"
        )
    offset = cur.u64(f"data offset of tensor {name!r}")
    n_bytes = n_elements // gt.block_size * gt.type_size
    return TensorInfo(name, shape, ggml_type, gt.name, offset, n_elements, n_bytes)


def _check_layout(tensors: list[TensorInfo], alignment: int, data_offset: int, size: int) -> None:
    if tensors and data_offset > size:
        raise GGUFError(
            f"tensor data would start at offset {data_offset}, past the end of the file ({size})"
        )
    for t in tensors:
        if t.offset % alignment:
            raise GGUFError(
                f"tensor {t.name!r} has data offset {t.offset}, not a multiple of the "
                f"alignment {alignment}"
            )
        end = data_offset + t.offset + t.n_bytes
        if end > size:
            raise GGUFError(
                f"tensor {t.name!r} claims bytes {data_offset + t.offset}..{end} of the file, but "
                f"the file is only {size} bytes (truncated download or incomplete shard?)"
            )
    prev: TensorInfo | None = None
    for t in sorted(tensors, key=lambda t: (t.offset, t.n_bytes)):
        if prev is not None and t.n_bytes and prev.offset + prev.n_bytes > t.offset:
            raise GGUFError(f"tensors {prev.name!r} and {t.name!r} overlap in the data section")
        if t.n_bytes:
            prev = t


def read_header_from(source: ByteReader) -> GGUFHeader:
    """Parse and validate the header of the GGUF file behind ``source``."""
    cur = _Cursor(source)
    version, tensor_count, kv_count = _read_preamble(cur)
    metadata = _read_metadata(cur, kv_count)
    alignment = _alignment(metadata)
    seen: set[str] = set()
    tensors = [_read_tensor_info(cur, t, seen) for t in range(tensor_count)]
    data_offset = -(-cur.pos // alignment) * alignment
    _check_layout(tensors, alignment, data_offset, cur.size)
    return GGUFHeader(
        version=version,
        tensor_count=tensor_count,
        metadata=metadata,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
        file_size=cur.size,
        header_bytes=cur.bytes_read,
    )


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse and validate the header of a local GGUF file (raises OSError if unreadable)."""
    with FileReader(path) as source:
        return read_header_from(source)
