"""Model facts derived from a GGUF header: what a person (or the catalog) wants to know."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from qmgr.errors import GGUFError
from qmgr.gguf.reader import ArraySummary, GGUFHeader, read_header
from qmgr.gguf.types import LLAMA_FILE_TYPES


@dataclass(slots=True)
class ModelFacts:
    architecture: str | None
    name: str | None
    file_type: int | None  # general.file_type (a llama_ftype id)
    quant_type: str | None  # its name ("Q4_K_M"), or a guess from the tensor types when absent
    tensor_types: dict[str, int]  # GGML type name -> number of tensors, most bytes first
    tensor_bytes: dict[str, int]  # GGML type name -> bytes of tensor data
    parameter_count: int
    tensor_data_bytes: int
    bits_per_weight: float
    block_count: int | None
    context_length: int | None
    embedding_length: int | None
    feed_forward_length: int | list[int] | None  # a list when given per layer
    head_count: int | list[int] | None
    head_count_kv: int | list[int] | None
    key_length: int | None
    value_length: int | None
    sliding_window: int | None
    sliding_window_pattern: Any  # whatever the file says (int, per-layer bools, ...)
    vocab_size: int | None
    split_no: int | None
    split_count: int | None
    split_tensors_count: int | None
    file_size: int
    header_bytes: int
    version: int

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, ArraySummary):
        return value.to_dict()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str(meta: dict[str, Any], key: str) -> str | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise GGUFError(f"metadata key {key!r} should be a string, got {value!r}")
    return value


def _int(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(key)
    if value is not None and not _is_int(value):
        raise GGUFError(f"metadata key {key!r} should be an integer, got {value!r}")
    return value


def _int_or_list(meta: dict[str, Any], key: str) -> int | list[int] | None:
    value = meta.get(key)
    if value is None or _is_int(value):
        return value
    if isinstance(value, list) and all(_is_int(v) for v in value):
        return value
    raise GGUFError(f"metadata key {key!r} should be an integer or a list of integers")


def _heads(value: int | list[int] | None) -> int | None:
    """The head count to derive head sizes from: per-layer lists (hybrid models give 0 for
    layers without attention) use their first attention layer."""
    if isinstance(value, list):
        return next((v for v in value if v), None)
    return value


def facts_from_header(header: GGUFHeader) -> ModelFacts:
    meta = header.metadata
    arch = _str(meta, "general.architecture")
    # Without an architecture there are no architecture-scoped keys to look up.
    scoped = meta if arch else {}
    prefix = f"{arch}."

    counts: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for t in header.tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
        nbytes[t.type_name] = nbytes.get(t.type_name, 0) + t.n_bytes
    order = sorted(nbytes, key=lambda n: (-nbytes[n], n))
    params = sum(t.n_elements for t in header.tensors)
    data_bytes = sum(nbytes.values())

    file_type = _int(meta, "general.file_type")
    quant_type = LLAMA_FILE_TYPES.get(file_type) if file_type is not None else None
    if quant_type is None and order:
        # No (known) file type: name it after the type holding most of the weights.
        quant_type = next((n for n in order if n != "F32"), order[0])

    embd = _int(scoped, prefix + "embedding_length")
    head_count = _int_or_list(scoped, prefix + "attention.head_count")
    n_head = _heads(head_count)
    default_head_dim = embd // n_head if embd is not None and n_head else None
    key_length = _int(scoped, prefix + "attention.key_length")
    value_length = _int(scoped, prefix + "attention.value_length")

    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, ArraySummary):
        vocab_size: int | None = tokens.count
    elif isinstance(tokens, list):
        vocab_size = len(tokens)
    else:
        vocab_size = _int(scoped, prefix + "vocab_size")

    return ModelFacts(
        architecture=arch,
        name=_str(meta, "general.name"),
        file_type=file_type,
        quant_type=quant_type,
        tensor_types={n: counts[n] for n in order},
        tensor_bytes={n: nbytes[n] for n in order},
        parameter_count=params,
        tensor_data_bytes=data_bytes,
        bits_per_weight=8 * data_bytes / params if params else 0.0,
        block_count=_int(scoped, prefix + "block_count"),
        context_length=_int(scoped, prefix + "context_length"),
        embedding_length=embd,
        feed_forward_length=_int_or_list(scoped, prefix + "feed_forward_length"),
        head_count=head_count,
        head_count_kv=_int_or_list(scoped, prefix + "attention.head_count_kv"),
        key_length=key_length if key_length is not None else default_head_dim,
        value_length=value_length if value_length is not None else default_head_dim,
        sliding_window=_int(scoped, prefix + "attention.sliding_window"),
        sliding_window_pattern=scoped.get(prefix + "attention.sliding_window_pattern"),
        vocab_size=vocab_size,
        split_no=_int(meta, "split.no"),
        split_count=_int(meta, "split.count"),
        split_tensors_count=_int(meta, "split.tensors.count"),
        file_size=header.file_size,
        header_bytes=header.header_bytes,
        version=header.version,
    )


def inspect(path: str | os.PathLike[str]) -> ModelFacts:
    """Read the header of a local GGUF file and derive its facts."""
    return facts_from_header(read_header(path))
