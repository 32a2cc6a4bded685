"""``qmgr watch``: folders whose GGUF files are cataloged as they appear."""

from __future__ import annotations

import click

from qmgr.cli import cli, client, emit_json, json_option
from qmgr.client import absolute


@cli.group(name="watch")
def watch() -> None:
    """Watch folders for GGUF files."""


@watch.command(name="add")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@json_option
@click.pass_context
def add(ctx: click.Context, directory: str, as_json: bool) -> None:
    """Watch DIRECTORY (and its subfolders)."""
    out = client(ctx).post("/v1/watches", {"path": absolute(directory)})
    if as_json:
        emit_json(out)
    else:
        click.echo(f"watching {out['path']}")


@watch.command(name="list")
@json_option
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List watched folders, and files recently refused in them."""
    out = client(ctx).get("/v1/watches")
    if as_json:
        emit_json(out)
        return
    for f in out["folders"]:
        click.echo(f["path"])
    for r in out["refused"]:
        click.echo(f"refused {r['path']}: {r['reason']}", err=True)


@watch.command(name="rm")
@click.argument("directory")
@click.pass_context
def rm(ctx: click.Context, directory: str) -> None:
    """Stop watching DIRECTORY (cataloged variants stay)."""
    client(ctx).delete("/v1/watches", path=absolute(directory))
    click.echo(f"no longer watching {absolute(directory)}")
