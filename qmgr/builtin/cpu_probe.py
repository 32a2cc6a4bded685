"""Built-in probe: the CPU and system memory, from /proc and os."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qmgr import hookimpl


def _meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            # /proc/meminfo says "kB" and means KiB.
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


class CPUProbe:
    """Reports one ``cpu`` device: logical cores, total and available RAM."""

    name = "cpu"

    def devices(self) -> list[dict[str, Any]]:
        mem = _meminfo()
        return [
            {
                "kind": "cpu",
                "name": os.uname().machine,
                "cores": os.cpu_count() or 1,
                "memory_total": mem.get("MemTotal"),
                "memory_free": mem.get("MemAvailable"),
            }
        ]


@hookimpl
def register_probes(register):
    register(CPUProbe())
