"""``qmgrd``: open the catalog, recover, bind the socket, serve, tell systemd.

Order at start: lock the socket path (one daemon per socket), migrate, reconcile files, load
plugins, start the watcher, bind (or adopt systemd's socket), serve, and only then send
``READY=1``. SIGTERM/SIGINT stop it cleanly (``STOPPING=1``, in-flight requests finish).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from qmgr import __version__, settings as settings_mod
from qmgr.daemon import systemd
from qmgr.errors import QmgrError
from qmgr.settings import Settings

log = logging.getLogger("qmgrd")


def setup_logging(level: str) -> None:
    # journald stamps each line itself; elsewhere (a log file, a terminal) add the time.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=fmt, force=True)


def lock_socket_path(path: Path, dir_mode: int) -> Any:
    """Create the socket's directory and hold a lock beside the socket for our lifetime."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=dir_mode)
    elif parent.stat().st_uid == os.getuid() and parent.stat().st_mode & 0o777 != dir_mode:
        parent.chmod(dir_mode)
    lock = open(parent / f"{path.name}.lock", "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise QmgrError(f"another qmgrd is already serving {path}", code="already_running")
    return lock


def bind_socket(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)  # we hold the lock: whatever is there is stale
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # 0660 from the first moment the socket exists
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


async def serve(s: Settings, sock: socket.socket, daemon: Any) -> None:
    import uvicorn

    from qmgr.daemon.app import build_app
    from qmgr.daemon.peercred import PeerCredProtocol

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Not uvicorn's own: it re-raises the signal after shutdown, which would kill the
            # process before the catalog is closed and the socket removed.
            systemd.notify("STOPPING=1")
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(
        build_app(daemon), http=PeerCredProtocol, log_config=None, access_log=s.log_level == "debug",
        lifespan="off", timeout_graceful_shutdown=10,
    )
    server = Server(config)

    async def tell_systemd() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
        log.info("qmgrd %s ready on %s (pid %d)", __version__, s.socket, os.getpid())
        systemd.notify(f"READY=1\nSTATUS=serving {s.socket}\nMAINPID={os.getpid()}")
        interval = systemd.watchdog_interval()
        # Pings come from the event loop itself, so a blocked loop stops them and systemd
        # restarts the daemon.
        while interval and not server.should_exit:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    notifier = asyncio.create_task(tell_systemd())
    server.should_exit = bool(EARLY_SIGNALS)
    await server.serve(sockets=[sock])
    notifier.cancel()


# Signals that arrive before uvicorn installs its handlers (during migrations and recovery, or
# just after the socket is bound) are remembered here and end the daemon cleanly once it serves.
EARLY_SIGNALS: list[int] = []


def run(s: Settings) -> int:
    setup_logging(s.log_level)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda sig, frame: EARLY_SIGNALS.append(sig))
    adopted = systemd.listen_fds()
    lock = None
    try:
        if not adopted:
            lock = lock_socket_path(s.socket, s.socket_dir_mode)
        from qmgr.daemon.state import Daemon

        systemd.notify("STATUS=migrating and recovering the catalog")
        daemon = Daemon(s)
    except QmgrError as e:
        log.error("%s", e.message)
        return 1
    try:
        sock = adopted[0] if adopted else bind_socket(s.socket)
        if adopted:
            log.info("using the socket passed by systemd")
        asyncio.run(serve(s, sock, daemon))
    finally:
        daemon.close()
        if lock is not None:
            s.socket.unlink(missing_ok=True)
            lock.close()
    log.info("qmgrd stopped")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qmgrd", description="The qmgr daemon.")
    parser.add_argument("--socket", help="Unix socket path (default: per user or system)")
    parser.add_argument("--home", help="data directory (catalog, store)")
    parser.add_argument("--system", action="store_true", default=None,
                        help="run as the system service (/run/qmgr, /var/lib/qmgr)")
    parser.add_argument("--version", action="version", version=f"qmgrd {__version__}")
    args = parser.parse_args(argv)
    try:
        s = settings_mod.load(system=args.system, socket=args.socket, home=args.home)
    except QmgrError as e:
        print(f"qmgrd: {e.message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(s))


if __name__ == "__main__":
    main()
