"""``qmgr fleet``: the nodes sharing this daemon's catalog."""

from __future__ import annotations

from typing import Any

import click

from qmgr.cli import cli, client, emit_json, human_size, json_option, table


def _devices(devices: list[dict[str, Any]]) -> str:
    """``cpu 16.0 GiB free / 32.0 GiB, cuda0 20.1 GiB / 24.0 GiB``."""
    out = []
    for d in devices:
        name = d["kind"] if d["kind"] in ("cpu", "metal") else f"{d['kind']}{d.get('index', 0)}"
        out.append(f"{name} {human_size(d.get('memory_free'))} free / "
                   f"{human_size(d.get('memory_total'))}")
    return ", ".join(out) or "-"


@cli.command(name="fleet")
@json_option
@click.pass_context
def fleet(ctx: click.Context, as_json: bool) -> None:
    """List the fleet's nodes: state, address, devices and free memory, loaded models,
    blobs held, last heartbeat (docs/fleet.md)."""
    out = client(ctx).get("/v1/fleet")
    if as_json:
        emit_json(out)
        return
    rows = []
    for n in out["nodes"]:
        age = n.get("heartbeat_age")
        rows.append([n["name"] + (" *" if n["name"] == out["node"] else ""), n["state"],
                     n.get("address") or "-", _devices(n["devices"]),
                     ", ".join(m["ref"] for m in n["loaded"]) or "-",
                     f"{n['blobs']} ({human_size(n['blob_bytes'])})",
                     str(n["running_jobs"]), "-" if age is None else f"{age:.0f} s ago"])
    click.echo(table(rows, ["NODE", "STATE", "ADDRESS", "DEVICES", "LOADED", "BLOBS", "JOBS",
                            "HEARTBEAT"]))
