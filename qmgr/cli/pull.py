"""``qmgr pull``, ``qmgr variants``, ``qmgr alias``."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from qmgr.cli import cli, client, emit_json, human_size, json_option, table
from qmgr.cli.fit import fit_options, fit_query, show_decision
from qmgr.cli.progress import follow


@cli.command(name="pull")
@click.argument("ref")
@click.option("--insecure", is_flag=True, help="Allow plain http (a registry on your network).")
@click.option("--sha256", metavar="HEX", help="Expected sha256 of a plain URL's file.")
@click.option("--fit", "fit_", is_flag=True,
              help="Pull the best variant that fits this machine (see `qmgr fit`).")
@click.option("--dry-run", is_flag=True, help="With --fit: show the decision, download nothing.")
@click.option("--fleet", is_flag=True, help="With --fit: the node of the fleet it fits best "
              "pulls it (docs/fleet.md).")
@fit_options
@click.option("--detach", is_flag=True, help="Start the pull and return; it runs in the daemon.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@json_option
@click.pass_context
def pull(ctx: click.Context, ref: str, insecure: bool, sha256: str | None, fit_: bool,
         dry_run: bool, fleet: bool, ctx_len: int | None, kv_type: str | None,
         headroom: float | None, detach: bool, quiet: bool, as_json: bool) -> None:
    """Download a model variant, verify it, and catalog it.

    REF is NAME[:QUANT] (an alias), hf.co/OWNER/REPO[:QUANT], hf://OWNER/REPO/FILE,
    ollama://[HOST/]NAMESPACE/MODEL[:TAG] or https://.../FILE.gguf. With --fit, qmgr picks
    the quant: the best quality that fits this machine's memory at --ctx.
    """
    c = client(ctx)
    params = fit_query(ctx_len, kv_type, headroom)
    if {"ctx", "kv_type", "headroom"} & set(params) and not fit_:
        raise click.UsageError("--ctx, --kv-type and --headroom go with --fit")
    if dry_run and not fit_:
        raise click.UsageError("--dry-run goes with --fit")
    if fleet and not fit_:
        raise click.UsageError("--fleet goes with --fit")
    if fleet:
        params["fleet"] = 1
    if dry_run:
        query = {"ref": ref, "remote": 1, **params, **({"insecure": 1} if insecure else {})}
        decision = c.get("/v1/fit", **query)
        if as_json:
            emit_json(decision)
        elif not quiet:
            show_decision(decision)  # the decision is the result
        return
    # With --fit the daemon decides first, then starts a pull of what it chose.
    job = c.post("/v1/pulls", {"ref": ref, "insecure": insecure, "sha256": sha256,
                               **({"fit": True, **params, "fleet": fleet} if fit_ else {})})
    if fit_ and not quiet and not as_json:
        show_decision(job["arguments"]["decision"], err=True)
    if detach:
        if as_json:
            emit_json(job)
        else:
            click.echo(f"job {job['id']} pulling {ref} (`qmgr jobs` to follow)", err=True)
        return
    final = follow(ctx, job, as_json=as_json, quiet=quiet, label=ref)
    if final["state"] != "succeeded":
        raise click.ClickException(final.get("error") or f"pull {final['state']}")
    if as_json:
        return
    result = final.get("result") or {}
    variant = result.get("variant") or {}
    got = result.get("downloaded", 0)
    if not quiet:
        how = f"downloaded {human_size(got)}" if got else "no download needed"
        click.echo(f"pulled {variant.get('ref')} ({human_size(variant.get('size'))}, {how})",
                   err=True)
    click.echo(variant.get("ref"))


@cli.command(name="variants")
@click.argument("ref")
@click.option("--insecure", is_flag=True, help="Allow plain http (a registry on your network).")
@click.option("--no-headers", is_flag=True, help="Skip reading each variant's GGUF header.")
@json_option
@click.pass_context
def variants(ctx: click.Context, ref: str, insecure: bool, no_headers: bool,
             as_json: bool) -> None:
    """List what a source offers for REF: quant, size, bits per weight, sha256."""
    query: dict[str, Any] = {"ref": ref}
    if insecure:
        query["insecure"] = 1
    if no_headers:
        query["headers"] = 0
    out = client(ctx).get("/v1/remote", **query)
    if as_json:
        emit_json(out)
        return
    rows = [[v["quant"] or "?", human_size(v["size"]),
             f"{v['bits_per_weight']:.2f}" if v.get("bits_per_weight") else "-",
             str(len(v["files"])), (v["sha256"] or "-")[:16]] for v in out["variants"]]
    click.echo(f"{out['ref']}", err=True)
    click.echo(table(rows, ["QUANT", "SIZE", "BPW", "FILES", "SHA256"]))
    projectors = out.get("projectors") or []
    if projectors:
        pulled = (out["variants"][0].get("attachments") or [{}])[0].get("name") \
            if out["variants"] else None
        click.echo("vision projectors (pulled with the model): " + ", ".join(
            p["name"] + (" (this one)" if p["name"] == pulled else "") for p in projectors),
            err=True)
    extras, skipped = out.get("extras") or [], out.get("skipped") or []
    if extras:
        click.echo(f"{len(extras)} other files (not fetched): "
                   + ", ".join(e["name"] for e in extras[:6])
                   + (", ..." if len(extras) > 6 else ""), err=True)
    for s in skipped:
        click.echo(f"skipped {s['name']}: {s['why']}", err=True)


@cli.group(name="alias")
def alias() -> None:
    """Short model names: the built-in table and your own."""


@alias.command(name="add")
@click.argument("name")
@click.argument("reference")
@click.pass_context
def alias_add(ctx: click.Context, name: str, reference: str) -> None:
    """Make NAME stand for REFERENCE (e.g. hf.co/OWNER/REPO)."""
    out = client(ctx).post("/v1/aliases", {"name": name, "reference": reference})
    click.echo(f"{out['name']} -> {out['reference']}")


@alias.command(name="list")
@json_option
@click.pass_context
def alias_list(ctx: click.Context, as_json: bool) -> None:
    """List model names and what they stand for."""
    out = client(ctx).get("/v1/aliases")
    if as_json:
        emit_json(out)
        return
    click.echo(table([[a["name"], a["reference"], "built-in" if a["builtin"] else "yours"]
                      for a in out], ["NAME", "REFERENCE", "KIND"]))


@alias.command(name="rm")
@click.argument("name")
@click.pass_context
def alias_rm(ctx: click.Context, name: str) -> None:
    """Remove one of your aliases."""
    client(ctx).delete(f"/v1/aliases/{quote(name, safe='')}")
    click.echo(f"removed alias {name}")
