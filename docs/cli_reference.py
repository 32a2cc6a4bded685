"""Write docs/cli.md from the commands' own --help (tests/test_docs.py checks it is current).

Run: python docs/cli_reference.py > docs/cli.md
"""

from __future__ import annotations

import click

from qmgr.cli import cli


def sections(command: click.Command, path: list[str],
             parent: click.Context | None = None) -> list[str]:
    settings = {"terminal_width": 100, "max_content_width": 100, **command.context_settings}
    with click.Context(command, parent=parent, info_name=path[-1], **settings) as ctx:
        text = command.get_help(ctx)
    out = [f"{'#' * min(len(path) + 1, 4)} `{' '.join(path)}`", "", "```", text, "```", ""]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                out += sections(sub, [*path, name], ctx)
    return out


def render() -> str:
    header = [
        "# CLI reference",
        "",
        "Generated from `--help` by `python docs/cli_reference.py > docs/cli.md`; "
        "a test fails when it is out of date.",
        "",
    ]
    return "\n".join(header + sections(cli, ["qmgr"])).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
