"""The quantize worker: ``python -m qmgr.quantize.worker`` runs one quantization (or one
importance-matrix computation) outside the daemon.

Native quantizers can abort, leak or hang; here that costs a process, not the daemon, and a
cancel is a kill. The request comes as JSON on stdin; the worker answers with JSON lines on
stdout: ``{"progress": 0.42, "message": "blk.3.ffn_up.weight"}`` as it goes, then one
``{"result": {...}}`` or ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from qmgr.errors import QmgrError
from qmgr.plugin.quantizer import (
    ImatrixJob,
    ImatrixMaker,
    QuantizeError,
    QuantizeJob,
    QuantizeOptions,
    Quantizer,
)
from qmgr.store import start_writeback
from qmgr.workerio import progress, serve

if TYPE_CHECKING:
    from qmgr.plugins import PluginSet


def flush_while_writing(path: Path, done: threading.Event, every: float = 0.25) -> None:
    """Write the output back to disk while the quantizer still writes it, so that the fsync
    before publication finds little left to do (the disk works while the CPUs quantize)."""
    writeback = start_writeback()
    while not done.wait(every):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # not created yet
        try:
            writeback(fd)
        except OSError:
            pass  # the daemon's own fsync before publication reports what matters
        finally:
            os.close(fd)


# The quantizer plugins, found while the worker waits for its request (prepare), with the
# state of the import path they were found on: looking up entry points scans every installed
# distribution (8-14 ms here), needed again only when a package was installed or removed since.
_plugins: list[tuple[tuple[tuple[str, int], ...], PluginSet]] = []


def _path_state() -> tuple[tuple[str, int], ...]:
    """Each import-path folder's modification time: installing or removing a package adds or
    removes an entry (its ``.dist-info``) in one of them."""
    state = []
    for entry in sys.path:
        with contextlib.suppress(OSError):
            state.append((entry, os.stat(entry or ".").st_mtime_ns))
    return tuple(state)


def quantizer_plugins() -> PluginSet:
    from qmgr.plugins import PluginSet

    state = _path_state()
    if not _plugins or _plugins[0][0] != state:
        _plugins[:] = [(state, PluginSet(load_builtins=lambda m: m.endswith("_quantizer")))]
    return _plugins[0][1]


def find_quantizer(name: str) -> Quantizer:
    return cast(Quantizer, quantizer_plugins().find("register_quantizers", name))


def quantize(request: dict[str, Any]) -> dict[str, Any]:
    quantizer = find_quantizer(request["quantizer"])
    target = request["target"]
    if target not in quantizer.targets():
        raise QuantizeError(f"quantizer {quantizer.name} cannot make {target} (it makes: "
                            f"{', '.join(quantizer.targets())})", code="bad_target")
    options = QuantizeOptions.from_dict(request.get("options") or {})
    unsupported = options.used() - set(getattr(quantizer, "supported_options", set()))
    if unsupported:
        raise QuantizeError(f"quantizer {quantizer.name} does not support "
                            f"{', '.join(sorted(unsupported))}", code="bad_option")
    job = QuantizeJob(Path(request["src"]), Path(request["dst"]), target, options, progress,
                      threading.Event(), src_facts=request.get("src_facts"))
    written = threading.Event()
    flusher = threading.Thread(target=flush_while_writing, args=(job.dst, written), daemon=True)
    flusher.start()
    try:
        details = quantizer.quantize(job) or {}
    finally:
        written.set()  # the flusher stops after its current write-back; no need to wait
    result = {"quantizer": quantizer.name, "version": str(quantizer.version), "details": details}
    # A quantizer that declares ``reports_digest`` hashed its output as it wrote it (the
    # built-in llama.cpp one: llama_digest): the daemon then need not read it all again.
    # Any other quantizer's output is hashed by the daemon, whatever its result says.
    sha, size = details.pop("output_sha256", None), details.pop("output_size", None)
    facts = details.pop("output_facts", None)
    if sha and size and getattr(quantizer, "reports_digest", False) is True:
        result.update(sha256=sha, size=size, facts=facts)
    return result


def find_imatrix_maker(name: str | None) -> ImatrixMaker:
    """The quantizer that computes importance matrices: the one named, else the first
    registered one that can."""
    if name:
        found = find_quantizer(name)
        if not callable(getattr(found, "compute_imatrix", None)):
            raise QuantizeError(f"quantizer {name} does not compute importance matrices",
                                code="imatrix_unsupported")
        return cast(ImatrixMaker, found)
    makers = [q for q in quantizer_plugins().quantizers()
              if callable(getattr(q, "compute_imatrix", None))]
    if not makers:
        raise QuantizeError("no installed quantizer computes importance matrices (the "
                            "llama.cpp one does: pip install 'qmgr[llama]')",
                            code="imatrix_unsupported")
    return cast(ImatrixMaker, makers[0])


def imatrix(request: dict[str, Any]) -> dict[str, Any]:
    maker = find_imatrix_maker(request.get("quantizer"))
    text = Path(request["text"])
    job = ImatrixJob(Path(request["src"]), Path(request["dst"]),
                     text.read_text(encoding="utf-8", errors="replace"), text.name,
                     n_ctx=int(request.get("n_ctx") or 512), threads=request.get("threads"),
                     progress=progress)
    return {"imatrix_maker": maker.name, **maker.compute_imatrix(job)}


def prepare() -> None:
    """Load what requests need before one arrives: the daemon starts the next worker ahead of
    time (see ``qmgr.work.jobs.WarmWorkers``), and it waits here, ready. The quantizer
    plugins are looked up here too, and again when the request comes if a package was
    installed or removed meanwhile, so a newly installed one is seen."""
    quantizer_plugins().quantizers()
    with contextlib.suppress(ImportError, OSError):  # the llama.cpp quantizer says why
        import llama_cpp  # noqa: F401 (the slow part: ~0.2-0.5 s)


def work(request: dict[str, Any]) -> dict[str, Any]:
    return (imatrix if request.get("kind") == "imatrix" else quantize)(request)


def main() -> int:
    # llama.cpp calls back into Python for every log line (progress comes from them), and a
    # callback must take the GIL: while the digest thread runs Python code (parsing the
    # predicted header, ~50 ms), each callback would wait up to the switch interval (5 ms by
    # default) with llama.cpp stalled. Measured with that code made to hold the GIL for 1 s
    # (Gemma 3 270M to Q4_K_M, medians of 3): 6.06 s at 5 ms, 5.38 s at 0.5 ms.
    sys.setswitchinterval(0.0005)
    return serve(work, QmgrError, "quantize_failed", prepare)


if __name__ == "__main__":
    sys.exit(main())
