"""Model facts derived from a GGUF header: what a person (or the catalog) wants to know."""

from __future__ import annotations

import math
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


# What sense allows, far beyond any model there is: a header is untrusted input, and these
# counts size what qmgr allocates and loops over (the estimator makes per-layer lists).
MAX_BLOCKS = 4096  # the deepest published models have ~128 layers
MAX_HEADS = 1 << 16
MAX_WIDTH = 1 << 22  # embedding and feed-forward lengths, head sizes
MAX_CONTEXT = 1 << 28  # 268M tokens; the longest claimed today is 10M
MAX_SPLITS = 99_999  # gguf-split numbers its files with five digits
MAX_FILE_TYPE = 1 << 16


def _bounded(meta: dict[str, Any], key: str, value: Any, low: int, high: int) -> None:
    """Refuse a count the file cannot mean (each element of a per-layer list too)."""
    for v in value if isinstance(value, list) else [value]:
        if v is not None and not low <= v <= high:
            raise GGUFError(f"metadata key {key!r} is {v}, outside what a model can have "
                            f"({low} to {high}): the header is damaged or crafted")


def _check_counts(meta: dict[str, Any], header: GGUFHeader, prefix: str) -> None:
    blocks = _int(meta, prefix + "block_count")
    split_count = _int(meta, "split.count")
    total_tensors = _int(meta, "split.tensors.count")
    _bounded(meta, "split.count", split_count, 1, MAX_SPLITS)
    _bounded(meta, "split.no", _int(meta, "split.no"), 0, (split_count or 1) - 1)
    if total_tensors is not None:
        _bounded(meta, "split.tensors.count", total_tensors, len(header.tensors), 1 << 24)
    # Every block holds at least one tensor: a whole file cannot have more blocks than tensors.
    most = total_tensors if total_tensors is not None else (
        len(header.tensors) if not split_count or split_count == 1 else MAX_BLOCKS)
    _bounded(meta, prefix + "block_count", blocks, 0, min(MAX_BLOCKS, max(most, 1)))
    for key in ("attention.head_count", "attention.head_count_kv"):
        value = _int_or_list(meta, prefix + key)
        _bounded(meta, prefix + key, value, 0, MAX_HEADS)
        if isinstance(value, list) and blocks is not None and len(value) > max(blocks, 1):
            raise GGUFError(f"metadata key {prefix + key!r} lists {len(value)} layers, the "
                            f"model has {blocks}")
    for key in ("embedding_length", "feed_forward_length", "attention.key_length",
                "attention.value_length", "attention.sliding_window"):
        _bounded(meta, prefix + key, _int_or_list(meta, prefix + key), 0, MAX_WIDTH)
    _bounded(meta, prefix + "context_length", _int(meta, prefix + "context_length"), 0,
             MAX_CONTEXT)
    _bounded(meta, "general.file_type", _int(meta, "general.file_type"), 0, MAX_FILE_TYPE)


def _finite(value: Any) -> Any:
    """A value fit for JSON: NaN and infinities (which a crafted header may hold) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def facts_from_header(header: GGUFHeader) -> ModelFacts:
    meta = header.metadata
    arch = _str(meta, "general.architecture")
    # Without an architecture there are no architecture-scoped keys to look up.
    scoped = meta if arch else {}
    prefix = f"{arch}."
    _check_counts(meta, header, prefix)

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
        sliding_window_pattern=_finite(scoped.get(prefix + "attention.sliding_window_pattern")),
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
