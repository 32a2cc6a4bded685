"""Built-in quantizer: llama.cpp's ``llama_model_quantize``, through llama-cpp-python.

llama-cpp-python is the optional ``qmgr[llama]`` extra and a native library, so it is imported
only inside :meth:`LlamaCppQuantizer.quantize`, which runs in a quantize worker process: the
daemon registers this plugin and lists its targets without loading any native code.

What it does per option, mirroring ``llama-quantize`` (tools/quantize/quantize.cpp):

- the target names a ``llama_ftype`` (Q4_K_M, IQ2_XS, ...); llama.cpp picks each tensor's type
  from it (k-quant mixes, fallbacks for widths that are not a multiple of 256);
- ``imatrix``: the importance matrix file (GGUF, as ``llama-imatrix`` or ``qmgr imatrix``
  writes it) is read by qmgr's bounded reader into the NULL-terminated
  ``llama_model_imatrix_data`` array that ``llama_model_quantize_params.imatrix`` points to,
  and its provenance goes into the output's ``quantize.imatrix.*`` keys, as the tool does;
- ``tensor_types``: regex -> type, the NULL-terminated ``tt_overrides`` array;
- ``token_embedding_type``, ``output_tensor_type``: GGML type names (Q8_0, F16, ...);
- ``leave_output``, ``pure``, ``allow_requantize``, ``threads``: the params' fields.

Before calling llama.cpp it refuses, with a message saying what to do: an already-quantized
source unless ``allow_requantize`` (quality compounds), and the types that llama.cpp will not
make without an importance matrix. While it runs, llama.cpp's log is captured: its per-tensor
lines (``[  12/ 236] blk.0.attn_q.weight - [...], type = ...``) become progress, and its last
lines become the error message if it fails. The previous log callback is restored after.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
import time
from collections.abc import Callable
from typing import Any

from qmgr import hookimpl
from qmgr.builtin.llama_digest import OutputDigest
from qmgr.builtin.llama_log import LlamaLog, cpu_count
from qmgr.plugin import (
    GGML_TYPES_BY_NAME,
    LLAMA_FILE_TYPES,
    GGUFError,
    GGUFHeader,
    ImatrixJob,
    QuantizeError,
    QuantizeJob,
    Quantizer,
    knob,
    read_header,
)

# The llama.cpp file types it makes, in llama-quantize's order (best first).
TARGET_NAMES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M",
    "Q4_K_S", "Q4_0", "Q4_1", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S", "IQ4_XS",
    "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
    "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0",
)
FTYPE_IDS: dict[str, int] = {name: i for i, name in LLAMA_FILE_TYPES.items()
                             if name in TARGET_NAMES}

# Targets that llama.cpp never makes without an importance matrix: their main tensor type is
# one tensor_requires_imatrix (src/llama-quant.cpp) names: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS,
# IQ2_S, or Q2_K in a Q2_K_S file. IQ3_XXS needs one only where a tensor keeps that type (on
# Gemma 3 270M none does: they all fall back); llama.cpp's own refusal covers it, before it
# writes anything, and is turned into the same message.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S"})

UNQUANTIZED = frozenset({"F32", "F16", "BF16"})

# GGML types a tensor can be quantized to (ggml_quantize_chunk), for the per-tensor options.
TENSOR_TYPES = frozenset({
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
    "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
    "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4", "Q1_0",
})

# "[  12/ 236] blk.0.attn_q.weight - [ 640, 1024, 1, 1], type = ..." (one log call)
TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
FALLBACK_LINE = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback")
IMATRIX_ERRORS = ("requires an imatrix", "requires an importance matrix",
                  "Missing importance matrix")

KV_STR_MAX = 127  # llama_model_kv_override.val_str is char[128]


def imatrix_hint(target: str) -> str:
    return (f"{target} needs an importance matrix (without one llama.cpp's low-bit types "
            "are garbage). Make one from a few thousand tokens of representative text, then "
            "pass it:\n"
            "  qmgr imatrix REF --text FILE\n"
            f"  qmgr quantize REF --to {target} --imatrix")


class LlamaCppQuantizer:
    """Quantizes with llama.cpp (llama-cpp-python's ``llama_model_quantize``)."""

    name = "llama.cpp"
    supported_options = frozenset({
        "imatrix", "leave_output", "pure", "allow_requantize", "tensor_types",
        "token_embedding_type", "output_tensor_type", "threads",
    })
    # Its output is hashed as llama.cpp writes it (llama_digest): the daemon trusts that digest.
    reports_digest = True

    @property
    def version(self) -> str:
        """llama-cpp-python's version (it pins the llama.cpp it vendors), from package metadata:
        the daemon reads it without loading native code. The build llama.cpp reports is in
        each result (``llama_cpp_build``)."""
        try:
            return importlib.metadata.version("llama-cpp-python")
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    def targets(self) -> list[str]:
        return list(TARGET_NAMES)

    def compute_imatrix(self, job: ImatrixJob) -> dict[str, Any]:
        """An importance matrix, collected through llama.cpp's eval callback (imatrix.py)."""
        from qmgr.builtin.imatrix import compute_imatrix

        return compute_imatrix(job.src, job.text, job.dst, n_ctx=job.n_ctx,
                               n_threads=job.threads, dataset=job.dataset,
                               progress=job.progress, cancel=job.cancel)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        target = job.target.upper()
        if target not in FTYPE_IDS:
            raise QuantizeError(f"llama.cpp cannot make {job.target!r}; it makes: "
                                f"{', '.join(TARGET_NAMES)}", code="bad_target")
        opts = job.options
        unsupported = opts.used() - self.supported_options
        if unsupported:
            raise QuantizeError(f"the llama.cpp quantizer has no option "
                                f"{', '.join(sorted(unsupported))}", code="bad_option")
        if job.src_facts and "tensor_types" in job.src_facts:  # the catalog read the header
            quantized = quant_type_from_facts(job.src_facts)
        else:
            quantized = source_quant_type(_read_source(job.src))
        if quantized and not opts.allow_requantize:
            raise QuantizeError(
                f"{job.src.name} is already quantized ({quantized}). Quantizing it again to "
                f"{target} compounds the rounding errors: the result is worse than the same "
                "type made from a 16-bit source. Quantize an F16/BF16/F32 variant of the model "
                "instead, or pass allow_requantize (--allow-requantize) to go on anyway.",
                code="requantize_refused")
        if target in NEEDS_IMATRIX and opts.imatrix is None:
            raise QuantizeError(imatrix_hint(target), code="imatrix_required")
        tensor_types = {pattern: parse_tensor_type(type_name, "tensor_types")
                        for pattern, type_name in opts.tensor_types.items()}
        for pattern in tensor_types:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise QuantizeError(f"tensor_types: {pattern!r} is not a regular expression "
                                    f"({exc})", code="bad_option") from exc

        try:
            import llama_cpp
        except ImportError as exc:
            raise QuantizeError("the llama.cpp quantizer needs llama-cpp-python: "
                                "pip install 'qmgr[llama]'",
                                code="quantizer_unavailable") from exc

        keep: list[Any] = []  # everything the params point to, alive until the call returns
        params = llama_cpp.llama_model_quantize_default_params()
        params.nthread = opts.threads or cpu_count()
        params.ftype = FTYPE_IDS[target]
        params.allow_requantize = opts.allow_requantize
        params.quantize_output_tensor = not opts.leave_output
        params.pure = opts.pure
        if opts.token_embedding_type:
            params.token_embedding_type = parse_tensor_type(opts.token_embedding_type,
                                                            "token_embedding_type")
        if opts.output_tensor_type:
            params.output_tensor_type = parse_tensor_type(opts.output_tensor_type,
                                                          "output_tensor_type")
        if tensor_types:
            overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
            for i, (pattern, type_id) in enumerate(tensor_types.items()):
                encoded = pattern.encode()
                keep.append(encoded)
                overrides[i].pattern = encoded
                overrides[i].type = type_id
            overrides[len(tensor_types)].type = llama_cpp.GGML_TYPE_COUNT  # pattern NULL: end
            keep.append(overrides)
            params.tt_overrides = overrides
        imatrix_entries = 0
        kv_items: list[tuple[str, str | int]] = []
        if opts.imatrix is not None:
            from qmgr.builtin.imatrix import read_imatrix

            imatrix = read_imatrix(opts.imatrix)
            imatrix_entries = len(imatrix.means)
            params.imatrix = _imatrix_array(llama_cpp, imatrix.means, keep)
            kv_items = _override_items([
                ("quantize.imatrix.file", opts.imatrix.name),
                ("quantize.imatrix.dataset", imatrix.datasets[0] if imatrix.datasets else None),
                ("quantize.imatrix.entries_count", imatrix_entries),
                ("quantize.imatrix.chunks_count", imatrix.chunk_count or None),
            ])
            params.kv_overrides = _kv_overrides(llama_cpp, kv_items, keep)

        seen: set[str] = set()

        def on_text(piece: str) -> None:
            m = TENSOR_LINE.match(piece.lstrip())
            if m:
                i, n = int(m[1]), int(m[2])
                seen.add(m[3])
                job.progress(i / n if n else None, m[3])

        started = time.monotonic()
        llama_cpp.llama_backend_init()
        log = LlamaLog(on_text)
        digest = OutputDigest(llama_cpp, job.src, job.dst, params, kv_items) \
            if knob("QMGR_HASH_WHILE_WRITING") else None
        with log:
            if digest is not None:
                digest.start(log)
            try:
                rc = llama_cpp.llama_model_quantize(os.fsencode(job.src), os.fsencode(job.dst),
                                                    ctypes.byref(params))
            finally:
                if digest is not None:
                    digest.wait_predicted()  # its log comes through this LlamaLog
        hashed = digest.finish() if digest is not None else None
        if rc != 0:
            job.dst.unlink(missing_ok=True)  # llama.cpp may have begun writing it
            tail = log.tail()
            if any(marker in tail for marker in IMATRIX_ERRORS):
                if opts.imatrix is not None:
                    raise QuantizeError(
                        f"the importance matrix {opts.imatrix.name} lacks data for tensors "
                        f"that {target} needs it for (was it made from another model?):\n{tail}",
                        code="imatrix_mismatch")
                raise QuantizeError(f"llama.cpp refused: {imatrix_hint(target)}\n\n{tail}",
                                    code="imatrix_required")
            raise QuantizeError(f"llama.cpp could not quantize {job.src.name} to {target}:\n"
                                f"{tail}")
        if log.errors:
            raise log.errors[0]
        fallback = next((int(m[1]) for line in log.lines if (m := FALLBACK_LINE.search(line))),
                        0)
        return {
            "tensors": len(seen),
            "fallback_tensors": fallback,
            "imatrix_entries": imatrix_entries,
            "llama_cpp_build": llama_cpp.llama_version().decode("utf-8", "replace"),
            "seconds": round(time.monotonic() - started, 2),
            # Hashed while written (see llama_digest); the worker hands it to the daemon.
            **({"output_sha256": hashed[0], "output_size": hashed[1],
                "output_facts": hashed[2]} if hashed else {}),
        }


def quant_type_from_facts(facts: dict[str, Any]) -> str | None:
    """:func:`source_quant_type` from the catalog's facts of the source (``file_type`` and
    ``tensor_types``, as qmgr read them from its header)."""
    file_type = facts.get("file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        name = LLAMA_FILE_TYPES.get(file_type, f"file type {file_type}")
        if name not in UNQUANTIZED:
            return name
    return next((t for t in facts["tensor_types"] if t not in UNQUANTIZED), None)


def source_quant_type(header: GGUFHeader) -> str | None:
    """The source's quantized type (its file type, else its first quantized tensor's type),
    or None when all of it is F32/F16/BF16."""
    file_type = header.metadata.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        name = LLAMA_FILE_TYPES.get(file_type, f"file type {file_type}")
        if name not in UNQUANTIZED:
            return name
    return next((t.type_name for t in header.tensors if t.type_name not in UNQUANTIZED), None)


def parse_tensor_type(name: str, option: str) -> int:
    """A GGML type name (any case) -> its id, for the per-tensor options."""
    key = name.strip().upper()
    if key not in TENSOR_TYPES:
        raise QuantizeError(f"{option}: {name!r} is not a type llama.cpp quantizes to; one of "
                            f"{', '.join(sorted(TENSOR_TYPES))}", code="bad_option")
    return GGML_TYPES_BY_NAME[key].id


def _read_source(path: Any) -> GGUFHeader:
    try:
        return read_header(path)
    except GGUFError as exc:
        raise QuantizeError(exc.message, code=exc.code) from exc
    except OSError as exc:
        raise QuantizeError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _imatrix_array(llama_cpp: Any, means: dict[str, Any], keep: list[Any]) -> Any:
    """The NULL-terminated ``llama_model_imatrix_data`` array (llama.cpp copies the values)."""
    array = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    for i, (name, values) in enumerate(means.items()):
        encoded = name.encode()
        keep.extend((encoded, values))
        array[i].name = encoded
        array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = values.size
    keep.append(array)
    return array


def _override_items(items: list[tuple[str, str | int | None]]) -> list[tuple[str, str | int]]:
    """Key-value overrides as llama.cpp will store them: None left out, strings cut to fit."""
    return [(k, v if isinstance(v, int) else
             v.encode()[:KV_STR_MAX].decode("utf-8", "ignore"))
            for k, v in items if v is not None]


def _kv_overrides(llama_cpp: Any, present: list[tuple[str, str | int]],
                  keep: list[Any]) -> Any:
    """A ``llama_model_kv_override`` array ended by an empty key."""
    array = (llama_cpp.llama_model_kv_override * (len(present) + 1))()
    for o, (key, value) in zip(array, present, strict=False):
        o.key = key.encode()
        if isinstance(value, int):
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            o.value.val_i64 = value
        else:
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            o.value.val_str = value.encode()
    keep.append(array)
    return array


@hookimpl
def register_quantizers(register: Callable[[Quantizer], None]) -> None:
    register(LlamaCppQuantizer())
