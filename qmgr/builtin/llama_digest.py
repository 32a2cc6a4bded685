"""The sha256 of llama.cpp's output, computed while llama.cpp writes it.

``llama_model_quantize`` writes a placeholder for the GGUF header (zeros), then each tensor's
data in turn, and only at the end goes back to write the real header: the types (and so the
offsets) of the tensors are known only then. A plain sha256 must begin with the header, so it
could only start after the quantization, costing a full read and hash of the output on the
critical path (~0.25 s per 250 MB here, several seconds for an 8B model).

Instead, a second thread predicts the header: a *dry run* of the same quantization (llama.cpp
reports each tensor's target type without quantizing), on a skeleton of the source without
its vocabulary (the dry run's time goes to the vocabulary otherwise: 0.35 s for Gemma 3's
262k tokens, 4 ms without them), then llama.cpp's own GGUF code (through ``libggml-base``)
rebuilds the output header exactly as ``llama_model_quantize`` does: copy the source's
key-value pairs, set ``general.quantization_version`` and ``general.file_type``, drop split
keys, apply the key-value overrides, add the tensors in the order the dry run listed them, set
their types. The thread hashes that header, then follows the file as the tensor data arrives,
and when llama.cpp is done compares the header it actually wrote with the prediction. Equal:
the digest is the file's (every byte hashed was read from the file, the header compared byte
for byte). Different, or anything failed: no digest, and the daemon hashes the file as it
always did. The prediction (~0.15 s of CPU for Gemma 3 270M) runs beside llama.cpp's own
loading of the model, the hashing at the lowest priority (nice 19), so as not to slow the
quantization when it uses every core.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qmgr.plugin import GGML_TYPES_BY_NAME

log = logging.getLogger(__name__)

GGML_QNT_VERSION = 2  # ggml.h; llama.cpp stores it as general.quantization_version
# The output is read back into one buffer of this size, reused: it stays in the core's cache
# between the read and the hash, and no new memory is mapped and unmapped per chunk (in the
# process whose other threads are llama.cpp's).
CHUNK = 1 << 20
GGUF_TYPE_ARRAY = 9  # gguf.h, enum gguf_type
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

# The dry run's line for each tensor: "[   3/ 236] blk.0.attn_k.weight - [  640,   256, 1, 1],
# type =    f16, size =     0.312 MiB" (kept as is) or "... size = 0.31 MiB -> 0.09 MiB (q4_K)".
DRY_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s+=\s+(\w+),"
                      r".*?size\s+=.*?(?:\((\w+)\))?\s*$")


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml(llama_cpp: Any) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for name, res, args in [
        ("gguf_init_from_file", vp, [cp, _InitParams]),
        ("gguf_init_empty", vp, []),
        ("gguf_free", None, [vp]),
        ("gguf_set_kv", None, [vp, vp]),
        ("gguf_set_val_u32", None, [vp, cp, ctypes.c_uint32]),
        ("gguf_set_val_str", None, [vp, cp, cp]),
        ("gguf_remove_key", ctypes.c_int64, [vp, cp]),
        ("gguf_add_tensor", None, [vp, vp]),
        ("gguf_set_tensor_type", None, [vp, cp, ctypes.c_int]),
        ("gguf_get_meta_size", ctypes.c_size_t, [vp]),
        ("gguf_get_meta_data", None, [vp, vp]),
        ("gguf_get_n_tensors", ctypes.c_int64, [vp]),
        ("gguf_get_tensor_offset", ctypes.c_size_t, [vp, ctypes.c_int64]),
        ("gguf_get_tensor_size", ctypes.c_size_t, [vp, ctypes.c_int64]),
        ("gguf_get_n_kv", ctypes.c_int64, [vp]),
        ("gguf_find_key", ctypes.c_int64, [vp, cp]),
        ("gguf_get_key", cp, [vp, ctypes.c_int64]),
        ("gguf_get_kv_type", ctypes.c_int, [vp, ctypes.c_int64]),
        ("gguf_get_arr_n", ctypes.c_size_t, [vp, ctypes.c_int64]),
        ("gguf_get_val_str", cp, [vp, ctypes.c_int64]),
        ("ggml_get_tensor", vp, [vp, cp]),
        ("ggml_free", None, [vp]),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def predict_header(llama_cpp: Any, src: Path, ftype: int,
                   overrides: list[tuple[str, str | int]],
                   dry_run: Callable[[bytes], list[tuple[str, str]]]) -> tuple[bytes, int]:
    """The header ``llama_model_quantize`` will write, and the size of the whole file.

    ``dry_run(path)`` runs the quantization's dry run on ``path`` and returns (name, ggml type
    name) per tensor, in the order llama.cpp writes them; it is given the source's skeleton
    (see :func:`_skeleton`). ``overrides``: the key-value overrides the quantization was
    given. The source's metadata is parsed once, by llama.cpp's own GGUF code."""
    g = _ggml(llama_cpp)
    tensor_ctx = ctypes.c_void_p()
    source = g.gguf_init_from_file(os.fsencode(src), _InitParams(True, ctypes.pointer(tensor_ctx)))
    if not source:
        raise ValueError(f"llama.cpp cannot read {src}")
    out = g.gguf_init_empty()
    try:
        g.gguf_set_kv(out, source)
        g.gguf_set_val_u32(out, b"general.quantization_version", GGML_QNT_VERSION)
        g.gguf_set_val_u32(out, b"general.file_type", ftype)
        for key in SPLIT_KEYS:
            g.gguf_remove_key(out, key.encode())
        for key, value in overrides:
            if isinstance(value, int):
                g.gguf_set_val_u32(out, key.encode(), abs(value))
            else:
                g.gguf_set_val_str(out, key.encode(), value.encode())
        with _skeleton(g, source, src) as path:
            tensors = dry_run(path)
        if not tensors:
            raise ValueError("the dry run listed no tensors")
        for name, _type in tensors:
            tensor = g.ggml_get_tensor(tensor_ctx, name.encode())
            if not tensor:
                raise ValueError(f"the dry run named a tensor the source lacks: {name}")
            g.gguf_add_tensor(out, tensor)
        for name, type_name in tensors:
            g.gguf_set_tensor_type(out, name.encode(), GGML_TYPES_BY_NAME[type_name.upper()].id)
        size = g.gguf_get_meta_size(out)
        buf = ctypes.create_string_buffer(size)
        g.gguf_get_meta_data(out, buf)
        # Each tensor's data is followed by zeros up to the next multiple of 32 (llama.cpp's
        # GGUF_DEFAULT_ALIGNMENT), the last one's too.
        data = max((g.gguf_get_tensor_offset(out, i) + -(-g.gguf_get_tensor_size(out, i) // 32)
                    * 32 for i in range(g.gguf_get_n_tensors(out))), default=0)
        return buf.raw, size + data
    finally:
        g.gguf_free(out)
        g.gguf_free(source)
        g.ggml_free(tensor_ctx)


@contextlib.contextmanager
def _skeleton(g: ctypes.CDLL, source: int, src: Path) -> Iterator[bytes]:
    """A path to the source without its vocabulary, for the dry run (``source`` loses its
    tokenizer arrays).

    A dry run reads the metadata and the tensor list, never the data, and picks each tensor's
    type from the architecture's hyper-parameters, the tensors' names and shapes and the
    options. On the whole source most of its time goes to llama.cpp parsing and copying the
    tokenizer's arrays (Gemma 3: 262k tokens, 0.35 s; without them: 4 ms). So the dry run
    gets the source's metadata without ``tokenizer.*`` arrays, plus ``{arch}.vocab_size``
    (the vocabulary's size is all some architectures read of it, to tell model sizes apart),
    followed by a hole as long as the source's data, in an anonymous memory file. Where there
    is no ``memfd_create`` it gets the source itself."""
    try:
        fd = os.memfd_create("qmgr-dry-run", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        yield os.fsencode(src)
        return
    try:
        arch_id = g.gguf_find_key(source, b"general.architecture")
        tokens = g.gguf_find_key(source, b"tokenizer.ggml.tokens")
        if arch_id >= 0 and tokens >= 0:
            vocab_key = g.gguf_get_val_str(source, arch_id) + b".vocab_size"
            if g.gguf_find_key(source, vocab_key) < 0:
                g.gguf_set_val_u32(source, vocab_key, g.gguf_get_arr_n(source, tokens))
        for i in reversed(range(g.gguf_get_n_kv(source))):
            key = g.gguf_get_key(source, i)
            if key.startswith(b"tokenizer.") and g.gguf_get_kv_type(source, i) == GGUF_TYPE_ARRAY:
                g.gguf_remove_key(source, key)
        size = g.gguf_get_meta_size(source)
        buf = ctypes.create_string_buffer(size)
        g.gguf_get_meta_data(source, buf)
        os.write(fd, buf.raw)
        # The tensors' offsets count from the (now earlier) start of the data: the source's
        # length is enough for all of them. A hole: no memory is used for it.
        os.ftruncate(fd, max(size, src.stat().st_size))
        yield f"/proc/self/fd/{fd}".encode()
    finally:
        os.close(fd)


class _Predicted:
    """The output file as predicted, for qmgr's header reader: the header, then zeros."""

    def __init__(self, header: bytes, size: int):
        self.header, self.size = header, size

    def read_at(self, offset: int, size: int) -> bytes:
        n = max(0, min(size, self.size - offset))
        data = self.header[offset:offset + n]
        return data + bytes(n - len(data))


def _facts(header: bytes, total: int) -> dict[str, Any] | None:
    from qmgr.plugin import facts_from_header, read_header_from

    try:
        return facts_from_header(read_header_from(_Predicted(header, total))).to_dict()
    except Exception:  # the daemon reads the header itself then
        log.debug("no facts from the predicted header", exc_info=True)
        return None


def parse_dry_run(lines: list[str]) -> list[tuple[str, str]]:
    """(name, target type) per tensor, in the order of the dry run's report."""
    found = []
    for line in lines:
        m = DRY_LINE.search(line)
        if m:
            found.append((m[1], m[3] or m[2]))
    return found


class OutputDigest:
    """Runs in its own thread next to ``llama_model_quantize``; see the module's docstring.

    Use: ``start(log)`` inside the ``LlamaLog`` of the real quantization (this thread's log
    lines are routed to :meth:`on_log`), the quantization, ``wait_predicted()`` before the
    ``LlamaLog`` ends, then ``finish()``, which returns (sha256, size, facts) or None: the
    facts (``qmgr.gguf.ModelFacts.to_dict()``) of the predicted header, parsed while the
    quantization ran, valid since the header written is the one predicted (None when the size
    differed from the prediction)."""

    def __init__(self, llama_cpp: Any, src: Path, dst: Path, params: Any,
                 overrides: list[tuple[str, str | int]]):
        self.llama_cpp = llama_cpp
        self.src, self.dst = src, dst
        self.params = type(params).from_buffer_copy(params)
        self.params.dry_run = True
        self.overrides = overrides
        self.text = ""
        self.predicted = threading.Event()  # the header is predicted (the dry run's log is in)
        self.written = threading.Event()  # llama.cpp returned: the file is complete
        self.result: tuple[str, int, dict[str, Any] | None] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="qmgr-digest")

    def start(self, log: Any) -> None:
        """``log``: the :class:`LlamaLog` installed around the real quantization."""
        self.log = log
        self.thread.start()

    def on_log(self, piece: str) -> None:
        self.text += piece

    def wait_predicted(self) -> None:
        self.predicted.wait()

    def finish(self) -> tuple[str, int, dict[str, Any] | None] | None:
        self.written.set()
        self.thread.join()
        return self.result

    def _run(self) -> None:
        self.log.routes[threading.get_ident()] = self.on_log
        try:
            try:
                header, total = predict_header(self.llama_cpp, self.src,
                                               int(self.params.ftype), self.overrides,
                                               self._dry_run)
            finally:
                self.predicted.set()
            # The prediction ran beside llama.cpp's loading of the model; from here on this
            # thread takes only what the quantization leaves idle (at the lowest priority it
            # takes little from llama.cpp's threads when they use every core) and catches up
            # on what is left when they are done.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            facts = _facts(header, total)
            result = self._follow(header)
            if result is not None:
                sha, size = result
                self.result = (sha, size, facts if size == total else None)
        except Exception:  # the daemon hashes the file instead
            log.debug("no digest while writing", exc_info=True)

    def _dry_run(self, path: bytes) -> list[tuple[str, str]]:
        rc = self.llama_cpp.llama_model_quantize(path, os.fsencode(self.dst),
                                                 ctypes.byref(self.params))
        if rc != 0:
            raise ValueError(f"the dry run failed ({rc})")
        return parse_dry_run(self.text.splitlines())

    def _follow(self, header: bytes) -> tuple[str, int] | None:
        h = hashlib.sha256(header)
        pos = len(header)
        view = memoryview(bytearray(CHUNK))
        fd = None
        while fd is None:
            done = self.written.is_set()
            try:
                fd = os.open(self.dst, os.O_RDONLY)
            except FileNotFoundError:
                if done:
                    return None
                self.written.wait(0.02)
        try:
            while True:
                done = self.written.is_set()  # before the size: then the size is the final one
                size = os.fstat(fd).st_size
                while pos < size:
                    n = os.preadv(fd, [view[:min(CHUNK, size - pos)]], pos)
                    if not n:
                        return None
                    h.update(view[:n])
                    pos += n
                if done:
                    break
                self.written.wait(0.02)
            if os.pread(fd, len(header), 0) != header:
                return None
            return h.hexdigest(), pos
        finally:
            os.close(fd)
