"""Built-in probe: NVIDIA GPUs, through NVML (the ``pynvml`` module of ``nvidia-ml-py``).

For each GPU: name, total and free memory, compute capability, the driver's version, and the
peak memory bandwidth. No NVML library, no driver loaded, or no GPU is a normal answer (no
devices), not an error; any other NVML failure (no permission on /dev/nvidia*, a library that
does not match the kernel module after a driver upgrade) is raised, so the snapshot reports it.

Free memory is NVML's ``free``: memory another process holds is not free. NVML's v2 memory
structure (``nvmlDeviceGetMemoryInfo(handle, version=nvmlMemory_v2)``) reports the driver's own
reservation apart from ``used`` instead of inside it; ``total`` and ``free`` are the same in both,
so v1 serves where v2 is missing (drivers before R510, old nvidia-ml-py).

Indexes are NVML's (PCI bus order). CUDA numbers devices fastest first unless
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and NVML ignores ``CUDA_VISIBLE_DEVICES``. A GPU in MIG mode
is reported whole, not per instance.

``pynvml`` is imported when ``devices()`` first runs, and ``nvml`` (a module with the same
functions) can be passed in: the tests pass one that answers from recorded NVML answers.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from qmgr import hookimpl
from qmgr.plugin import Device, Probe

log = logging.getLogger(__name__)

# nvmlInit's answers that mean "no NVIDIA GPU here" rather than "something is wrong".
ABSENT = ("NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED")


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def memory_bandwidth(bus_width_bits: int | None, max_memory_clock_mhz: int | None) -> int | None:
    """Peak memory bandwidth in bytes/s: bus width × NVML's maximum memory clock × 2.

    GDDR and HBM move data on both edges of the clock NVML reports (double data rate): an H200,
    6016 bits at 3201 MHz, gives 752 B × 3.201 GHz × 2 = 4.81 TB/s, its data sheet's 4.8 TB/s;
    an RTX 4090, 384 bits at 10501 MHz, 1.008 TB/s, its 1008 GB/s.
    """
    if not bus_width_bits or not max_memory_clock_mhz:
        return None
    return bus_width_bits * max_memory_clock_mhz * 1_000_000 * 2 // 8


class NvidiaProbe:
    """Reports one ``cuda`` device per NVIDIA GPU that NVML sees."""

    name = "nvidia"

    def __init__(self, nvml: Any = None):
        self.nvml = nvml

    def devices(self) -> list[Device]:
        nvml = self.nvml
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError:
                return []  # nvidia-ml-py is not installed: nothing can see NVIDIA GPUs
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            if e.value in {getattr(nvml, name) for name in ABSENT if hasattr(nvml, name)}:
                return []
            raise
        try:
            driver = _text(_optional(nvml, nvml.nvmlSystemGetDriverVersion))
            return [_device(nvml, index, driver) for index in range(nvml.nvmlDeviceGetCount())]
        finally:
            nvml.nvmlShutdown()


def _optional(nvml: Any, function: Any, *args: Any) -> Any:
    """What NVML answers, or None where this GPU or driver does not support the query."""
    try:
        return function(*args)
    except nvml.NVMLError:
        return None


def _device(nvml: Any, index: int, driver: str | None) -> Device:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        total, free = _memory(nvml, handle)
    # One unreadable GPU (lost, no permission on its node) must not hide the others.
    except nvml.NVMLError as e:
        log.warning("NVIDIA GPU %d: %s", index, e)
        return Device("cuda", index, f"NVIDIA GPU (unreadable: {e})", None, None, driver=driver)
    capability = _optional(nvml, nvml.nvmlDeviceGetCudaComputeCapability, handle)
    return Device(
        "cuda", index,
        _text(_optional(nvml, nvml.nvmlDeviceGetName, handle)) or "NVIDIA GPU",
        total, free,
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        driver=driver,
        memory_bandwidth=memory_bandwidth(
            _optional(nvml, nvml.nvmlDeviceGetMemoryBusWidth, handle),
            _optional(nvml, nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM),
        ),
    )


def _memory(nvml: Any, handle: Any) -> tuple[int, int]:
    """Total and free bytes: v2 where the driver has it, else v1 (the same two numbers)."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            return int(info.total), int(info.free)
        # Drivers before R510 lack the v2 call (Function Not Found); old pynvml, the argument.
        except (nvml.NVMLError, TypeError):
            pass
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return int(info.total), int(info.free)


@hookimpl
def register_probes(register: Callable[[Probe], None]) -> None:
    register(NvidiaProbe())
