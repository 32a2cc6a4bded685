"""``qmgrd``: open the catalog, recover, bind the socket, serve, tell systemd.

Order at start: lock the socket path (one daemon per socket), migrate, reconcile files, load
plugins, start the watcher, bind (or adopt systemd's sockets: qmgr's own, and the API
listener's when qmgr-api.socket passes it as ``api``), serve, and only then send
``READY=1``. SIGTERM/SIGINT stop it cleanly (``STOPPING=1``, in-flight requests finish).
SIGHUP re-reads the config file and applies what can change while running (log level, watch
settle time), between ``RELOADING=1`` and ``READY=1``.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import functools
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from qmgr import __version__
from qmgr import settings as settings_mod
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


def lock_socket_path(path: Path, dir_mode: int, dedicated: bool = True) -> Any:
    """Create the socket's directory and hold a lock beside the socket for our lifetime.

    The directory must be ours: a link, or a directory another user made first (anyone can
    create the predictable ``/tmp/qmgr-UID`` fallback), would let them see or replace the
    socket. ``dedicated``: the directory is qmgr's own (a default path), so its mode is set;
    a directory named by the user (``QMGR_SOCKET``) is left as it is.
    """
    import stat

    parent = path.parent
    try:
        st = os.lstat(parent)
    except FileNotFoundError:
        parent.mkdir(parents=True, mode=dir_mode)
        os.chmod(parent, dir_mode)  # mkdir's mode passes through the umask
        st = os.lstat(parent)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise QmgrError(f"refusing to serve in {parent}: it is not a plain directory (a link?); "
                        "remove it or choose another --socket", code="unsafe_socket_dir")
    if st.st_uid != os.geteuid():
        raise QmgrError(f"refusing to serve in {parent}: it belongs to uid {st.st_uid}, not to "
                        f"this daemon's uid {os.geteuid()}; remove it or choose another "
                        "--socket", code="unsafe_socket_dir")
    if dedicated and stat.S_IMODE(st.st_mode) != dir_mode:
        os.chmod(parent, dir_mode)
    lock = open(parent / f"{path.name}.lock", "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise QmgrError(f"another qmgrd is already serving {path}",
                        code="already_running") from None
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


# What a reload can change in a running daemon; the rest needs a restart.
RELOADABLE = ("log_level", "watch_settle")
RESTART_ONLY = ("home", "socket", "database_url", "listen", "origins")


def reload_settings(s: Settings, daemon: Any, flags: dict[str, Any]) -> None:
    """SIGHUP: re-read the config file and environment, apply what can change, log the rest."""
    log.info("reloading configuration")
    # MONOTONIC_USEC lets systemd match this reload to `systemctl reload` (Type=notify-reload).
    systemd.notify(f"RELOADING=1\nSTATUS=reloading configuration\n"
                   f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        new = settings_mod.load(**flags)
        level = logging.getLevelName(new.log_level.upper())
        if not isinstance(level, int):
            raise QmgrError(f"unknown log_level {new.log_level!r}", code="bad_config")
    except QmgrError as e:
        log.error("configuration not reloaded, the running one stays: %s", e.message)
    else:
        for key in RELOADABLE:
            old_value, new_value = getattr(s, key), getattr(new, key)
            if old_value != new_value:
                log.info("%s: %s -> %s", key, old_value, new_value)
                setattr(s, key, new_value)
        logging.getLogger().setLevel(level)
        daemon.watcher.settle = s.watch_settle
        # uvicorn logs requests when its access logger propagates (new connections check).
        logging.getLogger("uvicorn.access").propagate = s.log_level == "debug"
        for key in RESTART_ONLY:
            if getattr(new, key) != getattr(s, key):
                log.warning("%s changed to %s: restart qmgrd to use it", key, getattr(new, key))
    systemd.notify(f"READY=1\nSTATUS={serving_status(s, daemon)}")


def serving_status(s: Settings, daemon: Any) -> str:
    """The STATUS= line while serving: where, and what start-up recovery found."""
    found = daemon.recovery
    notes = [f"{n} {what}" for n, what in (
        (found.missing, "missing"), (found.modified, "modified"),
        (len(found.quarantined), "quarantined"),
    ) if n]
    return f"serving {s.socket}" + (f"; at start: {', '.join(notes)}" if notes else "")


async def serve(s: Settings, socks: list[socket.socket], daemon: Any,
                flags: dict[str, Any] | None = None,
                listeners: list[tuple[socket.socket, str]] | None = None) -> None:
    """Serve qmgr's API on ``socks`` and, on ``listeners`` (each with the HOST:PORT it was
    checked as), Ollama's and OpenAI's."""
    import uvicorn

    from qmgr.daemon.app import build_app
    from qmgr.daemon.peercred import PeerCredProtocol

    servers: list[uvicorn.Server] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Not uvicorn's own: it re-raises the signal after shutdown, which would kill the
            # process before the catalog is closed and the socket removed. A signal stops
            # every server (the socket's and the API listener's).
            systemd.notify("STOPPING=1\nSTATUS=stopping: finishing requests")
            for each in servers:
                if each.should_exit and sig == signal.SIGINT:
                    each.force_exit = True
                each.should_exit = True

    config = uvicorn.Config(
        build_app(daemon), http=PeerCredProtocol, log_config=None,
        access_log=s.log_level == "debug", lifespan="off", timeout_graceful_shutdown=10,
    )
    server = Server(config)
    servers.append(server)
    serving = [server.serve(sockets=socks)]
    if listeners:
        from qmgr.serve.app import build_api_app

        api = build_api_app(daemon.catalog, daemon.running, daemon.models, daemon.puller,
                            daemon.fitter, daemon.jobs, [address for _, address in listeners],
                            s.api_key, s.origins, s.fleet_key)
        servers.append(Server(uvicorn.Config(api, log_config=None, lifespan="off",
                                             access_log=s.log_level == "debug",
                                             timeout_graceful_shutdown=10)))
        serving.append(servers[-1].serve(sockets=[tcp for tcp, _ in listeners]))
        for tcp, _ in listeners:
            log.info("serving Ollama's API on http://%s",
                     settings_mod.format_listen(*tcp.getsockname()[:2]))

    async def tell_systemd() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
        log.info("qmgrd %s ready on %s (pid %d)", __version__, s.socket, os.getpid())
        systemd.notify(f"READY=1\nSTATUS={serving_status(s, daemon)}\nMAINPID={os.getpid()}")
        # Without flags (the `qmgr daemon` command), keep the socket and home we run with.
        reload_flags = flags if flags is not None else {
            "system": s.system, "socket": str(s.socket), "home": str(s.home)}
        reload = functools.partial(reload_settings, s, daemon, reload_flags)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
        if EARLY_RELOAD:
            reload()
        interval = systemd.watchdog_interval()
        # Pings come from the event loop itself, so a blocked loop stops them and systemd
        # restarts the daemon.
        while interval and not server.should_exit:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    notifier = asyncio.create_task(tell_systemd())
    for each in servers:
        each.should_exit = bool(EARLY_SIGNALS)
    await asyncio.gather(*serving)
    notifier.cancel()


# Signals that arrive before uvicorn installs its handlers (during migrations and recovery, or
# just after the socket is bound) are remembered here and end the daemon cleanly once it serves.
EARLY_SIGNALS: list[int] = []
# Likewise a SIGHUP (whose default action would kill the daemon): the reload happens once it
# serves.
EARLY_RELOAD: list[int] = []


def no_delay(sock: socket.socket) -> socket.socket:
    """TCP_NODELAY on a listener, which its connections inherit (Linux). asyncio sets it only
    on sockets whose ``proto`` says TCP, and ``socket.create_server``'s say 0: without it a
    streamed answer's first piece waits for the client's delayed ACK of the headers (Nagle),
    ~40 ms on every request."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def bind_listener(listen: str, api_key: str | None) -> socket.socket:
    """The TCP socket of the API listener (``listen``: HOST:PORT), or why not."""
    host, port = settings_mod.check_listen(listen, api_key)
    try:
        return no_delay(socket.create_server((host, port), family=socket.AF_INET6
                                             if ":" in host else socket.AF_INET))
    except OSError as e:
        raise QmgrError(f"cannot listen on {listen}: {e.strerror or e} (another server, "
                        "an Ollama, may be there: `--listen HOST:PORT` for another port)",
                        code="bad_config") from None


# FileDescriptorName= of qmgr-api.socket: the API listener's socket, when systemd holds it.
API_FDNAME = "api"


def sort_passed(passed: list[tuple[str, socket.socket]]) -> tuple[list[socket.socket],
                                                                   list[socket.socket]]:
    """systemd's sockets: qmgr's own (any name but ``api``) and the API listener's.

    Each must be of its kind, or the daemon does not start: qmgr's own API trusts whoever
    connects by their uid (SO_PEERCRED) and must never be on an IP socket.
    """
    own: list[socket.socket] = []
    api: list[socket.socket] = []
    for name, sock in passed:
        ip = sock.family in (socket.AF_INET, socket.AF_INET6)
        where = settings_mod.format_listen(*sock.getsockname()[:2]) if ip else \
            sock.getsockname() or "an unnamed socket"
        if name == API_FDNAME and not ip:
            raise QmgrError(f"systemd passed {where} as {API_FDNAME!r}: the API listener needs "
                            "a TCP socket (ListenStream=127.0.0.1:11434, as in "
                            "qmgr-api.socket)", code="bad_config")
        if name != API_FDNAME and ip:
            raise QmgrError(f"systemd passed the TCP socket {where} (named {name!r}): qmgr's "
                            "own API is served on a Unix socket only; to serve Ollama's API "
                            f"there, name it {API_FDNAME!r} (FileDescriptorName={API_FDNAME}, "
                            "as in qmgr-api.socket)", code="bad_config")
        (api if ip else own).append(sock)
    return own, api


def api_listeners(s: Settings, passed: list[socket.socket]) -> list[tuple[socket.socket, str]]:
    """The API listener's sockets, each with the HOST:PORT it is checked as: those systemd
    passed (``listen`` is then not bound: systemd holds the port), else one bound at
    ``listen``, else none. A passed one obeys the same rule: off loopback, an api_key."""
    if passed:
        listeners = []
        for sock in passed:
            address = settings_mod.format_listen(*sock.getsockname()[:2])
            settings_mod.check_listen(address, s.api_key)
            listeners.append((no_delay(sock), address))
        log.info("using the API socket passed by systemd")
        if s.listen and s.listen not in [address for _, address in listeners]:
            log.info("listen %s is not bound: systemd holds the API's socket (qmgr-api.socket; "
                     "`qmgr service install` writes it with listen's address)", s.listen)
        return listeners
    if s.listen:
        return [(bind_listener(s.listen, s.api_key), s.listen)]
    return []


def run(s: Settings, flags: dict[str, Any] | None = None) -> int:
    """Serve until SIGTERM/SIGINT. ``flags``: the command-line settings, kept on reload."""
    setup_logging(s.log_level)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda sig, frame: EARLY_SIGNALS.append(sig))
    signal.signal(signal.SIGHUP, lambda sig, frame: EARLY_RELOAD.append(sig))
    passed = systemd.listen_fds()
    lock = None
    try:
        adopted, passed_api = sort_passed(passed)
        if not adopted:
            lock = lock_socket_path(s.socket, s.socket_dir_mode, not s.socket_explicit)
        from qmgr.daemon.state import Daemon

        systemd.notify("STATUS=migrating and recovering the catalog")
        daemon = Daemon(s)
    except QmgrError as e:
        log.error("%s", e.message)
        return 1
    try:
        # The API listener first: once the socket answers, everything is up (a client that
        # waits for the socket then finds the listener too).
        try:
            listeners = api_listeners(s, passed_api)
        except QmgrError as e:
            log.error("%s", e.message)
            return 1
        socks = adopted or [bind_socket(s.socket)]
        if adopted:
            log.info("using the socket passed by systemd")
        asyncio.run(serve(s, socks, daemon, flags, listeners))
    finally:
        # A reload now would come too late, and dying of SIGHUP would skip the cleanup.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="also serve Ollama's API to other programs there")
    parser.add_argument("--version", action="version", version=f"qmgrd {__version__}")
    args = parser.parse_args(argv)
    flags = {"system": args.system, "socket": args.socket, "home": args.home,
             "listen": args.listen}
    try:
        s = settings_mod.load(**flags)
    except QmgrError as e:
        print(f"qmgrd: {e.message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(s, flags))


if __name__ == "__main__":
    main()
