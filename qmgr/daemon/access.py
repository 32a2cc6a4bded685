"""Who may use the daemon, and which paths they may make it read.

The socket's mode and directory are the first fence; the peer's credentials (SO_PEERCRED, see
:mod:`qmgr.daemon.peercred`) the second, so that a socket whose directory was opened up by
mistake still answers only its owner: a per-user daemon answers its own user and root; the
system service answers root, its own user and the members of its group.

A caller may name paths (``import``, ``watch``, calibration and evaluation texts). The daemon
may be able to read what the caller cannot (the system service runs as its own user, or as
root): it reads a path for a caller only if that caller could read it themselves (search
permission on every folder on the way, read permission on the file), judged from the caller's
uid and groups as the kernel would.
"""

from __future__ import annotations

import os
from pathlib import Path

from qmgr.errors import QmgrError


class Forbidden(QmgrError):
    code = "forbidden"
    http_status = 403


def groups_of(pid: int, gid: int) -> set[int]:
    """A process's groups (primary and supplementary), from /proc; its primary one only if
    /proc does not say."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups |= {int(g) for g in line.split()[1:]}
                    break
    except (OSError, ValueError):
        pass
    return groups


def service_group(socket_path: Path) -> int:
    """The system service's group: the one its socket belongs to (systemd's SocketGroup=, or
    the daemon's own group where it made the socket itself)."""
    try:
        return os.stat(socket_path).st_gid
    except OSError:
        return os.getgid()


def check_caller(who: dict[str, int] | None, system: bool, socket_path: Path) -> None:
    """Refuse a caller the daemon does not serve. ``who`` is None where the transport carries
    no credentials (not a Unix socket): the socket's own checks are all there is."""
    if who is None or who["uid"] in (0, os.getuid()):
        return
    if system and service_group(socket_path) in groups_of(who["pid"], who["gid"]):
        return
    whom = "the members of its group" if system else "its own user"
    raise Forbidden(f"this qmgr daemon (uid {os.getuid()}) serves root and {whom}, not uid "
                    f"{who['uid']}: use your own daemon (unset QMGR_SOCKET; the next command "
                    "starts one)")


def _may(st: os.stat_result, uid: int, groups: set[int], want: int) -> bool:
    """Whether uid/groups (not root's) have ``want`` (4 read, 1 search) on a file with this
    stat."""
    if st.st_uid == uid:
        return bool((st.st_mode >> 6) & want)
    if st.st_gid in groups:
        return bool((st.st_mode >> 3) & want)
    return bool(st.st_mode & want)


def check_readable_by(path: str | Path, who: dict[str, int] | None) -> None:
    """Refuse to read ``path`` for a caller who could not read it (see the module's doc).
    The same message whether the path exists or not, so nothing is revealed about places the
    caller cannot look into."""
    if who is None or who["uid"] == os.getuid():
        return  # the daemon's own user: whatever it can read, they can
    uid, groups = who["uid"], groups_of(who["pid"], who["gid"])
    if uid == 0:
        return
    denied = Forbidden(f"{path}: you (uid {uid}) cannot read it, so the daemon will not read it "
                       "for you")
    p = Path(os.path.abspath(path))
    try:
        for folder in reversed(p.parents):
            if not _may(os.stat(folder), uid, groups, 1):
                raise denied
        if not _may(os.stat(p), uid, groups, 4):
            raise denied
    except OSError:
        raise denied from None
