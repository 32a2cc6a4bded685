"""The sample third-party plugin, plugins/qmgr-sensitive, installed with pip as a user would.

It goes into a throwaway virtual environment made for this module and removed after it, never
into the one running the tests. That environment sees this one's packages (qmgr, numpy, gguf,
llama_cpp) through a .pth file, so pip builds and installs only the plugin. The plugin's code
runs there, found through its entry point: in qmgr's quantize worker and in a qmgrd started
with that environment's interpreter. This process only checks the files it writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Env
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from ggufmake import make_tiny_gguf
from test_numpy_quantizer import gemma_f16, generate, tensor_data, values  # noqa: F401

from qmgr.gguf import inspect, read_header

PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "qmgr-sensitive"
Q4_0, Q8_0 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0


class PluginVenv:
    """A virtual environment at ``root`` with the plugin installed in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "bin" / "python"
        # Where plugins are found, as for any qmgr process: by entry point, when named.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("QMGR_")}
        self.env["QMGR_PLUGINS"] = "sensitive"

    def run(self, code: str) -> Any:
        """Run ``code`` with this environment's interpreter; the JSON it prints last."""
        r = subprocess.run([str(self.python), "-c", code], capture_output=True, text=True,
                           env=self.env, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.splitlines()[-1])

    def worker(self, request: dict[str, Any], timeout: float = 120) -> list[dict[str, Any]]:
        """qmgr's quantize worker run here: its answers (progress..., then a result or an
        error)."""
        r = subprocess.run([str(self.python), "-m", "qmgr.quantize.worker"],
                           input=json.dumps(request), capture_output=True, text=True,
                           env=self.env, timeout=timeout)
        answers = [json.loads(line) for line in r.stdout.splitlines()]
        assert answers and ("result" in answers[-1] or "error" in answers[-1]), r.stderr
        return answers

    def result(self, request: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        answer = self.worker(request, timeout)[-1]
        assert "result" in answer, answer
        return answer["result"]


def make_venv(root: Path) -> PluginVenv:
    venv.EnvBuilder(with_pip=False).create(root)
    # A .pth line that starts with "import" runs at start-up: addsitedir adds this
    # environment's site-packages with their own .pth files (qmgr's editable install), after
    # the new environment's own. --system-site-packages would add the base interpreter's
    # instead, which has neither qmgr nor its dependencies.
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    theirs = Path(sysconfig.get_path("purelib", "venv", vars={"base": str(root),
                                                              "platbase": str(root)}))
    (theirs / "_qmgr_tests.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    return PluginVenv(root)


def pip_install(python: Path) -> subprocess.CompletedProcess[str]:
    """pip (this environment's, run by ``python``) installs the plugin for ``python``. It
    builds the wheel with the plugin's build backend, hatchling, which pip takes from the
    package index as it did for qmgr itself (a local index will do); with no index at all, from
    this environment when hatchling is installed here."""
    command = [str(python), "-m", "pip", "install", "--no-deps", str(PLUGIN)]
    r = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and importlib.util.find_spec("hatchling"):
        r = subprocess.run([*command, "--no-build-isolation"], capture_output=True, text=True,
                           timeout=600)
    return r


@pytest.fixture(scope="module")
def plugin_venv() -> Iterator[PluginVenv]:
    root = Path(tempfile.mkdtemp(prefix="qm-venv-"))
    try:
        env = make_venv(root)
        start = time.monotonic()
        r = pip_install(env.python)
        if r.returncode != 0:
            pytest.fail(f"pip cannot install {PLUGIN.name} into a throwaway venv (it builds "
                        "it with hatchling: reach a package index, or pip install hatchling "
                        f"here):\n{r.stderr}", pytrace=False)
        print(f"venv and pip install {PLUGIN.name}: {time.monotonic() - start:.1f} s")
        yield env
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def version(plugin_venv: PluginVenv) -> str:
    """The installed plugin's version, as its module says."""
    return str(plugin_venv.run("import json, qmgr_sensitive; "
                               "print(json.dumps(qmgr_sensitive.__version__))"))


def test_entry_point(plugin_venv: PluginVenv, version: str) -> None:
    found = plugin_venv.run("""if True:
        import importlib.metadata, json
        import qmgr_sensitive
        (ep,) = importlib.metadata.entry_points(group="qmgr", name="sensitive")
        print(json.dumps({"value": ep.value, "dist": ep.dist.name, "version": ep.dist.version,
                          "module": qmgr_sensitive.__file__}))
    """)
    assert found["value"] == "qmgr_sensitive"
    assert found["dist"] == "qmgr-sensitive" and found["version"] == version
    # Installed (a copy in the venv), not run from the checkout.
    assert Path(found["module"]).is_relative_to(plugin_venv.root), found["module"]


def test_not_in_the_environment_running_the_tests() -> None:
    assert importlib.util.find_spec("qmgr_sensitive") is None, (
        "qmgr_sensitive is importable in the environment running the tests (left there by "
        "an earlier version of this test?): pip uninstall qmgr-sensitive")


def test_loaded_only_when_asked_for(plugin_venv: PluginVenv, version: str) -> None:
    seen = plugin_venv.run("""if True:
        import json
        from qmgr.plugins import PluginSet
        off = PluginSet(env={"QMGR_PLUGINS": ""})
        on = PluginSet(env={"QMGR_PLUGINS": "sensitive"})
        quantizers = {q.name: q for q in on.registered("register_quantizers")}
        print(json.dumps({"off": sorted(off.info), "targets": quantizers["sensitive"].targets(),
                          "info": on.info["sensitive"].to_dict()}))
    """)
    assert "sensitive" not in seen["off"]
    assert seen["targets"] == ["MIX_Q4_0_Q8_0", "MIX_Q4_0_Q8_0_K10", "MIX_Q4_0_Q8_0_K50"]
    assert seen["info"] == {"name": "sensitive", "version": version, "builtin": False,
                            "distribution": "qmgr-sensitive", "hooks": ["register_quantizers"],
                            "provides": ["quantizer:sensitive"], "errors": []}


def relative_errors(path: Path) -> dict[str, float]:
    """Each weight's Q4_0 round-trip error, computed here without the plugin's code."""
    out = {}
    for name, (ggml_type, raw) in tensor_data(path).items():
        if ggml_type != GGMLQuantizationType.F32:
            x = values(ggml_type, raw)
            out[name] = float(np.linalg.norm(dequantize(quantize(x, Q4_0), Q4_0) - x)
                              / np.linalg.norm(x))
    return out


def request(src: Path, dst: Path, target: str, **options: Any) -> dict[str, Any]:
    return {"quantizer": "sensitive", "src": str(src), "dst": str(dst), "target": target,
            "options": options}


@pytest.mark.parametrize("target, fraction", [("MIX_Q4_0_Q8_0", 0.25),
                                              ("MIX_Q4_0_Q8_0_K10", 0.10),
                                              ("MIX_Q4_0_Q8_0_K50", 0.50)])
def test_mixes_by_sensitivity(plugin_venv: PluginVenv, tmp_path: Path, target: str,
                              fraction: float) -> None:
    src = make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")
    dst = tmp_path / "mixed.gguf"
    *progress, answer = plugin_venv.worker(request(src, dst, target))
    assert progress[-1] == {"progress": 1.0, "message": "done"}
    result = answer["result"]["details"]

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


def test_quantized_source_needs_allow_requantize(plugin_venv: PluginVenv,
                                                 tmp_path: Path) -> None:
    src = make_tiny_gguf(tmp_path / "tiny-Q8_0.gguf", ftype="Q8_0")
    refused = plugin_venv.worker(request(src, tmp_path / "out.gguf", "MIX_Q4_0_Q8_0"))[-1]
    assert refused["error"]["code"] == "requantize_refused"
    assert "already quantized" in refused["error"]["message"]
    plugin_venv.result(request(src, tmp_path / "out.gguf", "MIX_Q4_0_Q8_0",
                               allow_requantize=True))
    assert inspect(tmp_path / "out.gguf").tensor_types.keys() == {"Q4_0", "Q8_0", "F32"}


def test_through_qmgrs_worker(plugin_venv: PluginVenv, version: str, tmp_path: Path) -> None:
    src = make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")
    mix = request(src, tmp_path / "out.gguf", "MIX_Q4_0_Q8_0")
    answer = plugin_venv.result(mix)
    assert answer["quantizer"] == "sensitive" and answer["version"] == version
    assert len(answer["details"]["kept_high"]) == 4
    refused = plugin_venv.worker({**mix, "options": {"pure": True}})[-1]["error"]
    assert refused["code"] == "bad_option" and "does not support pure" in refused["message"]


def test_through_the_daemon(plugin_venv: PluginVenv, qenv: Env, tmp_path: Path) -> None:
    # The venv's interpreter runs the daemon and so its workers: the only place the plugin is.
    qenv.qmgrd = [str(plugin_venv.python), "-m", "qmgr.daemon.main"]
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


def test_tiny_mix_loads_in_llama_cpp(plugin_venv: PluginVenv, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    src = make_tiny_gguf(tmp_path / "tiny-F16.gguf", ftype="F16")
    plugin_venv.result(request(src, tmp_path / "mixed.gguf", "MIX_Q4_0_Q8_0_K50"))
    generate(tmp_path / "mixed.gguf")  # random weights: any text, but no error


@pytest.mark.slow
def test_gemma_mix_loads_and_generates(plugin_venv: PluginVenv, gemma_f16: Path,  # noqa: F811
                                       tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    dst = tmp_path / "gemma-mixed.gguf"
    start = time.monotonic()
    result = plugin_venv.result(request(gemma_f16, dst, "MIX_Q4_0_Q8_0"), timeout=280)
    print(f"sensitive on Gemma 3 270M: {time.monotonic() - start:.0f} s, "
          f"{json.dumps(result, indent=1)}")
    facts = inspect(dst)
    assert set(facts.tensor_types) == {"Q4_0", "Q8_0", "F32"}
    text = generate(dst)
    print(f"generated: {text!r}")
    assert text.strip()
