"""SIGKILL the daemon again and again during a large pull: it resumes and reuses the bytes."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
from badmirror import BadMirror, sha256_of
from conftest import Env
from ggufmake import make_sparse_gguf

pytestmark = pytest.mark.reliability  # the reliability suite: docs/operations.md

SIZE = 320 << 20
KILLS = 20


def _job(env: Env, job_id: int) -> dict:
    return next(j for j in env.json("jobs") if j["id"] == job_id)


def test_pull_survives_20_sigkills(qenv: Env, tmp_path: Path) -> None:
    repo = tmp_path / "mirror" / "test" / "big"
    repo.mkdir(parents=True)
    src = make_sparse_gguf(repo / "big-Q4_K_M.gguf", SIZE)
    size = src.stat().st_size
    expected = sha256_of(src)
    server = BadMirror(tmp_path / "mirror")
    try:
        # Slow enough that the pull spans all the kills: ~2 MiB/s per connection, 4 parts.
        server.behavior["rate"] = 2.5 * 2**20
        qenv.env.update(QMGR_HF_ENDPOINT=server.url, QMGR_PART_THRESHOLD=str(64 << 20),
                        QMGR_DOWNLOAD_PARTS="4", QMGR_RETRY_BACKOFF="0.1")
        qenv.start()
        job = json.loads(qenv.qmgr("pull", "--detach", "--json", "hf.co/test/big:Q4_K_M").stdout)
        rng = random.Random(20)
        kills = 0
        progress = []
        while kills < KILLS:
            time.sleep(rng.uniform(0.3, 1.2))
            state = _job(qenv, job["id"])
            if state["state"] != "running":
                break
            progress.append(state["progress"].get("done", 0))
            assert qenv.proc is not None
            qenv.proc.send_signal(signal.SIGKILL)
            qenv.proc.wait()
            qenv.log.close()
            kills += 1
            qenv.start()  # resumes the job by itself
        assert kills == KILLS, f"the pull finished after {kills} kills: slow the mirror down"
        deadline = time.monotonic() + 300
        while (state := _job(qenv, job["id"]))["state"] == "running":
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
        assert state["state"] == "succeeded", state
        row = qenv.json("list")[0]
        assert row["sha256"] == expected and row["size"] == size
        assert sha256_of(Path(row["paths"][0])) == expected
        # Bytes on disk were reused: what the mirror served is the file plus, per kill, at
        # most what was in flight. Without reuse it would be ~KILLS/2 times the file.
        served = server.bytes_sent
        assert served <= size * 1.15, f"served {served} bytes for a {size}-byte file"
        # Progress seen between kills never went back: each start picked up where it was.
        assert progress == sorted(progress) and progress[-1] > 0
        assert list((qenv.home / "store" / "partial").iterdir()) == []
        print(f"\n{kills} kills; served {served / size:.3f} x the file size")
    finally:
        server.stop()
