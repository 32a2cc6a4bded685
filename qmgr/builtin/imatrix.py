"""Importance matrices: computed with llama-cpp-python, stored in llama.cpp's GGUF format.

An importance matrix says, for each weight matrix ``W`` that the model multiplies with
activations (``W @ x``), how large each input column's activations are on real text: the mean
of ``x_j**2`` over the calibration tokens, one value per input column ``j`` (per expert for
mixture-of-experts tensors). Low-bit quantizers weigh each column's rounding error by it, which
is what keeps IQ2/IQ1 types usable and makes Q2_K-Q4_K measurably better.

Collection follows llama.cpp's ``tools/imatrix/imatrix.cpp`` (``IMatrixCollector::
collect_imatrix``): the context's scheduler callback (``cb_eval``) is asked about every node of
the compute graph; we claim the ``MUL_MAT`` nodes whose weight is a layer's (``blk.*``) and
whose activations are F32 with at least 16 rows, and every ``MUL_MAT_ID`` node; when the node
has run, we add the squares of its activations (``src[1]``) to that weight's sums and count the
rows. The text is cut into chunks of ``n_ctx`` tokens (a shorter tail is left out), each
evaluated as one batch from an empty cache with a BOS token first and every token marked as an
output, as the tool does: asking for fewer outputs would let llama.cpp drop rows before the
last layer's feed-forward. Unlike the tool we stop each chunk's graph after its last weight
matmul (see :class:`Collector`), which skips the vocabulary-sized output matmul; the logits
buffer (n_ctx x vocabulary floats, 512 MiB for Gemma 3 at n_ctx 512) is still allocated.

The file is what ``llama-imatrix`` writes: keys ``general.type = "imatrix"``,
``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``; per weight
``<name>.in_sum2`` (F32, ne = [n_in * n_mat / n_counts, n_counts]) and ``<name>.counts``
(F32, ne = [1, n_counts]); ``llama-quantize --imatrix`` reads it. Its reader here is bounded
(the header through :func:`qmgr.gguf.read_header`, data by known extents), since an imatrix may
come from anywhere.

``ggml_tensor`` is not exposed by llama-cpp-python, so its layout is declared below for the
ggml that llama-cpp-python 0.3.36 vendors (``ggml/include/ggml.h``) and checked on the first
node against ggml's own accessors; a layout change fails loudly instead of reading garbage.
Activations are read in place when they are in host memory (a CPU build); on a GPU they are
copied out with ``ggml_backend_tensor_get`` first, as the tool does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from qmgr.plugin import GGUFError, QuantizeError, read_header

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM2_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"

# ggml.h at the llama.cpp commit llama-cpp-python 0.3.36 vendors.
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_OP_MUL_MAT = 29
GGML_OP_MUL_MAT_ID = 30
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26
MIN_ROWS = 16  # the tool ignores smaller batches (token generation steps)


class GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h); only read, never written."""


GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


@dataclasses.dataclass
class Stats:
    """Running sums for one weight: ``values`` (n_mat * n_in sums of squares, flat, float64)
    and ``counts`` (rows seen; one per expert for MUL_MAT_ID, else one)."""

    values: np.ndarray
    counts: np.ndarray


@dataclasses.dataclass
class Imatrix:
    """An importance matrix file, read: ``means`` is what the quantizer gets."""

    means: dict[str, np.ndarray]  # weight name -> float32 mean squared activations
    datasets: list[str]
    chunk_count: int
    chunk_size: int


def weight_name(name: bytes) -> str:
    """The model weight behind a graph tensor name: ``CUDA0#blk.0.attn_k.weight#0`` ->
    ``blk.0.attn_k.weight`` (the scheduler's copies carry a backend prefix)."""
    text = name.decode("utf-8", "replace")
    _, sep, rest = text.partition("#")
    return rest.partition("#")[0] if sep else text


# -- accumulation (pure numpy: the callback gives it arrays) ---------------------------------


def accumulate_dense(stats: dict[str, Stats], name: str, x: np.ndarray,
                     src0_ne: tuple[int, int, int, int]) -> None:
    """Add a MUL_MAT's activations ``x`` (numpy shape (ne3, ne2, ne1, ne0): ne1 rows of ne0
    inputs) for weight ``name`` of ggml shape ``src0_ne``. A 3D/4D weight is n_mat matrices;
    activation slice (i3, i2) meets matrix (i3 % ne3w) * ne2w + (i2 % ne2w)."""
    ne3, ne2, ne1, ne0 = x.shape
    n_mat = src0_ne[2] * src0_ne[3]
    e = stats.get(name)
    if e is None:
        e = stats[name] = Stats(np.zeros(ne0 * n_mat), np.zeros(1, dtype=np.int64))
    elif e.values.size != ne0 * n_mat:
        raise QuantizeError(f"inconsistent activation size for {name}: "
                            f"{e.values.size} vs {ne0 * n_mat}", code="imatrix_failed")
    if e.counts.size > 1 and np.all(e.counts == e.counts[0]):
        e.counts = e.counts[:1].copy()
    sums = np.einsum("abij,abij->abj", x, x, dtype=np.float64)  # (ne3, ne2, ne0)
    acc = e.values.reshape(n_mat, ne0)
    for i3 in range(ne3):
        for i2 in range(ne2):
            acc[(i3 % src0_ne[3]) * src0_ne[2] + (i2 % src0_ne[2])] += sums[i3, i2]
    if not np.all(np.isfinite(acc)):
        raise QuantizeError(f"non-finite activations in {name}", code="imatrix_failed")
    e.counts += ne1 * ne2 * ne3 // n_mat


def accumulate_experts(stats: dict[str, Stats], name: str, x: np.ndarray, ids: np.ndarray,
                       n_experts: int) -> None:
    """Add a MUL_MAT_ID's activations for expert weight ``name``: ``x`` has numpy shape
    (n_tokens, ne1, ne0) (ne1 is 1 when every chosen expert gets the same row, else one row
    per chosen expert), ``ids`` (n_tokens, n_used) the experts each token was routed to."""
    n_tokens, ne1, ne0 = x.shape
    e = stats.get(name)
    if e is not None and e.counts.size == 1 and n_experts > 1:
        e.counts = np.full(n_experts, e.counts[0], dtype=np.int64)
    if e is None:
        e = stats[name] = Stats(np.zeros(ne0 * n_experts), np.zeros(n_experts, dtype=np.int64))
    elif e.values.size != ne0 * n_experts or e.counts.size != n_experts:
        raise QuantizeError(f"inconsistent expert data for {name}", code="imatrix_failed")
    if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
        raise QuantizeError(f"expert id out of range in {name}", code="imatrix_failed")
    acc = e.values.reshape(n_experts, ne0)
    for idx in range(ids.shape[1]):
        rows = x[:, idx % ne1, :].astype(np.float64)
        np.add.at(acc, ids[:, idx], rows * rows)
        np.add.at(e.counts, ids[:, idx], 1)
    touched = np.unique(ids)
    if not np.all(np.isfinite(acc[touched])):
        raise QuantizeError(f"non-finite activations in {name}", code="imatrix_failed")


# -- the scheduler callback ------------------------------------------------------------------


class _Ggml:
    """The few ggml functions the collector needs, from the library llama_cpp loaded (its
    dependencies are searched too: libggml-base comes with libllama)."""

    def __init__(self, lib: ctypes.CDLL):
        p = ctypes.c_void_p
        self.op_name = _fn(lib, "ggml_op_name", ctypes.c_char_p, [ctypes.c_int])
        self.op_desc = _fn(lib, "ggml_op_desc", ctypes.c_char_p, [p])
        self.get_name = _fn(lib, "ggml_get_name", p, [p])
        self.get_data = _fn(lib, "ggml_get_data", p, [p])
        self.nelements = _fn(lib, "ggml_nelements", ctypes.c_int64, [p])
        self.nbytes = _fn(lib, "ggml_nbytes", ctypes.c_size_t, [p])
        self.buffer_is_host = _fn(lib, "ggml_backend_buffer_is_host", ctypes.c_bool, [p])
        self.tensor_get = _fn(lib, "ggml_backend_tensor_get", None,
                              [p, p, ctypes.c_size_t, ctypes.c_size_t])
        for op, expected in ((GGML_OP_MUL_MAT, b"MUL_MAT"), (GGML_OP_MUL_MAT_ID, b"MUL_MAT_ID")):
            if self.op_name(op) != expected:
                raise QuantizeError(
                    f"this llama.cpp build numbers its ops differently (op {op} is "
                    f"{self.op_name(op)!r}, not {expected!r}): qmgr's imatrix collector needs "
                    "updating for it", code="imatrix_unsupported")

    def check_layout(self, ptr: int) -> None:
        """Compare our reading of one tensor with ggml's accessors."""
        t = GGMLTensor.from_address(ptr)
        ours = (ptr + GGMLTensor.name.offset, t.data or None, math.prod(t.ne), t.op)
        theirs = (self.get_name(ptr), self.get_data(ptr), self.nelements(ptr), t.op)
        desc = self.op_desc(ptr)
        if ours != theirs or (t.op in (GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID)
                              and desc != self.op_name(t.op)):
            raise QuantizeError(
                "this llama.cpp build's ggml_tensor layout differs from the one qmgr's imatrix "
                "collector declares: it needs updating", code="imatrix_unsupported")

    def host_bytes(self, t: GGMLTensor) -> tuple[int, Any]:
        """Address of the tensor's bytes in host memory, and the copy that holds them when
        they were on a device (keep it while reading)."""
        if not t.buffer or self.buffer_is_host(t.buffer):
            return t.data, None
        n = self.nbytes(ctypes.addressof(t))
        copy = ctypes.create_string_buffer(n)
        self.tensor_get(ctypes.addressof(t), copy, 0, n)
        return ctypes.addressof(copy), copy


def _fn(lib: ctypes.CDLL, name: str, restype: Any, argtypes: list[Any]) -> Any:
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = argtypes
    return f


def _view(address: int, dtype: type, ne: Any, nb: Any, dims: int) -> np.ndarray:
    """A numpy view (outermost dimension first) of a ggml tensor's first ``dims`` dims; valid
    only while the callback runs."""
    shape = tuple(int(ne[i]) for i in reversed(range(dims)))
    strides = tuple(int(nb[i]) for i in reversed(range(dims)))
    if 0 in shape:
        return np.zeros(shape, dtype)
    extent = sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    raw = (ctypes.c_char * (extent + np.dtype(dtype).itemsize)).from_address(address)
    return np.ndarray(shape, dtype, buffer=memoryview(raw), strides=strides)


class Collector:
    """The ``cb_eval`` callback: claims weight matmuls, then accumulates their activations.

    Answering False after a node cancels the rest of the graph (ggml-backend.h). We do that
    on purpose after the graph's last weight matmul, once the first chunk has shown how many
    there are: what follows (the output norm and the vocabulary-sized output matmul, about
    half the work for a small model with a large vocabulary) adds nothing to the matrix, and
    the logits it would make are not read. An exception must not escape into C (ctypes would
    print it and answer False), so the first one is kept in ``error`` and every later call
    answers False; the caller raises it after ``llama_decode``.
    """

    def __init__(self, ggml: _Ggml, cancel: threading.Event | None):
        self.ggml = ggml
        self.cancel = cancel
        self.stats: dict[str, Stats] = {}
        self.error: BaseException | None = None
        self.checked = False
        self.per_graph: int | None = None  # weight matmuls in one chunk's graph
        self.in_graph = 0

    def __call__(self, ptr: int, ask: bool, user_data: int) -> bool:
        if self.error is not None:
            return False
        try:
            t = GGMLTensor.from_address(ptr)
            if not self.checked:  # until a MUL_MAT has been checked, op included
                self.ggml.check_layout(ptr)
                self.checked = t.op == GGML_OP_MUL_MAT
            if ask:
                return self.wants(t)
            if self.cancel is not None and self.cancel.is_set():
                raise QuantizeError("cancelled", code="cancelled")
            self.collect(t)
            self.in_graph += 1
            return self.per_graph is None or self.in_graph < self.per_graph
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            self.error = exc
            return False

    def graph_done(self) -> None:
        if self.per_graph is None:
            self.per_graph = self.in_graph
        self.in_graph = 0

    def wants(self, t: GGMLTensor) -> bool:
        if t.op == GGML_OP_MUL_MAT_ID:
            return True
        if t.op != GGML_OP_MUL_MAT:
            return False
        src0, src1 = t.src[0], t.src[1]
        if not src0 or not src1:
            return False
        if src1.contents.ne[1] < MIN_ROWS or src1.contents.type != GGML_TYPE_F32:
            return False
        return weight_name(src0.contents.name).startswith("blk.")

    def collect(self, t: GGMLTensor) -> None:
        src0 = t.src[0].contents
        src1 = t.src[1].contents
        if src1.type != GGML_TYPE_F32 or src1.nb[0] != 4:
            raise QuantizeError(f"unexpected activations for {weight_name(src0.name)}",
                                code="imatrix_failed")
        address, _keep = self.ggml.host_bytes(src1)
        name = weight_name(src0.name)
        if t.op == GGML_OP_MUL_MAT_ID:
            ids_t = t.src[2].contents
            if ids_t.type != GGML_TYPE_I32 or ids_t.ne[1] != src1.ne[2] or src1.ne[3] != 1:
                raise QuantizeError(f"unexpected expert routing for {name}",
                                    code="imatrix_failed")
            ids_address, _keep_ids = self.ggml.host_bytes(ids_t)
            ids = _view(ids_address, np.int32, ids_t.ne, ids_t.nb, 2)  # (n_tokens, n_used)
            x = _view(address, np.float32, src1.ne, src1.nb, 3)  # (n_tokens, ne1, ne0)
            accumulate_experts(self.stats, name, x, ids, int(src0.ne[2]))
        else:
            x = _view(address, np.float32, src1.ne, src1.nb, 4)
            ne = src0.ne
            accumulate_dense(self.stats, name, x, (ne[0], ne[1], ne[2], ne[3]))


# -- computing -------------------------------------------------------------------------------


def compute_imatrix(model_path: str | os.PathLike[str], text: str,
                    out_path: str | os.PathLike[str], *, n_ctx: int = 512,
                    n_threads: int | None = None, dataset: str | None = None,
                    progress: Callable[[float | None, str], None] | None = None,
                    cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run the model over ``text`` in chunks of ``n_ctx`` tokens and write the importance
    matrix to ``out_path``. ``dataset`` names the text in the file (``imatrix.datasets``).
    Returns what is worth recording: chunks, chunk size, tokens, entries, seconds."""
    import llama_cpp

    from qmgr.builtin.llama_log import LlamaLog, cpu_count

    if n_ctx < MIN_ROWS:
        raise QuantizeError(f"n_ctx must be at least {MIN_ROWS}", code="imatrix_failed")
    threads = n_threads or cpu_count()
    started = time.monotonic()
    log = LlamaLog()
    with log:
        llama_cpp.llama_backend_init()
        ggml = _Ggml(llama_cpp.llama_cpp._lib)
        mparams = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(os.fsencode(model_path), mparams)
        if not model:
            raise QuantizeError(f"llama.cpp could not load {model_path}:\n{log.tail()}",
                                code="imatrix_failed")
        try:
            tokens = _tokenize(llama_cpp, model, text)
            n_chunks = len(tokens) // n_ctx
            if n_chunks < 1:
                raise QuantizeError(
                    f"the calibration text is only {len(tokens)} tokens; at least {n_ctx} are "
                    "needed (a few thousand are better)", code="text_too_short")
            collector = Collector(ggml, cancel)
            callback = llama_cpp.ggml_backend_sched_eval_callback(collector)
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = n_ctx
            cparams.n_ubatch = n_ctx  # a chunk is one graph: see Collector
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = threads
            cparams.cb_eval = callback
            cparams.cb_eval_user_data = None
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                raise QuantizeError(f"llama.cpp could not create a context:\n{log.tail()}",
                                    code="imatrix_failed")
            try:
                _run_chunks(llama_cpp, model, ctx, tokens, n_ctx, n_chunks, collector,
                            progress, cancel)
            finally:
                llama_cpp.llama_free(ctx)
        finally:
            llama_cpp.llama_model_free(model)
    if not collector.stats:
        raise QuantizeError("no weight matrix saw any activations: nothing to write",
                            code="imatrix_failed")
    datasets = [dataset or "text"]
    write_imatrix(out_path, collector.stats, datasets=datasets, chunk_count=n_chunks,
                  chunk_size=n_ctx)
    return {"chunks": n_chunks, "chunk_size": n_ctx, "tokens": n_chunks * n_ctx,
            "entries": len(collector.stats), "datasets": datasets,
            "seconds": round(time.monotonic() - started, 2)}


def _tokenize(llama_cpp: Any, model: Any, text: str) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(model)
    data = text.encode("utf-8")
    n_max = len(data) + 16
    for _ in range(2):  # a negative answer is the size needed (byte fallback can exceed bytes)
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, True, False)
        if n >= 0:
            return list(buf[:n])
        n_max = -n
    raise QuantizeError("could not tokenize the calibration text", code="imatrix_failed")


def _run_chunks(llama_cpp: Any, model: Any, ctx: Any, tokens: list[int], n_ctx: int,
                n_chunks: int, collector: Collector,
                progress: Callable[[float | None, str], None] | None,
                cancel: threading.Event | None) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model)
    add_bos = llama_cpp.llama_vocab_get_add_bos(vocab)
    bos = llama_cpp.llama_vocab_bos(vocab)
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    try:
        for chunk in range(n_chunks):
            if cancel is not None and cancel.is_set():
                raise QuantizeError("cancelled", code="cancelled")
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            start = chunk * n_ctx
            for k in range(n_ctx):
                batch.token[k] = bos if (k == 0 and add_bos) else tokens[start + k]
                batch.pos[k] = k
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = 0
                batch.logits[k] = 1  # every row through the last layer, as the tool does
            batch.n_tokens = n_ctx
            rc = llama_cpp.llama_decode(ctx, batch)
            if collector.error is not None:
                raise collector.error
            collector.graph_done()
            if rc != 0:
                raise QuantizeError(f"llama_decode failed ({rc}) on chunk {chunk + 1}",
                                    code="imatrix_failed")
            if progress is not None:
                progress((chunk + 1) / n_chunks, f"chunk {chunk + 1}/{n_chunks}")
    finally:
        llama_cpp.llama_batch_free(batch)


# -- the file --------------------------------------------------------------------------------


def write_imatrix(path: str | os.PathLike[str], stats: dict[str, Stats], *,
                  datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    """Write ``stats`` as llama-imatrix does (tensors sorted by name)."""
    import gguf

    writer = gguf.GGUFWriter(os.fspath(path), arch="")
    # GGUFWriter always starts with general.architecture; an imatrix file has none.
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(KEY_DATASETS, datasets)
    writer.add_uint32(KEY_CHUNK_COUNT, chunk_count)
    writer.add_uint32(KEY_CHUNK_SIZE, chunk_size)
    for name in sorted(stats):
        e = stats[name]
        n_counts = e.counts.size
        writer.add_tensor(name + SUM2_SUFFIX,
                          e.values.astype(np.float32).reshape(n_counts, -1))
        writer.add_tensor(name + COUNTS_SUFFIX,
                          e.counts.astype(np.float32).reshape(n_counts, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_NAME_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII: weight names, nothing else


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an importance matrix file (GGUF, as llama-imatrix writes it), checking it the way
    llama.cpp's loader does; ``means`` = sums / counts per expert (1 where nothing was seen)."""
    try:
        header = read_header(path)
    except GGUFError as exc:
        raise QuantizeError(
            f"{path} is not an importance matrix in GGUF format ({exc.message}); legacy .dat "
            "files of older llama-imatrix are not read: convert them with llama-imatrix "
            "--in-file FILE.dat -o FILE.gguf, or make a new one with `qmgr imatrix`",
            code="imatrix_invalid") from exc
    meta = header.metadata
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in meta]
    if missing:
        raise QuantizeError(f"{path} lacks imatrix metadata ({', '.join(missing)})",
                            code="imatrix_invalid")
    pairs: dict[str, dict[str, Any]] = {}
    for t in header.tensors:
        for suffix, kind in ((SUM2_SUFFIX, "sums"), (COUNTS_SUFFIX, "counts")):
            if t.name.endswith(suffix):
                pairs.setdefault(t.name[: -len(suffix)], {})[kind] = t
    if not pairs:
        raise QuantizeError(f"{path} holds no importance data", code="imatrix_invalid")
    means: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name, pair in sorted(pairs.items()):
            sums_t, counts_t = pair.get("sums"), pair.get("counts")
            if sums_t is None or counts_t is None:
                raise QuantizeError(f"{path}: {name} has sums without counts or the reverse",
                                    code="imatrix_invalid")
            if sums_t.type_name != "F32" or counts_t.type_name != "F32":
                raise QuantizeError(f"{path}: {name}'s sums and counts must be F32",
                                    code="imatrix_invalid")
            n_counts = counts_t.n_elements
            if not _NAME_RE.fullmatch(name) or n_counts < 1 or sums_t.n_elements % n_counts:
                raise QuantizeError(f"{path}: malformed entry {name!r}", code="imatrix_invalid")
            sums = _read_f32(f, header.data_offset + sums_t.offset, sums_t.n_elements)
            counts = np.rint(_read_f32(f, header.data_offset + counts_t.offset, n_counts))
            if not (np.all(np.isfinite(sums)) and np.all(np.isfinite(counts))):
                raise QuantizeError(f"{path}: {name} has non-finite values",
                                    code="imatrix_invalid")
            per = sums.reshape(n_counts, -1)
            mean = np.ones_like(per)
            seen = counts > 0
            mean[seen] = per[seen] / counts[seen, None]
            means[name] = np.ascontiguousarray(mean.reshape(-1), dtype=np.float32)
    datasets = meta[KEY_DATASETS]
    return Imatrix(
        means=means,
        datasets=[d for d in datasets if isinstance(d, str)] if isinstance(datasets, list) else [],
        chunk_count=_uint(meta[KEY_CHUNK_COUNT]),
        chunk_size=_uint(meta[KEY_CHUNK_SIZE]),
    )


def load_imatrix(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Weight name -> mean squared activations (float32), what llama_model_quantize takes."""
    return read_imatrix(path).means


def _read_f32(f: Any, offset: int, count: int) -> np.ndarray:
    f.seek(offset)
    data = f.read(count * 4)
    if len(data) != count * 4:
        raise QuantizeError("importance matrix file is truncated", code="imatrix_invalid")
    return np.frombuffer(data, dtype="<f4").astype(np.float64)


def _uint(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
