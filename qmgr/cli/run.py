"""``qmgr run``, ``qmgr chat``, ``qmgr ps``, ``qmgr stop``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import click

from qmgr.cli import cli, client, emit_json, human_size, json_option, table
from qmgr.settings import knob

KV = ["f16", "q8_0", "q4_0"]


def gen_options(f: Any) -> Any:
    f = click.option("--kv-type", type=click.Choice(KV), default=None, help="KV cache type.")(f)
    f = click.option("--ctx", "ctx_len", type=int,
                     help="Context length (default 4096; at most the model's trained one).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="0 is greedy: the same answer every time.")(f)
    f = click.option("--max-tokens", type=int, default=512, show_default=True)(f)
    f = click.option("--backend", default=None,
                     help="The runtime backend plugin (default: the first that can run it).")(f)
    return f


def _body(ref: str, ctx_len: int | None, kv_type: str | None, max_tokens: int,
          temperature: float, seed: int, backend: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"ref": ref, "params": {"max_tokens": max_tokens,
                                                   "temperature": temperature, "seed": seed}}
    if backend:
        body["backend"] = backend
    if ctx_len:
        body["ctx"] = ctx_len
    if kv_type:
        body["kv_type"] = kv_type
    if knob("QMGR_HW"):
        body["hw"] = knob("QMGR_HW")
    return body


def stream(ctx: click.Context, body: dict[str, Any], as_json: bool, verbose: bool) -> None:
    """Print the pieces as they come."""
    for msg in client(ctx).stream_lines("/v1/generate", body):
        if as_json:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()
        if "error" in msg:
            raise click.ClickException(msg["error"]["message"])
        if "text" in msg and not as_json:
            sys.stdout.write(msg["text"])
            sys.stdout.flush()
        if "done" in msg and verbose:
            s = msg["done"]
            click.echo(f"\n[{s.get('prompt_tokens')} prompt tokens in {s.get('prompt_s', 0):.2f} s,"
                       f" {s.get('tokens')} tokens at {s.get('tokens_per_s', 0):.1f} tokens/s]",
                       err=True)


@cli.command(name="run")
@click.argument("ref")
@click.argument("prompt", required=False)
@gen_options
@click.option("-v", "--verbose", is_flag=True, help="Timing on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the stream's JSON lines.")
@click.pass_context
def run(ctx: click.Context, ref: str, prompt: str | None, ctx_len: int | None,
        kv_type: str | None, max_tokens: int, temperature: float, seed: int,
        backend: str | None, verbose: bool, as_json: bool) -> None:
    """Answer PROMPT (or standard input) with REF, streaming the text."""
    if prompt is None:
        prompt = sys.stdin.read()
    body = _body(ref, ctx_len, kv_type, max_tokens, temperature, seed, backend)
    body["prompt"] = prompt
    stream(ctx, body, as_json, verbose)
    if not as_json:
        sys.stdout.write("\n")


# Lines that reach a terminal within this of each other were pasted together: one message.
PASTE_GAP_S = 0.05
BLOCK = '"""'  # Ollama's: a message between two of these may span lines


def _close_block(text: str) -> str | None:
    """``text`` (after an opening \"\"\") up to the line that ends with the closing one, or None
    while there is none yet."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.rstrip().endswith(BLOCK):
            return "\n".join([*lines[:i], line.rstrip()[:-len(BLOCK)]])
    return None


def _tidy(text: str) -> str:
    return text.replace("\r\n", "\n").strip("\n").rstrip()


def piped_messages(lines: Iterable[str]) -> Iterator[str]:
    """Messages from a pipe or file: separated by blank lines, or each a \"\"\" block (which
    may hold blank lines); each is sent once its blank line (or the end) has come."""
    text, in_block = "", False
    for line in lines:
        if not in_block and not text and line.lstrip().startswith(BLOCK):
            text, in_block = line.lstrip()[len(BLOCK):], True
        elif in_block or line.strip():
            text += line
        elif text:
            yield _tidy(text)
            text = ""
        if in_block and (closed := _close_block(text)) is not None:
            if _tidy(closed):
                yield _tidy(closed)
            text, in_block = "", False
    if _tidy(text):
        yield _tidy(text)


class Terminal:
    """What is typed or pasted at a terminal in its usual (canonical) mode, where the kernel
    edits each line and hands it over at Enter."""

    def __init__(self, fd: int):
        import codecs

        self.fd = fd
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ended = False

    def _read(self) -> str:
        data = os.read(self.fd, 65536)
        self.ended = not data  # Ctrl-D on an empty line
        return self.decoder.decode(data, final=self.ended)

    def burst(self) -> str:
        """A line typed, or every line of a paste: what arrives together ("" at the end)."""
        import select

        text = self._read()
        while not self.ended and select.select([self.fd], [], [], PASTE_GAP_S)[0]:
            text += self._read()
        if text.endswith("\n") and (rest := self._unfinished_line()):
            # The paste ended without a newline: its last line waits for Enter, as in a shell.
            text += rest
            while not self.ended and not text.endswith("\n"):
                text += self._read()
        return text

    def _unfinished_line(self) -> str:
        """The part of a line not yet ended by Enter: the kernel's line editor keeps it out of
        sight of select and read, except outside canonical mode, for a moment here. (What is
        read so can no longer be erased with Backspace.)"""
        import termios

        old = termios.tcgetattr(self.fd)
        probe = [*old[:6], list(old[6])]
        probe[3] &= ~termios.ICANON
        probe[6][termios.VMIN], probe[6][termios.VTIME] = 0, 0  # return at once
        termios.tcsetattr(self.fd, termios.TCSANOW, probe)
        try:
            return self.decoder.decode(os.read(self.fd, 65536))
        finally:
            termios.tcsetattr(self.fd, termios.TCSANOW, old)

    def messages(self) -> Iterator[str]:
        while not self.ended:
            click.echo(">>> ", nl=False, err=True)
            text = self.burst()
            if text.lstrip().startswith(BLOCK):
                text = text.lstrip()[len(BLOCK):]
                while (closed := _close_block(text)) is None and not self.ended:
                    click.echo("... ", nl=False, err=True)
                    text += self.burst()
                text = text if closed is None else closed
            if _tidy(text):
                yield _tidy(text)
        click.echo("", err=True)


def reply(ctx: click.Context, body: dict[str, Any], show: bool) -> tuple[str, dict[str, Any], bool]:
    """One answer, printed as it comes when ``show``: (text, final stats, stopped). Ctrl-C
    stops it: the stream is closed, and the daemon cancels the generation in the runner."""
    text: list[str] = []
    stats: dict[str, Any] = {}
    answers = client(ctx).stream_lines("/v1/generate", body)
    try:
        for msg in answers:
            if "error" in msg:
                raise click.ClickException(msg["error"]["message"])
            if "text" in msg:
                text.append(msg["text"])
                if show:
                    sys.stdout.write(msg["text"])
                    sys.stdout.flush()
            stats = msg.get("done", stats)
    except KeyboardInterrupt:
        return "".join(text), stats, True
    finally:
        answers.close()
    return "".join(text), stats, False


@cli.command(name="chat")
@click.argument("ref")
@gen_options
@click.option("--system", "system_prompt", help="A system message.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the conversation as JSON lines, one per message, not the text.")
@click.pass_context
def chat(ctx: click.Context, ref: str, ctx_len: int | None, kv_type: str | None,
         max_tokens: int, temperature: float, seed: int, backend: str | None,
         system_prompt: str | None, as_json: bool) -> None:
    """Chat with REF, in the chat format its GGUF file gives, or llama.cpp's built-in one for
    the model's family; a model with neither is refused (use `qmgr run` with a raw prompt).

    \b
    At a terminal, Enter sends the line; lines pasted at once are one message, and so
    are lines between two \"\"\" (Ollama's way to type several lines). Ctrl-C stops a reply:
    what it said so far stays in the conversation. Ctrl-D, or Ctrl-C at the prompt, ends.
    From a pipe or a file, messages are separated by blank lines (or each a \"\"\" block);
    the end of the input ends the chat.
    """
    def send(messages: list[dict[str, str]], show: bool) -> tuple[str, dict[str, Any], bool]:
        body = _body(ref, ctx_len, kv_type, max_tokens, temperature, seed, backend)
        body["messages"] = messages
        return reply(ctx, body, show)

    # No messages: the model loads and says its chat format, before anyone types.
    _, loaded, stopped = send([], False)
    if stopped:
        return
    chat_format = loaded.get("chat_format", "")
    if chat_format.startswith("llama.cpp:"):
        click.echo(f"(this model's file has no chat template: using llama.cpp's built-in "
                   f"{chat_format.removeprefix('llama.cpp:')} template, its family's)", err=True)
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    terminal = sys.stdin.isatty()
    source = Terminal(sys.stdin.fileno()).messages() if terminal else piped_messages(sys.stdin)
    try:
        for content in source:
            messages.append({"role": "user", "content": content})
            if as_json:
                emit_json_line(messages[-1])
            answer, stats, stopped = send(messages, not as_json)
            if not as_json:
                sys.stdout.write("\n")
            if stopped:
                click.echo("[reply stopped]", err=True)
            if as_json:
                emit_json_line({"role": "assistant", "content": answer, "stopped": stopped,
                                "stats": stats})
            if stopped and not answer:  # nothing said: as if it had not been asked
                messages.pop()
            else:
                messages.append({"role": "assistant", "content": answer})
    except KeyboardInterrupt:  # at the prompt: the end
        click.echo("", err=True)


def emit_json_line(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@cli.command(name="ps")
@json_option
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
