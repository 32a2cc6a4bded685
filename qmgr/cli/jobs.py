"""``qmgr jobs``, ``qmgr cancel``: the daemon's long work (pulls, quantizations, evals)."""

from __future__ import annotations

import click

from qmgr.cli import cli, client, emit_json, json_option, table
from qmgr.cli.progress import job_line


@cli.command(name="jobs")
@json_option
@click.pass_context
def jobs(ctx: click.Context, as_json: bool) -> None:
    """List recent jobs (pulls and other long work)."""
    out = client(ctx).get("/v1/jobs")
    if as_json:
        emit_json(out)
        return
    rows = [[str(j["id"]), j["kind"], j["arguments"].get("ref", ""), j["state"],
             job_line(j) if j["state"] == "running" else (j.get("error") or "")] for j in out]
    click.echo(table(rows, ["ID", "KIND", "REF", "STATE", "PROGRESS"]))


@cli.command(name="cancel")
@click.argument("job_id", type=int)
@click.pass_context
def cancel(ctx: click.Context, job_id: int) -> None:
    """Cancel a running job."""
    client(ctx).post(f"/v1/jobs/{job_id}/cancel", {})
    click.echo(f"cancelling job {job_id}")
