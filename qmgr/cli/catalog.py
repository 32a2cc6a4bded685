"""Commands on the catalog: list, show, path, rm, import."""

from __future__ import annotations

import sys
from typing import Any

import click

from qmgr.cli import cli, client, emit_json, human_count, human_size, json_option, safe, table
from qmgr.client import absolute, ref_path


@cli.command(name="list")
@json_option
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List cataloged variants: name, quant, size, bits per weight, parameters, state."""
    raw = client(ctx).request_raw("GET", "/v1/variants")
    if as_json and not sys.stdout.isatty():
        # Programs get the daemon's JSON as it came: no decoding and re-encoding.
        sys.stdout.buffer.write(raw.body + b"\n")
        return
    variants = raw.json()
    if as_json:
        emit_json(variants)
        return
    if not variants:
        click.echo("No models yet: `qmgr import FILE.gguf` or `qmgr watch add DIR`.", err=True)
        return
    rows = [
        [v["ref"] + (" *" if v.get("default") else ""), v["quant_type"] or "-",
         human_size(v["size"]), f"{v['bits_per_weight']:.2f}" if v["bits_per_weight"] else "-",
         human_count(v["parameter_count"]), v["architecture"] or "-", _state(v),
         v.get("source_ref") or v["origin"]]
        for v in variants
    ]
    click.echo(table(rows, ["NAME", "QUANT", "SIZE", "BPW", "PARAMS", "ARCH", "STATE", "SOURCE"]))
    defaults = [v["model"] for v in variants if v.get("default")]
    if defaults and sys.stderr.isatty():
        click.echo(f"* what the bare name means (`qmgr run {defaults[0]}`)", err=True)


def _state(v: dict[str, Any]) -> str:
    return "unverified" if v["state"] == "ready" and v.get("verified") is False else v["state"]


FACT_LABELS = [
    ("architecture", "architecture"), ("name", "model name"), ("quant_type", "file type"),
    ("parameter_count", "parameters"), ("bits_per_weight", "bits per weight"),
    ("block_count", "blocks"), ("context_length", "context length"),
    ("embedding_length", "embedding length"), ("feed_forward_length", "feed-forward length"),
    ("head_count", "attention heads"), ("head_count_kv", "KV heads"),
    ("key_length", "key head dim"), ("value_length", "value head dim"),
    ("sliding_window", "sliding window"), ("sliding_window_pattern", "sliding window pattern"),
    ("vocab_size", "vocabulary"), ("split_count", "shards"), ("version", "GGUF version"),
    ("header_bytes", "header bytes"),
]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(str, value[:8]))}, ...] ({len(value)} values)"
    return str(value)


@cli.command(name="show")
@click.argument("ref")
@json_option
@click.pass_context
def show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show a variant: catalog row, GGUF header facts, lineage."""
    v = client(ctx).get(f"/v1/variants/{ref_path(ref)}")
    if as_json:
        emit_json(v)
        return
    facts = v.get("facts") or {}
    lines = [
        ("ref", v["ref"] + (f" (what `{v['model']}` means)" if v.get("default") else "")),
        ("state", v["state"] + ("" if v.get("verified", True) else
                                " (unverified: no digest was known before the download; "
                                "pin one with `qmgr pull --sha256 HEX URL`)")),
        ("origin", v["origin"]),
        ("source", v.get("source_ref") or "-"),
        ("size", f"{human_size(v['size'])} ({v['size']} bytes)"), ("sha256", v["sha256"]),
    ]
    lines += [("file" if len(v["paths"]) == 1 else f"shard {i + 1}", p)
              for i, p in enumerate(v["paths"])]
    lines += [(a["kind"], f"{a['path']} ({a['name']}, {human_size(a['size'])})")
              for a in v.get("attachments") or []]
    lines += [(label, _fmt(facts[key])) for key, label in FACT_LABELS
              if facts.get(key) is not None]
    width = max(len(k) for k, _ in lines)
    for k, val in lines:
        click.echo(f"{k.ljust(width)}  {safe(val)}")
    types = facts.get("tensor_types") or {}
    if types:
        click.echo("tensor types".ljust(width) + "  " + safe(
            ", ".join(f"{t}×{n}" for t, n in sorted(types.items(), key=lambda x: -x[1]))))
    if v.get("lineage") or v.get("children"):
        click.echo("lineage")
        chain = [*reversed(v.get("lineage") or []), v["ref"]]
        for depth, ref_ in enumerate(chain):
            click.echo("  " + "   " * depth + ("└─ " if depth else "") + ref_)
        for child in v.get("children") or []:
            click.echo("  " + "   " * len(chain) + "└─ " + child)


@cli.command(name="path")
@click.argument("ref")
@click.option("--all-shards", is_flag=True, help="Print every shard, not just the first.")
@click.pass_context
def path(ctx: click.Context, ref: str, all_shards: bool) -> None:
    """Print a variant's file path, for other tools: llama-server -m $(qmgr path NAME)."""
    v = client(ctx).get(f"/v1/variants/{ref_path(ref)}")
    if v["state"] != "ready":
        raise click.ClickException(f"{v['ref']} is {v['state']}: its file is not usable")
    for p in v["paths"] if all_shards else v["paths"][:1]:
        click.echo(p)


@cli.command(name="rm")
@click.argument("ref")
@click.option("--all", "every", is_flag=True, help="Remove every variant the name matches.")
@json_option
@click.pass_context
def rm(ctx: click.Context, ref: str, every: bool, as_json: bool) -> None:
    """Remove a variant from the catalog (and its file, if it lives in qmgr's store)."""
    out = client(ctx).delete(f"/v1/variants/{ref_path(ref)}", **({"all": 1} if every else {}))
    if as_json:
        emit_json(out)
        return
    for r in out["removed"]:
        click.echo(f"removed {r}")


@cli.command(name="import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--copy", is_flag=True, help="Copy into qmgr's store instead of cataloging in place.")
@click.option("--name", help="Model name (default: from the file name).")
@json_option
@click.pass_context
def import_(ctx: click.Context, paths: tuple[str, ...], copy: bool, name: str | None,
            as_json: bool) -> None:
    """Catalog GGUF files (sharded models by their first shard)."""
    out = client(ctx).post("/v1/imports",
                           {"paths": [absolute(p) for p in paths], "copy": copy, "name": name})
    results = out["results"]
    if as_json:
        emit_json(results)
    failed = [r for r in results if "error" in r]
    for r in results:
        if "error" in r:
            click.echo(f"Error: {r['path']}: {r['error']['message']}", err=True)
        elif not as_json:
            verb = "imported" if r["created"] else "already cataloged"
            click.echo(f"{verb} {r['variant']['ref']}  ({r['path']})")
    if failed:
        sys.exit(1)
