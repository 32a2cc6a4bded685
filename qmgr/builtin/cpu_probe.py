"""Built-in probe: the CPU and the memory this process may use, from /proc and its cgroups.

System memory is ``MemTotal`` and ``MemAvailable`` from /proc/meminfo, unless the process runs
in a cgroup with a memory limit (a container, a systemd slice with ``MemoryMax=``): then the
limit wins. The limit of every ancestor cgroup applies too, so the probe walks up from the
process's own cgroup and keeps the tightest. Both hierarchies are read at their usual mount
points:

- cgroup v2: ``0::/path`` in /proc/self/cgroup, then /sys/fs/cgroup/path/memory.max ("max":
  no limit), memory.current and memory.stat;
- cgroup v1: the ``memory`` line, then /sys/fs/cgroup/memory/path/memory.limit_in_bytes (no
  limit is a huge number, 9223372036854771712 with 4 KiB pages), memory.usage_in_bytes and
  memory.stat.

A cgroup's usage counts the page cache, which the kernel reclaims before it reaches the limit;
so free is the limit minus the usage less its inactive file pages (the "working set" that
kubelet and ``docker stats`` report), and never more than MemAvailable.

Cores are the CPUs this process may run on (its affinity), fewer if a cgroup CPU quota
(``cpu.max``, or v1 ``cpu.cfs_quota_us``) allows less. SIMD features come from the ``flags``
(x86) or ``Features`` (ARM) line of /proc/cpuinfo.

Every path is read under ``root``, so tests point the probe at recorded trees.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from qmgr import hookimpl
from qmgr.plugin import Device, Probe

# x86 flags that matter to llama.cpp's kernels, in the order they are reported (/proc/cpuinfo
# name -> reported name).
X86_SIMD = {
    "pni": "sse3", "ssse3": "ssse3", "sse4_1": "sse4_1", "sse4_2": "sse4_2", "avx": "avx",
    "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx_vnni": "avx_vnni",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi", "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16", "amx_tile": "amx_tile", "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
}
# ARM: the kernel says asimd for NEON, asimddp for the dot-product instructions.
ARM_SIMD = {
    "asimd": "neon", "asimdhp": "fp16", "asimddp": "dotprod", "i8mm": "i8mm", "bf16": "bf16",
    "sve": "sve", "sve2": "sve2", "sme": "sme",
}

# cgroup v1 says "no limit" with PAGE_COUNTER_MAX pages, whose byte value depends on the page
# size; anything this large is no limit.
NO_LIMIT = 2**60

CGROUP = PurePosixPath("sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _keyed(text: str | None, sep: str | None) -> dict[str, str]:
    """``key<sep>value`` lines (first occurrence wins); ``sep=None`` splits on whitespace."""
    values: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(sep) if sep else line.partition(" ")
        values.setdefault(key.strip(), value.strip())
    return values


def _meminfo(text: str | None) -> dict[str, int]:
    values: dict[str, int] = {}
    for key, rest in _keyed(text, ":").items():
        parts = rest.split()
        if parts and parts[0].isdigit():
            # /proc/meminfo says "kB" and means KiB.
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


class CPUProbe:
    """Reports one ``cpu`` device: cores, SIMD features, and the RAM this process may use."""

    name = "cpu"

    def __init__(self, root: Path = Path("/"), cpu_count: Callable[[], int] | None = None):
        self.root = Path(root)
        self.cpu_count = cpu_count or _affinity

    def devices(self) -> list[Device]:
        cpuinfo = _keyed(_read(self.root / "proc/cpuinfo"), ":")
        name, simd = _cpu_model(cpuinfo)
        total, free = self.memory()
        return [Device("cpu", 0, name, total, free, cores=self.cores(), simd=simd)]

    def memory(self) -> tuple[int | None, int | None]:
        """Total and free bytes of RAM for this process: /proc/meminfo within cgroup limits."""
        meminfo = _meminfo(_read(self.root / "proc/meminfo"))
        total, free = meminfo.get("MemTotal"), meminfo.get("MemAvailable")
        if total is None and self.root == Path("/"):
            total = _sysconf_memory()  # no /proc (macOS): at least the size of RAM
        for limit, headroom in self._memory_limits():
            total = _min(total, limit)
            free = _min(free, headroom)
        return total, free

    def cores(self) -> int:
        cores = self.cpu_count()
        for quota in self._cpu_quotas():
            cores = min(cores, quota)
        return max(cores, 1)

    # -- cgroups -------------------------------------------------------------------------------

    def _cgroup_paths(self) -> tuple[str | None, dict[str, str]]:
        """The v2 path and the v1 path of each controller, from /proc/self/cgroup."""
        v2: str | None = None
        v1: dict[str, str] = {}
        for line in (_read(self.root / "proc/self/cgroup") or "").splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            hierarchy, controllers, path = parts
            if hierarchy == "0" and not controllers:
                v2 = path
            else:
                for controller in controllers.split(","):
                    v1[controller] = path
        return v2, v1

    def _walk(self, mount: PurePosixPath, path: str) -> Iterator[Path]:
        """The cgroup's directory, then each ancestor up to the mount (those that exist).

        Inside a container the path names the cgroup on the host, while the mount shows the
        container's own cgroup at its top: the walk then finds only the top, which is right.
        """
        parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".", "..")]
        for depth in range(len(parts), -1, -1):
            directory = self.root / mount.joinpath(*parts[:depth])
            if directory.is_dir():
                yield directory

    def _memory_limits(self) -> Iterator[tuple[int, int | None]]:
        """(limit, headroom) for each cgroup level with a memory limit."""
        v2, v1 = self._cgroup_paths()
        if v2 is not None:
            for directory in self._walk(CGROUP, v2):
                limit = _read_int(directory / "memory.max")  # "max" (no limit) reads as None
                if limit is not None:
                    stat = _keyed(_read(directory / "memory.stat"), None)
                    yield limit, _headroom(limit, _read_int(directory / "memory.current"),
                                           stat.get("inactive_file"))
        if "memory" in v1:
            for directory in self._walk(CGROUP / "memory", v1["memory"]):
                limit = _read_int(directory / "memory.limit_in_bytes")
                if limit is None or limit >= NO_LIMIT:
                    continue
                stat = _keyed(_read(directory / "memory.stat"), None)
                yield limit, _headroom(limit, _read_int(directory / "memory.usage_in_bytes"),
                                       stat.get("total_inactive_file"))

    def _cpu_quotas(self) -> Iterator[int]:
        """CPUs' worth of time each cgroup level's CPU quota allows (rounded up)."""
        v2, v1 = self._cgroup_paths()
        if v2 is not None:
            for directory in self._walk(CGROUP, v2):
                fields = (_read(directory / "cpu.max") or "").split()
                if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
                    yield math.ceil(int(fields[0]) / max(int(fields[1]), 1))
        if "cpu" in v1:
            for directory in self._walk(CGROUP / "cpu", v1["cpu"]):
                quota = _read_int(directory / "cpu.cfs_quota_us")
                period = _read_int(directory / "cpu.cfs_period_us")
                if quota is not None and quota > 0 and period:
                    yield math.ceil(quota / period)


def _headroom(limit: int, usage: int | None, inactive_file: str | None) -> int | None:
    if usage is None:
        return None
    reclaimable = int(inactive_file) if inactive_file and inactive_file.isdigit() else 0
    return max(limit - max(usage - reclaimable, 0), 0)


def _cpu_model(cpuinfo: dict[str, str]) -> tuple[str, list[str]]:
    """The CPU's name and its SIMD features, from /proc/cpuinfo's first processor."""
    if "flags" in cpuinfo:
        flags = set(cpuinfo["flags"].split())
        simd = [name for flag, name in X86_SIMD.items() if flag in flags]
        return cpuinfo.get("model name") or "x86_64", simd
    if "Features" in cpuinfo:
        features = set(cpuinfo["Features"].split())
        simd = [name for feature, name in ARM_SIMD.items() if feature in features]
        return cpuinfo.get("model name") or "aarch64", simd
    return platform.machine() or "cpu", []


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _sysconf_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@hookimpl
def register_probes(register: Callable[[Probe], None]) -> None:
    register(CPUProbe())
