"""``qmgr status``, ``qmgr plugins``, ``qmgr daemon``, ``qmgr serve``."""

from __future__ import annotations

import sys

import click

from qmgr.cli import cli, client, emit_json, json_option, table


@cli.command(name="status")
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the daemon's version, socket, data directory and catalog counts."""
    out = client(ctx).get("/v1/status")
    if as_json:
        emit_json(out)
        return
    states = ", ".join(f"{n} {s}" for s, n in sorted(out["variants_by_state"].items()))
    click.echo(f"qmgrd {out['version']} (pid {out['pid']}, up {out['uptime_s']:.0f} s)")
    click.echo(f"socket    {out['socket']}")
    click.echo(f"home      {out['home']}")
    click.echo(f"catalog   {out['models']} models, {out['variants']} variants"
               + (f" ({states})" if states else ""))
    if out["plugin_errors"]:
        click.echo(f"plugins   {out['plugin_errors']} errors: see `qmgr plugins`")


@cli.command(name="plugins")
@json_option
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List the daemon's plugins: name, the package that installed it and its version, what
    it provides, errors (--json adds the hooks each implements)."""
    out = client(ctx).get("/v1/plugins")
    if as_json:
        emit_json(out)
        return
    rows = [[p["name"], p["distribution"], p["version"],
             "built-in" if p["builtin"] else "installed", ", ".join(p["provides"]) or "-"]
            for p in out]
    click.echo(table(rows, ["NAME", "PACKAGE", "VERSION", "KIND", "PROVIDES"]))
    for p in out:
        for e in p["errors"]:
            click.echo(f"Error: plugin {p['name']}: {e}", err=True)


@cli.command(name="daemon")
@click.option("--system", is_flag=True, default=None,
              help="Run as the system service (/run/qmgr, /var/lib/qmgr).")
@click.option("--home", metavar="DIR", help="Data directory (catalog and store).")
@click.pass_context
def daemon(ctx: click.Context, system: bool | None, home: str | None) -> None:
    """Run the daemon in the foreground (what `qmgrd` does)."""
    _exec_daemon(ctx, system, home, None)


@cli.command(name="serve")
@click.option("--listen", metavar="HOST:PORT", default="127.0.0.1:11434", show_default=True,
              help="Where to serve Ollama's API (off loopback: needs api_key in the config).")
@click.option("--home", metavar="DIR", help="Data directory (catalog and store).")
@click.pass_context
def serve(ctx: click.Context, listen: str, home: str | None) -> None:
    """Run the daemon in the foreground, serving the cataloged models to other programs in
    Ollama's API (as `ollama serve` does): Open WebUI, LangChain, the ollama client...

    qmgr's own commands keep using the daemon's Unix socket. See docs/serve.md."""
    _exec_daemon(ctx, None, home, listen)


def _exec_daemon(ctx: click.Context, system: bool | None, home: str | None,
                 listen: str | None) -> None:
    import os

    root = ctx.find_root().obj or {}
    argv = [sys.executable, "-m", "qmgr.daemon.main"]
    if system:
        argv.append("--system")
    if root.get("socket"):
        argv += ["--socket", root["socket"]]
    if home:
        argv += ["--home", home]
    if listen:
        argv += ["--listen", listen]
    sys.stdout.flush()
    sys.stderr.flush()
    # This process becomes qmgrd: the client never imports the daemon (its layer rule).
    os.execv(sys.executable, argv)
