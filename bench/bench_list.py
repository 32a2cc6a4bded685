"""`qmgr list --json` with 1,000 cataloged variants, against `python3 -c pass`.

Run: python bench/bench_list.py [--variants 1000] [--runs 30]
Target: qmgr list --json under 150 ms median on a 2-core machine. Both commands run
interleaved in the same loop, so machine noise hits them alike; the ratio is the figure to watch.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import qmgr_env, start_daemon

BIN = Path(sys.executable).parent


def fill_catalog(home: Path, n: int, url: str | None = None) -> None:
    """``n`` variants (10 quants of n/10 models) in the catalog at ``url`` (default: the
    SQLite file of ``home``)."""
    from qmgr.catalog.db import Catalog
    from qmgr.catalog.models import Blob, Model, Variant, VariantFile

    home.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(url or f"sqlite:///{home / 'catalog.db'}")
    catalog.migrate()
    quants = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "IQ2_XS",
              "Q4_0"]
    with catalog.writing() as session:
        for m in range(n // len(quants)):
            model = Model(name=f"model-{m:04d}", architecture="llama",
                          parameter_count=8_030_261_248)
            session.add(model)
            for q in quants:
                sha = hashlib.sha256(f"{m}-{q}".encode()).hexdigest()
                blob = Blob(sha256=sha, size=4_920_734_016, path=f"/models/model-{m:04d}-{q}.gguf",
                            in_store=False, mtime_ns=0)
                facts = {"architecture": "llama", "parameter_count": 8_030_261_248,
                         "block_count": 32, "tensor_types": {"q4_K": 193, "f32": 65, "q6_K": 33}}
                v = Variant(model=model, tag=q, quant_type=q, bits_per_weight=4.89,
                            size=blob.size, sha256=sha, state="ready", origin="imported",
                            facts=facts)
                v.files.append(VariantFile(shard=0, blob=blob))
                session.add(v)
    catalog.close()


def time_cmd(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qmb-", dir="/tmp"))
    env = qmgr_env(root, QMGR_NO_AUTOSTART="1")
    try:
        fill_catalog(root / "home", args.variants)
        daemon = start_daemon(env)
        out = subprocess.run([str(BIN / "qmgr"), "list", "--json"], env=env, capture_output=True,
                             check=True).stdout
        import json

        assert len(json.loads(out)) == args.variants // 10 * 10
        qmgr_times, base_times = [], []
        for _ in range(args.runs):
            qmgr_times.append(time_cmd([str(BIN / "qmgr"), "list", "--json"], env))
            base_times.append(time_cmd([sys.executable, "-c", "pass"], env))
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    q, b = statistics.median(qmgr_times) * 1000, statistics.median(base_times) * 1000
    print(f"qmgr list --json ({args.variants} variants): median {q:.1f} ms "
          f"(min {min(qmgr_times) * 1000:.1f}) over {args.runs} runs")
    print(f"python3 -c pass:                       median {b:.1f} ms")
    print(f"ratio qmgr/python: {q / b:.2f}   target: qmgr under 150 ms -> "
          f"{'MET' if q < 150 else 'MISSED'}")


if __name__ == "__main__":
    main()
