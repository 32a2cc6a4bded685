"""The quantize worker: ``python -m qmgr.quantize.worker`` runs one quantization (or one
importance-matrix computation) outside the daemon.

Native quantizers can abort, leak or hang; here that costs a process, not the daemon, and a
cancel is a kill. The request comes as JSON on stdin; the worker answers with JSON lines on
stdout: ``{"progress": 0.42, "message": "blk.3.ffn_up.weight"}`` as it goes, then one
``{"result": {...}}`` or ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from qmgr.quantize.contract import QuantizeError, QuantizeJob, QuantizeOptions


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def progress(fraction: float | None, message: str) -> None:
    emit({"progress": fraction, "message": message})


def find_quantizer(name: str) -> Any:
    from qmgr.plugins import PluginSet

    plugins = PluginSet(load_builtins=lambda module: module.endswith("_quantizer"))
    for q in plugins.registered("register_quantizers"):
        if getattr(q, "name", None) == name:
            return q
    names = ", ".join(sorted(str(getattr(q, "name", "?"))
                             for q in plugins.registered("register_quantizers")))
    raise QuantizeError(f"no quantizer named {name!r} (installed: {names or 'none'})",
                        code="no_quantizer")


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
                      threading.Event())
    details = quantizer.quantize(job) or {}
    return {"quantizer": quantizer.name, "version": str(quantizer.version), "details": details}


def imatrix(request: dict[str, Any]) -> dict[str, Any]:
    from qmgr.builtin.imatrix import compute_imatrix

    text = Path(request["text"]).read_text(encoding="utf-8", errors="replace")
    return compute_imatrix(Path(request["src"]), text, Path(request["dst"]),
                           n_ctx=int(request.get("n_ctx") or 512),
                           dataset=Path(request["text"]).name,
                           n_threads=request.get("threads"), progress=progress)


def main() -> int:
    try:
        request = json.loads(sys.stdin.read())
        work = imatrix if request.get("kind") == "imatrix" else quantize
        result = work(request)
        emit({"result": result})
        return 0
    except QuantizeError as e:
        emit({"error": {"code": e.code, "message": e.message}})
    except Exception as e:  # the daemon shows it; the traceback goes to the daemon's log
        traceback.print_exc(file=sys.stderr)
        emit({"error": {"code": "quantize_failed", "message": f"{type(e).__name__}: {e}"}})
    return 1


if __name__ == "__main__":
    sys.exit(main())
