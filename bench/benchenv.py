"""The environment of the qmgr processes a benchmark starts."""

from __future__ import annotations

import os
from pathlib import Path


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
