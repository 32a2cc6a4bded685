"""Pull throughput from the mirror against curl fetching the same file from the same server.

Run: python bench/bench_pull.py [--size-gib 1 4] [--runs 3]
qmgr's figure is the whole `qmgr pull` (daemon already running): listing, download, sha256
while receiving, fsync, header check, cataloging. curl writes the same file to the same disk
(into the page cache, without fsync; a third column adds the fsync that makes its copy as
safe as qmgr's). Target: qmgr/curl throughput ratio at least 0.9.

Sizes: 1 GiB (the issue's minimum), which curl's page cache absorbs whole, and 4 GiB (a
typical 7-8B model at Q4), where the kernel's writeback catches up with curl.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import qmgr_env, start_daemon

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ggufmake import make_sparse_gguf  # noqa: E402

from qmgr import mirror  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parts", type=int, default=0,
                        help="parallel parts (default: qmgr's choice, 1 over plain http)")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is needed as the baseline")
    root = Path(tempfile.mkdtemp(prefix="qmp-", dir="/tmp"))
    (root / "mirror").mkdir()
    server = mirror.serve(root / "mirror", "127.0.0.1", 0)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = qmgr_env(root, QMGR_HF_ENDPOINT=server.url)
    if args.parts:
        env["QMGR_DOWNLOAD_PARTS"] = str(args.parts)
    daemon = start_daemon(env)
    qmgr = str(BIN / "qmgr")
    rows = []
    try:
        for i, gib in enumerate(args.size_gib):
            rows.append(measure(root, server.url, env, qmgr, f"big{i}", gib, args.runs))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.runs} runs each (medians); qmgr with "
          f"{args.parts or 'its default number of'} parts; sha256 verified and fsynced by qmgr")
    print(f"{'file':>9} {'curl MiB/s':>11} {'qmgr MiB/s':>11} {'ratio':>6} "
          f"{'curl+fsync MiB/s':>17}")
    for size, c, q, cs in rows:
        mib = size / 2**20
        print(f"{size / 2**30:7.2f} G {mib / c:11.1f} {mib / q:11.1f} {c / q:6.2f} {mib / cs:17.1f}"
              f"   target >= 0.9 -> {'MET' if c / q >= 0.9 else 'MISSED'}")


def measure(root: Path, url: str, env: dict[str, str], qmgr: str, name: str, gib: float,
            runs: int) -> tuple[int, float, float, float]:
    """(file size, curl seconds, qmgr seconds, curl seconds with an fsync of its file)."""
    repo = root / "mirror" / "bench" / name
    repo.mkdir(parents=True)
    src = make_sparse_gguf(repo / f"{name}-Q4_K_M.gguf", int(gib * 2**30))
    size = src.stat().st_size
    file_url = f"{url}/bench/{name}/resolve/main/{src.name}"
    # Warm the mirror's digest cache and the page cache: both sides then read from memory.
    subprocess.run([qmgr, "variants", "--no-headers", f"hf.co/bench/{name}"], env=env,
                   check=True, capture_output=True)
    curl_s, synced_s, qmgr_s = [], [], []
    for _ in range(runs):
        out = root / "curl.out"
        # Each side starts with no dirty pages left by the other (curl leaves its whole file
        # for the kernel to write back, which would slow whatever runs next).
        os.sync()
        t = time.perf_counter()
        subprocess.run(["curl", "-sS", "-o", str(out), file_url], check=True)
        curl_s.append(time.perf_counter() - t)
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)  # what curl's copy needs to be as safe on disk as qmgr's
        os.close(fd)
        synced_s.append(time.perf_counter() - t)
        assert out.stat().st_size == size
        out.unlink()
        os.sync()
        t = time.perf_counter()
        subprocess.run([qmgr, "pull", "-q", f"hf.co/bench/{name}:Q4_K_M"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        qmgr_s.append(time.perf_counter() - t)
        subprocess.run([qmgr, "rm", f"{name}:Q4_K_M"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    src.unlink()
    return (size, statistics.median(curl_s), statistics.median(qmgr_s),
            statistics.median(synced_s))


if __name__ == "__main__":
    main()
