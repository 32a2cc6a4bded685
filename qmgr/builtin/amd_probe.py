"""Built-in probe: AMD GPUs, from the amdgpu driver's sysfs files.

Every /sys/class/drm/cardN whose ``device/vendor`` is AMD's (0x1002) and whose driver reports
VRAM is a ``rocm`` device. The amdgpu driver documents these files (Linux
Documentation/gpu/amdgpu/driver-misc.rst, "GPU Memory Usage Information"):

- ``mem_info_vram_total``: the VRAM on the device, in bytes;
- ``mem_info_vram_used``: the VRAM in use by every process, in bytes;
- ``product_name``: the product's name, read from the board's FRU EEPROM (where there is one,
  mostly server cards; elsewhere the file is missing or empty, and the device is "AMD GPU").

An APU's VRAM is the small carve-out the firmware reserves; the memory it actually computes in
is system RAM (GTT), which the CPU probe reports. ``cardN-DP-1`` and the like are connectors, not
cards. Indexes count AMD cards in card-number order, as ROCm numbers them by default.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from qmgr import hookimpl
from qmgr.plugin import Device, Probe

AMD_VENDOR = 0x1002
CARD_RE = re.compile(r"card(\d+)")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path, base: int = 10) -> int | None:
    text = _read(path)
    try:
        return int(text, base) if text else None
    except ValueError:
        return None


class AMDProbe:
    """Reports one ``rocm`` device per AMD GPU that the amdgpu driver manages."""

    name = "amd"

    def __init__(self, root: Path = Path("/")):
        self.root = Path(root)

    def devices(self) -> list[Device]:
        drm = self.root / "sys/class/drm"
        try:
            entries = list(drm.iterdir())
        except OSError:
            return []  # no DRM devices at all (a server without graphics, a container)
        cards = sorted(
            (int(m[1]), entry) for entry in entries if (m := CARD_RE.fullmatch(entry.name))
        )
        devices: list[Device] = []
        for _, card in cards:
            device = card / "device"
            if _read_int(device / "vendor", 16) != AMD_VENDOR:
                continue
            total = _read_int(device / "mem_info_vram_total")
            if total is None:
                continue  # not driven by amdgpu (radeon, vfio-pci for a VM): nothing to use
            used = _read_int(device / "mem_info_vram_used")
            free = None if used is None else max(total - used, 0)
            name = _read(device / "product_name") or "AMD GPU"
            devices.append(Device("rocm", len(devices), name, total, free))
        return devices


@hookimpl
def register_probes(register: Callable[[Probe], None]) -> None:
    register(AMDProbe())
