"""Counts in a GGUF header are bounded by the file, or by sense, before anything uses them.

Crafted tiny files (tests/ggufmake.py) with one count out of bounds each: the facts refuse
them with a clear error at once, and a real daemon importing one answers with that error and
keeps working.
"""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import pytest
from conftest import Env
from gguf import GGUFValueType
from ggufmake import make_tiny_gguf

from qmgr import gguf as qgguf
from qmgr.errors import GGUFError

pytestmark = pytest.mark.reliability  # the reliability suite: docs/operations.md

U64_MAX = (1 << 64) - 1

CRAFTED = {
    "split.count": ({"split.count": (U64_MAX, GGUFValueType.UINT64), "split.no": 0},
                    "split.count"),
    "split.no past count": ({"split.count": 2, "split.no": 7}, "split.no"),
    "block_count": ({"llama.block_count": 30_000_000}, "block_count"),
    "block_count > tensors": ({"llama.block_count": 500}, "block_count"),
    "head_count": ({"llama.attention.head_count": (U64_MAX, GGUFValueType.UINT64)},
                   "head_count"),
    "per-layer heads": ({"llama.attention.head_count_kv": [2] * 5000}, "head_count_kv"),
    "context_length": ({"llama.context_length": (1 << 40, GGUFValueType.UINT64)},
                       "context_length"),
    "embedding_length": ({"llama.embedding_length": (1 << 40, GGUFValueType.UINT64)},
                         "embedding_length"),
    "file_type": ({"general.file_type": (1 << 31, GGUFValueType.UINT32)}, "file_type"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_count_out_of_bounds_is_refused_at_once(tmp_path: Path, case: str) -> None:
    extra, key = CRAFTED[case]
    path = make_tiny_gguf(tmp_path / "crafted.gguf", extra_kv=extra)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError) as e:
            qgguf.inspect(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert key in e.value.message, e.value.message[:300]
    # Refused before any per-layer work: nothing allocated in proportion to the count.
    assert peak < 4 << 20, peak


def test_real_models_pass(tmp_path: Path) -> None:
    facts = qgguf.inspect(make_tiny_gguf(tmp_path / "ok.gguf", n_layers=3))
    assert facts.block_count == 3


def test_non_finite_floats_never_reach_json(tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "nan.gguf", extra_kv={
        "llama.attention.sliding_window_pattern": [math.nan, math.inf, 1.0]})
    facts = qgguf.inspect(path).to_dict()
    assert facts["sliding_window_pattern"] == [None, None, 1.0]


def test_the_daemon_refuses_a_crafted_import_and_stays_up(daemon: Env, tmp_path: Path) -> None:
    bad = make_tiny_gguf(tmp_path / "bad.gguf",
                         extra_kv={"split.count": (U64_MAX, GGUFValueType.UINT64), "split.no": 0})
    r = daemon.qmgr("import", str(bad), check=False)
    assert r.returncode == 1 and "split.count" in r.stderr and "Traceback" not in r.stderr
    good = make_tiny_gguf(tmp_path / "good-Q8_0.gguf", ftype="Q8_0")
    assert daemon.qmgr("import", str(good)).returncode == 0
    assert [v["state"] for v in daemon.json("list")] == ["ready"]


def test_memory_spent_on_a_header_is_a_small_multiple_of_its_size(tmp_path: Path) -> None:
    """8000 arrays of 1024 int32 (32 MB of header): decoded whole, they would cost ~10x that
    in Python objects; past a budget they are summarized instead."""
    import numpy as np

    extra = {f"crafted.a{i}": (np.arange(1024, dtype=np.int32) + i).tolist()
             for i in range(8000)}
    path = make_tiny_gguf(tmp_path / "wide.gguf", extra_kv=extra)
    header_bytes = path.stat().st_size
    assert header_bytes > 30 << 20
    tracemalloc.start()
    try:
        header = qgguf.read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header.metadata["crafted.a0"][:3] == [0, 1, 2]  # the first ones are decoded
    assert peak < 3 * header_bytes, (peak, header_bytes)
