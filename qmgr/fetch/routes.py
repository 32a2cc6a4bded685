"""Fetching's endpoints: pulls, what fits, the hardware, what a source offers, aliases."""

from __future__ import annotations

from typing import Any

from qmgr.catalog.db import Catalog
from qmgr.errors import QmgrError
from qmgr.fetch import aliases
from qmgr.fetch.fitting import FitRequest, Fitter
from qmgr.fetch.pull import Puller
from qmgr.refs import parse
from qmgr.settings import SECRET_ENV
from qmgr.work.api import Call, Endpoint, Table
from qmgr.work.jobs import JobRunner

PULL_BODY = {
    "type": "object", "required": ["ref"],
    "properties": {"ref": {"type": "string"}, "insecure": {"type": "boolean"},
                   "sha256": {"type": "string", "pattern": "[0-9a-fA-F]{64}",
                              "description": "64 hex digits"},
                   "fit": {"type": "boolean"}, "ctx": {"type": "integer"},
                   "kv_type": {"type": "string"}, "headroom": {"type": "number"},
                   "hw": {"type": "string"},
                   "fleet": {"type": "boolean", "description": "with fit: the node of the "
                             "fleet to put it on is chosen too, and the job runs there"}},
}
ALIAS_BODY = {"type": "object", "required": ["name", "reference"],
              "properties": {"name": {"type": "string"}, "reference": {"type": "string"}}}


def submit_pull(puller: Puller, fitter: Fitter, jobs: JobRunner, body: dict[str, Any],
                env: dict[str, str]) -> dict[str, Any]:
    """Start a pull job for ``body`` (PULL_BODY: ``ref``, ``fit``...) with the client's
    settings ``env``; with ``fit``, the decision is made first and the job pulls the variant
    chosen. The job, as ``/v1/jobs/{id}`` shows it."""
    ref, sha = body["ref"], body.get("sha256")
    typed = puller.parse(ref)  # a bad reference fails here, before a job exists
    args: dict[str, Any] = {"ref": ref, "insecure": bool(body.get("insecure")),
                            "sha256": sha.lower() if sha else None}
    if any(k not in SECRET_ENV for k in env):
        args["env"] = {k: v for k, v in env.items() if k not in SECRET_ENV}
    node_id = None
    if body.get("fleet") and not body.get("fit"):
        raise QmgrError("fleet goes with fit: the decision names the node", code="bad_request")
    if body.get("fit"):
        # Decide first, then pull what was chosen: the job is an ordinary pull of one
        # variant. The fit service for this request: the client's settings (its Hub endpoint
        # and token) over the daemon's.
        fitting = fitter if not env else Fitter(puller.with_env(env), fitter.settings)
        decision = fitting.fit(FitRequest.from_args({**body, "ref": ref, "remote": True}))[0]
        if decision["pick"] is None:
            raise QmgrError(f"nothing downloaded: {decision['reason']}", code="does_not_fit")
        if parse(decision["pick_source_ref"]).kind == "hf":
            args["ref"] = decision["pick_source_ref"]  # one variant of the repository
        args.update(name=typed.name if typed.kind == "alias" else None, default=True,
                    decision=decision)
        node_id = decision.get("node_id")
    return jobs.submit("pull", args, secrets={k: v for k, v in env.items() if k in SECRET_ENV},
                       node_id=node_id)


def routes(catalog: Catalog, puller: Puller, fitter: Fitter, jobs: JobRunner) -> list[Endpoint]:
    api = Table()

    def fitter_for(env: dict[str, str]) -> Fitter:
        """The fit service for one request: with the client's settings (its Hub endpoint and
        token) over the daemon's."""
        return fitter if not env else Fitter(puller.with_env(env), fitter.settings)

    @api.endpoint("POST", "/v1/pulls", "Start a pull job (returns the job; follow "
                  "/v1/jobs/{id}/events)", body=PULL_BODY)
    def start_pull(call: Call) -> dict[str, Any]:
        return submit_pull(puller, fitter, jobs, call.body, call.env)

    @api.endpoint("GET", "/v1/fit", "Which variant of a reference fits this machine (or, with "
                  "fleet=1, which node of the fleet), and why (?ref=REF[&ctx=N]"
                  "[&kv_type=f16|q8_0|q4_0][&headroom=0.1][&insecure=1][&fleet=1])")
    def fit(call: Call) -> dict[str, Any]:
        q: dict[str, Any] = dict(call.query)
        if not q.get("ref"):
            raise QmgrError("give the reference as ?ref=REF", code="bad_request")
        q["insecure"] = q.get("insecure") in ("1", "true")
        return fitter_for(call.env).fit(FitRequest.from_args(q))[0]

    @api.endpoint("GET", "/v1/hardware", "Devices (probed, or declared by QMGR_HW / config) "
                  "and probe errors")
    def hardware(call: Call) -> dict[str, Any]:
        return fitter.hardware(call.query.get("hw")).to_dict()

    @api.endpoint("GET", "/v1/remote", "What a reference's source offers (?ref=REF"
                  "[&insecure=1][&headers=0]): quant, size, sha256, and from each header read "
                  "by HTTP Range, parameters and bits per weight")
    def remote_variants(call: Call) -> dict[str, Any]:
        q = call.query
        if not q.get("ref"):
            raise QmgrError("give the reference as ?ref=REF", code="bad_request")
        return puller.with_env(call.env).describe_remote(
            q["ref"], insecure=q.get("insecure") in ("1", "true"),
            headers=q.get("headers") not in ("0", "false"))

    @api.endpoint("GET", "/v1/aliases", "Model names: the built-in table and the user's own")
    def list_aliases(call: Call) -> list[dict[str, Any]]:
        with catalog.reading() as session:
            return aliases.all_aliases(session)

    @api.endpoint("POST", "/v1/aliases", "Add or replace a user alias", body=ALIAS_BODY)
    def add_alias(call: Call) -> dict[str, str]:
        with catalog.writing() as session:
            return aliases.set_alias(session, call.body["name"], call.body["reference"])

    @api.endpoint("DELETE", "/v1/aliases/{name}", "Remove a user alias")
    def remove_alias(call: Call) -> dict[str, Any]:
        name = call.params["name"]
        with catalog.writing() as session:
            aliases.remove_alias(session, name)
        return {"removed": name}

    return api.endpoints
