"""The few lines of systemd integration qmgrd needs, without a dependency.

``sd_notify``: datagram messages to ``$NOTIFY_SOCKET`` (``READY=1``, ``STATUS=...``,
``STOPPING=1``, ``WATCHDOG=1``). ``listen_fds``: sockets passed by socket activation
(``LISTEN_FDS`` / ``LISTEN_PID``, starting at fd 3), named by ``LISTEN_FDNAMES``. See
sd_notify(3) and sd_listen_fds_with_names(3).
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send one notification; returns whether a notify socket was there to send it to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(address)
        s.sendall(message.encode())
    return True


def listen_fds() -> list[tuple[str, socket.socket]]:
    """Sockets handed over by systemd, if they are meant for this process, each with its name
    (the socket unit's ``FileDescriptorName=``, by default the unit's own name; ``unknown``
    from a manager that names none)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    socks = []
    for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)):
        os.set_inheritable(fd, False)
        socks.append((names[i] if i < len(names) and names[i] else "unknown",
                      socket.socket(fileno=fd)))
    return socks


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), when systemd asks for them."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
