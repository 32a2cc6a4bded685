"""A blob fetched from a fleet peer (qmgr pull on a node without it) against curl from the
same peer's blob endpoint, in one run.

Run: python bench/bench_peer.py [--size-gib 1] [--runs 3]
Target: qmgr >= 0.9x curl's speed at >= 1 GiB, qmgr's time including what curl's does not:
the sha256 of every byte, the fsync, the catalog rows (curl followed by sha256sum is printed
too). Two qmgrd nodes on one PostgreSQL (tests/pgserver.py) on this machine: the "wire" is
loopback, so the bound is the peer's read from the page cache, the copy through the kernel,
and sha256 (printed: hashlib's speed here).
"""

from __future__ import annotations

import argparse
import hashlib
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
from pgserver import PgServer  # noqa: E402

BIN = Path(sys.executable).parent
KEY = "bench-fleet-key"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256_speed(size: int = 256 << 20) -> float:
    data = bytes(size)
    t = time.perf_counter()
    hashlib.sha256(data).digest()
    return size / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qmb-", dir="/tmp"))
    pg = PgServer()
    url = pg.database()
    daemons = []
    envs, ports = {}, {}
    try:
        for name in ("a", "b"):
            (root / name).mkdir()
            (root / name / "config.toml").write_text(f'fleet_key = "{KEY}"\n')
            ports[name] = free_port()
            envs[name] = qmgr_env(root / name, QMGR_DATABASE_URL=url, QMGR_NODE=name,
                                  QMGR_LISTEN=f"127.0.0.1:{ports[name]}",
                                  QMGR_CONFIG=str(root / name / "config.toml"),
                                  QMGR_NO_AUTOSTART="1", QMGR_WARM_WORKERS="0")
            daemons.append(start_daemon(envs[name]))
        qmgr = str(BIN / "qmgr")
        src = make_sparse_gguf(root / "big-Q4_K_M.gguf", int(args.size_gib * 2**30))
        size = src.stat().st_size
        subprocess.run([qmgr, "import", str(src), "--name", "big"], env=envs["a"], check=True,
                       stdout=subprocess.DEVNULL)
        ref = subprocess.run([qmgr, "list", "--json"], env=envs["a"], check=True,
                             capture_output=True, text=True).stdout
        import json

        row = json.loads(ref)[0]
        blob_url = f"http://127.0.0.1:{ports['a']}/fleet/blobs/sha256:{row['sha256']}"
        time.sleep(1.5)  # b hears of a's blob (a's row is there at once; b asks per pull)
        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        curl_s, hashed_s, qmgr_s = [], [], []
        for _ in range(args.runs):
            out = root / "curl.out"
            os.sync()
            t = time.perf_counter()
            subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {KEY}", "-o", str(out),
                            blob_url], check=True)
            curl_s.append(time.perf_counter() - t)
            subprocess.run(["sha256sum", str(out)], check=True, stdout=subprocess.DEVNULL)
            hashed_s.append(time.perf_counter() - t)
            assert out.stat().st_size == size
            out.unlink()
            os.sync()
            t = time.perf_counter()
            r = subprocess.run([qmgr, "pull", "-q", row["ref"]], env=envs["b"],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"qmgr pull on b failed: {r.stderr}")
            qmgr_s.append(time.perf_counter() - t)
            # b forgets its copy (not `qmgr rm`: that would remove the fleet's variant).
            with engine.begin() as conn:
                path = conn.execute(text(
                    "DELETE FROM blob_copies c USING nodes n WHERE n.id = c.node_id AND "
                    "n.name = 'b' RETURNING c.path")).scalar_one()
            Path(path).unlink()
        engine.dispose()
    finally:
        for d in daemons:
            d.send_signal(signal.SIGTERM)
            d.wait(30)
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    mib = size / 2**20
    c, h, q = (statistics.median(x) for x in (curl_s, hashed_s, qmgr_s))
    print(f"{args.runs} runs each (medians), {size / 2**30:.2f} GiB from a peer over loopback; "
          f"sha256 here: {sha256_speed() / 2**20:.0f} MiB/s")
    print(f"{'curl MiB/s':>11} {'curl+sha256sum':>15} {'qmgr MiB/s':>11} {'qmgr/curl':>10}")
    print(f"{mib / c:11.1f} {mib / h:15.1f} {mib / q:11.1f} {c / q:10.2f}"
          f"   target >= 0.9 -> {'MET' if c / q >= 0.9 else 'MISSED'}")


if __name__ == "__main__":
    main()
