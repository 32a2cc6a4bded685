"""What a qmgr plugin imports: the one public surface for plugin authors.

::

    from qmgr.plugin import Quantizer, QuantizeJob, QuantizeError, hookimpl

    class MyQuantizer:
        name = "mine"
        ...

    @hookimpl
    def register_quantizers(register):
        register(MyQuantizer())

It holds the protocols qmgr calls (:class:`Source`, :class:`Quantizer`, :class:`Probe`,
:class:`Backend` and its :class:`Session`), the values passed to and returned from them, and the
helpers they need: HTTP with qmgr's redirect and credential rules for a source, GGUF file-name
rules, qmgr's bounded GGUF header reader, and the rewriting helpers of a quantizer that uses the
``gguf`` package. The built-in plugins (``qmgr.builtin``) use nothing else of qmgr's, and the
layer test keeps it so. docs/plugins.md documents each protocol.

Importing this module costs well under a millisecond (-X importtime): each name is imported
when first used (the client loads command plugins on its start-up path, and httpx, ~140 ms,
or numpy must not be paid there).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pluggy

    from qmgr.errors import GGUFError, NotFound, QmgrError
    from qmgr.fit.hardware import Device, Probe
    from qmgr.gguf.facts import ModelFacts, facts_from_header
    from qmgr.gguf.names import file_kind, model_name_from, quant_from_name, strip_quant_suffix
    from qmgr.gguf.reader import GGUFHeader, read_header, read_header_from
    from qmgr.gguf.types import GGML_TYPES, GGML_TYPES_BY_NAME, LLAMA_FILE_TYPES
    from qmgr.plugin.backend import (
        Backend,
        Embeddings,
        GenParams,
        LoadOptions,
        Piece,
        Refusal,
        Scores,
        Session,
        log_softmax,
    )
    from qmgr.plugin.http import FetchError, get_json, next_link, redact, request
    from qmgr.plugin.quantizer import (
        ImatrixJob,
        ImatrixMaker,
        QuantizeError,
        QuantizeJob,
        QuantizeOptions,
        Quantizer,
    )
    from qmgr.plugin.rewrite import float_rows, is_weight, new_writer, read_gguf, write_header
    from qmgr.plugin.source import (
        FetchContext,
        Listing,
        RemoteFile,
        RemoteVariant,
        Skipped,
        Source,
        group_gguf_files,
        preferred_projector,
    )
    from qmgr.refs import Reference, registry_path_problem
    from qmgr.settings import knob
    from qmgr.store import SHA256_RE, check_digest

    hookimpl: pluggy.HookimplMarker

# name -> the module it comes from
_EXPORTS = {
    # errors every plugin may raise, and qmgr's QMGR_* settings (settings.KNOBS)
    "QmgrError": "qmgr.errors", "GGUFError": "qmgr.errors", "NotFound": "qmgr.errors",
    "knob": "qmgr.settings",
    # sources
    "Source": "qmgr.plugin.source", "FetchContext": "qmgr.plugin.source",
    "RemoteFile": "qmgr.plugin.source", "RemoteVariant": "qmgr.plugin.source",
    "Listing": "qmgr.plugin.source", "Skipped": "qmgr.plugin.source",
    "group_gguf_files": "qmgr.plugin.source", "preferred_projector": "qmgr.plugin.source",
    "Reference": "qmgr.refs", "registry_path_problem": "qmgr.refs",
    "SHA256_RE": "qmgr.store", "check_digest": "qmgr.store",
    "FetchError": "qmgr.plugin.http", "get_json": "qmgr.plugin.http",
    "next_link": "qmgr.plugin.http", "redact": "qmgr.plugin.http",
    "request": "qmgr.plugin.http",
    "file_kind": "qmgr.gguf.names", "model_name_from": "qmgr.gguf.names",
    "quant_from_name": "qmgr.gguf.names", "strip_quant_suffix": "qmgr.gguf.names",
    # quantizers
    "Quantizer": "qmgr.plugin.quantizer", "QuantizeJob": "qmgr.plugin.quantizer",
    "QuantizeOptions": "qmgr.plugin.quantizer", "QuantizeError": "qmgr.plugin.quantizer",
    "ImatrixMaker": "qmgr.plugin.quantizer", "ImatrixJob": "qmgr.plugin.quantizer",
    "read_gguf": "qmgr.plugin.rewrite", "new_writer": "qmgr.plugin.rewrite",
    "write_header": "qmgr.plugin.rewrite", "float_rows": "qmgr.plugin.rewrite",
    "is_weight": "qmgr.plugin.rewrite",
    "read_header": "qmgr.gguf.reader", "read_header_from": "qmgr.gguf.reader",
    "GGUFHeader": "qmgr.gguf.reader",
    "ModelFacts": "qmgr.gguf.facts", "facts_from_header": "qmgr.gguf.facts",
    "GGML_TYPES": "qmgr.gguf.types", "GGML_TYPES_BY_NAME": "qmgr.gguf.types",
    "LLAMA_FILE_TYPES": "qmgr.gguf.types",
    # hardware probes
    "Probe": "qmgr.fit.hardware", "Device": "qmgr.fit.hardware",
    # runtime backends
    "Backend": "qmgr.plugin.backend", "Session": "qmgr.plugin.backend",
    "LoadOptions": "qmgr.plugin.backend", "GenParams": "qmgr.plugin.backend",
    "Piece": "qmgr.plugin.backend", "Scores": "qmgr.plugin.backend",
    "Embeddings": "qmgr.plugin.backend", "Refusal": "qmgr.plugin.backend",
    "log_softmax": "qmgr.plugin.backend",
}

__all__ = [  # what `from qmgr.plugin import *` gives: every name in _EXPORTS, and hookimpl
    "hookimpl", "QmgrError", "GGUFError", "NotFound", "knob", "Source", "FetchContext",
    "RemoteFile", "RemoteVariant", "Listing", "Skipped", "group_gguf_files", "preferred_projector",
    "Reference", "registry_path_problem", "SHA256_RE", "check_digest", "FetchError", "get_json",
    "next_link", "redact", "request", "file_kind", "model_name_from", "quant_from_name",
    "strip_quant_suffix", "Quantizer", "QuantizeJob", "QuantizeOptions", "QuantizeError",
    "ImatrixMaker", "ImatrixJob", "read_gguf", "new_writer", "write_header", "float_rows",
    "is_weight", "read_header", "read_header_from", "GGUFHeader", "ModelFacts",
    "facts_from_header", "GGML_TYPES", "GGML_TYPES_BY_NAME", "LLAMA_FILE_TYPES", "Probe", "Device",
    "Backend", "Session", "LoadOptions", "GenParams", "Piece", "Scores", "Refusal", "log_softmax",
    "Embeddings",
]


def __getattr__(name: str) -> object:
    if name == "hookimpl":
        import qmgr

        return qmgr.hookimpl
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qmgr.plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value
