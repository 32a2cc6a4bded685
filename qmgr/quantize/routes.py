"""Quantizing's endpoints: quantize jobs, importance-matrix jobs, the installed quantizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qmgr.errors import QmgrError
from qmgr.plugin.quantizer import QuantizeOptions
from qmgr.plugins import PluginSet
from qmgr.quantize.job import Quantizing
from qmgr.work.access import check_readable_by
from qmgr.work.api import Call, Endpoint, Table
from qmgr.work.jobs import JobRunner

QUANTIZE_BODY = {
    "type": "object", "required": ["ref", "targets"],
    "properties": {"ref": {"type": "string"},
                   "targets": {"type": "array", "minItems": 1,
                               "items": {"type": "string", "pattern": "[A-Za-z0-9_]{1,32}",
                                         "description": "a quant type name"}},
                   "quantizer": {"type": "string"}, "imatrix": {"type": "string"},
                   "options": {"type": "object"}},
}
IMATRIX_BODY = {"type": "object", "required": ["ref", "text"],
                "properties": {"ref": {"type": "string"}, "text": {"type": "string"},
                               "n_ctx": {"type": "integer"},
                               "quantizer": {"type": "string"}}}


def routes(quantizing: Quantizing, plugins: PluginSet, jobs: JobRunner) -> list[Endpoint]:
    api = Table()

    @api.endpoint("POST", "/v1/quantize", "Start a quantize job: REF to each target type",
                  body=QUANTIZE_BODY)
    def start_quantize(call: Call) -> dict[str, Any]:
        body = call.body
        try:
            QuantizeOptions.from_dict(dict(body.get("options") or {}))
        except (TypeError, ValueError) as e:
            raise QmgrError(str(e), code="bad_option") from e
        quantizing.parent(body["ref"])  # a missing or unready parent fails before a job exists
        quantizer = body.get("quantizer")
        if quantizer is not None:
            plugins.find("register_quantizers", quantizer)  # 404 before a job
        return jobs.submit("quantize", {
            "ref": body["ref"], "targets": [t.upper() for t in body["targets"]],
            "quantizer": quantizer, "imatrix": body.get("imatrix"),
            "options": body.get("options") or {}})

    @api.endpoint("GET", "/v1/quantizers", "Installed quantizers: name, version, target types")
    def list_quantizers(call: Call) -> list[dict[str, Any]]:
        out = []
        for q in plugins.quantizers():
            try:
                targets = list(q.targets())
            except Exception as e:  # a plugin's bug shows, the list still answers
                targets = [f"error: {type(e).__name__}: {e}"]
            out.append({"name": q.name, "version": str(getattr(q, "version", "?")),
                        "targets": targets,
                        "options": sorted(getattr(q, "supported_options", [])),
                        "imatrix": callable(getattr(q, "compute_imatrix", None)),
                        "reports_digest": getattr(q, "reports_digest", False) is True})
        return out

    @api.endpoint("POST", "/v1/imatrix", "Start computing an importance matrix from "
                  "calibration text", body=IMATRIX_BODY)
    def start_imatrix(call: Call) -> dict[str, Any]:
        body = call.body
        text = body["text"]
        check_readable_by(text, call.who)
        if not Path(text).is_absolute() or not Path(text).is_file():
            raise QmgrError("give 'ref' and 'text', the absolute path of a calibration text "
                            "file", code="bad_request")
        quantizing.parent(body["ref"])
        return jobs.submit("imatrix", {"ref": body["ref"], "text": text,
                                       "n_ctx": body.get("n_ctx"),
                                       "quantizer": body.get("quantizer")})

    return api.endpoints
