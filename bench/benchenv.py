"""The environment of the qmgr processes a benchmark starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def qmgr_env(root: Path, **extra: str) -> dict[str, str]:
    """A private daemon under ``root`` (home, socket), no third-party plugins, ``extra`` on top.

    ``PYTHONDONTWRITEBYTECODE`` is dropped: qmgr's modules then run from bytecode, as those of
    an installed package do (pip compiles them), while a checkout edited since its bytecode was
    written would compile its changed modules again in every client (a few ms each), a cost
    of the checkout, not of qmgr. The benchmarks' untimed first runs write the bytecode."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("QMGR_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(QMGR_HOME=str(root / "home"), QMGR_SOCKET=str(root / "s.sock"), QMGR_PLUGINS="")
    env.update(extra)
    return env


def start_daemon(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``qmgrd`` in ``env``, returned once ``qmgr status`` answers (the caller stops it)."""
    daemon = subprocess.Popen([str(BIN / "qmgrd")], env=env, stderr=subprocess.DEVNULL)
    while subprocess.run([str(BIN / "qmgr"), "status"], env=env,
                         capture_output=True).returncode:
        if daemon.poll() is not None:
            raise SystemExit(f"qmgrd exited ({daemon.returncode}) before it answered")
        time.sleep(0.05)
    return daemon
