"""Hardware snapshot and probes, on recorded (and, where none exist, constructed) fixtures.

tests/fixtures/hw/README.md says where each fixture came from. NVML cannot run here, so the
NVIDIA probe is fed a fake NVML module that answers from the recorded H200 answers, with
pynvml's own function names, error class and constants; it is also run against the real pynvml,
which finds no GPU here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pynvml
import pytest

from qmgr import hookimpl
from qmgr.builtin import amd_probe, apple_probe, cpu_probe, nvidia_probe
from qmgr.builtin.amd_probe import AMDProbe
from qmgr.builtin.apple_probe import AppleProbe
from qmgr.builtin.cpu_probe import CPUProbe
from qmgr.builtin.nvidia_probe import NvidiaProbe, memory_bandwidth
from qmgr.errors import QmgrError
from qmgr.fit.hardware import Device, ProbeError, parse_hw, parse_size, snapshot
from qmgr.plugins import PluginSet

HW = Path(__file__).parent / "fixtures" / "hw"
GiB = 2**30
KiB = 1024

# The H200 recordings.
H200_TOTAL = 150754820096
H200_FREE_IDLE = 150109880320
H200_FREE_20GIB_HELD = 128082640896


# -- CPU ------------------------------------------------------------------------------------


def cpu(fixture: str, cores: int = 16) -> Device:
    [device] = CPUProbe(root=HW / fixture, cpu_count=lambda: cores).devices()
    return device


def test_cpu_probe_on_the_recorded_2_core_machine() -> None:
    device = cpu("cpu-2core", cores=2)
    assert device == Device(
        "cpu", 0, "x86_64", 24683656 * KiB, 24300384 * KiB, cores=2,
        simd=["sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c"],
    )
    assert device.to_dict()["memory_total"] == 25276063744


def test_cgroup_v2_limit_below_memtotal_wins() -> None:
    device = cpu("cgroup-v2-limit")
    assert device.memory_total == 8 * GiB  # not the host's 128 GiB
    # limit - (current - inactive_file) = 8 - (3 - 1) GiB, well under MemAvailable
    assert device.memory_free == 6 * GiB
    assert device.cores == 2  # cpu.max 200000/100000


def test_cgroup_v2_max_means_no_limit() -> None:
    device = cpu("cgroup-v2-max", cores=2)
    assert (device.memory_total, device.memory_free) == (24683656 * KiB, 24300384 * KiB)
    assert device.cores == 2  # "max 100000": no quota


def test_cgroup_v2_parent_limit_applies() -> None:
    device = cpu("cgroup-v2-nested")
    assert device.memory_total == 4 * GiB  # the slice's, not the service's 16 GiB
    assert device.memory_free == 4 * GiB - (3 * GiB - 512 * 2**20)  # the slice's headroom
    assert device.cores == 16


def test_cgroup_v1_limit_in_a_container_without_cgroup_namespace() -> None:
    device = cpu("cgroup-v1-limit")
    assert device.memory_total == 2 * GiB
    assert device.memory_free == 2 * GiB - (1536 - 256) * 2**20
    assert device.cores == 2  # 1.5 CPUs of quota, rounded up


def test_cgroup_v1_unlimited_sentinel_is_no_limit() -> None:
    root = HW / "cgroup-v1-unlimited"
    leaf = root / "sys/fs/cgroup/memory/process_api/82a0d7c3f62a041aff776faef599f9c6"
    assert (leaf / "memory.limit_in_bytes").read_text().strip() == "9223372036854771712"
    meminfo = cpu_probe._meminfo((root / "proc/meminfo").read_text())
    device = cpu("cgroup-v1-unlimited")
    assert (device.memory_total, device.memory_free) == (
        meminfo["MemTotal"], meminfo["MemAvailable"]) == (25276510208, 23606534144)


def test_avx512_and_amx_on_the_recorded_xeon() -> None:
    device = cpu("cgroup-v1-unlimited", cores=2)
    assert device.name == "Intel(R) Xeon(R) Processor"
    assert device.simd == [
        "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni",
        "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "avx512_bf16",
        "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    ]


def test_arm_features_and_missing_meminfo() -> None:
    device = cpu("arm-neoverse-v1", cores=2)
    assert device.name == "aarch64"
    assert device.simd == ["neon", "fp16", "dotprod", "i8mm", "bf16", "sve"]
    assert (device.memory_total, device.memory_free) == (None, None)


def test_cpu_probe_on_this_machine() -> None:
    [device] = CPUProbe().devices()
    assert device.kind == "cpu" and device.cores and device.cores >= 1
    assert device.memory_total and device.memory_free
    assert device.memory_free <= device.memory_total


# -- NVIDIA ---------------------------------------------------------------------------------


def recorded_nvml(name: str) -> dict[str, Any]:
    return json.loads((HW / "nvidia-h200" / name).read_text())


class FakeNVML:
    """pynvml's calls answered from a recording (handles are the recorded device dicts)."""

    NVMLError = pynvml.NVMLError
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
    NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, recording: dict[str, Any], init_error: int | None = None,
                 has_v2: bool = True):
        self.recording = recording
        self.init_error = init_error
        self.has_v2 = has_v2
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.recording["driver_version"]

    def nvmlDeviceGetCount(self) -> int:
        return len(self.recording["devices"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return self.recording["devices"][index]

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str:
        return handle["name"]

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any], version: int | None = None) -> Any:
        if version is None:
            return SimpleNamespace(**handle["memory_info"])
        if not self.has_v2:  # what a driver before R510 answers
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        assert version == pynvml.nvmlMemory_v2
        return SimpleNamespace(**handle["memory_info_v2"])

    def nvmlDeviceGetCudaComputeCapability(self, handle: dict[str, Any]) -> tuple[int, int]:
        major, minor = handle["cuda_compute_capability"]
        return major, minor

    def nvmlDeviceGetMemoryBusWidth(self, handle: dict[str, Any]) -> int:
        return handle["memory_bus_width"]

    def nvmlDeviceGetMaxClockInfo(self, handle: dict[str, Any], clock_type: int) -> int:
        assert clock_type == pynvml.NVML_CLOCK_MEM
        return handle["max_mem_clock_mhz"]


def test_the_fake_answers_with_pynvml_struct_fields() -> None:
    device = recorded_nvml("nvml-idle.json")["devices"][0]
    assert set(device["memory_info"]) == {n for n, _ in pynvml.c_nvmlMemory_t._fields_}
    assert set(device["memory_info_v2"]) == {n for n, _ in pynvml.c_nvmlMemory_v2_t._fields_}
    for name in dir(FakeNVML):
        if name.startswith("nvml") and name != "nvmlMemory_v2":
            assert callable(getattr(pynvml, name)), name


def test_nvidia_probe_on_the_idle_h200() -> None:
    fake = FakeNVML(recorded_nvml("nvml-idle.json"))
    [device] = NvidiaProbe(nvml=fake).devices()
    assert device == Device(
        "cuda", 0, "NVIDIA H200", H200_TOTAL, H200_FREE_IDLE,
        compute_capability="9.0", driver="580.159.04",
        memory_bandwidth=6016 * 3201 * 10**6 * 2 // 8,
    )
    assert device.memory_bandwidth == 4_814_304_000_000  # the data sheet says 4.8 TB/s
    assert fake.calls == ["init", "shutdown"]
    # nvidia-smi's view of the same card, in MiB
    header, row = (HW / "nvidia-h200/nvidia-smi-query.csv").read_text().splitlines()
    assert row.split(", ")[1] == f"{H200_TOTAL // 2**20} MiB"


def test_memory_another_process_holds_is_not_free() -> None:
    [device] = NvidiaProbe(nvml=FakeNVML(
        recorded_nvml("nvml-20gib-used-by-another-process.json"))).devices()
    assert device.memory_free == H200_FREE_20GIB_HELD == 128082640896
    assert device.memory_total == H200_TOTAL
    assert H200_FREE_IDLE - device.memory_free >= 20 * GiB


def test_nvidia_probe_falls_back_to_v1_memory_info() -> None:
    recording = recorded_nvml("nvml-20gib-used-by-another-process.json")
    [device] = NvidiaProbe(nvml=FakeNVML(recording, has_v2=False)).devices()
    assert (device.memory_total, device.memory_free) == (H200_TOTAL, H200_FREE_20GIB_HELD)


@pytest.mark.parametrize("error", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
                                   pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_no_nvml_library_or_driver_is_no_gpu(error: int) -> None:
    fake = FakeNVML(recorded_nvml("nvml-idle.json"), init_error=error)
    assert NvidiaProbe(nvml=fake).devices() == []


def test_other_nvml_failures_are_raised() -> None:
    fake = FakeNVML(recorded_nvml("nvml-idle.json"), init_error=pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        NvidiaProbe(nvml=fake).devices()


def test_no_gpus_is_no_devices_and_nvml_is_shut_down() -> None:
    fake = FakeNVML({"driver_version": "580.159.04", "devices": []})
    assert NvidiaProbe(nvml=fake).devices() == []
    assert fake.calls == ["init", "shutdown"]


def test_an_unreadable_gpu_does_not_hide_the_others() -> None:
    recording = recorded_nvml("nvml-idle.json")
    recording["devices"].append({"lost": True})

    class LostSecondGPU(FakeNVML):
        def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any],
                                    version: int | None = None) -> Any:
            if handle.get("lost"):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            return super().nvmlDeviceGetMemoryInfo(handle, version)

    first, second = NvidiaProbe(nvml=LostSecondGPU(recording)).devices()
    assert first.memory_free == H200_FREE_IDLE
    assert (second.index, second.memory_total, second.memory_free) == (1, None, None)
    assert second.name == "NVIDIA GPU (unreadable: GPU is lost)"


def test_nvidia_probe_with_the_real_pynvml_here() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        assert NvidiaProbe().devices() == []  # this machine: no driver, no GPU
    else:
        pynvml.nvmlShutdown()
        devices = NvidiaProbe().devices()
        assert devices and all(d.kind == "cuda" and d.memory_total for d in devices)


def test_nvidia_probe_without_nvidia_ml_py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert NvidiaProbe().devices() == []


def test_memory_bandwidth_unknown_parts() -> None:
    assert memory_bandwidth(None, 3201) is None
    assert memory_bandwidth(384, 10501) == 1_008_096_000_000  # RTX 4090: 1008 GB/s


# -- AMD ------------------------------------------------------------------------------------


def test_amd_probe_on_a_sysfs_tree() -> None:
    devices = AMDProbe(root=HW / "amd-2gpu").devices()
    assert devices == [
        Device("rocm", 0, "AMD Instinct MI210", 68702699520, 68702699520 - 11632640),
        Device("rocm", 1, "AMD GPU", 25753026560, 25753026560 - 1442357248),
    ]


def test_amd_probe_without_drm(tmp_path: Path) -> None:
    assert AMDProbe(root=tmp_path).devices() == []
    assert AMDProbe(root=HW / "cpu-2core").devices() == []


# -- Apple ----------------------------------------------------------------------------------


def recorded_run(sysctl: str) -> Any:
    def run(argv: Sequence[str]) -> str:
        name = {"sysctl": sysctl, "vm_stat": "vm_stat.txt"}[argv[0]]
        return (HW / "apple-m2" / name).read_text()

    return run


def test_apple_probe_on_an_m2() -> None:
    probe = AppleProbe(run=recorded_run("sysctl.txt"), system=lambda: "Darwin")
    assert probe.devices() == [Device(
        "metal", 0, "Apple M2", 16 * GiB, (31504 + 318711) * 16384, cores=8,
        unified_memory=True, usable_fraction=2 / 3,
    )]


def test_apple_probe_honours_the_wired_limit() -> None:
    probe = AppleProbe(run=recorded_run("sysctl-wired-limit.txt"), system=lambda: "Darwin")
    [device] = probe.devices()
    assert device.usable_fraction == 0.75  # 12288 MiB of 16 GiB
    assert device.memory_total == 16 * GiB


def test_apple_probe_elsewhere() -> None:
    def never(argv: Sequence[str]) -> str:
        raise AssertionError("ran a command off macOS")

    assert AppleProbe(run=never, system=lambda: "Linux").devices() == []
    assert AppleProbe().devices() == []  # this machine is not a Mac
    intel = AppleProbe(run=recorded_run("sysctl-intel.txt"), system=lambda: "Darwin")
    assert intel.devices() == []


def test_usable_fraction_by_size() -> None:
    assert apple_probe.default_usable_fraction(32 * GiB) == 2 / 3
    assert apple_probe.default_usable_fraction(128 * GiB) == 3 / 4


# -- QMGR_HW --------------------------------------------------------------------------------


def test_parse_hw() -> None:
    assert parse_hw("ram=16GiB,cuda=24GiB") == [
        Device("cpu", 0, "declared RAM", 16 * GiB, 16 * GiB, source="QMGR_HW"),
        Device("cuda", 0, "declared cuda 0", 24 * GiB, 24 * GiB, source="QMGR_HW"),
    ]
    devices = parse_hw(" RAM = 64 gib , cores=16, nvidia=24GB, cuda=12GiB ,amd=16GiB,")
    assert [(d.kind, d.index, d.memory_total) for d in devices] == [
        ("cpu", 0, 64 * GiB), ("cuda", 0, 24 * 10**9), ("cuda", 1, 12 * GiB),
        ("rocm", 0, 16 * GiB)]
    assert devices[0].cores == 16
    [metal] = parse_hw("apple=32GiB")
    assert metal.kind == "metal" and metal.unified_memory and metal.memory_free == 32 * GiB


@pytest.mark.parametrize("text, size", [
    ("17179869184", 17179869184), ("1B", 1), ("1kb", 1000), ("1KiB", 1024), ("1.5 MB", 1500000),
    ("2MiB", 2 * 2**20), ("8GB", 8 * 10**9), ("8gib", 8 * GiB), ("1TB", 10**12),
    ("1TiB", 2**40), ("0.5GiB", GiB // 2), (".25KiB", 256),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("spec, item, why", [
    ("ram=16GiB,gpu=24GiB", "gpu=24GiB", "unknown kind 'gpu'"),
    ("ram", "ram", "not KIND=SIZE"),
    ("ram=", "ram=", "not KIND=SIZE"),
    ("=16GiB", "=16GiB", "not KIND=SIZE"),
    ("ram=16 GiBs", "ram=16 GiBs", "unknown unit 'GiBs'"),
    ("ram=16G", "ram=16G", "unknown unit 'G'"),
    ("ram=lots", "ram=lots", "is not a size"),
    ("ram=-1GiB", "ram=-1GiB", "is not a size"),
    ("ram=0GiB", "ram=0GiB", "not more than zero"),
    ("ram=1.5", "ram=1.5", "not a whole number of bytes"),
    ("ram=16", "ram=16", "write a unit, e.g. ram=16GiB"),
    ("ram=16GiB,ram=8GiB", "ram=8GiB", "given twice"),
    ("metal=16GiB,apple=16GiB", "apple=16GiB", "given twice"),
    ("cuda=24GiB,cores=8", "cores=8", "needs ram="),
    ("ram=8GiB,cores=0", "cores=0", "whole number above zero"),
    ("ram=8GiB,cores=2,cores=4", "cores=4", "given twice"),
    (" , ", " , ", "no device declared"),
])
def test_parse_hw_errors_name_the_item(spec: str, item: str, why: str) -> None:
    with pytest.raises(QmgrError) as info:
        parse_hw(spec)
    assert info.value.code == "bad_hw"
    assert f"QMGR_HW: cannot read {item!r}" in info.value.message
    assert why in info.value.message


# -- snapshot -------------------------------------------------------------------------------


class ListProbe:
    def __init__(self, name: str, found: Any):
        self.name = name
        self.found = found
        self.calls = 0

    def devices(self) -> Any:
        self.calls += 1
        if isinstance(self.found, Exception):
            raise self.found
        return self.found


class ProbesPlugin:
    def __init__(self, *probes: ListProbe):
        self.probes = probes

    @hookimpl
    def register_probes(self, register: Any) -> None:
        for probe in self.probes:
            register(probe)


@pytest.fixture
def plugins() -> PluginSet:
    return PluginSet(env={"QMGR_PLUGINS": ""}, load_builtins=False)


GPU = Device("cuda", 0, "Test GPU", 8 * GiB, 6 * GiB)


def test_a_raising_probe_is_an_error_and_the_others_still_count(plugins: PluginSet) -> None:
    plugins.register(ProbesPlugin(
        ListProbe("broken", RuntimeError("NVML hung up")),
        ListProbe("good", [GPU]),
        ListProbe("dicts", [{"kind": "rocm", "name": "Dict GPU", "memory_total": 4 * GiB,
                             "memory_free": GiB, "vendor_extra": "ignored"}]),
        ListProbe("bad-kind", [{"kind": "tpu", "name": "?"}]),
        ListProbe("not-a-list", None),
    ), name="test-probes")
    try:
        result = snapshot(plugins.probes(), env={})
    finally:
        plugins.unregister("test-probes")
    assert result.source == "probe"
    assert result.devices == [GPU, Device("rocm", 0, "Dict GPU", 4 * GiB, GiB)]
    assert [e.probe for e in result.errors] == ["broken", "bad-kind", "not-a-list"]
    assert result.errors[0] == ProbeError("broken", "RuntimeError: NVML hung up")
    assert "unknown device kind 'tpu'" in result.errors[1].message
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["devices"][0]["memory_free"] == 6 * GiB
    assert as_json["errors"][0] == {"probe": "broken", "message": "RuntimeError: NVML hung up"}


def test_qmgr_hw_wins_over_config_and_probes(plugins: PluginSet) -> None:
    probe = ListProbe("good", [GPU])
    plugins.register(ProbesPlugin(probe), name="test-probes")
    try:
        declared = snapshot(plugins.probes(), env={"QMGR_HW": "ram=16GiB,cuda=24GiB"},
                            config={"hw": "ram=8GiB"})
        configured = snapshot(plugins.probes(), env={"QMGR_HW": ""}, config={"hw": "ram=8GiB"})
        probed = snapshot(plugins.probes(), env={}, config={"home": "/somewhere"})
    finally:
        plugins.unregister("test-probes")
    assert declared.source == "QMGR_HW"
    assert [(d.kind, d.memory_total, d.source) for d in declared.devices] == [
        ("cpu", 16 * GiB, "QMGR_HW"), ("cuda", 24 * GiB, "QMGR_HW")]
    assert configured.source == "config"
    assert [(d.kind, d.memory_total, d.source) for d in configured.devices] == [
        ("cpu", 8 * GiB, "config")]
    assert probed.devices == [GPU]
    assert probe.calls == 1  # declarations probe nothing


def test_a_malformed_declaration_is_a_user_error(plugins: PluginSet) -> None:
    with pytest.raises(QmgrError, match=r"QMGR_HW: cannot read 'cuda=24'"):
        snapshot(plugins.probes(), env={"QMGR_HW": "cuda=24"})
    with pytest.raises(QmgrError, match=r"config: cannot read 'ram=lots'"):
        snapshot(plugins.probes(), env={}, config={"hw": "ram=lots"})
    with pytest.raises(QmgrError, match="hw must be a string"):
        snapshot(plugins.probes(), env={}, config={"hw": {"ram": "16GiB"}})


def test_snapshot_of_this_machine_with_every_builtin_probe(plugins: PluginSet) -> None:
    modules: list[ModuleType] = [cpu_probe, nvidia_probe, amd_probe, apple_probe]
    for module in modules:
        plugins.register(module, name=module.__name__.rsplit(".", 1)[-1])
    try:
        result = snapshot(plugins.probes(), env={})
    finally:
        for module in modules:
            plugins.unregister(module.__name__.rsplit(".", 1)[-1])
    assert result.errors == []
    assert [d.kind for d in result.devices][0] == "cpu"
    assert all(isinstance(d, Device) for d in result.devices)
