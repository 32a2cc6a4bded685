"""``qmgr fit`` and ``qmgr hw``: which variant fits this machine, and what the machine has."""

from __future__ import annotations

from typing import Any

import click

from qmgr.cli import cli, client, emit_json, human_size, json_option, table
from qmgr.settings import knob

KV_TYPES = ["f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]


def fit_options(f: Any) -> Any:
    f = click.option("--headroom", type=float, default=None,
                     help="Fraction of each device kept free (default 0.10).")(f)
    f = click.option("--kv-type", type=click.Choice(KV_TYPES), default=None,
                     help="KV cache type (default f16).")(f)
    f = click.option("--ctx", "ctx_len", type=int, default=None,
                     help="Context length (default 4096).")(f)
    return f


def fit_query(ctx_len: int | None, kv_type: str | None, headroom: float | None) -> dict[str, Any]:
    """Fit parameters for the daemon; the client's QMGR_HW travels with them, so a declared
    machine applies to this command even when the daemon was started without it."""

    return {k: v for k, v in {"ctx": ctx_len, "kv_type": kv_type, "headroom": headroom,
                              "hw": knob("QMGR_HW")}.items()
            if v is not None}


def _fit_cell(o: dict[str, Any]) -> str:
    p = o["placement"]
    if o["fit"] == "gpu":
        return "fully (GPU)"
    if o["fit"] == "partial":
        return f"partly ({p['gpu_layers']}/{p['n_layer']} layers on GPU)"
    if o["fit"] == "cpu":
        return "fully (RAM)" if len(p["devices"]) == 1 else "RAM only"
    return "no"


def show_nodes(out: dict[str, Any], err: bool = False) -> None:
    """A fleet decision's per-node picks (``fit --fleet``)."""
    rows = [[("* " if n["name"] == out.get("node") else "  ") + n["name"], n["pick"] or "-",
             human_size(n["free"]), "yes" if n["has_blob"] else "-"] for n in out["nodes"]]
    click.echo(table(rows, ["  NODE", "PICK", "FREE", "HAS IT"]), err=err)


def show_decision(out: dict[str, Any], err: bool = False) -> None:
    """The table of `qmgr fit`, best quality first, then the pick, why, and notes (on stdout,
    or with ``err`` on stderr: `pull --fit` keeps stdout for the name it pulled); the
    parameters and hardware on stderr. RATED says where each quality figure comes from:
    measured on this model, published (the Llama-3-8B table), estimated (from bits per
    weight), inherited (re-quantized: capped by an ancestor) or unknown."""
    kinds = []
    for o in out["options"]:
        for d in o["placement"]["devices"]:
            label = d["kind"] if d["kind"] == "cpu" else f"{d['kind']}{d['index']}"
            if label not in kinds:
                kinds.append(label)
    rows = []
    for o in out["options"]:
        per = {(d["kind"] if d["kind"] == "cpu" else f"{d['kind']}{d['index']}"): d["total"]
               for d in o["placement"]["devices"]}
        mark = "*" if o["quant"] == out["pick"] and (
            o.get("source_ref") == out.get("pick_source_ref") or not o.get("source_ref")) else " "
        rows.append([f"{mark} {o['quant'] or '?'}", human_size(o["size"]),
                     *[human_size(per[k]) if per.get(k) else "-" for k in kinds],
                     _fit_cell(o), o.get("quality_source") or "-", o["quality_note"]])
    headers = ["  QUANT", "FILE", *[f"MEM {k.upper()}" for k in kinds], "FITS", "RATED",
               "QUALITY"]
    click.echo(table(rows, headers), err=err)
    click.echo("", err=err)
    if out.get("nodes"):
        show_nodes(out, err)
        click.echo("", err=err)
    if out["pick"]:
        click.echo(f"pick: {out['reason']}", err=err)
    else:
        click.echo(f"no pick: {out['reason']}", err=err)
    for note in out["notes"]:
        click.echo(f"note: {note}", err=err)
    hw = out["hardware"]
    devices = ", ".join(f"{d['kind']} {human_size(d['memory_total'])}" for d in hw["devices"])
    click.echo(f"(--ctx {out['ctx']}, KV cache {out['kv_type']}, {out['headroom']:.0%} kept "
               f"free; hardware from {hw['source']}: {devices}; headers read: "
               f"{human_size(out['header_bytes'])})", err=True)


@cli.command(name="fit")
@click.argument("ref")
@fit_options
@click.option("--insecure", is_flag=True, help="Allow plain http (a registry on your network).")
@click.option("--fleet", is_flag=True, help="Decide for every node of the fleet and name the "
              "node too (docs/fleet.md).")
@json_option
@click.pass_context
def fit(ctx: click.Context, ref: str, ctx_len: int | None, kv_type: str | None,
        headroom: float | None, insecure: bool, fleet: bool, as_json: bool) -> None:
    """Which variant of REF fits this machine: memory per device, quality, and the pick.

    Reads only the GGUF headers (HTTP Range requests for a remote REF): nothing is downloaded.
    """
    query = fit_query(ctx_len, kv_type, headroom)
    query["ref"] = ref
    if insecure:
        query["insecure"] = 1
    if fleet:
        query["fleet"] = 1
    out = client(ctx).get("/v1/fit", **query)
    if as_json:
        emit_json(out)
    else:
        show_decision(out)


@cli.command(name="hw")
@json_option
@click.pass_context
def hw(ctx: click.Context, as_json: bool) -> None:
    """The devices qmgr plans for: probed, or declared with QMGR_HW='ram=16GiB,cuda=24GiB'."""

    hw_spec = knob("QMGR_HW")
    out = client(ctx).get("/v1/hardware", **({"hw": hw_spec} if hw_spec else {}))
    if as_json:
        emit_json(out)
        return
    rows = []
    for d in out["devices"]:
        extra = []
        if d.get("cores"):
            extra.append(f"{d['cores']} cores")
        if d.get("simd"):
            extra.append(" ".join(d["simd"]))
        if d.get("compute_capability"):
            extra.append(f"compute {d['compute_capability']}")
        if d.get("driver"):
            extra.append(f"driver {d['driver']}")
        rows.append([d["kind"], d["name"], human_size(d["memory_total"]),
                     human_size(d["memory_free"]), ", ".join(extra)])
    click.echo(table(rows, ["KIND", "NAME", "TOTAL", "FREE", "DETAILS"]))
    click.echo(f"(from {out['source']})", err=True)
    for e in out["errors"]:
        click.echo(f"Error: probe {e['probe']}: {e['message']}", err=True)
