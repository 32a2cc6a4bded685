"""``qmgr pull``, ``qmgr variants``, ``qmgr jobs``, ``qmgr cancel``, ``qmgr alias``."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any
from urllib.parse import quote

import click

from qmgr.cli import cli, client, emit_json, human_size, table
from qmgr.cli.fit import fit_options, fit_query, show_decision

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _bar(job: dict[str, Any], width: int = 28) -> str:
    p = job.get("progress") or {}
    phase = p.get("phase") or job["state"]
    done, total = p.get("done") or 0, p.get("total")
    if p.get("fraction") is not None and phase not in ("done", "downloading"):
        frac = min(1.0, float(p["fraction"]))
        filled = int(frac * width)
        return (f"{phase} {frac * 100:5.1f}% [{'#' * filled}{'.' * (width - filled)}] "
                f"{p.get('message', '')[:40]}")
    if phase != "downloading" or not total:
        return f"{phase}..."
    frac = min(1.0, done / total)
    filled = int(frac * width)
    speed = p.get("speed")
    eta = f"  ETA {max(0, (total - done) / speed):.0f} s" if speed else ""
    rate = f"  {human_size(int(speed))}/s" if speed else ""
    return (f"{frac * 100:5.1f}% [{'#' * filled}{'.' * (width - filled)}] "
            f"{human_size(done)} / {human_size(total)}{rate}{eta}")


def _columns() -> int:
    """The terminal's width now (it may be resized while a pull runs)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 80


def progress_line(label: str, job: dict[str, Any], columns: int) -> str:
    """One line of progress that fits ``columns``: a line that wraps leaves a stale copy
    behind at every redraw, as ``\r`` only goes back to the start of the last row. The bar
    narrows first, then the label loses its middle, then goes; then the end is cut."""
    room = max(columns - 1, 10)
    short = label if len(label) <= 24 else label[:10] + "..." + label[-11:]
    for text in (f"{label}  {_bar(job, 28)}", f"{label}  {_bar(job, 10)}",
                 f"{short}  {_bar(job, 10)}", _bar(job, 10)):
        if len(text) <= room:
            return text
    return _bar(job, 0)[:room]


def follow(ctx: click.Context, job: dict[str, Any], *, as_json: bool, quiet: bool,
           label: str) -> dict[str, Any]:
    """Show a job's events until it ends; returns its final state. Ctrl-C asks whether to
    cancel it or leave it running in the daemon."""
    c = client(ctx)
    tty = sys.stderr.isatty() and not quiet and not as_json
    last_phase = None
    last_draw = 0.0
    final = job
    # Without a bar or --json, only changes of state and phase are wanted.
    query = "" if tty or as_json else "?progress=0"
    try:
        for event in c.stream_lines(f"/v1/jobs/{job['id']}/events{query}"):
            final = event
            if as_json:
                sys.stdout.write(json.dumps(event) + "\n")
                sys.stdout.flush()
                continue
            phase = (event.get("progress") or {}).get("phase")
            if tty and (time.monotonic() - last_draw > 0.1 or event["state"] != "running"):
                click.echo("\r" + progress_line(label, event, _columns()) + "\x1b[K", nl=False,
                           err=True)
                last_draw = time.monotonic()
            elif not tty and not quiet and phase != last_phase and phase:
                click.echo(f"{label}: {phase}", err=True)
            last_phase = phase
    except KeyboardInterrupt:
        if tty:
            click.echo("", err=True)
        leave = sys.stdin.isatty() and not click.confirm(
            f"Cancel job {job['id']}? (no leaves it running in the daemon)", default=False,
            err=True)
        if leave:
            click.echo(f"job {job['id']} goes on: `qmgr jobs` shows it, "
                       f"`qmgr cancel {job['id']}` stops it", err=True)
            sys.exit(130)
        c.post(f"/v1/jobs/{job['id']}/cancel", {})
        click.echo(f"cancelled job {job['id']}", err=True)
        sys.exit(130)
    if tty:
        click.echo("", err=True)
    return final


@cli.command(name="pull")
@click.argument("ref")
@click.option("--insecure", is_flag=True, help="Allow plain http (a registry on your network).")
@click.option("--sha256", metavar="HEX", help="Expected sha256 of a plain URL's file.")
@click.option("--fit", "fit_", is_flag=True,
              help="Pull the best variant that fits this machine (see `qmgr fit`).")
@click.option("--dry-run", is_flag=True, help="With --fit: show the decision, download nothing.")
@fit_options
@click.option("--detach", is_flag=True, help="Start the pull and return; it runs in the daemon.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@json_option
@click.pass_context
def pull(ctx: click.Context, ref: str, insecure: bool, sha256: str | None, fit_: bool,
         dry_run: bool, ctx_len: int | None, kv_type: str | None, headroom: float | None,
         detach: bool, quiet: bool, as_json: bool) -> None:
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
                               **({"fit": True, **params} if fit_ else {})})
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
             _bar(j) if j["state"] == "running" else (j.get("error") or "")] for j in out]
    click.echo(table(rows, ["ID", "KIND", "REF", "STATE", "PROGRESS"]))


@cli.command(name="cancel")
@click.argument("job_id", type=int)
@click.pass_context
def cancel(ctx: click.Context, job_id: int) -> None:
    """Cancel a running job."""
    client(ctx).post(f"/v1/jobs/{job_id}/cancel", {})
    click.echo(f"cancelling job {job_id}")


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
