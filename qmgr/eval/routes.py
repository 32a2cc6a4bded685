"""Measuring's endpoints: eval and bench jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qmgr.errors import QmgrError
from qmgr.eval.jobs import Measuring
from qmgr.work.access import check_readable_by
from qmgr.work.api import Call, Endpoint, Table
from qmgr.work.jobs import JobRunner

MEASURE_BODY = {
    "type": "object", "required": ["ref"],
    "properties": {"ref": {"type": "string"},
                   "variants": {"type": "array", "items": {"type": "string"}},
                   "text": {"type": "string"}, "ctx": {"type": "integer"},
                   "tokens": {"type": "integer"}, "max_tokens": {"type": "integer"}},
}


def routes(measuring: Measuring, jobs: JobRunner) -> list[Endpoint]:
    api = Table()

    @api.endpoint("POST", "/v1/eval", "Start an eval job: perplexity, ΔPPL, KL divergence and "
                  "top-token agreement of each variant against the model's highest-precision "
                  "one", body=MEASURE_BODY)
    def start_eval(call: Call) -> dict[str, Any]:
        body = call.body
        text = body.get("text")
        if text:
            check_readable_by(text, call.who)
        if text and (not Path(text).is_absolute() or not Path(text).is_file()):
            raise QmgrError(f"--text {text}: not a file", code="bad_request")
        measuring.variants(body["ref"], body.get("variants"))  # fail before a job exists
        return jobs.submit("eval", body)

    @api.endpoint("POST", "/v1/bench", "Start a bench job: prompt and generation tokens/s per "
                  "variant", body=MEASURE_BODY)
    def start_bench(call: Call) -> dict[str, Any]:
        body = call.body
        measuring.variants(body["ref"], body.get("variants"))
        return jobs.submit("bench", body)

    return api.endpoints
