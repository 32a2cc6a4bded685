"""Pull throughput from the mirror against curl fetching the same file from the same server.

Run: python bench/bench_pull.py [--size-gib 1.0] [--runs 2]
qmgr's figure is the whole `qmgr pull` (daemon already running): listing, download in ranged
parts, sha256 while receiving, fsync, header check, cataloging. curl writes the same file to
the same disk. Target: qmgr/curl throughput ratio at least 0.9.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ggufmake import make_sparse_gguf  # noqa: E402

from qmgr import mirror  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--parts", type=int, default=0,
                        help="parallel parts (default: qmgr's choice, 1 over plain http)")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is needed as the baseline")
    root = Path(tempfile.mkdtemp(prefix="qmp-", dir="/tmp"))
    repo = root / "mirror" / "bench" / "big"
    repo.mkdir(parents=True)
    src = make_sparse_gguf(repo / "big-Q4_K_M.gguf", int(args.size_gib * 2**30))
    size = src.stat().st_size
    server = mirror.serve(root / "mirror", "127.0.0.1", 0)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"{server.url}/bench/big/resolve/main/{src.name}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMGR_")}
    env.update(QMGR_HOME=str(root / "home"), QMGR_SOCKET=str(root / "s.sock"), QMGR_PLUGINS="",
               QMGR_HF_ENDPOINT=server.url)
    if args.parts:
        env["QMGR_DOWNLOAD_PARTS"] = str(args.parts)
    daemon = subprocess.Popen([str(BIN / "qmgrd")], env=env, stderr=subprocess.DEVNULL)
    qmgr = str(BIN / "qmgr")
    try:
        while subprocess.run([qmgr, "status"], env=env, capture_output=True).returncode:
            time.sleep(0.1)
        # Warm the mirror's digest cache and the page cache: both sides then read from memory.
        subprocess.run([qmgr, "variants", "--no-headers", "hf.co/bench/big"], env=env,
                       check=True, capture_output=True)
        curl_s, qmgr_s = [], []
        for _ in range(args.runs):
            out = root / "curl.out"
            t = time.perf_counter()
            subprocess.run(["curl", "-sS", "-o", str(out), url], check=True)
            curl_s.append(time.perf_counter() - t)
            assert out.stat().st_size == size
            out.unlink()
            t = time.perf_counter()
            subprocess.run([qmgr, "pull", "-q", "hf.co/bench/big:Q4_K_M"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            qmgr_s.append(time.perf_counter() - t)
            subprocess.run([qmgr, "rm", "big:Q4_K_M"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    mib = size / 2**20
    c, q = statistics.median(curl_s), statistics.median(qmgr_s)
    print(f"file: {size / 2**30:.2f} GiB, {args.runs} runs each, qmgr with "
          f"{args.parts or 'its default number of'} parts")
    print(f"curl:      {mib / c:8.1f} MiB/s  (median {c:.2f} s)")
    print(f"qmgr pull: {mib / q:8.1f} MiB/s  (median {q:.2f} s, sha256 verified)")
    print(f"ratio qmgr/curl: {c / q:.2f}   target >= 0.9 -> {'MET' if c / q >= 0.9 else 'MISSED'}")


if __name__ == "__main__":
    main()
