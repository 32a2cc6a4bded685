"""The ``qmgr`` command: a click group whose commands talk to the daemon over its socket.

Start-up cost matters here (``qmgr --help``, ``qmgr list``): this package imports click and the
standard library only. Plugin commands (``register_commands``) are loaded only when a command
name is not a built-in one, or when the full list of commands is shown.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import click

from qmgr import __version__
from qmgr.errors import QmgrError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
# Every command that shows something takes --json (the result on stdout, as JSON).
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")

# Control characters (C0 but newline and tab, DEL, C1): in a name from a GGUF header or a
# registry they could move the cursor, retitle the terminal or hide text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: object) -> str:
    """Text fit for a terminal: control characters written as escapes (``\x1b``)."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(text))


class QmgrGroup(click.Group):
    """Turns domain errors into ``Error: ...`` and loads plugin commands lazily."""

    plugins_loaded = False

    def _load_plugins(self) -> None:
        if self.plugins_loaded:
            return
        self.plugins_loaded = True
        from qmgr.plugins import COMMANDS_GROUP, PluginSet

        # Built-in plugins add no commands (those live in this package) and import what the
        # daemon needs (httpx...): the client loads only third-party plugins.
        plugins = PluginSet(load_builtins=False, group=COMMANDS_GROUP)
        for impl in plugins.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(cli=self)
            except Exception as e:  # a broken plugin must not break the built-in commands
                click.echo(f"qmgr: plugin {impl.plugin_name} failed to add commands: {e}",
                           err=True)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            self._load_plugins()
            command = super().get_command(ctx, name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugins()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QmgrError as e:
            raise click.ClickException(safe(e.message)) from None
        except click.UsageError:
            raise
        except click.ClickException as e:  # a job's error, the daemon's words: made safe too
            if _CONTROL.search(e.message):
                raise click.ClickException(safe(e.message)) from None
            raise


@click.group(cls=QmgrGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="qmgr")
@click.option("--socket", "socket_path", metavar="PATH", envvar="QMGR_SOCKET",
              help="The daemon's socket (default: yours, else the system service's).")
@click.option("--no-autostart", is_flag=True, default=False,
              help="Fail instead of starting a daemon when none answers "
                   "(also QMGR_NO_AUTOSTART=1).")
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, no_autostart: bool) -> None:
    """qmgr: a local model manager for quantized LLMs.

    A daemon (qmgrd) keeps a catalog of models and their GGUF variants; this command talks to
    it over a Unix socket, and starts one for you if none runs.
    """
    ctx.obj = {"socket": socket_path, "autostart": False if no_autostart else None}


def client(ctx: click.Context) -> Any:
    """The socket client for this invocation (settings from flags, environment, config)."""
    from qmgr import settings
    from qmgr.client import Client

    root = ctx.find_root().obj or {}
    s = settings.load(socket=root.get("socket"), autostart=root.get("autostart"))
    return Client(s)


def emit_json(data: Any) -> None:
    """JSON on stdout: indented for a person at a terminal, compact for a program."""
    if sys.stdout.isatty():
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
    else:
        # The C encoder only runs without indent: 5x faster on a large catalog.
        json.dump(data, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_count(n: int | None) -> str:
    if not n:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}".replace(".0", "")
    return str(n)


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def main() -> None:
    try:
        cli(prog_name="qmgr")
        code = 0
    except SystemExit as e:
        code = _exit_status(e.code)
    # Leave without the interpreter's teardown (freeing every module: ~15 ms of a ~90 ms
    # `qmgr list`): nothing here needs it once the output is flushed. Files are closed by
    # their `with` blocks; the process's sockets close with it.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`qmgr list | head -1`): nothing to say
            code = code or 1
    os._exit(code)


def _exit_status(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives (a message is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


# The command families register themselves on ``cli``.
from qmgr.cli import (  # noqa: E402, F401
    catalog,
    fit,
    fleet,
    jobs,
    measure,
    mirror,
    pull,
    quantize,
    run,
    service,
    system,
    watch,
)
