"""``qmgr run``, ``qmgr chat``, ``qmgr ps``, ``qmgr stop``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from qmgr.cli import cli, client, emit_json, human_size, table

KV = ["f16", "q8_0", "q4_0"]


def gen_options(f: Any) -> Any:
    f = click.option("--kv-type", type=click.Choice(KV), default=None, help="KV cache type.")(f)
    f = click.option("--ctx", "ctx_len", type=int, help="Context length (default 4096).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="0 is greedy: the same answer every time.")(f)
    f = click.option("--max-tokens", type=int, default=512, show_default=True)(f)
    return f


def _body(ref: str, ctx_len: int | None, kv_type: str | None, max_tokens: int,
          temperature: float, seed: int) -> dict[str, Any]:
    body: dict[str, Any] = {"ref": ref, "params": {"max_tokens": max_tokens,
                                                   "temperature": temperature, "seed": seed}}
    if ctx_len:
        body["ctx"] = ctx_len
    if kv_type:
        body["kv_type"] = kv_type
    if os.environ.get("QMGR_HW"):
        body["hw"] = os.environ["QMGR_HW"]
    return body


def stream(ctx: click.Context, body: dict[str, Any], as_json: bool, verbose: bool) -> str:
    """Print the pieces as they come; return the whole text."""
    text = []
    for msg in client(ctx).stream_lines("/v1/generate", body):
        if as_json:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()
        if "error" in msg:
            raise click.ClickException(msg["error"]["message"])
        if "text" in msg:
            text.append(msg["text"])
            if not as_json:
                sys.stdout.write(msg["text"])
                sys.stdout.flush()
        if "done" in msg and verbose:
            s = msg["done"]
            click.echo(f"\n[{s.get('prompt_tokens')} prompt tokens in {s.get('prompt_s', 0):.2f} s,"
                       f" {s.get('tokens')} tokens at {s.get('tokens_per_s', 0):.1f} tokens/s]",
                       err=True)
    return "".join(text)


@cli.command(name="run")
@click.argument("ref")
@click.argument("prompt", required=False)
@gen_options
@click.option("-v", "--verbose", is_flag=True, help="Timing on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the stream's JSON lines.")
@click.pass_context
def run(ctx: click.Context, ref: str, prompt: str | None, ctx_len: int | None,
        kv_type: str | None, max_tokens: int, temperature: float, seed: int, verbose: bool,
        as_json: bool) -> None:
    """Answer PROMPT (or standard input) with REF, streaming the text."""
    if prompt is None:
        prompt = sys.stdin.read()
    body = _body(ref, ctx_len, kv_type, max_tokens, temperature, seed)
    body["prompt"] = prompt
    stream(ctx, body, as_json, verbose)
    if not as_json:
        sys.stdout.write("\n")


@cli.command(name="chat")
@click.argument("ref")
@gen_options
@click.option("--system", "system_prompt", help="A system message.")
@click.pass_context
def chat(ctx: click.Context, ref: str, ctx_len: int | None, kv_type: str | None,
         max_tokens: int, temperature: float, seed: int, system_prompt: str | None) -> None:
    """Chat with REF (the chat template in its GGUF file). An empty line or Ctrl-D ends."""
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo(">>> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        messages.append({"role": "user", "content": line.strip()})
        body = _body(ref, ctx_len, kv_type, max_tokens, temperature, seed)
        body["messages"] = messages
        answer = stream(ctx, body, False, False)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})


@cli.command(name="ps")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """List loaded models: memory, context, GPU layers, idle time."""
    out = client(ctx).get("/v1/ps")
    if as_json:
        emit_json(out)
        return
    click.echo(table([[r["ref"], str(r["pid"]), human_size(r["rss"]), str(r["ctx"]),
                       f"{r['gpu_layers']}/{r['placement']['n_layer']}",
                       "busy" if r["busy"] else f"idle {r['idle_s']:.0f} s"] for r in out],
                     ["NAME", "PID", "MEMORY", "CTX", "GPU LAYERS", "STATE"]))


@cli.command(name="stop")
@click.argument("ref", required=False)
@click.pass_context
def stop(ctx: click.Context, ref: str | None) -> None:
    """Unload REF (every loaded model when none is named)."""
    out = client(ctx).post("/v1/stop", {"ref": ref} if ref else {})
    for r in out["stopped"]:
        click.echo(f"stopped {r}")
