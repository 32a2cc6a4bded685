"""Fit: the estimator, the policy, and `qmgr fit` / `qmgr pull --fit` against the mirror.

The mirror serves GGUF files with the header of the real Llama-3-8B-Instruct quants (true
tensor types and sizes, tests/ladder.py) and sparse holes for data: fit reads headers only.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from badmirror import BadMirror
from conftest import Env
from ladder import ladder_types_small, make_ladder_gguf

from qmgr.fit.estimate import CUDA_CONTEXT, GiB, MiB, ModelShape, kv_bytes, kv_cells, place
from qmgr.fit.policy import Candidate, decide, option
from qmgr.gguf import read_header

# What NVML reported for an idle H200 (tests/test_hardware.py has the recordings).
H200_TOTAL = 150754820096
H200_FREE_IDLE = 150109880320
PARTS = ("weights", "kv_cache", "compute", "overhead", "repacked_originals")


def ram(gib: float) -> list[SimpleNamespace]:
    return [SimpleNamespace(kind="cpu", index=0, name="ram", memory_total=int(gib * GiB),
                            memory_free=int(gib * GiB))]


def gpu(gib: float, index: int = 0) -> SimpleNamespace:
    return SimpleNamespace(kind="cuda", index=index, name=f"gpu{index}",
                           memory_total=int(gib * GiB), memory_free=int(gib * GiB))


def h200() -> SimpleNamespace:
    return SimpleNamespace(kind="cuda", index=0, name="NVIDIA H200", memory_total=H200_TOTAL,
                           memory_free=H200_FREE_IDLE)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelShape]:
    d = tmp_path_factory.mktemp("ladder")
    return {t: ModelShape.from_header(read_header(make_ladder_gguf(d / f"m-{t}.gguf", t)))
            for t in ("F16", *ladder_types_small)}


def candidates(shapes: dict[str, ModelShape]) -> list[Candidate]:
    return [Candidate(q, s.file_size, s, {"parameter_count": 8_030_261_248})
            for q, s in shapes.items()]


def test_shape_of_llama3_8b(shapes: dict[str, ModelShape]) -> None:
    s = shapes["Q4_K_M"]
    assert (s.n_layer, s.n_embd, s.n_vocab) == (32, 4096, 128256)
    assert s.n_head_kv == [8] * 32 and s.head_dim_k == s.head_dim_v == 128
    assert not any(s.swa_layers)
    assert s.weight_bytes == s.file_size - 7_835_904  # the whole file but its header
    # KV cache: 32 layers x 8 heads x (128 + 128) x 2 bytes = 128 KiB per token in f16.
    assert sum(kv_bytes(s, i, 4096) for i in range(32)) == 4096 * 128 * 1024
    assert sum(kv_bytes(s, i, 4096, "q8_0") for i in range(32)) == 4096 * 128 * 1024 * 17 // 32
    assert kv_cells(s, 0, 4000) == 4096  # padded to 256


def test_sliding_window_layers_of_gemma3() -> None:
    from ggufmake import find_gemma_gguf

    path = find_gemma_gguf()
    s = ModelShape.from_header(read_header(path))
    assert s.n_swa == 512 and s.swa_layers.count(False) == 3  # every 6th of 18 is global
    # llama-cpp-python keeps llama.cpp's full-size SWA cache (as its log says)...
    assert kv_cells(s, 0, 8192) == kv_cells(s, 5, 8192) == 8192
    # ...without it a window layer holds window + batch cells, padded.
    assert kv_cells(s, 0, 8192, swa_full=False) == 1024
    assert kv_cells(s, 5, 8192, swa_full=False) == 8192
    assert s.tied_bytes > 0 and s.output_bytes < s.tied_bytes  # tied embeddings


# On the CPU, Q4_K_M needs more than Q5_K_M: llama.cpp repacks its Q4_K weights into a copy and
# the mapped originals stay resident (qmgr/fit/estimate.py, REPACKED_TYPES).
@pytest.mark.parametrize("gib,pick", [(12, "Q8_0"), (8, "Q6_K"), (7, "Q5_K_M"),
                                      (6.5, "Q3_K_M"), (6, "Q2_K"), (4, "Q2_K")])
def test_ram_picks_the_best_quant_that_fits(shapes: dict[str, ModelShape], gib: float,
                                            pick: str) -> None:
    d = decide(candidates(shapes), ram(gib), ctx=4096)
    assert d.pick is not None and d.pick.candidate.quant == pick, d.reason
    assert d.pick.placement.fits and d.pick.placement.kind == "cpu"
    # Everything of better quality would not have fitted.
    for o in d.options:
        if o.rank < d.pick.rank:
            assert not o.placement.fits
    assert d.reason.startswith(f"{pick}: the best quality that fits in RAM")
    cliff = [n for n in d.notes if "below 4 bits" in n]
    assert bool(cliff) == (pick in ("Q3_K_M", "Q2_K"))


def test_repacked_weights_count_and_the_decision_says_so(shapes: dict[str, ModelShape]) -> None:
    q4 = shapes["Q4_K_M"]
    cpu = place(q4, ram(64), 4096).devices[0]
    assert cpu.repacked_originals == sum(q4.repacked_bytes) > 3 * GiB  # 193 Q4_K tensors
    assert cpu.weights == q4.weight_bytes
    assert cpu.total == sum(getattr(cpu, k) for k in PARTS)
    assert not any(shapes["Q5_K_M"].repacked_bytes) and not any(shapes["Q8_0"].repacked_bytes)
    # 6 GiB: Q4_K_M would fit without its mapped originals, and the notes say so.
    d = decide(candidates(shapes), ram(6), ctx=4096)
    assert d.pick is not None and d.pick.candidate.quant == "Q2_K"
    assert any(n.startswith("Q4_K_M would fit but for 3.1 GiB: llama.cpp's CPU backend copies")
               for n in d.notes), d.notes


def test_memory_is_the_sum_of_the_parts_the_placement_lists(
        shapes: dict[str, ModelShape]) -> None:
    """`memory` in `fit --json` is what the decision compares with the budgets: every part each
    device lists, on the CPU, the GPU and split between them."""
    for devices in (ram(64), [*ram(64), h200()], [*ram(64), gpu(4)], [*ram(64), gpu(3, 0),
                                                                       gpu(3, 1)]):
        for quant in ("Q4_K_M", "Q8_0", "Q3_K_M"):
            c = Candidate(quant, shapes[quant].file_size, shapes[quant],
                          {"parameter_count": 8_030_261_248})
            out = option(c, devices, 4096, "f16", 0.10).to_dict()
            listed = out["placement"]["devices"]
            for d in listed:
                assert d["total"] == sum(d[k] for k in PARTS), (quant, d)
                assert d["fits"] == (d["total"] <= d["budget"])
            assert out["memory"] == sum(d["total"] for d in listed)


def test_cpu_and_gpu_placements_agree(shapes: dict[str, ModelShape]) -> None:
    """The same model split differently: the layers' weights and caches move between devices,
    the repacked originals stay with the CPU's layers, and nothing is counted twice."""
    s = shapes["Q4_K_M"]
    kv = sum(kv_bytes(s, i, 4096) for i in range(s.n_layer))
    whole = place(s, [*ram(64), h200()], 4096)
    assert whole.kind == "gpu" and whole.fits
    cpu, cuda = whole.devices
    assert cpu.weights == s.input_bytes and cpu.repacked_originals == 0 and cpu.kv_cache == 0
    assert cuda.weights == sum(s.layer_bytes) + s.output_bytes + s.tied_bytes
    assert cuda.kv_cache == kv and cuda.overhead == CUDA_CONTEXT
    assert cuda.repacked_originals == 0  # CUDA buffers are copies; nothing stays mapped
    split = place(s, [*ram(64), gpu(4)], 4096)
    assert split.kind == "partial"
    cpu, cuda = split.devices
    n_cpu = s.n_layer - split.gpu_layers
    assert cpu.layers == n_cpu and cuda.layers == split.gpu_layers
    assert cpu.repacked_originals == sum(s.repacked_bytes[:n_cpu]) > 0
    assert cpu.weights + cuda.weights == s.weight_bytes
    assert cpu.kv_cache + cuda.kv_cache == kv
    alone = place(s, ram(64), 4096).devices[0]
    assert alone.repacked_originals == sum(s.repacked_bytes)
    # The CPU-only placement is the split one's CPU part (which keeps the output head, as
    # llama.cpp does unless every layer is offloaded) plus the layers that moved to the GPU.
    assert not split.output_on_gpu
    moved = sum(s.layer_bytes[n_cpu:])
    assert alone.weights == cpu.weights + moved
    assert alone.repacked_originals == cpu.repacked_originals + sum(s.repacked_bytes[n_cpu:])


def test_too_small_is_refused_with_what_is_missing(shapes: dict[str, ModelShape]) -> None:
    d = decide(candidates(shapes), ram(3), ctx=4096)
    assert d.pick is None
    assert "nothing fits" in d.reason and "Q2_K" in d.reason and "more memory" in d.reason


def test_context_can_be_the_limit(shapes: dict[str, ModelShape]) -> None:
    d = decide(candidates(shapes), ram(8), ctx=16384)  # 2 GiB of KV cache
    assert d.pick is not None and d.pick.candidate.quant != "Q6_K"
    assert any(n.startswith("context is the limit") for n in d.notes), d.notes


def test_gpu_tiers(shapes: dict[str, ModelShape]) -> None:
    # A big GPU: the best that fits entirely on it.
    d = decide(candidates(shapes), [*ram(32), gpu(24)], ctx=4096)
    assert d.pick is not None and d.pick.candidate.quant == "F16"
    assert d.pick.placement.kind == "gpu" and d.pick.placement.output_on_gpu
    # A small GPU: nothing fits on it alone, so the best quality with part of it offloaded.
    d = decide(candidates(shapes), [*ram(32), gpu(4)], ctx=4096)
    assert d.pick is not None and d.pick.placement.kind == "partial"
    assert d.pick.candidate.quant == "F16"
    p = d.pick.placement
    assert 0 < p.gpu_layers < 32 and "layers on the GPU" in d.reason
    cuda = next(u for u in p.devices if u.kind == "cuda")
    assert cuda.total <= cuda.budget and cuda.layers == p.gpu_layers
    # One more layer would not have fitted.
    more = place(shapes["F16"], [*ram(32), gpu(4)], 4096)
    assert more.gpu_layers == p.gpu_layers


def test_two_gpus_share_the_layers(shapes: dict[str, ModelShape]) -> None:
    p = place(shapes["Q8_0"], [*ram(32), gpu(6, 0), gpu(6, 1)], 4096)
    assert p.kind == "gpu" and p.fits
    layers = [u.layers for u in p.devices if u.kind == "cuda"]
    assert sum(layers) == 32 and min(layers) > 0


@pytest.fixture
def fitting(qenv: Env, ladder_mirror: BadMirror) -> Env:
    qenv.env["QMGR_HF_ENDPOINT"] = ladder_mirror.url
    qenv.start()
    qenv.qmgr("alias", "add", "llama3", "hf.co/test/llama3-8b")
    return qenv


def test_pull_fit_picks_by_ram_and_explains(fitting: Env, ladder_mirror: BadMirror) -> None:
    for gib, pick in [(12, "Q8_0"), (8, "Q6_K"), (6.5, "Q3_K_M"), (6, "Q2_K")]:
        fitting.env["QMGR_HW"] = f"ram={gib}GiB"
        r = fitting.qmgr("pull", "llama3", "--fit", "--dry-run")
        assert f"pick: {pick}: the best quality that fits in RAM" in r.stdout, r.stdout
        assert ("note: Q3_K_M is below 4 bits" in r.stdout) == (pick == "Q3_K_M")
        out = fitting.json("pull", "llama3", "--fit", "--dry-run")
        assert out["pick"] == pick and out["hardware"]["source"] == "QMGR_HW"
        ranks = [o["quality_rank"] for o in out["options"]]
        assert ranks == sorted(ranks) and {o["quality_source"] for o in out["options"]} == \
            {"published"}
        # Headers only: each variant's header (7.8 MB for a 128k vocabulary) and little more.
        for o in out["options"]:
            assert o["header_bytes"] <= 10 * MiB
    assert fitting.json("list") == [] and fitting.json("jobs") == []
    served = ladder_mirror.bytes_sent
    assert served < 8 * 6 * 10 * MiB  # 8 fits x 6 headers, never a whole file


def test_pull_fit_refuses_a_machine_too_small(fitting: Env, ladder_mirror: BadMirror) -> None:
    fitting.env["QMGR_HW"] = "ram=3GiB"
    r = fitting.qmgr("pull", "llama3", "--fit", check=False)
    assert r.returncode == 1
    assert "nothing downloaded: nothing fits: the smallest variant (Q2_K) needs" in r.stderr
    assert fitting.json("jobs") == [] and fitting.json("list") == []
    assert not list((fitting.home / "store" / "partial").iterdir())


def test_fit_table_on_a_gpu_machine(fitting: Env) -> None:
    fitting.env["QMGR_HW"] = "ram=32GiB,cuda=8GiB"
    r = fitting.qmgr("fit", "llama3", "--ctx", "8192")
    assert "MEM CUDA0" in r.stdout and "pick:" in r.stdout
    out = fitting.json("fit", "llama3", "--ctx", "8192", "--kv-type", "q8_0")
    assert out["ctx"] == 8192 and out["kv_type"] == "q8_0"
    pick = next(o for o in out["options"] if o["quant"] == out["pick"])
    assert pick["fit"] == "gpu"
    better = [o for o in out["options"] if o["quality_rank"] < pick["quality_rank"]]
    assert all(o["fit"] != "gpu" for o in better)
    assert "RATED" in r.stdout and "published" in r.stdout
