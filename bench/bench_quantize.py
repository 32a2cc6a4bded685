"""`qmgr quantize` against a direct `llama_model_quantize` call, same file, same run.

Run: python bench/bench_quantize.py [--type Q4_K_M] [--runs 15] [--threads N] [--source F]
Source: the Gemma 3 270M 16-bit base the test suite derives (tests/testmodel.py), or any F16
GGUF file given with --source (docs/quantize.md makes a larger one for a longer job). qmgr's
figure is the whole job through the daemon and the client: client start, worker,
quantization, hashing, header check, publication, cataloging (after one untimed job, as the
direct side's library is loaded before its timer starts). The two alternate (direct, qmgr,
direct, qmgr, ...), each after a pause; the overhead reported is the median of the pairs'
overheads, which a machine whose speed drifts during the run (these are shared) disturbs less
than a ratio of medians (printed too), with a bootstrap 95% interval: on 2 shared vCPUs one
quantization's time varies by 10-20% from the next, so the interval is several points wide
(31 runs: about 9). It also splits the overhead: the worker's own time for the quantizer call
(recorded in the recipe) against the direct call, and the rest of the job; and counts the
CPU time each side used, all processes together (Linux's /proc/stat: the daemon's worker, the
kernel's write-back), with the client's and the daemon's shares.
Target: overhead under 5%.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import qmgr_env, start_daemon

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
BIN = Path(sys.executable).parent
SETTLE = 2.5  # seconds of quiet before each timed run


def direct(src: Path, dst: Path, ftype: int, threads: int) -> float:
    import llama_cpp

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def quiet(level: int, text: bytes, user: int) -> None:
        pass

    llama_cpp.llama_log_set(quiet, None)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    elapsed = time.perf_counter() - t
    assert rc == 0, rc
    return elapsed


def main() -> None:
    from testmodel import gemma_f16

    from qmgr.gguf.types import LLAMA_FILE_TYPES

    parser = argparse.ArgumentParser()
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--runs", type=int, default=15)
    # Both sides get the same thread count: every core by default (fewer leave the digest
    # thread a core of its own).
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--source", type=Path, help="an F16 GGUF file (default: the Gemma 3 base)")
    args = parser.parse_args()
    src = args.source or gemma_f16()
    ftype = next(k for k, v in LLAMA_FILE_TYPES.items() if v == args.type)
    threads = args.threads
    root = Path(tempfile.mkdtemp(prefix="qmq-", dir="/tmp"))
    env = qmgr_env(root, QMGR_NO_AUTOSTART="1")
    qmgr = str(BIN / "qmgr")
    daemon = start_daemon(env)
    direct_s, qmgr_s, inside_s = [], [], []
    cpu_direct, cpu_qmgr, cpu_client, cpu_daemon = [], [], [], []
    try:
        subprocess.run([qmgr, "import", "--name", "bench", str(src)], env=env, check=True,
                       capture_output=True)
        # One untimed job first: it starts the worker that loads llama-cpp-python, which the
        # direct side does before its timer too (the import in ``direct``); later jobs find a
        # worker waiting, as they do on a daemon that has quantized before.
        out = subprocess.run([qmgr, "quantize", "-q", "bench:F16", "--to", args.type],
                             env=env, check=True, capture_output=True, text=True).stdout.split()
        subprocess.run([qmgr, "rm", out[0]], env=env, check=True, capture_output=True)
        for i in range(args.runs):
            # Each run starts on a settled machine: after a job the daemon starts the next
            # worker (~1 s later, ~0.5 s of imports), which must not land in a direct run.
            time.sleep(SETTLE)
            busy = _busy()
            direct_s.append(direct(src, root / f"direct-{i}.gguf", ftype, threads))
            cpu_direct.append(_busy() - busy)
            (root / f"direct-{i}.gguf").unlink()
            time.sleep(SETTLE)
            busy, daemon_cpu = _busy(), _cpu_of(daemon.pid)
            client_cpu = _children_cpu()
            t = time.perf_counter()
            out = subprocess.run([qmgr, "quantize", "-q", "bench:F16", "--to", args.type,
                                  "--threads", str(threads)], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            qmgr_s.append(time.perf_counter() - t)
            cpu_qmgr.append(_busy() - busy)
            cpu_client.append(_children_cpu() - client_cpu)
            cpu_daemon.append(_cpu_of(daemon.pid) - daemon_cpu)
            show = json.loads(subprocess.run([qmgr, "show", "--json", out[0]], env=env,
                                             check=True, capture_output=True).stdout)
            inside_s.append(float(show["recipe"]["details"]["seconds"]))
            subprocess.run([qmgr, "rm", out[0]], env=env, check=True, capture_output=True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    d, q = statistics.median(direct_s), statistics.median(qmgr_s)
    pairs = [(b - a) / a for a, b in zip(direct_s, qmgr_s, strict=True)]
    paired = statistics.median(pairs)
    low, high = _bootstrap_median(pairs)
    print(f"{args.type} of {src.name}, {args.runs} runs each, {threads} threads")
    print(f"llama_model_quantize directly: median {d:.2f} s  ({_list(direct_s)})")
    print(f"qmgr quantize (whole job):     median {q:.2f} s  ({_list(qmgr_s)})")
    print(f"ratio of medians {100 * (q - d) / d:+.1f}%")
    print(f"pairs: {', '.join(f'{100 * x:+.1f}%' for x in pairs)}")
    # Where it goes: the worker's own time for the quantizer call (llama.cpp, the digest's
    # tail), against the direct call; the rest of the job (client, daemon, publication).
    inside = statistics.median((w - a) / a for a, w in zip(direct_s, inside_s, strict=True))
    rest = statistics.median(b - w for b, w in zip(qmgr_s, inside_s, strict=True))
    print(f"  of which: the quantizer call in the worker {100 * inside:+.1f}% (median of pairs), "
          f"the rest of the job {rest:.2f} s (median)")
    cd, cq = statistics.median(cpu_direct), statistics.median(cpu_qmgr)
    print(f"CPU time, all processes (medians): direct {cd:.2f} s, qmgr {cq:.2f} s "
          f"({cq - cd:+.2f} s; qmgr's client {statistics.median(cpu_client):.3f} s, daemon "
          f"{statistics.median(cpu_daemon):.3f} s, the rest: its worker, the kernel)")
    print(f"overhead (median of pairs) {100 * paired:+.1f}% (95% interval {100 * low:+.1f}% to "
          f"{100 * high:+.1f}%)   target < 5% -> {'MET' if paired < 0.05 else 'MISSED'}")


def _busy() -> float:
    """CPU seconds the machine has spent busy (all CPUs, all processes, the kernel's too);
    NaN without Linux's /proc."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    except OSError:
        return math.nan
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> float:
    """CPU seconds process ``pid`` has used itself (all its threads, not its children); NaN
    without Linux's /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _bootstrap_median(values: list[float], rounds: int = 10_000) -> tuple[float, float]:
    """A 95% bootstrap interval of the median: how much the machine's noise leaves it open."""
    import random

    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds) - 1]


def _list(values: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


if __name__ == "__main__":
    main()
