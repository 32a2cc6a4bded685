"""``qmgr eval`` and ``qmgr bench``: what each quant costs in quality and gains in speed."""

from __future__ import annotations

from typing import Any

import click

from qmgr.cli import cli, client, human_size, json_option, table
from qmgr.cli.quantize import _run_job
from qmgr.client import absolute


def _variants(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _sizes(ctx: click.Context, refs: list[str]) -> dict[str, dict[str, Any]]:
    rows = client(ctx).get("/v1/variants")
    return {r["ref"]: r for r in rows if r["ref"] in refs}


@cli.command(name="eval")
@click.argument("ref")
@click.option("--variants", metavar="TAG[,TAG...]", help="Variants to measure (default: all).")
@click.option("--text", type=click.Path(exists=True, dir_okay=False),
              help="Evaluation text (default: qmgr's built-in public-domain text).")
@click.option("--ctx", "ctx_len", type=int, default=512, show_default=True,
              help="Chunk size (the second half of each chunk is scored).")
@click.option("--max-tokens", type=int, help="Use only the text's first N tokens.")
@click.option("--detach", is_flag=True, help="Start the job and return.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@json_option
@click.pass_context
def eval_(ctx: click.Context, ref: str, variants: str | None, text: str | None, ctx_len: int,
          max_tokens: int | None, detach: bool, quiet: bool, as_json: bool) -> None:
    """Perplexity, ΔPPL, KL divergence and top-token agreement of REF's variants against its
    highest-precision variant, on the same tokens; stored for `qmgr show` and `qmgr fit`."""
    body: dict[str, Any] = {"ref": ref, "ctx": ctx_len}
    if max_tokens:
        body["max_tokens"] = max_tokens
    if variants:
        body["variants"] = _variants(variants)
    if text:
        body["text"] = absolute(text)
    result = _run_job(ctx, "/v1/eval", body, detach, quiet, as_json, f"eval {ref}")
    if result is None or as_json:
        return
    ev = result["eval"]
    sizes = _sizes(ctx, [result["base"], *[v["ref"] for v in ev["variants"]]])
    base = sizes.get(result["base"], {})
    rows = [[result["base"], human_size(base.get("size")),
             f"{base.get('bits_per_weight') or 0:.2f}", f"{ev['base']['ppl']:.4f}", "-", "-",
             "-"]]
    for v in ev["variants"]:
        s = sizes.get(v["ref"], {})
        rows.append([v["ref"], human_size(s.get("size")), f"{s.get('bits_per_weight') or 0:.2f}",
                     f"{v['ppl']:.4f}", f"{v['delta_ppl']:+.4f}", f"{v['kld']:.5f}",
                     f"{v['top_agreement'] * 100:.2f}%"])
    click.echo(table(rows, ["VARIANT", "SIZE", "BPW", "PPL", "ΔPPL", "KLD", "SAME TOP"]))
    source = "qmgr's built-in text" if result.get("builtin_text") else result["text"]
    click.echo(f"({ev['tokens']} tokens of {source}, chunks of {body['ctx']}; base "
               f"{result['base']})", err=True)


@cli.command(name="bench")
@click.argument("ref")
@click.option("--variants", metavar="TAG[,TAG...]", help="Variants to measure (default: all).")
@click.option("--tokens", type=int, default=64, show_default=True, help="Tokens to generate.")
@click.option("--detach", is_flag=True, help="Start the job and return.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@json_option
@click.pass_context
def bench(ctx: click.Context, ref: str, variants: str | None, tokens: int, detach: bool,
          quiet: bool, as_json: bool) -> None:
    """Prompt processing and generation speed (tokens/s) of REF's variants on this machine."""
    body: dict[str, Any] = {"ref": ref, "tokens": tokens}
    if variants:
        body["variants"] = _variants(variants)
    result = _run_job(ctx, "/v1/bench", body, detach, quiet, as_json, f"bench {ref}")
    if result is None or as_json:
        return
    sizes = _sizes(ctx, [r["ref"] for r in result["bench"]])
    click.echo(table([[r["ref"], human_size(sizes.get(r["ref"], {}).get("size")),
                       f"{r['pp_tps']:.1f}", f"{r['tg_tps']:.1f}"] for r in result["bench"]],
                     ["VARIANT", "SIZE", "PROMPT TOKENS/S", "GENERATION TOKENS/S"]))
    click.echo(f"(median of {result['runs']} runs each)", err=True)
