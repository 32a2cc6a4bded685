"""The sample third-party plugin, plugins/qmgr-sensitive, installed with pip as a user would.

The first test run installs it (editable) into this environment; later runs find it there.
Installed is not loaded: the rest of the suite keeps QMGR_PLUGINS="" and never sees it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import site
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from conftest import Env
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from ggufmake import make_tiny_gguf
from test_numpy_quantizer import gemma_f16, generate, tensor_data, values  # noqa: F401

from qmgr.gguf import inspect, read_header
from qmgr.plugin.quantizer import QuantizeError, QuantizeJob, QuantizeOptions
from qmgr.plugins import PluginSet

PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "qmgr-sensitive"
Q4_0, Q8_0 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0


def pip_install() -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "-e", str(PLUGIN)]
    r = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and importlib.util.find_spec("hatchling"):
        # No index to fetch the build backend from, but it is here already.
        r = subprocess.run([*command, "--no-build-isolation"], capture_output=True, text=True,
                           timeout=600)
    return r


@pytest.fixture(scope="module")
def plugin() -> ModuleType:
    """The plugin's module, pip-installed into this environment unless it already is."""
    try:
        importlib.metadata.distribution("qmgr-sensitive")
    except importlib.metadata.PackageNotFoundError:
        start = time.monotonic()
        r = pip_install()
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            pytest.skip(f"pip cannot install {PLUGIN.name} (no package index and no "
                        f"hatchling here?): {last}")
        print(f"pip install -e {PLUGIN.name}: {time.monotonic() - start:.1f} s")
        # This interpreter read the .pth files at start-up: read the one pip just wrote.
        site.addsitedir(sysconfig.get_paths()["purelib"])
        importlib.invalidate_caches()
    module = importlib.import_module("qmgr_sensitive")
    assert Path(module.__file__ or "").resolve().is_relative_to(PLUGIN), (
        f"qmgr_sensitive comes from {module.__file__}, not from {PLUGIN}: an older "
        "non-editable install? pip uninstall qmgr-sensitive")
    return module


def test_entry_point(plugin: ModuleType) -> None:
    (ep,) = importlib.metadata.entry_points(group="qmgr", name="sensitive")
    assert ep.value == "qmgr_sensitive"
    assert ep.dist is not None and ep.dist.name == "qmgr-sensitive"
    assert ep.dist.version == plugin.__version__


def test_loaded_only_when_asked_for(plugin: ModuleType) -> None:
    assert "sensitive" not in PluginSet(env={"QMGR_PLUGINS": ""}).info
    plugins = PluginSet(env={"QMGR_PLUGINS": "sensitive"})
    quantizers = {q.name: q for q in plugins.registered("register_quantizers")}
    assert quantizers["sensitive"].targets() == [
        "MIX_Q4_0_Q8_0", "MIX_Q4_0_Q8_0_K10", "MIX_Q4_0_Q8_0_K50"]
    assert plugins.info["sensitive"].to_dict() == {
        "name": "sensitive", "version": plugin.__version__, "builtin": False,
        "hooks": ["register_quantizers"], "errors": []}


def relative_errors(path: Path) -> dict[str, float]:
    """Each weight's Q4_0 round-trip error, computed here without the plugin's code."""
    out = {}
    for name, (ggml_type, raw) in tensor_data(path).items():
        if ggml_type != GGMLQuantizationType.F32:
            x = values(ggml_type, raw)
            out[name] = float(np.linalg.norm(dequantize(quantize(x, Q4_0), Q4_0) - x)
                              / np.linalg.norm(x))
    return out


@pytest.mark.parametrize("target, fraction", [("MIX_Q4_0_Q8_0", 0.25),
                                              ("MIX_Q4_0_Q8_0_K10", 0.10),
                                              ("MIX_Q4_0_Q8_0_K50", 0.50)])
def test_mixes_by_sensitivity(plugin: ModuleType, tmp_path: Path, target: str,
                              fraction: float) -> None:
    src = make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")
    dst = tmp_path / "mixed.gguf"
    seen: list[float | None] = []
    result = plugin.SensitiveQuantizer().quantize(QuantizeJob(
        src, dst, target, QuantizeOptions(), lambda fraction, message: seen.append(fraction)))
    assert seen[-1] == 1.0

    types = {t.name: t.type_name for t in read_header(dst).tensors}
    high = [name for name, t in types.items() if t == "Q8_0"]
    assert len(high) == math.ceil(fraction * 16)  # of the tiny model's 16 weight matrices
    assert sorted(result["kept_high"]) == sorted(high)
    assert sorted(types.values()).count("Q4_0") == 16 - len(high)
    assert sorted(types.values()).count("F32") == 5  # norms, copied

    errors = relative_errors(src)
    assert min(errors[n] for n in high) >= max(e for n, e in errors.items() if n not in high)
    for name in high:
        assert result["kept_high"][name] == pytest.approx(errors[name], abs=1e-5)
    assert list(result["kept_high"].values()) == sorted(result["kept_high"].values(),
                                                        reverse=True)

    src_data = tensor_data(src)
    for name, (ggml_type, raw) in tensor_data(dst).items():
        if ggml_type in (Q4_0, Q8_0):
            assert np.array_equal(raw, quantize(values(*src_data[name]),
                                                GGMLQuantizationType(ggml_type))), name
        else:
            assert np.array_equal(raw, src_data[name][1])

    facts = inspect(dst)  # qmgr's own bounded reader accepts it
    params = {t: sum(int(np.prod(i.shape)) for i in read_header(dst).tensors if i.type_name == t)
              for t in ("Q4_0", "Q8_0")}
    dominant = max(params, key=params.__getitem__)
    assert result["file_type"] == facts.quant_type == dominant
    assert result["parameters"] == params


def test_quantized_source_needs_allow_requantize(plugin: ModuleType, tmp_path: Path) -> None:
    src = make_tiny_gguf(tmp_path / "tiny-Q8_0.gguf", ftype="Q8_0")
    quantizer = plugin.SensitiveQuantizer()
    with pytest.raises(QuantizeError, match="already quantized") as e:
        quantizer.quantize(QuantizeJob(src, tmp_path / "out.gguf", "MIX_Q4_0_Q8_0",
                                       QuantizeOptions()))
    assert e.value.code == "requantize"
    quantizer.quantize(QuantizeJob(src, tmp_path / "out.gguf", "MIX_Q4_0_Q8_0",
                                   QuantizeOptions(allow_requantize=True)))
    assert inspect(tmp_path / "out.gguf").tensor_types.keys() == {"Q4_0", "Q8_0", "F32"}


def worker(request: dict[str, Any]) -> dict[str, Any]:
    """qmgr's quantize worker in a fresh process, which finds the plugin by its entry point."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMGR_")}
    env["QMGR_PLUGINS"] = "sensitive"
    r = subprocess.run([sys.executable, "-m", "qmgr.quantize.worker"], input=json.dumps(request),
                       capture_output=True, text=True, env=env, timeout=120)
    return json.loads(r.stdout.splitlines()[-1])


def test_through_qmgrs_worker(plugin: ModuleType, tmp_path: Path) -> None:
    src = make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")
    request = {"quantizer": "sensitive", "src": str(src), "dst": str(tmp_path / "out.gguf"),
               "target": "MIX_Q4_0_Q8_0", "options": {}}
    answer = worker(request)["result"]
    assert answer["quantizer"] == "sensitive" and answer["version"] == plugin.__version__
    assert len(answer["details"]["kept_high"]) == 4
    refused = worker({**request, "options": {"pure": True}})["error"]
    assert refused["code"] == "bad_option" and "does not support pure" in refused["message"]


def test_through_the_daemon(plugin: ModuleType, qenv: Env, tmp_path: Path) -> None:
    qenv.env["QMGR_PLUGINS"] = "sensitive"
    qenv.start()
    qenv.qmgr("import", "--copy", str(make_tiny_gguf(tmp_path / "base-F16.gguf", ftype="F16")))
    (ref,) = qenv.qmgr("quantize", "base:F16", "--to", "MIX_Q4_0_Q8_0", "--quantizer",
                       "sensitive", "-q").stdout.split()
    assert ref == "base:MIX_Q4_0_Q8_0"  # tagged with the target's name
    show = qenv.json("show", ref)
    assert show["lineage"] == ["base:F16"]
    assert show["facts"]["tensor_types"].keys() == {"Q4_0", "Q8_0", "F32"}
    recipe = show["recipe"]
    assert recipe["quantizer"] == "sensitive" and recipe["target"] == "MIX_Q4_0_Q8_0"
    assert len(recipe["details"]["kept_high"]) == 4
    assert show["quant_type"] == recipe["details"]["file_type"]  # from general.file_type


def test_tiny_mix_loads_in_llama_cpp(plugin: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    src = make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")
    plugin.SensitiveQuantizer().quantize(QuantizeJob(src, tmp_path / "mixed.gguf",
                                                     "MIX_Q4_0_Q8_0_K50", QuantizeOptions()))
    generate(tmp_path / "mixed.gguf")  # random weights: any text, but no error


@pytest.mark.slow
def test_gemma_mix_loads_and_generates(plugin: ModuleType, gemma_f16: Path,  # noqa: F811
                                       tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    dst = tmp_path / "gemma-mixed.gguf"
    start = time.monotonic()
    result = plugin.SensitiveQuantizer().quantize(QuantizeJob(
        gemma_f16, dst, "MIX_Q4_0_Q8_0", QuantizeOptions()))
    print(f"sensitive on Gemma 3 270M: {time.monotonic() - start:.0f} s, "
          f"{json.dumps(result, indent=1)}")
    facts = inspect(dst)
    assert set(facts.tensor_types) == {"Q4_0", "Q8_0", "F32"}
    text = generate(dst)
    print(f"generated: {text!r}")
    assert text.strip()
