"""``qmgr quantize``, ``qmgr imatrix``, ``qmgr quantizers``."""

from __future__ import annotations

from typing import Any

import click

from qmgr.cli import cli, client, emit_json, json_option, table
from qmgr.cli.progress import follow
from qmgr.client import absolute


def _run_job(ctx: click.Context, path: str, body: dict[str, Any], detach: bool, quiet: bool,
             as_json: bool, label: str) -> dict[str, Any] | None:
    job = client(ctx).post(path, body)
    if detach:
        if as_json:
            emit_json(job)
        else:
            click.echo(f"job {job['id']} {label} (`qmgr jobs` to follow)", err=True)
        return None
    final = follow(ctx, job, as_json=as_json, quiet=quiet, label=label)
    if final["state"] != "succeeded":
        raise click.ClickException(final.get("error") or f"{label}: {final['state']}")
    return final.get("result") or {}


@cli.command(name="quantize")
@click.argument("ref")
@click.option("--to", "targets", required=True, metavar="TYPE[,TYPE...]",
              help="Target quant types, e.g. Q4_K_M,Q5_K_M,IQ4_XS.")
@click.option("--quantizer", metavar="NAME", help="Quantizer plugin (default llama.cpp).")
@click.option("--imatrix", metavar="latest|SHA256|PATH", is_flag=False, flag_value="latest",
              default=None, help="Importance matrix: the model's latest (no value), one "
                                 "computed before (digest prefix), or a file.")
@click.option("--leave-output", is_flag=True, help="Keep output.weight unquantized.")
@click.option("--pure", is_flag=True, help="Every tensor of the target type (no k-quant mix).")
@click.option("--allow-requantize", is_flag=True,
              help="Quantize an already-quantized source (loses quality twice).")
@click.option("--token-embedding-type", metavar="TYPE", help="Type of token_embd.weight.")
@click.option("--output-tensor-type", metavar="TYPE", help="Type of output.weight.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="Type for tensors whose name matches REGEX (repeatable).")
@click.option("--threads", type=int, help="Threads (default: all cores).")
@click.option("--detach", is_flag=True, help="Start the job and return.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@json_option
@click.pass_context
def quantize(ctx: click.Context, ref: str, targets: str, quantizer: str | None,
             imatrix: str | None, leave_output: bool, pure: bool, allow_requantize: bool,
             token_embedding_type: str | None, output_tensor_type: str | None,
             tensor_types: tuple[str, ...], threads: int | None, detach: bool, quiet: bool,
             as_json: bool) -> None:
    """Make new variants of REF: one per target type, with lineage and recipe."""
    options: dict[str, Any] = {}
    if leave_output:
        options["leave_output"] = True
    if pure:
        options["pure"] = True
    if allow_requantize:
        options["allow_requantize"] = True
    if token_embedding_type:
        options["token_embedding_type"] = token_embedding_type.upper()
    if output_tensor_type:
        options["output_tensor_type"] = output_tensor_type.upper()
    if threads:
        options["threads"] = threads
    if tensor_types:
        pairs = {}
        for item in tensor_types:
            pattern, sep, ttype = item.rpartition("=")
            if not sep or not pattern:
                raise click.BadParameter(f"{item!r} is not REGEX=TYPE", param_hint="--tensor-type")
            pairs[pattern] = ttype.upper()
        options["tensor_types"] = pairs
    spec = imatrix
    if spec and spec != "latest" and ("/" in spec or spec.startswith(".")):
        spec = absolute(spec)
    result = _run_job(ctx, "/v1/quantize", {
        "ref": ref, "targets": [t.strip() for t in targets.split(",") if t.strip()],
        "quantizer": quantizer, "imatrix": spec, "options": options}, detach, quiet, as_json,
        f"quantize {ref}")
    if result is None or as_json:
        return
    for v in result.get("variants", []):
        click.echo(v["ref"])


@cli.command(name="imatrix")
@click.argument("ref")
@click.option("--text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Calibration text (plain UTF-8).")
@click.option("--ctx", "n_ctx", type=int, default=512, show_default=True,
              help="Tokens per chunk.")
@click.option("--quantizer", default=None,
              help="The quantizer plugin that computes it (default: the first that can; "
                   "`qmgr quantizers` says which can).")
@click.option("--detach", is_flag=True, help="Start the job and return.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@json_option
@click.pass_context
def imatrix(ctx: click.Context, ref: str, text: str, n_ctx: int, quantizer: str | None,
            detach: bool, quiet: bool, as_json: bool) -> None:
    """Compute an importance matrix for REF from calibration text (the built-in llama.cpp
    quantizer does: needs qmgr[llama])."""
    body = {"ref": ref, "text": absolute(text), "n_ctx": n_ctx}
    if quantizer:
        body["quantizer"] = quantizer
    result = _run_job(ctx, "/v1/imatrix", body, detach, quiet, as_json, f"imatrix {ref}")
    if result is None or as_json:
        return
    m = result["imatrix"]
    click.echo(f"sha256:{m['sha256']}")
    click.echo(f"importance matrix of {m['variant']} from {m['tokens']} tokens; use it with "
               f"`qmgr quantize {m['model']}:TAG --to IQ2_XS --imatrix`", err=True)


@cli.command(name="quantizers")
@json_option
@click.pass_context
def quantizers(ctx: click.Context, as_json: bool) -> None:
    """List installed quantizers and the types each can make."""
    out = client(ctx).get("/v1/quantizers")
    if as_json:
        emit_json(out)
        return
    click.echo(table([[q["name"], q["version"], "yes" if q.get("imatrix") else "-",
                       ", ".join(q["targets"])] for q in out],
                     ["NAME", "VERSION", "IMATRIX", "TARGETS"]))
