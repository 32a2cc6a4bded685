"""``qmgr service install|uninstall``: run qmgrd under systemd, at boot or at login."""

from __future__ import annotations

import os
from pathlib import Path

import click

from qmgr.cli import cli


def _scope(system: bool | None) -> bool:
    # Root means the machine's service; anyone else means their own.
    return os.geteuid() == 0 if system is None else system


def _say(message: str) -> None:
    click.echo(message, err=True)


system_option = click.option(
    "--system/--user", "system", default=None,
    help="The machine's service, started at boot (needs root), or your own, started at "
         "login. Default: --system for root, --user otherwise.")
root_option = click.option(
    "--root", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
    help="Work on the system image under DIR (a container or chroot being built): write and "
         "enable the units there, start nothing.")


def _check(system: bool, root: Path | None) -> None:
    if root is not None and not system:
        raise click.UsageError("--root is for the system service (--system)")
    if system and root is None and os.geteuid() != 0:
        raise click.ClickException(
            "the system service needs root: run it with "
            '`sudo "$(command -v qmgr)" service ...`, or use --user')


@cli.group(name="service")
def service() -> None:
    """Run qmgrd as a systemd service (see docs/operations.md)."""


@service.command(name="install")
@system_option
@root_option
def install(system: bool | None, root: Path | None) -> None:
    """Write qmgr's systemd units with this qmgrd, and enable and start them.

    --system: qmgr.service and qmgr.socket in /etc/systemd/system, the qmgr account
    (sysusers.d) and /run/qmgr (tmpfiles.d); it starts at boot, and members of the qmgr group
    use it. --user: your own units in ~/.config/systemd/user. Run it again after upgrading
    qmgr; a qmgrd not started by systemd is stopped first.
    """
    from qmgr import service as service_mod

    scope = _scope(system)
    _check(scope, root)
    service_mod.install(scope, root, say=_say)
    if root is not None:
        return
    if scope:
        who = os.environ.get("SUDO_USER") or "NAME"
        _say("qmgr runs as a system service: `systemctl status qmgr`, `journalctl -u qmgr`.\n"
             f"Let people use it: `sudo usermod -aG qmgr {who}` (then log in again).")
    else:
        _say("qmgr runs as your service: `systemctl --user status qmgr`.\n"
             "To start it at boot rather than at login: `loginctl enable-linger`.")


@service.command(name="uninstall")
@system_option
@root_option
def uninstall(system: bool | None, root: Path | None) -> None:
    """Stop and disable qmgr's systemd units and remove them.

    The catalog and the store stay where they are (and, for --system, the qmgr account that
    owns them); `qmgr` then starts a daemon of your own when it needs one.
    """
    from qmgr import service as service_mod

    scope = _scope(system)
    _check(scope, root)
    plan = service_mod.uninstall(scope, root, say=_say)
    if not plan.files:
        _say("qmgr's units are not installed: nothing to do")
