"""The hardware snapshot: the devices a variant can be placed on, and their memory.

Devices come from the first of these that is set:

1. ``QMGR_HW`` in the environment: a declaration, nothing is probed (tests, and users whose
   hardware the probes cannot see, such as a GPU that another machine will run on);
2. ``hw`` in the config file, the same grammar;
3. every registered probe (``register_probes``): each one's ``devices()``.

``QMGR_HW`` grammar: comma-separated ``KIND=SIZE`` items. Kinds: ``ram``/``cpu`` (system memory),
``cuda``/``nvidia``, ``rocm``/``amd``, ``metal``/``apple``; repeat ``cuda=``/``rocm=`` for
several GPUs; ``cores=N`` gives the CPU's cores. SIZE is a number with an optional unit, case
ignored: ``B``, ``KB``/``MB``/``GB``/``TB`` (powers of 1000), ``KiB``/``MiB``/``GiB``/``TiB``
(powers of 1024); a bare number is bytes. A declared device is all free.

    QMGR_HW='ram=64GiB,cores=16,cuda=24GiB,cuda=24GiB'

A probe is an object with a ``name`` and ``devices() -> list[Device]``. Third-party probes may
return dicts with the same keys instead (the protocol docs/plugins.md first described); they
are read with :meth:`Device.from_dict`. A probe that raises, or returns something that is not a
device, becomes an entry in :attr:`Snapshot.errors`; the other probes' devices still count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Protocol

from qmgr.errors import QmgrError
from qmgr.settings import knob

log = logging.getLogger(__name__)

KINDS = ("cpu", "cuda", "rocm", "metal")

_KIND_NAMES = {
    "ram": "cpu", "cpu": "cpu",
    "cuda": "cuda", "nvidia": "cuda",
    "rocm": "rocm", "amd": "rocm",
    "metal": "metal", "apple": "metal",
}

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}

_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)

_EXAMPLE = "QMGR_HW='ram=16GiB,cuda=24GiB'"


@dataclasses.dataclass
class Device:
    """One device a model can be placed on. Memory is in bytes; ``None`` means unknown."""

    kind: str  # "cpu", "cuda", "rocm" or "metal"
    index: int  # position among the devices of its kind (the CUDA/ROCm device index)
    name: str
    memory_total: int | None
    memory_free: int | None
    cores: int | None = None
    simd: list[str] = dataclasses.field(default_factory=list)
    compute_capability: str | None = None  # "9.0"
    driver: str | None = None
    memory_bandwidth: int | None = None  # bytes per second, peak
    # CPU and GPU share this memory (Apple silicon): it is the same bytes as the CPU's RAM.
    unified_memory: bool = False
    # The share of memory_total the GPU may use, where the OS caps it (Metal); None: all of it.
    usable_fraction: float | None = None
    source: str = "probe"  # "probe", "QMGR_HW" or "config"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Device:
        """A device from a dict probe (unknown keys are ignored). Raises ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values.setdefault("index", 0)
        values.setdefault("name", str(values.get("kind")))
        values.setdefault("memory_total", None)
        values.setdefault("memory_free", None)
        if "kind" not in values:
            raise ValueError(f"a device without a kind: {dict(data)!r}")
        device = cls(**values)
        device.check()
        return device

    def check(self) -> None:
        """Raise ValueError if this is not a device the estimator can use."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown device kind {self.kind!r} (expected one of {KINDS})")
        for field in ("memory_total", "memory_free"):
            value = getattr(self, field)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"{self.kind} {self.name!r}: {field} must be a byte count, "
                                 f"not {value!r}")


class Probe(Protocol):
    """What a hardware probe plugin implements (registered with ``register_probes``)."""

    #: Short name shown in errors and by ``qmgr hw``.
    name: str

    def devices(self) -> list[Device]:
        """The devices this probe finds now (none: an empty list; a ``dict`` with a Device's
        keys is accepted too). May raise: the error is recorded and the probe skipped."""
        ...


@dataclasses.dataclass
class ProbeError:
    """A probe that failed: its name and what it raised."""

    probe: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Snapshot:
    """The devices found (or declared), and the probes that failed while looking."""

    devices: list[Device]
    errors: list[ProbeError]
    source: str  # "QMGR_HW", "config" or "probe"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "devices": [d.to_dict() for d in self.devices],
            "errors": [e.to_dict() for e in self.errors],
        }


def parse_size(text: str) -> int:
    """Bytes in ``text`` ("24GiB", "1.5 TB", "4096"). Raises ValueError."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (a number, then B, KB, KiB, MB, MiB, GB, GiB, "
                         "TB or TiB)")
    number, unit = match.groups()
    if unit.lower() not in _UNITS:
        raise ValueError(f"unknown unit {unit!r} (expected B, KB, KiB, MB, MiB, GB, GiB, TB or "
                         "TiB)")
    value = Decimal(number) * _UNITS[unit.lower()]
    if value != value.to_integral_value():
        if _UNITS[unit.lower()] == 1:
            raise ValueError(f"{text!r} is not a whole number of bytes")
        value = value.to_integral_value()
    if value <= 0:
        raise ValueError(f"{text!r} is not more than zero")
    return int(value)


def parse_hw(spec: str, source: str = "QMGR_HW") -> list[Device]:
    """The devices a ``QMGR_HW`` declaration describes. Raises QmgrError naming the bad item."""

    def bad(item: str, why: str) -> QmgrError:
        return QmgrError(f"{source}: cannot read {item!r}: {why}. Expected comma-separated "
                         f"KIND=SIZE items, e.g. {_EXAMPLE}", code="bad_hw")

    devices: list[Device] = []
    cores: tuple[str, int] | None = None
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue  # a trailing comma
        key, sep, value = (part.strip() for part in item.partition("="))
        key = key.lower()
        if not sep or not key or not value:
            raise bad(item, "not KIND=SIZE")
        if key == "cores":
            if cores is not None:
                raise bad(item, "cores= given twice")
            if not value.isdigit() or int(value) == 0:
                raise bad(item, "cores must be a whole number above zero")
            cores = (item, int(value))
            continue
        if key not in _KIND_NAMES:
            raise bad(item, f"unknown kind {key!r} (expected ram, cpu, cuda, nvidia, rocm, amd, "
                            "metal, apple or cores)")
        kind = _KIND_NAMES[key]
        try:
            size = parse_size(value)
        except ValueError as e:
            raise bad(item, str(e)) from None
        if size < 2**20 and value[-1].isdigit():
            # "ram=16" is almost certainly not meant as sixteen bytes.
            raise bad(item, f"a bare number is bytes, and {size} bytes is no device; "
                            f"write a unit, e.g. {key}={value}GiB")
        index = sum(d.kind == kind for d in devices)
        if index and kind in ("cpu", "metal"):
            raise bad(item, f"{key}= given twice (only cuda= and rocm= repeat, one per GPU)")
        name = "declared RAM" if kind == "cpu" else f"declared {kind} {index}"
        devices.append(Device(kind, index, name, size, size, unified_memory=kind == "metal",
                              source=source))
    if not devices:
        raise bad(spec, "no device declared")
    if cores is not None:
        cpu = next((d for d in devices if d.kind == "cpu"), None)
        if cpu is None:
            raise bad(cores[0], "cores= needs ram= for the CPU it belongs to")
        cpu.cores = cores[1]
    return devices


def _as_device(found: Any) -> Device:
    if isinstance(found, Device):
        found.check()
        return found
    if isinstance(found, Mapping):
        return Device.from_dict(found)
    raise ValueError(f"devices() returned {type(found).__name__}, not a Device")


def snapshot(probes: Iterable[Probe], env: Mapping[str, str] | None = None,
             config: Mapping[str, Any] | None = None) -> Snapshot:
    """This machine's devices: declared (``QMGR_HW``, else config ``hw``), else probed.

    ``probes``: the registered probes (``PluginSet.probes()``). A malformed declaration raises
    QmgrError (the user wrote it, the user must fix it); a failing probe is recorded and
    skipped.
    """
    env = os.environ if env is None else env
    declared = (knob("QMGR_HW", env) or "").strip()
    if declared:
        return Snapshot(parse_hw(declared, "QMGR_HW"), [], "QMGR_HW")
    if config is not None and config.get("hw") is not None:
        hw = config["hw"]
        if not isinstance(hw, str):
            raise QmgrError(f"config: hw must be a string such as 'ram=16GiB,cuda=24GiB', not "
                            f"{hw!r}", code="bad_hw")
        return Snapshot(parse_hw(hw, "config"), [], "config")
    devices: list[Device] = []
    errors: list[ProbeError] = []
    for probe in probes:
        name = str(getattr(probe, "name", type(probe).__name__))
        try:
            found = [_as_device(d) for d in probe.devices()]
        # A probe is third-party code reading drivers: it must never take the daemon down.
        except (Exception, SystemExit) as e:
            errors.append(ProbeError(name, f"{type(e).__name__}: {e}"))
            log.warning("probe %s failed: %s: %s", name, type(e).__name__, e)
            continue
        devices.extend(found)
    return Snapshot(devices, errors, "probe")
