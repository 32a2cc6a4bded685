"""Install qmgrd as a systemd service: write the unit files, create the account, tell systemd.

The unit files live in ``systemd/`` at the top of a source checkout and ship inside the wheel as
``qmgr/systemd_units``. They name ``/usr/bin/qmgrd``, where a distribution package puts it;
``install`` writes them with the path of the qmgrd installed next to this qmgr instead. This
module runs in the client: it imports the standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import qmgr
from qmgr import settings as settings_mod
from qmgr.errors import QmgrError

UNIT_QMGRD = "/usr/bin/qmgrd"
UNITS = ("qmgr.socket", "qmgr.service")
# The API listener's socket: always written, enabled when the configuration sets `listen`
# (at that address), disabled otherwise, so that it follows the configuration.
API_UNIT = "qmgr-api.socket"

# Unit files (relative to units_dir()) and where they go, relative to the root file system.
SYSTEM_FILES = {
    "qmgr.service": "etc/systemd/system/qmgr.service",
    "qmgr.socket": "etc/systemd/system/qmgr.socket",
    "qmgr-api.socket": "etc/systemd/system/qmgr-api.socket",
    "sysusers.d/qmgr.conf": "etc/sysusers.d/qmgr.conf",
    "tmpfiles.d/qmgr.conf": "etc/tmpfiles.d/qmgr.conf",
}
# User units, relative to the user's unit directory.
USER_FILES = {
    "user/qmgr.service": "qmgr.service",
    "user/qmgr.socket": "qmgr.socket",
    "user/qmgr-api.socket": "qmgr-api.socket",
}

# What the system service cannot see (ProtectHome=yes): qmgrd must not live there.
HIDDEN_FROM_SYSTEM = (Path("/home"), Path("/root"), Path("/run/user"))

STOP_WAIT_S = 30.0

Say = Callable[[str], object]


def units_dir() -> Path:
    """Where the unit files are: inside the wheel, or at the top of a source checkout."""
    package = Path(qmgr.__file__).resolve().parent
    for candidate in (package / "systemd_units", package.parent / "systemd"):
        if (candidate / "qmgr.service").is_file():
            return candidate
    raise QmgrError(f"qmgr's systemd unit files are missing (looked in {package}): "
                    "reinstall qmgr", code="broken_install")


def user_units_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def find_qmgrd() -> Path:
    """The qmgrd installed with this qmgr (same environment), as an absolute path."""
    candidates = [Path(sysconfig.get_path("scripts")) / "qmgrd",
                  Path(sys.executable).parent / "qmgrd"]
    found = shutil.which("qmgrd")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path.absolute()
    raise QmgrError("cannot find the qmgrd program installed with qmgr: reinstall qmgr",
                    code="broken_install")


def exec_path(path: Path) -> str:
    """``path`` written as the program of an ``ExecStart=`` line (see systemd.service(5)).

    systemd expands no variables in the program's name, but does expand ``%`` specifiers and
    splits at spaces and ``;``. It refuses quotes and backslashes in the name outright.
    """
    text = str(path)
    bad = set(text) & set("\\\"'")
    if bad or not text.isprintable() or not path.is_absolute():
        raise QmgrError(f"systemd cannot run a program at {text!r}: install qmgr under a path "
                        "without quotes, backslashes or control characters", code="bad_path")
    text = text.replace("%", "%%")
    if re.search(r"[\s;]", text):
        text = f'"{text}"'
    return text


def render(text: str, qmgrd: Path) -> str:
    """A unit file's text with ``qmgrd`` as the program it runs."""
    rendered, count = re.subn(rf"^ExecStart={re.escape(UNIT_QMGRD)}(?=\s|$)",
                              lambda _: f"ExecStart={exec_path(qmgrd)}", text, flags=re.M)
    return rendered if count else text


def service_settings(system: bool, root: Path | None = None) -> settings_mod.Settings:
    """The settings the installed daemon will have: from its configuration file (the image's,
    under ``root``), not from this shell's QMGR_* variables, which it will not see."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMGR_")}
    if root is not None:
        env["QMGR_CONFIG"] = str(root / settings_mod.SYSTEM_CONFIG.relative_to("/"))
    return settings_mod.load(system=system, env=env)


def api_listen_stream(s: settings_mod.Settings) -> str | None:
    """The ``ListenStream=`` of qmgr-api.socket for ``s.listen`` (None: no listener), checked
    as the daemon checks it: an install that would give a service that cannot start fails."""
    import ipaddress

    if not s.listen:
        return None
    host, port = settings_mod.check_listen(s.listen, s.api_key)
    if host == "localhost" or host.endswith(".localhost"):
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise QmgrError(f"listen {s.listen} (in {s.config_file}): a systemd socket listens on "
                        "an IP address, not a host name: write the address (e.g. "
                        f"listen = \"0.0.0.0:{port}\")", code="bad_config") from None
    return settings_mod.format_listen(host, port)


def render_listen(text: str, listen_stream: str) -> str:
    """A socket unit's text listening at ``listen_stream`` instead of its own address."""
    return re.sub(r"^ListenStream=.*$", lambda _: f"ListenStream={listen_stream}", text,
                  count=1, flags=re.M)


def check_visible_to_system_service(qmgrd: Path) -> None:
    """Refuse a qmgrd the sandboxed system service could not run (it would fail at boot):
    the program, its environment and the Python it was made from must all be visible."""
    for path in (qmgrd, Path(sys.prefix), Path(sys.base_prefix)):
        resolved = path.resolve()
        for hidden in HIDDEN_FROM_SYSTEM:
            if resolved.is_relative_to(hidden):
                raise QmgrError(
                    f"{path} is under {hidden}, which the system service cannot see "
                    "(ProtectHome=yes). Install qmgr, with a Python outside home directories, "
                    "e.g. `/usr/bin/python3 -m venv /opt/qmgr && /opt/qmgr/bin/pip install "
                    "PATH-TO-QMGR`, and run "
                    "`sudo /opt/qmgr/bin/qmgr service install --system`", code="bad_path")
        # The qmgr user is "other" to these files: every directory must let it through.
        for parent in [resolved, *resolved.parents]:
            if parent.is_dir() and not parent.stat().st_mode & 0o001:
                raise QmgrError(
                    f"the qmgr user cannot reach {path}: {parent} is not searchable by others "
                    f"(chmod o+x {parent}, or install qmgr under /opt)", code="bad_path")


@dataclasses.dataclass
class Plan:
    """Files to write (destination -> text), commands to run in order, then the one that
    starts the service (before which a daemon not run by systemd is stopped)."""

    files: dict[Path, str]
    commands: list[list[str]]
    start: list[str] | None = None


def _systemctl(system: bool, root: Path | None, *args: str) -> list[str]:
    cmd = ["systemctl"]
    if root is not None:
        cmd.append(f"--root={root}")
    elif not system:
        cmd.append("--user")
    return [*cmd, *args]


def plan_install(system: bool, root: Path | None = None, qmgrd: Path | None = None) -> Plan:
    qmgrd = qmgrd or find_qmgrd()
    source = units_dir()
    listen_stream = api_listen_stream(service_settings(system, root))
    files: dict[Path, str] = {}
    if system:
        if root is None:  # an image is checked when it boots, not on the machine building it
            check_visible_to_system_service(qmgrd)
        base = root or Path("/")
        destinations = {name: base / dest for name, dest in SYSTEM_FILES.items()}
    else:
        destinations = {name: user_units_dir() / dest for name, dest in USER_FILES.items()}
    for name, dest in destinations.items():
        text = render((source / name).read_text(), qmgrd)
        if dest.name == API_UNIT and listen_stream:
            text = render_listen(text, listen_stream)
        files[dest] = text
    enabled = [API_UNIT, *UNITS] if listen_stream else list(UNITS)
    if root is not None:
        # An image: the account goes into its /etc/passwd; its /run is made at its boot.
        return Plan(files, [["systemd-sysusers", f"--root={root}", "qmgr.conf"],
                            _systemctl(system, root, "enable", *enabled)])
    commands = []
    if system:
        # What would happen at boot: the account and /run/qmgr, before the socket needs them.
        commands.append(["systemd-sysusers", "/" + SYSTEM_FILES["sysusers.d/qmgr.conf"]])
        commands.append(["systemd-tmpfiles", "--create",
                         "/" + SYSTEM_FILES["tmpfiles.d/qmgr.conf"]])
    commands.append(_systemctl(system, root, "daemon-reload"))
    # A reinstall (a new qmgrd, new units) takes effect now, not at the next boot. The API's
    # socket stops too: systemd refuses to start a socket while its service runs.
    commands.append(_systemctl(system, root, "stop", API_UNIT, *UNITS))
    if not listen_stream:
        commands.append(_systemctl(system, root, "disable", API_UNIT))
    return Plan(files, commands, start=_systemctl(system, root, "enable", "--now", *enabled))


def plan_uninstall(system: bool, root: Path | None = None) -> Plan:
    if system:
        base = root or Path("/")
        # The account stays (sysusers.d too): it owns the catalog and store, which stay.
        files = [base / dest for name, dest in SYSTEM_FILES.items() if "sysusers" not in name]
    else:
        files = [user_units_dir() / dest for dest in USER_FILES.values()]
    present = {path: "" for path in files if path.exists()}
    if not present:
        return Plan({}, [])
    # The API's socket only where it is (a qmgr before it installed none): systemctl fails
    # on a unit it does not know.
    units = [API_UNIT, *UNITS] if any(path.name == API_UNIT for path in present) else UNITS
    if root is not None:
        return Plan(present, [_systemctl(system, root, "disable", *units)])
    # Disabled and stopped before the files go, reloaded after.
    return Plan(present, [_systemctl(system, root, "disable", "--now", *units),
                          _systemctl(system, root, "daemon-reload")])


def run_command(cmd: list[str], say: Say) -> None:
    if shutil.which(cmd[0]) is None:
        raise QmgrError(f"{cmd[0]} not found: `qmgr service` needs systemd "
                        "(docs/operations.md says how to run qmgrd without it)",
                        code="no_systemd")
    say("running " + " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise QmgrError(f"`{' '.join(cmd)}` failed ({done.returncode}): {detail}",
                        code="systemd_failed")


def write_file(path: Path, text: str) -> None:
    """Write atomically, 0644: a daemon-reload never sees a unit half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)


def stop_unmanaged_daemon(socket_path: Path) -> int | None:
    """Stop a qmgrd still answering on ``socket_path`` once systemd has stopped its own.

    That is one the client autostarted or someone ran by hand: left running, it would keep the
    catalog open beside the service's daemon. Returns its pid if there was one.
    """
    from qmgr.client import Client

    s = settings_mod.load(socket=str(socket_path), autostart=False)
    try:
        pid = int(Client(s, timeout=5).get("/v1/status")["pid"])
    except (OSError, QmgrError, KeyError, ValueError):
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        if not _running(pid):
            return pid
        time.sleep(0.1)
    raise QmgrError(f"qmgrd (pid {pid}) on {socket_path} did not stop: stop it, then run "
                    "this again", code="daemon_running")


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited child its parent has not reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def service_socket(system: bool) -> Path:
    """Where the socket unit listens (the paths in qmgr.socket and user/qmgr.socket)."""
    return settings_mod.SYSTEM_SOCKET if system else settings_mod.user_runtime_dir() / "qmgr.sock"


def systemd_running() -> bool:
    """Whether systemd is this machine's init (what sd_booted(3) checks)."""
    return Path("/run/systemd/system").is_dir()


def install(system: bool, root: Path | None = None, say: Say = print) -> Plan:
    """Write the units and enable them; start them too, unless ``root`` names an image."""
    if system and root is None and not systemd_running():
        # Checked first: a system install creates an account and writes to /etc. (A user
        # install writes two files in your home; systemctl then says what is wrong.)
        raise QmgrError("systemd is not running on this machine (no /run/systemd/system): "
                        "nothing was installed. Run qmgrd under the init system there is "
                        "(docs/operations.md), or prepare an image with --root DIR",
                        code="no_systemd")
    plan = plan_install(system, root)
    for path, text in plan.files.items():
        write_file(path, text)
        say(f"wrote {path}")
    for cmd in plan.commands:
        run_command(cmd, say)
    if plan.start:
        pid = stop_unmanaged_daemon(service_socket(system))
        if pid:
            say(f"stopped the qmgrd that systemd did not start (pid {pid})")
        run_command(plan.start, say)
    return plan


def uninstall(system: bool, root: Path | None = None, say: Say = print) -> Plan:
    """Stop and disable the units and remove their files; the catalog and store stay."""
    plan = plan_uninstall(system, root)
    if plan.commands:
        run_command(plan.commands[0], say)
    for path in plan.files:
        path.unlink(missing_ok=True)
        say(f"removed {path}")
    for cmd in plan.commands[1:]:
        run_command(cmd, say)
    return plan
