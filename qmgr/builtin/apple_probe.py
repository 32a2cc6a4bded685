"""Built-in probe: Apple silicon's GPU, whose memory is the machine's (unified) memory.

On macOS with an arm64 CPU it reports one ``metal`` device from ``sysctl`` and ``vm_stat``:

- total: ``hw.memsize``, all of RAM, shared by CPU and GPU (``unified_memory``);
- free: ``vm_stat``'s free + inactive pages × its page size (what psutil calls available);
- cores: ``hw.ncpu``; name: ``machdep.cpu.brand_string`` ("Apple M2 Pro").

Metal does not let the GPU use all of RAM. Its limit, ``MTLDevice.recommendedMaxWorkingSetSize``,
is an Objective-C property that no ``sysctl`` shows, so the probe reports it as a share of total,
``usable_fraction``. llama.cpp keeps its Metal buffers under that limit and logs it at start
(``ggml_metal_init: recommendedMaxWorkingSetSize``); the logs users posted show about 2/3 of RAM
on smaller machines, e.g. 10922.67 MB on 16 GB (abetlen/llama-cpp-python#687) and 21845.34 MB on
a 32 GB M1 Max (ggml-org/llama.cpp#2011), and about 3/4 on larger ones: loads fail above about
47 GB on a 64 GB M2 Max (ggml-org/llama.cpp#1870), and Ollama shows 96 GB on a 128 GB M1 Ultra.
An administrator can move the limit with ``sysctl iogpu.wired_limit_mb=N`` (macOS 14 and later;
0 is the default): the probe uses that value where it is set.

Output is parsed as ``name: value`` lines rather than ``sysctl -n``'s bare values, so a name an
older macOS does not know (it says "unknown oid" on stderr) cannot shift the others. The command
runner is injectable: the tests feed it recorded outputs.
"""

from __future__ import annotations

import platform
import re
import subprocess
from collections.abc import Callable, Sequence

from qmgr import hookimpl
from qmgr.plugin import Device, Probe

SYSCTL = ("sysctl", "hw.memsize", "hw.ncpu", "machdep.cpu.brand_string", "hw.optional.arm64",
          "iogpu.wired_limit_mb")
VM_STAT = ("vm_stat",)

# Up to this much RAM, macOS lets the GPU have about 2/3 of it; above, about 3/4 (see above).
SMALL_MACHINE = 36 * 2**30

PAGE_SIZE_RE = re.compile(r"page size of (\d+) bytes")


def run_command(argv: Sequence[str]) -> str:
    """A command's standard output ("" if it cannot run)."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=5,
                              check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def default_usable_fraction(memsize: int) -> float:
    return 2 / 3 if memsize <= SMALL_MACHINE else 3 / 4


def parse_sysctl(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def parse_vm_stat_free(text: str) -> int | None:
    """Free + inactive pages × page size, from ``vm_stat``'s output."""
    match = PAGE_SIZE_RE.search(text)
    pages: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        value = value.strip().rstrip(".")
        if sep and value.isdigit():
            pages[key.strip()] = int(value)
    if not match or "Pages free" not in pages or "Pages inactive" not in pages:
        return None
    return (pages["Pages free"] + pages["Pages inactive"]) * int(match[1])


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


class AppleProbe:
    """Reports the ``metal`` device of an Apple silicon Mac; nothing elsewhere."""

    name = "apple"

    def __init__(self, run: Callable[[Sequence[str]], str] = run_command,
                 system: Callable[[], str] = platform.system):
        self.run = run
        self.system = system

    def devices(self) -> list[Device]:
        if self.system() != "Darwin":
            return []
        sysctl = parse_sysctl(self.run(SYSCTL))
        if sysctl.get("hw.optional.arm64") != "1":
            return []  # an Intel Mac: no unified memory for Metal to share
        memsize = _int(sysctl.get("hw.memsize"))
        wired_limit_mb = _int(sysctl.get("iogpu.wired_limit_mb"))
        fraction = None
        if memsize:
            fraction = (min(wired_limit_mb * 2**20 / memsize, 1.0) if wired_limit_mb
                        else default_usable_fraction(memsize))
        return [Device(
            "metal", 0, sysctl.get("machdep.cpu.brand_string") or "Apple silicon",
            memsize, parse_vm_stat_free(self.run(VM_STAT)),
            cores=_int(sysctl.get("hw.ncpu")),
            unified_memory=True,
            usable_fraction=fraction,
        )]


@hookimpl
def register_probes(register: Callable[[Probe], None]) -> None:
    register(AppleProbe())
