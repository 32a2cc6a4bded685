"""A "quant ladder" of Meta-Llama-3-8B-Instruct GGUF files: real headers, sparse data.

Each file has the header a real quantization of Meta-Llama-3-8B-Instruct has (its metadata, its
128256-token vocabulary, its 291 tensors with their true shapes) and, per tensor, the GGML type
llama.cpp's quantizer picks for that file type, hence the true tensor sizes and the true file
size (within a few MB). The tensor data is a sparse hole: a 16 GB F16 file takes a few MB on
disk and is written in a fraction of a second. Only headers can be read from these files.

- ``LLAMA3_8B``: the model's architecture facts and tensor list (GGUF shapes, ne[0] first).
- ``tensor_type(file_type, tensor_name, layer, n_layers)``: llama.cpp's type for one tensor.
- ``make_ladder_gguf(path, file_type)``: one sparse file.
- ``make_ladder_repo(root, ...)``: files named like the Hub's, for the test mirror.
- ``REAL_SIZES``: sizes of published files, to check ours against.

Writing reuses the approach of ``ggufmake.make_sparse_gguf`` (``GGUFWriter.add_tensor_info``
for tensors without data, then ``os.truncate`` to the full size). The vocabulary arrays
(128256 tokens and types, 280147 merges) are serialized once per process and handed to the
writer pre-packed, because ``GGUFWriter`` packs array elements one by one (~2.5 s a file).
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
)
from gguf.gguf_writer import GGUFValue
from ggufmake import _add_value

Q = GGMLQuantizationType


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts as a GGUF states them, and the tensors, in GGUF shape order."""

    name: str
    architecture: str
    block_count: int
    context_length: int
    embedding_length: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    rope_freq_base: float
    rope_dimension_count: int
    layer_norm_rms_epsilon: float
    vocab_size: int
    tokenizer_model: str
    tokenizer_pre: str
    n_merges: int
    bos_token_id: int
    eos_token_id: int
    chat_template: str
    parameter_count: int
    # Bytes before the tensor data in the real files (header, metadata, tensor infos, padding),
    # or None. Our synthetic merges are padded to reach it, so that file sizes come out exact.
    header_bytes: int | None = None

    @property
    def n_gqa(self) -> int:
        return self.head_count // self.head_count_kv

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, GGUF shape with ne[0] first), in the order the writer lays them out."""
        embd, ff, vocab = self.embedding_length, self.feed_forward_length, self.vocab_size
        kv = embd // self.head_count * self.head_count_kv
        out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (embd, vocab))]
        for i in range(self.block_count):
            out += [
                (f"blk.{i}.attn_norm.weight", (embd,)),
                (f"blk.{i}.attn_q.weight", (embd, embd)),
                (f"blk.{i}.attn_k.weight", (embd, kv)),
                (f"blk.{i}.attn_v.weight", (embd, kv)),
                (f"blk.{i}.attn_output.weight", (embd, embd)),
                (f"blk.{i}.ffn_norm.weight", (embd,)),
                (f"blk.{i}.ffn_gate.weight", (embd, ff)),
                (f"blk.{i}.ffn_up.weight", (embd, ff)),
                (f"blk.{i}.ffn_down.weight", (ff, embd)),
            ]
        out += [("output_norm.weight", (embd,)), ("output.weight", (embd, vocab))]
        return out


# The chat template shipped with Meta-Llama-3-8B-Instruct (tokenizer_config.json).
_LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

LLAMA3_8B = ModelSpec(
    name="Meta-Llama-3-8B-Instruct",
    architecture="llama",
    block_count=32,
    context_length=8192,
    embedding_length=4096,
    feed_forward_length=14336,
    head_count=32,
    head_count_kv=8,
    rope_freq_base=500000.0,
    rope_dimension_count=128,
    layer_norm_rms_epsilon=1e-5,
    vocab_size=128256,
    tokenizer_model="gpt2",
    tokenizer_pre="llama-bpe",
    n_merges=280147,
    bos_token_id=128000,  # <|begin_of_text|>
    eos_token_id=128009,  # <|eot_id|> (the Instruct fix; the base model says 128001)
    chat_template=_LLAMA3_CHAT_TEMPLATE,
    parameter_count=8_030_261_248,
    # QuantFactory's Q4_K_M (4,920,733,952 bytes) less its tensor data (4,912,898,048 bytes).
    header_bytes=7_835_904,
)

# Published sizes in bytes of Meta-Llama-3-8B-Instruct GGUFs, to check ours against. Exact
# byte counts where a Hub LFS pointer gave them, else the Hub's rounded GB (10^9) figure.
# Static (no imatrix) quants: QuantFactory/ and mradermacher/Meta-Llama-3-8B-Instruct-GGUF.
# bartowski/Meta-Llama-3-8B-Instruct-GGUF (imatrix) for the IQ types, and the same K-quant
# sizes to 0.01 GB: an imatrix changes the numbers in a tensor, not its type or size (except
# for a few rules: see tensor_type).
# The Hub shows 3 significant digits: "6.6 GB" means 6.55-6.65 GB.
REAL_SIZES: dict[str, int] = {
    "F16": 16_100_000_000,  # mradermacher f16: "16.1 GB"
    "Q8_0": 8_540_000_000,  # mradermacher/bartowski: "8.54 GB"
    "Q6_K": 6_600_000_000,  # mradermacher: "6.6 GB"
    "Q5_K_M": 5_730_000_000,  # mradermacher: "5.73 GB"
    "Q5_K_S": 5_600_000_000,  # mradermacher: "5.6 GB"
    "Q4_K_M": 4_920_733_952,  # QuantFactory LFS pointer
    "Q4_K_S": 4_690_000_000,  # mradermacher: "4.69 GB"
    "Q4_0": 4_660_000_000,  # QuantFactory: "4.66 GB"
    "Q3_K_L": 4_321_956_416,  # QuantFactory LFS pointer
    "Q3_K_M": 4_020_000_000,  # mradermacher/QuantFactory: "4.02 GB"
    "Q3_K_S": 3_660_000_000,  # mradermacher: "3.66 GB"
    "Q2_K": 3_180_000_000,  # mradermacher/QuantFactory/bartowski: "3.18 GB"
    "IQ4_XS": 4_480_000_000,  # mradermacher static: "4.48 GB" (bartowski imatrix: 4.45 GB)
    "IQ3_M": 3_780_000_000,  # mradermacher static, bartowski: "3.78 GB"
    "IQ2_XS": 2_610_000_000,  # bartowski (imatrix; IQ2_XS requires one): "2.61 GB"
}

# The whole ladder, largest first, and the set that is cheap enough to hash (see
# make_ladder_repo).
ladder_types = (
    "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0",
    "IQ4_XS", "Q3_K_L", "Q3_K_M", "IQ3_M", "Q3_K_S", "Q2_K", "IQ2_XS",
)  # fmt: skip
ladder_types_small = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")

# file type name -> (llama_ftype id, default GGML type of the quantized tensors), as
# llama_ftype_get_default_type in llama-quant.cpp.
FILE_TYPES: dict[str, tuple[int, Q]] = {
    "F32": (LlamaFileType.ALL_F32, Q.F32),
    "F16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "BF16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
    "Q5_K_M": (LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K),
    "Q5_K_S": (LlamaFileType.MOSTLY_Q5_K_S, Q.Q5_K),
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
    "Q4_K_S": (LlamaFileType.MOSTLY_Q4_K_S, Q.Q4_K),
    "Q4_0": (LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
    "Q3_K_L": (LlamaFileType.MOSTLY_Q3_K_L, Q.Q3_K),
    "Q3_K_M": (LlamaFileType.MOSTLY_Q3_K_M, Q.Q3_K),
    "Q3_K_S": (LlamaFileType.MOSTLY_Q3_K_S, Q.Q3_K),
    "Q2_K": (LlamaFileType.MOSTLY_Q2_K, Q.Q2_K),
    "IQ4_XS": (LlamaFileType.MOSTLY_IQ4_XS, Q.IQ4_XS),
    "IQ3_M": (LlamaFileType.MOSTLY_IQ3_M, Q.IQ3_S),
    "IQ2_XS": (LlamaFileType.MOSTLY_IQ2_XS, Q.IQ2_XS),
}

_UNQUANTIZED = {"F32", "F16", "BF16"}


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third
    layer in between."""
    n8 = n_layers // 8
    return i_layer < n8 or i_layer >= 7 * n_layers // 8 or (i_layer - n8) % 3 == 2


def _category(name: str) -> str:
    """tensor_get_category of llama-quant.cpp, for the tensors a llama model has."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for cat in ("attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{cat}.weight" in name:
            return cat
    for cat in ("ffn_up", "ffn_gate", "ffn_down"):
        if cat in name:
            return cat
    return "other"


def tensor_type(
    file_type: str,
    tensor_name: str,
    layer: int,
    n_layers: int,
    *,
    n_dims: int = 2,
    n_gqa: int = LLAMA3_8B.n_gqa,
    imatrix: bool = False,
) -> GGMLQuantizationType:
    """The GGML type llama-quantize gives ``tensor_name`` in a ``file_type`` file.

    A port of ``llama_tensor_get_type`` / ``llama_tensor_get_type_impl`` from llama.cpp's
    ``src/llama-quant.cpp`` (ggml-org/llama.cpp at commit
    007dbbf3fd17eefe9b47fee45f48f7ba5e62b714), restricted to what a dense llama model meets:
    no experts (n_expert <= 1), not Falcon, not the 70B special case, no user overrides
    (--pure, --tensor-type, --output-tensor-type, --token-embedding-type), an ``output.weight``
    of its own (untied embeddings). ``layer`` is the block index (ignored outside blocks); for
    a dense model llama.cpp's per-category counters (i_attention_wv, i_ffn_down, ...) equal it,
    since its tensor map is sorted by block. ``n_gqa`` is head_count / head_count_kv (4 for
    Llama 3 8B). ``imatrix`` only matters for the rules that test ``has_imatrix``.

    Checks: for Llama 3 8B the resulting bits per weight equal those of llama.cpp's own table
    for Llama 3.1 8B (tools/quantize/README.md) to 4 decimals, and the file sizes those of
    published files (made by 2024 versions of llama.cpp) to 0.2% (the Hub rounds sizes) or,
    where the exact size is known, to the byte.

    The rules, for the types covered (default type in brackets; 1-D tensors and norms stay F32,
    and every 4096- or 14336-wide row divides the block sizes, so no shape fallback applies):

    - F32/F16/BF16: not quantized, every 2-D tensor in that type.
    - output.weight: Q8_0 in Q8_0 files, Q5_K in IQ1_S/IQ1_M/IQ2_XXS/IQ2_XS/IQ2_S/IQ2_M/IQ3_XXS
      files, else Q6_K (k-quants, the other i-quants and Q4_0 alike).
    - token_embd.weight: Q2_K in IQ2_XXS/IQ2_XS/IQ1_* files, else the default type.
    - Q8_0 [Q8_0], Q6_K [Q6_K], Q5_K_S [Q5_K], Q3_K_S [Q3_K]: no other rule.
    - Q5_K_M [Q5_K], Q4_K_M [Q4_K]: attn_v and ffn_down Q6_K where use_more_bits(layer)
      (layer < n/8, layer >= 7n/8, or (layer - n/8) % 3 == 2: 16 of 32 layers).
    - Q4_K_S [Q4_K]: attn_v Q5_K for layers < 4, ffn_down Q5_K for layers < n/8.
    - Q4_0 [Q4_0]: ffn_down Q4_1 for layers < n/8, only with an imatrix.
    - Q3_K_L [Q3_K]: attn_v, attn_output, ffn_down Q5_K.
    - Q3_K_M [Q3_K]: attn_v Q5_K for layers < 2 else Q4_K; attn_output Q4_K; ffn_down Q5_K
      for layers < n/16 else Q4_K (the Q3_K branch is Falcon's only).
    - Q2_K [Q2_K]: attn_v Q4_K when n_gqa >= 4 else Q3_K; ffn_down Q3_K; attn_output Q3_K.
    - IQ4_XS [IQ4_XS]: attn_v Q5_K when n_gqa >= 4; ffn_down Q5_K for layers < n/8 without
      an imatrix.
    - IQ3_M [IQ3_S]: attn_v Q4_K; attn_output Q4_K; ffn_down Q4_K for layers < n/8.
    - IQ2_XS [IQ2_XS]: attn_v Q4_K when n_gqa >= 4 else Q2_K; ffn_down Q2_K for layers < n/8;
      token_embd Q2_K; output Q5_K. (llama-quantize refuses IQ2_XS without an imatrix, since
      IQ2_XS tensors require one, but no IQ2_XS rule looks at it, so the types are the same.)
    """
    if file_type not in FILE_TYPES:
        raise ValueError(f"unsupported file type {file_type!r}; known: {', '.join(FILE_TYPES)}")
    _, default = FILE_TYPES[file_type]
    # tensor_allows_quantization: only 2-D+ weights, never norms; they keep their source type,
    # F32 in every llama GGUF converted from Hugging Face.
    if n_dims < 2 or not tensor_name.endswith("weight") or "_norm.weight" in tensor_name:
        return Q.F32
    if file_type in _UNQUANTIZED:  # ggml_is_quantized(default_type) is false: no mixing
        return default

    ft = file_type
    cat = _category(tensor_name)
    new = default
    more_bits = _use_more_bits(layer, n_layers)
    iq2 = ft in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")

    if cat == "output":
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            new = Q.Q5_K
        elif new != Q.Q8_0:
            new = Q.Q6_K
    elif cat == "token_embd":
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            new = Q.Q2_K
        elif ft in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            new = Q.IQ3_S
    elif iq2:
        if cat == "attn_v":
            new = Q.Q4_K if n_gqa >= 4 else (Q.IQ3_S if ft in ("IQ2_S", "IQ2_M") else Q.Q2_K)
        elif cat == "ffn_down":
            if layer < n_layers // 8:
                new = Q.IQ3_S if ft in ("IQ2_S", "IQ2_M") else Q.Q2_K
        elif cat == "attn_output":
            if ft in ("IQ1_S", "IQ1_M"):
                new = Q.IQ2_XXS
            elif ft in ("IQ2_S", "IQ2_M"):
                new = Q.IQ3_S
    elif cat == "attn_v":
        if ft == "Q2_K":
            new = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
        elif ft == "IQ3_M":
            new = Q.Q4_K
        elif ft == "Q3_K_M":
            new = Q.Q5_K if layer < 2 else Q.Q4_K
        elif ft == "Q3_K_L" or ft in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            new = Q.Q5_K
        elif ft in ("Q4_K_M", "Q5_K_M") and more_bits:
            new = Q.Q6_K
        elif ft == "Q4_K_S" and layer < 4:
            new = Q.Q5_K
    elif cat == "ffn_down":
        if ft == "Q2_K":
            new = Q.Q3_K
        elif ft == "Q3_K_M":
            # "arch != FALCON || use_more_bits" is always true for llama: Q4_K
            new = Q.Q5_K if layer < n_layers // 16 else Q.Q4_K
        elif ft == "IQ3_M" and layer < n_layers // 8:
            new = Q.Q4_K
        elif ft == "Q3_K_L":
            new = Q.Q5_K
        elif ft == "Q4_K_M":
            if more_bits:
                new = Q.Q6_K
        elif layer < n_layers // 8 and ft in ("IQ4_NL", "IQ4_XS") and not imatrix:
            new = Q.Q5_K
        elif ft == "Q5_K_M" and more_bits:
            new = Q.Q6_K
        elif ft == "Q4_K_S" and layer < n_layers // 8:
            new = Q.Q5_K
        elif ft in ("Q4_0", "Q5_0") and imatrix and layer < n_layers // 8:
            new = Q.Q4_1 if ft == "Q4_0" else Q.Q5_1
    elif cat == "attn_output":
        if ft == "Q2_K":
            new = Q.Q3_K
        elif ft in ("Q3_K_M", "IQ3_M"):
            new = Q.Q4_K
        elif ft == "Q3_K_L":
            new = Q.Q5_K
    return new


def tensor_nbytes(qtype: GGMLQuantizationType, shape: Sequence[int]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    if n % block:
        raise ValueError(f"{n} elements are not a whole number of {qtype.name} blocks")
    return n // block * size


def _layer_of(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def ladder_tensors(
    file_type: str, spec: ModelSpec = LLAMA3_8B, *, imatrix: bool = False
) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]]:
    """(name, GGUF shape, type, bytes) of every tensor of a ``file_type`` file."""
    out = []
    for name, shape in spec.tensors():
        qtype = tensor_type(
            file_type, name, _layer_of(name), spec.block_count,
            n_dims=len(shape), n_gqa=spec.n_gqa, imatrix=imatrix,
        )  # fmt: skip
        out.append((name, shape, qtype, tensor_nbytes(qtype, shape)))
    return out


# --- the vocabulary, serialized once ------------------------------------------------------


class _Packed(Sequence[Any]):
    """A GGUF array whose elements are already serialized (the payload after the element
    type and count). ``_Writer`` emits it as is instead of packing element by element."""

    def __init__(self, element_type: GGUFValueType, count: int, payload: bytes) -> None:
        self.element_type, self.count, self.payload = element_type, count, payload

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: Any) -> Any:
        raise TypeError("a pre-packed GGUF array cannot be indexed")


class _Writer(GGUFWriter):
    def _pack_val(
        self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None
    ) -> bytes:
        if isinstance(val, _Packed):
            head = struct.pack("<I", GGUFValueType.ARRAY) if add_vtype else b""
            return head + struct.pack("<IQ", val.element_type, val.count) + val.payload
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _pack_strings(strings: Iterable[str]) -> bytes:
    parts = []
    for s in strings:
        b = s.encode()
        parts.append(len(b).to_bytes(8, "little"))
        parts.append(b)
    return b"".join(parts)


def _pack_rows(rows: np.ndarray) -> bytes:
    """Serialize the rows of a (n, length) uint8 array as n GGUF strings of that length."""
    n, length = rows.shape
    out = np.empty((n, 8 + length), dtype=np.uint8)
    out[:, :8] = np.frombuffer(np.uint64(length).tobytes(), dtype=np.uint8)
    out[:, 8:] = rows
    return out.tobytes()


def _pieces(ids: np.ndarray, tail: bytes = b"", pad: int = 0) -> np.ndarray:
    """Rows "Ġ" + 5 hex digits of the id + ``tail`` + ``pad`` times "y", as uint8 (vectorized:
    the Python-level loop of GGUFWriter is what this module avoids)."""
    if len(ids) and int(ids.max()) > 0xFFFFF:
        raise ValueError("ids above 0xFFFFF would not give distinct strings")
    hexdigits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    rows = np.empty((len(ids), 7 + len(tail) + pad), dtype=np.uint8)
    rows[:, :2] = np.frombuffer("\u0120".encode(), dtype=np.uint8)  # byte-level BPE's space
    for k in range(5):
        rows[:, 2 + k] = hexdigits[(ids >> (4 * (4 - k))) & 15]
    rows[:, 7 : 7 + len(tail)] = np.frombuffer(tail, dtype=np.uint8) if tail else 0
    rows[:, 7 + len(tail) :] = ord("y")
    return rows


def _llama3_specials() -> list[str]:
    """The 256 added tokens 128000-128255 of Llama 3, in id order."""
    named = {0: "begin_of_text", 1: "end_of_text", 6: "start_header_id", 7: "end_header_id",
             9: "eot_id"}  # fmt: skip
    out, reserved = [], 0
    for i in range(256):
        if i in named:
            out.append(f"<|{named[i]}|>")
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


# Synthetic stand-ins for Llama 3's byte-level BPE tokens and merges: distinct strings of
# typical lengths (tokens "Ġ" + a hex id: 7 bytes, as a real piece averages ~6.5). The merges
# are then padded so that the header is as long as the real one (ModelSpec.header_bytes).


@functools.cache
def _vocab_arrays(n_vocab: int) -> tuple[_Packed, _Packed]:
    specials = _llama3_specials() if n_vocab > 256 else []
    n_normal = n_vocab - len(specials)
    tokens = _pack_rows(_pieces(np.arange(n_normal))) + _pack_strings(specials)
    types = np.full(n_vocab, TokenType.NORMAL, dtype="<i4")
    types[n_normal:] = TokenType.CONTROL
    return (
        _Packed(GGUFValueType.STRING, n_vocab, tokens),
        _Packed(GGUFValueType.INT32, n_vocab, types.tobytes()),
    )


@functools.cache
def _merges_array(n_merges: int, extra_bytes: int = 0) -> _Packed:
    """``n_merges`` distinct merges ("Ġ01a2f x"), ``extra_bytes`` more in all, spread evenly."""
    each, rest = divmod(max(0, extra_bytes), n_merges)
    ids = np.arange(n_merges)
    payload = _pack_rows(_pieces(ids[:rest], b" x", each + 1))
    payload += _pack_rows(_pieces(ids[rest:], b" x", each))
    return _Packed(GGUFValueType.STRING, n_merges, payload)


def _header_size(w: GGUFWriter) -> int:
    """Bytes the writer's header will take, data-section padding excluded."""
    n = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
    for key, v in w.kv_data[0].items():
        n += 8 + len(key.encode()) + len(w._pack_val(v.value, v.type, True, v.sub_type))
    for name, ti in w.tensors[0].items():
        n += 8 + len(name.encode()) + 4 + 8 * len(ti.shape) + 4 + 8
    return n


# --- writing --------------------------------------------------------------------------------


def make_ladder_gguf(
    path: str | os.PathLike[str],
    file_type: str,
    *,
    spec: ModelSpec = LLAMA3_8B,
    imatrix: bool = False,
    extra_kv: dict[str, Any] | None = None,
) -> Path:
    """Write a ``file_type`` quantization of ``spec`` (Llama 3 8B Instruct) with a real header
    and a sparse hole for its tensor data; return the path.

    The file has the real file's full size (``st_size``) but only its header (7.8 MB, mostly
    the vocabulary) occupies disk. ``imatrix`` picks the tensor types llama-quantize chooses
    when given an importance matrix (only Q4_0 and IQ4_XS differ, in 4 ffn_down tensors).
    ``extra_kv`` adds or replaces metadata keys, as in ``ggufmake``.
    """
    if file_type not in FILE_TYPES:
        raise ValueError(f"unsupported file type {file_type!r}; known: {', '.join(FILE_TYPES)}")
    ftype_id, _ = FILE_TYPES[file_type]
    path = Path(path)
    tensors = ladder_tensors(file_type, spec, imatrix=imatrix)
    tokens, types = _vocab_arrays(spec.vocab_size)

    w = _Writer(path, spec.architecture)
    arch = spec.architecture
    w.add_name(spec.name)
    w.add_block_count(spec.block_count)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.embedding_length)
    w.add_feed_forward_length(spec.feed_forward_length)
    w.add_head_count(spec.head_count)
    w.add_head_count_kv(spec.head_count_kv)
    w.add_rope_freq_base(spec.rope_freq_base)
    w.add_layer_norm_rms_eps(spec.layer_norm_rms_epsilon)
    w.add_file_type(int(ftype_id))
    w.add_uint32(f"{arch}.vocab_size", spec.vocab_size)
    w.add_rope_dimension_count(spec.rope_dimension_count)
    w.add_tokenizer_model(spec.tokenizer_model)
    w.add_tokenizer_pre(spec.tokenizer_pre)
    w.add_key_value("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY)
    w.add_key_value("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY)
    w.add_key_value("tokenizer.ggml.merges", _merges_array(spec.n_merges), GGUFValueType.ARRAY)
    w.add_bos_token_id(spec.bos_token_id)
    w.add_eos_token_id(spec.eos_token_id)
    w.add_chat_template(spec.chat_template)
    w.add_quantization_version(2)
    for key, value in (extra_kv or {}).items():
        _add_value(w, key, value)

    for name, shape, qtype, nbytes in tensors:
        # add_tensor_info takes the numpy (row-major) shape: reversed GGUF order.
        w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes, qtype)
    if spec.header_bytes is not None:
        # Lengthen the merges so that the data starts where it does in the real files.
        short = spec.header_bytes - _header_size(w)
        if short > 0:
            merges = _merges_array(spec.n_merges, short)
            w.kv_data[0]["tokenizer.ggml.merges"] = GGUFValue(merges, GGUFValueType.ARRAY)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()

    align = w.data_alignment
    data_offset = -(-path.stat().st_size // align) * align
    data_bytes = sum(-(-nbytes // align) * align for *_, nbytes in tensors)
    os.truncate(path, data_offset + data_bytes)
    return path


def ladder_filename(file_type: str, spec: ModelSpec = LLAMA3_8B) -> str:
    return f"{spec.name}-{file_type}.gguf"


def make_ladder_repo(
    root: str | os.PathLike[str],
    owner: str = "test",
    repo: str = "llama3-8b",
    types: Sequence[str] = ladder_types,
    *,
    spec: ModelSpec = LLAMA3_8B,
) -> Path:
    """Write ``root/owner/repo/Meta-Llama-3-8B-Instruct-{TYPE}.gguf`` for each of ``types``
    (the layout ``qmgr.mirror`` serves as a Hub repo) and return the repo directory.

    Writing is cheap: all 16 types in ~0.6 s (plus ~0.5 s once per process to build the
    vocabulary), ~7.8 MB of disk each. Hashing is not: ``qmgr.mirror`` computes the sha256 and
    the git blob sha1 of a file on first listing or download, and a hole still reads as zeros.
    Measured here (2 cores; ``mirror.Digests.of``, sha256 + sha1): ~0.3 GB/s, so Q8_0 (8.5 GB)
    takes ~29 s, Q2_K (3.2 GB) ~14 s, ``ladder_types_small`` (33 GB) ~113 s, the whole
    ``ladder_types`` (~99 GB) ~5.5 min; sha256 alone runs at ~0.45 GB/s (Q8_0: ~19 s). So
    serve through the mirror only what a test needs, or test what needs no listing (qmgr's
    estimator and fit policy) on the files directly.
    """
    d = Path(root) / owner / repo
    d.mkdir(parents=True, exist_ok=True)
    for t in types:
        make_ladder_gguf(d / ladder_filename(t, spec), t, spec=spec)
    return d
