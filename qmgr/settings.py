"""One settings object for the client and the daemon.

Precedence: command-line flags, then environment (``QMGR_*``), then the config file
(``$XDG_CONFIG_HOME/qmgr/config.toml`` for a user, ``/etc/qmgr/config.toml`` for the system
service, or ``$QMGR_CONFIG``), then defaults. This module is on the client's start-up path: it
imports nothing heavy, and reads the config file only if there is one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SYSTEM_SOCKET = Path("/run/qmgr/qmgr.sock")
SYSTEM_HOME = Path("/var/lib/qmgr")
SYSTEM_CONFIG = Path("/etc/qmgr/config.toml")

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


@dataclasses.dataclass(frozen=True)
class Knob:
    """One ``QMGR_*`` environment variable: what it holds and means (docs/operations.md
    lists every one; a test keeps the two in step)."""

    name: str
    kind: str  # "str", "int", "float", "bool", "list" (comma-separated), "path"
    default: Any
    meaning: str


# Every QMGR_* variable qmgr reads, and the only place that reads one (a test checks that no
# other module does): the settings of `Settings` (with config-file keys) and the knobs below.
KNOBS = {k.name: k for k in (
    Knob("QMGR_SYSTEM", "bool", False, "act as the system service (defaults above)"),
    Knob("QMGR_CONFIG", "path", None, "the configuration file to read instead of the default"),
    Knob("QMGR_HOME", "path", None, "the data directory (config `home`)"),
    Knob("QMGR_SOCKET", "path", None, "the daemon's Unix socket (config `socket`)"),
    Knob("QMGR_DATABASE_URL", "str", None, "the catalog's SQLAlchemy URL (config "
         "`database_url`)"),
    Knob("QMGR_NO_AUTOSTART", "bool", False, "the client fails instead of starting a daemon"),
    Knob("QMGR_WATCH_SETTLE", "float", None, "seconds a watched file must keep its size "
         "(config `watch_settle`)"),
    Knob("QMGR_LOG_LEVEL", "str", None, "the daemon's log level (config `log_level`)"),
    Knob("QMGR_HW", "str", None, "the devices to plan for, declared instead of probed "
         "(config `hw`)"),
    Knob("QMGR_LISTEN", "str", None, "HOST:PORT of the Ollama/OpenAI API listener (config "
         "`listen`)"),
    Knob("QMGR_ORIGINS", "list", None, "web origins a browser may call the API listener from, "
         "besides this machine's own (config `origins`)"),
    Knob("QMGR_PLUGINS", "list", None, "entry-point plugins to load; set but empty loads "
         "none"),
    Knob("QMGR_DISABLE_PLUGINS", "list", [], "plugins never to load, built-ins included"),
    Knob("QMGR_HF_ENDPOINT", "str", None, "the Hugging Face API to pull from (else "
         "HF_ENDPOINT, else huggingface.co)"),
    Knob("QMGR_CA_BUNDLE", "path", None, "a PEM file of certificate authorities to trust for "
         "downloads"),
    Knob("QMGR_DOWNLOAD_PARTS", "int", None, "parallel ranges per large download (default: 4 "
         "over https, 1 over plain http)"),
    Knob("QMGR_PART_THRESHOLD", "int", 256 << 20, "bytes above which a download is split "
         "into parts"),
    Knob("QMGR_RETRIES", "int", 5, "attempts per download part before it fails"),
    Knob("QMGR_RETRY_BACKOFF", "float", 1.0, "seconds before the first retry, doubling "
         "after"),
    Knob("QMGR_STALL_TIMEOUT", "float", 30.0, "seconds without a byte (or below "
         "QMGR_MIN_SPEED) before a download attempt is retried"),
    Knob("QMGR_MIN_SPEED", "float", 1024.0, "bytes per second a download attempt must "
         "average over each stall window"),
    Knob("QMGR_BUSY_WAIT", "float", 600.0, "seconds a pull waits for a registry that answers "
         "503 with Retry-After (a mirror still hashing)"),
    Knob("QMGR_DIRECT_IO", "bool", True, "downloads are written with O_DIRECT where the "
         "filesystem allows it"),
    Knob("QMGR_KEEP_ALIVE", "float", 300.0, "seconds a loaded model stays in memory after its "
         "last request"),
    Knob("QMGR_MAX_LOADED", "int", None, "models loaded at once at most (default: as many as "
         "the memory holds)"),
    Knob("QMGR_MAX_QUEUE", "int", 32, "requests that may wait for one loaded model; more are "
         "refused with 503 and Retry-After"),
    Knob("QMGR_WARM_WORKERS", "bool", True, "an idle worker process is kept ready for the "
         "next quantize/eval job, and with the API listener an idle runner for the next "
         "model load"),
    Knob("QMGR_NODE", "str", None, "this daemon's name in a fleet sharing a PostgreSQL "
         "catalog (config `node`)"),
    Knob("QMGR_ADVERTISE", "str", None, "the URL a fleet's peers reach this node's API "
         "listener at (config `advertise`; default: http://LISTEN)"),
    Knob("QMGR_HEARTBEAT", "float", 5.0, "seconds between a fleet node's heartbeats"),
    Knob("QMGR_NODE_TIMEOUT", "float", 30.0, "seconds without a heartbeat before a fleet "
         "node is gone and its jobs are taken over"),
    Knob("QMGR_HASH_WHILE_WRITING", "bool", True, "the llama.cpp quantizer's worker hashes "
         "its output while it is written (else the daemon hashes it after)"),
)}


def knob(name: str, env: Mapping[str, str] | None = None) -> Any:
    """The value of ``QMGR_*`` variable ``name`` in ``env`` (the process's environment by
    default), parsed as its :data:`KNOBS` entry says; unset or empty is the default (but an
    empty list is empty). A value that does not parse is a ``bad_config`` error naming it."""
    k = KNOBS[name]  # a knob not declared above is a bug, not a user's error
    raw = (os.environ if env is None else env).get(name)
    if raw is None or (raw.strip() == "" and k.kind != "list"):
        return k.default
    raw = raw.strip()
    try:
        if k.kind == "int":
            return int(raw)
        if k.kind == "float":
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError("not a finite number")
            return value
        if k.kind == "bool":
            if raw.lower() in TRUE:
                return True
            if raw.lower() in FALSE:
                return False
            raise ValueError("not 1/0, true/false, yes/no or on/off")
        if k.kind == "list":
            return [part.strip() for part in raw.split(",") if part.strip()]
    except ValueError as e:
        from qmgr.errors import QmgrError

        raise QmgrError(f"{name}={raw!r}: {e} (it is {k.meaning})", code="bad_config") from None
    return raw

# The client's settings that the daemon's work depends on: sent with every request (header
# ``X-Qmgr-Env``), so a daemon started from another shell, or the system service, pulls from
# where this user means, with this user's token. ``QMGR_HOME`` is compared, not applied: a
# daemon keeps one home, and a request meant for another is refused with the difference.
FORWARDED_ENV = ("QMGR_HF_ENDPOINT", "HF_ENDPOINT", "HF_TOKEN")
SECRET_ENV = frozenset({"HF_TOKEN"})
COMPARED_ENV = ("QMGR_HOME",)


@dataclasses.dataclass
class Settings:
    """Where the daemon listens and keeps its data, and how the client reaches it."""

    system: bool = False
    socket: Path = SYSTEM_SOCKET
    home: Path = SYSTEM_HOME
    database_url: str = ""
    autostart: bool = True
    # Seconds a file in a watched folder must keep its size before it is cataloged.
    watch_settle: float = 2.0
    log_level: str = "info"
    # Declared hardware from the config file (QMGR_HW in the environment wins): "ram=16GiB,..."
    hw: str | None = None
    config_file: Path | None = None
    # Whether the socket was named (flag, environment, config) rather than defaulted.
    socket_explicit: bool = False
    # HOST:PORT of the API listener for other programs (Ollama's and OpenAI's APIs); None: none.
    listen: str | None = None
    # The key those programs must send (Authorization: Bearer KEY); required off loopback.
    api_key: str | None = None
    # Web origins (``https://chat.example.com``, ``*`` in a pattern for any characters, ``*``
    # alone for any origin) whose pages may call the API listener, besides the local ones.
    origins: list[str] = dataclasses.field(default_factory=list)
    # This daemon's name in a fleet (several daemons sharing one PostgreSQL catalog); None:
    # not in one.
    node: str | None = None
    # The URL the fleet's peers reach this node's API listener at; None: http://LISTEN.
    advertise: str | None = None
    # The secret the fleet's nodes send each other (Authorization: Bearer KEY) for blobs.
    fleet_key: str | None = None

    @property
    def store(self) -> Path:
        return self.home / "store"

    @property
    def socket_dir_mode(self) -> int:
        # The system socket's directory admits the qmgr group; a user's admits only the user.
        return 0o750 if self.system else 0o700


def user_runtime_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "qmgr"
    # No per-user runtime directory (containers, su sessions): a private one under /tmp.
    return Path("/tmp") / f"qmgr-{os.getuid()}"


def check_private_dir(path: Path, group_ok: bool = False) -> None:
    """Refuse a socket directory someone else could have planted: it must be a real directory
    (not a link), owned by us, and not writable (nor, for a user's, readable) by others.

    ``/tmp/qmgr-UID`` is predictable, so another local user could create it first and serve
    a socket of their own there.
    """
    import stat

    from qmgr.errors import QmgrError

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    problem = None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        problem = "is not a plain directory"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})"
    elif st.st_mode & (0o027 if group_ok else 0o077):
        problem = f"is open to other users (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        raise QmgrError(f"refusing to use {path}: it {problem}; someone may be impersonating the "
                        "daemon. Remove it, or set QMGR_SOCKET / XDG_RUNTIME_DIR.",
                        code="unsafe_socket_dir")


def user_config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "qmgr" / "config.toml"


def user_data_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qmgr"


def _read_config(path: Path) -> dict[str, Any]:
    import tomllib

    from qmgr.errors import QmgrError

    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise QmgrError(f"cannot read config file {path}: {e}", code="bad_config") from e


def load(
    *,
    system: bool | None = None,
    socket: str | None = None,
    home: str | None = None,
    listen: str | None = None,
    autostart: bool | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Settings from flags (the keyword arguments), environment and config file."""
    env = dict(os.environ) if env is None else env
    if system is None:
        system = bool(knob("QMGR_SYSTEM", env))
    config_path = Path(knob("QMGR_CONFIG", env) or (SYSTEM_CONFIG if system else
                                                     user_config_file()))
    config = _read_config(config_path) if config_path.is_file() else {}

    def pick(flag: Any, env_key: str, config_key: str) -> Any:
        if flag is not None:
            return flag
        value = knob(env_key, env)
        return value if value is not None else config.get(config_key)

    s = Settings(system=system, config_file=config_path if config else None)
    s.home = Path(pick(home, "QMGR_HOME", "home") or (SYSTEM_HOME if system else user_data_home()))
    chosen_socket = pick(socket, "QMGR_SOCKET", "socket")
    if chosen_socket:
        s.socket = Path(chosen_socket)
        s.socket_explicit = True
    elif system:
        s.socket = SYSTEM_SOCKET
    else:
        s.socket = user_runtime_dir() / "qmgr.sock"
    s.database_url = pick(None, "QMGR_DATABASE_URL", "database_url") or (
        f"sqlite:///{s.home / 'catalog.db'}"
    )
    s.autostart = autostart if autostart is not None else not knob("QMGR_NO_AUTOSTART", env)
    settle = pick(None, "QMGR_WATCH_SETTLE", "watch_settle")
    if settle is not None:
        s.watch_settle = float(settle)
    s.log_level = str(pick(None, "QMGR_LOG_LEVEL", "log_level") or "info").lower()
    if config.get("hw") is not None:
        s.hw = str(config["hw"])
    chosen_listen = pick(listen, "QMGR_LISTEN", "listen")
    s.listen = str(chosen_listen) if chosen_listen else None
    s.api_key = str(config["api_key"]) if config.get("api_key") else None
    s.origins = _origins(pick(None, "QMGR_ORIGINS", "origins"))
    node = pick(None, "QMGR_NODE", "node")
    s.node = str(node) if node else None
    advertise = pick(None, "QMGR_ADVERTISE", "advertise")
    s.advertise = str(advertise).rstrip("/") if advertise else None
    s.fleet_key = str(config["fleet_key"]) if config.get("fleet_key") else None
    return s


def _origins(value: Any) -> list[str]:
    """The ``origins`` setting: a list of strings (a string is split at commas, as the
    environment's is)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        from qmgr.errors import QmgrError

        raise QmgrError(f"origins = {value!r}: expected a list of strings, e.g. "
                        '["https://chat.example.com"]', code="bad_config")
    return [v.strip() for v in value if v.strip()]


# -- the API listener's address ---------------------------------------------------------------
# Here rather than in qmgr.serve: `qmgr service install` checks it too, in the client.

DEFAULT_LISTEN = "127.0.0.1:11434"  # Ollama's


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:11434`` for IPv6) -> (host, port); a clear error otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        from qmgr.errors import QmgrError

        raise QmgrError(f"listen {value!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}",
                        code="bad_config")
    return host, int(port)


def format_listen(host: str, port: int) -> str:
    """The inverse of :func:`parse_listen`: ``[::1]:11434`` for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, api_key: str | None) -> tuple[str, int]:
    """Where to listen; refused off loopback without an API key (anyone on the network could
    otherwise use, pull into and fill this machine)."""
    host, port = parse_listen(listen)
    if not is_loopback(host) and not api_key:
        from qmgr.errors import QmgrError

        raise QmgrError(f"listen {listen}: serving beyond this machine needs an api_key in "
                        "the configuration file (programs then send Authorization: Bearer "
                        "KEY)", code="bad_config")
    return host, port


def client_socket(s: Settings) -> Path:
    """The socket a client should try: the user's daemon, else a system daemon if one runs.

    A user who installed the system service gets it without any flag; a user without one gets
    a per-user daemon (autostarted) at the default path.
    """
    if s.socket_explicit or s.system or s.socket.exists() or not SYSTEM_SOCKET.exists():
        return s.socket
    return SYSTEM_SOCKET
