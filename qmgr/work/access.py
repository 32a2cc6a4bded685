"""Who may use the daemon, and which paths they may make it read.

The socket's mode and directory are the first fence; the peer's credentials (SO_PEERCRED:
:mod:`qmgr.daemon.peercred` puts them on each request, :func:`caller` reads them) the second,
so that a socket whose directory was opened up by mistake still answers only its owner: a
per-user daemon answers its own user and root; the system service answers root, its own user
and the members of its group.

A caller may name paths (``import``, ``watch``, calibration and evaluation texts). The daemon
may be able to read what the caller cannot (the system service runs as its own user, or as
root): it reads a path for a caller only if that caller could read it themselves (search
permission on every folder on the way, read permission on the file), judged from the caller's
uid and groups as the kernel would.

A caller may also send their own settings (``X-Qmgr-Env``, :func:`client_env`); the system
service takes from others only the ones that do not change what it shares.

Here, below the feature packages, because their handlers check the paths they are given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmgr.errors import QmgrError

if TYPE_CHECKING:
    from qmgr.settings import Settings

Caller = dict[str, int]  # {"uid", "gid", "pid"} of the process at the socket's other end


class Forbidden(QmgrError):
    code = "forbidden"


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


def check_caller(who: Caller | None, system: bool, socket_path: Path) -> None:
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


def check_readable_by(path: str | Path, who: Caller | None) -> None:
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


def caller(scope_client: Any) -> Caller | None:
    """The caller's {"uid", "gid", "pid"} from a request's ``client``, if it came that way
    (``("uid=U,gid=G", pid)``, put there by :class:`qmgr.daemon.peercred.PeerCredProtocol`)."""
    if not scope_client or not str(scope_client[0]).startswith("uid="):
        return None
    fields = dict(part.split("=") for part in scope_client[0].split(","))
    return {"uid": int(fields["uid"]), "gid": int(fields["gid"]), "pid": int(scope_client[1])}


def client_env(settings: Settings, raw: str | None, who: Caller | None) -> dict[str, str]:
    """The client's settings sent in ``X-Qmgr-Env`` (``raw``; see
    :data:`qmgr.settings.FORWARDED_ENV`), to apply to this request's work. A ``QMGR_HOME``
    other than this daemon's is refused: the client meant another daemon. On the system
    service, only its own user (or root) may point it at another endpoint: the catalog it
    fills is shared."""
    import json

    from qmgr.settings import COMPARED_ENV, FORWARDED_ENV, SECRET_ENV

    if not raw:
        return {}
    try:
        sent = json.loads(raw)
    except ValueError as e:
        raise QmgrError("the X-Qmgr-Env header is not JSON", code="bad_request") from e
    if not isinstance(sent, dict) or not all(
            k in (*FORWARDED_ENV, *COMPARED_ENV) and isinstance(v, str) for k, v in sent.items()):
        raise QmgrError(f"X-Qmgr-Env may carry only {', '.join(FORWARDED_ENV + COMPARED_ENV)}",
                        code="bad_request")
    home = sent.pop("QMGR_HOME", None)
    if home and Path(home).expanduser().resolve() != settings.home.resolve():
        raise QmgrError(
            f"the daemon on {settings.socket} (pid {os.getpid()}) keeps its data in "
            f"{settings.home}, but your QMGR_HOME is {home}: unset QMGR_HOME to use this "
            f"daemon, or give {home} a daemon of its own (QMGR_SOCKET=/another/path.sock; the "
            "next command starts it)", code="other_daemon")
    if settings.system and who is not None and who["uid"] not in (0, os.getuid()):
        differs = sorted(k for k, v in sent.items()
                         if k not in SECRET_ENV and os.environ.get(k) != v)
        if differs:
            raise QmgrError(
                f"the system service uses its own {', '.join(differs)} (your environment "
                f"sets {', '.join(f'{k}={sent[k]}' for k in differs)}): unset it, or ask the "
                "service's administrator to configure it", code="env_differs")
    return sent
