"""The Llama 3 8B quant ladder (tests/ladder.py): real headers, true k-quant mixes, real file
sizes, sparse data, as qmgr's own header reader sees them."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import gguf
import pytest
from ladder import (
    FILE_TYPES,
    LLAMA3_8B,
    REAL_SIZES,
    ladder_filename,
    ladder_types,
    ladder_types_small,
    make_ladder_gguf,
    make_ladder_repo,
    tensor_type,
)

from qmgr.gguf import LLAMA_FILE_TYPES, ArraySummary, inspect, read_header

Q = gguf.GGMLQuantizationType

# Tensor type histograms, worked out by hand from llama-quant.cpp's rules for 32 layers:
# use_more_bits holds for 16 layers (0-3, 28-31 and 6, 9, ..., 27); 1 + 32*4 = 129 tensors
# (token_embd, attn_q, attn_k, ffn_gate, ffn_up) follow the default type; 65 norms stay F32.
EXPECTED_TYPES: dict[str, dict[str, int]] = {
    "F16": {"F16": 226, "F32": 65},
    "BF16": {"BF16": 226, "F32": 65},
    "Q8_0": {"Q8_0": 226, "F32": 65},
    "Q6_K": {"Q6_K": 226, "F32": 65},
    "Q5_K_M": {"Q5_K": 193, "Q6_K": 33, "F32": 65},
    "Q5_K_S": {"Q5_K": 225, "Q6_K": 1, "F32": 65},
    "Q4_K_M": {"Q4_K": 193, "Q6_K": 33, "F32": 65},
    "Q4_K_S": {"Q4_K": 217, "Q5_K": 8, "Q6_K": 1, "F32": 65},
    "Q4_0": {"Q4_0": 225, "Q6_K": 1, "F32": 65},
    "IQ4_XS": {"IQ4_XS": 189, "Q5_K": 36, "Q6_K": 1, "F32": 65},
    "Q3_K_L": {"Q3_K": 129, "Q5_K": 96, "Q6_K": 1, "F32": 65},
    "Q3_K_M": {"Q3_K": 129, "Q4_K": 92, "Q5_K": 4, "Q6_K": 1, "F32": 65},
    "IQ3_M": {"IQ3_S": 157, "Q4_K": 68, "Q6_K": 1, "F32": 65},
    "Q3_K_S": {"Q3_K": 225, "Q6_K": 1, "F32": 65},
    "Q2_K": {"Q2_K": 129, "Q3_K": 64, "Q4_K": 32, "Q6_K": 1, "F32": 65},
    "IQ2_XS": {"IQ2_XS": 188, "Q4_K": 32, "Q2_K": 5, "Q5_K": 1, "F32": 65},
}

# bits/weight of meta-llama/Llama-3.1-8B (same tensor shapes) from llama.cpp's own table,
# tools/quantize/README.md (ggml-org/llama.cpp 311c2c9f); Q3_K_M and Q4_0 are not in it.
LLAMA_CPP_BPW = {
    "F16": 16.0005, "Q8_0": 8.5008, "Q6_K": 6.5633, "Q5_K_M": 5.7036, "Q5_K_S": 5.5704,
    "Q4_K_M": 4.8944, "Q4_K_S": 4.6672, "IQ4_XS": 4.4597, "Q3_K_L": 4.2979, "IQ3_M": 3.7628,
    "Q3_K_S": 3.6429, "Q2_K": 3.1593, "IQ2_XS": 2.5882,
}  # fmt: skip


@pytest.fixture(scope="module")
def ladder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ladder_repo(tmp_path_factory.mktemp("ladder"), types=ladder_types)


def test_type_tables_cover_the_ladder() -> None:
    assert set(ladder_types) == set(EXPECTED_TYPES) <= set(FILE_TYPES)
    assert set(ladder_types_small) <= set(ladder_types)
    for name, (ftype_id, _) in FILE_TYPES.items():
        assert LLAMA_FILE_TYPES[int(ftype_id)] == name


def test_parameter_count_of_the_spec() -> None:
    n = 0
    for _, shape in LLAMA3_8B.tensors():
        p = 1
        for d in shape:
            p *= d
        n += p
    assert n == LLAMA3_8B.parameter_count == 8_030_261_248
    assert len(LLAMA3_8B.tensors()) == 291


@pytest.mark.parametrize("file_type", ladder_types)
def test_ladder_file(ladder_dir: Path, file_type: str) -> None:
    path = ladder_dir / ladder_filename(file_type)
    assert path.name == f"Meta-Llama-3-8B-Instruct-{file_type}.gguf"
    facts = inspect(path)
    st = path.stat()

    assert facts.version == 3
    assert facts.architecture == "llama"
    assert facts.name == "Meta-Llama-3-8B-Instruct"
    assert facts.file_type == int(FILE_TYPES[file_type][0])
    assert facts.quant_type == file_type
    assert facts.tensor_types == EXPECTED_TYPES[file_type]
    assert facts.parameter_count == 8_030_261_248
    assert (facts.block_count, facts.context_length, facts.embedding_length) == (32, 8192, 4096)
    assert (facts.feed_forward_length, facts.head_count, facts.head_count_kv) == (14336, 32, 8)
    assert (facts.key_length, facts.value_length, facts.vocab_size) == (128, 128, 128256)

    assert facts.file_size == st.st_size
    real = REAL_SIZES["F16" if file_type == "BF16" else file_type]  # BF16 is F16's size
    assert abs(st.st_size - real) / real < 0.02, (st.st_size, real)
    if file_type in LLAMA_CPP_BPW:
        assert facts.bits_per_weight == pytest.approx(LLAMA_CPP_BPW[file_type], abs=5e-4)
    # Sparse: only the ~7.8 MB header is on disk (where the file system supports holes).
    assert st.st_blocks * 512 < 16 << 20, st.st_blocks * 512


def test_exact_sizes_where_known(ladder_dir: Path) -> None:
    # QuantFactory's Q4_K_M gave header_bytes; its Q3_K_L then agrees to 320 bytes.
    assert (ladder_dir / ladder_filename("Q4_K_M")).stat().st_size == 4_920_733_952
    q3kl = (ladder_dir / ladder_filename("Q3_K_L")).stat().st_size
    assert abs(q3kl - 4_321_956_416) < 4096


def test_q4_k_m_tensors(ladder_dir: Path) -> None:
    header = read_header(ladder_dir / ladder_filename("Q4_K_M"))
    by_name = {t.name: t for t in header.tensors}
    assert by_name["token_embd.weight"].shape == (4096, 128256)
    assert by_name["token_embd.weight"].type_name == "Q4_K"
    assert by_name["output.weight"].shape == (4096, 128256)
    assert by_name["output.weight"].type_name == "Q6_K"
    assert by_name["output_norm.weight"].shape == (4096,)
    assert by_name["output_norm.weight"].type_name == "F32"
    assert by_name["blk.0.attn_k.weight"].shape == (4096, 1024)
    assert by_name["blk.0.ffn_down.weight"].shape == (14336, 4096)
    assert by_name["blk.0.ffn_up.weight"].shape == (4096, 14336)
    more_bits = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for i in range(32):
        want = "Q6_K" if i in more_bits else "Q4_K"
        assert by_name[f"blk.{i}.attn_v.weight"].type_name == want
        assert by_name[f"blk.{i}.ffn_down.weight"].type_name == want
        for other in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert by_name[f"blk.{i}.{other}.weight"].type_name == "Q4_K"
    # Offsets: in order, aligned, each tensor right after the previous one (padded).
    assert header.alignment == 32 and header.data_offset % 32 == 0
    end = 0
    for t in header.tensors:
        assert t.offset == -(-end // 32) * 32
        end = t.offset + t.n_bytes
    assert header.data_offset + -(-end // 32) * 32 == header.file_size


def test_metadata(ladder_dir: Path) -> None:
    meta = read_header(ladder_dir / ladder_filename("Q2_K")).metadata
    assert meta["general.file_type"] == 10
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["llama.rope.freq_base"] == 500000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["llama.rope.dimension_count"] == 128
    assert meta["llama.vocab_size"] == 128256
    assert meta["tokenizer.ggml.bos_token_id"] == 128000
    assert meta["tokenizer.ggml.eos_token_id"] == 128009
    assert "<|eot_id|>" in meta["tokenizer.chat_template"]
    assert meta["tokenizer.ggml.tokens"] == ArraySummary("STRING", 128256)
    assert meta["tokenizer.ggml.token_type"] == ArraySummary("INT32", 128256)
    assert meta["tokenizer.ggml.merges"] == ArraySummary("STRING", 280147)


def test_agrees_with_gguf_reader(tmp_path: Path) -> None:
    # gguf.GGUFReader takes ~20 s over 400k strings: check the format on a small vocabulary,
    # with the merges padded to a given header size as for the real one.
    spec = dataclasses.replace(LLAMA3_8B, vocab_size=1000, n_merges=500, header_bytes=200_000)
    path = make_ladder_gguf(tmp_path / "m.gguf", "Q2_K", spec=spec)
    r = gguf.GGUFReader(path)
    assert r.data_offset == 200_000 == read_header(path).data_offset
    assert r.fields["general.file_type"].contents() == 10
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["llama.rope.freq_base"].contents() == 500000.0
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(set(tokens)) == 1000
    assert tokens[:2] == ["\u012000000", "\u012000001"]
    assert tokens[744:746] == ["<|begin_of_text|>", "<|end_of_text|>"]
    assert tokens[753] == "<|eot_id|>"
    assert tokens[-1] == "<|reserved_special_token_250|>"
    assert Counter(r.fields["tokenizer.ggml.token_type"].contents()) == {1: 744, 3: 256}
    merges = r.fields["tokenizer.ggml.merges"].contents()
    assert len(merges) == len(set(merges)) == 500
    assert all(m.startswith("\u0120") and " x" in m for m in merges)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    assert shapes == dict(spec.tensors())
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["output.weight"] == Q.Q6_K and types["blk.3.ffn_down.weight"] == Q.Q3_K
    assert path.stat().st_size == 200_000 + sum(int(t.n_bytes) for t in r.tensors)


def test_tensor_type_rules() -> None:
    n = 32
    assert tensor_type("Q4_K_M", "blk.5.attn_norm.weight", 5, n, n_dims=1) == Q.F32
    assert tensor_type("Q8_0", "output.weight", -1, n) == Q.Q8_0
    assert tensor_type("Q4_0", "output.weight", -1, n) == Q.Q6_K
    assert tensor_type("IQ2_XS", "output.weight", -1, n) == Q.Q5_K
    assert tensor_type("IQ2_XS", "token_embd.weight", -1, n) == Q.Q2_K
    # The GQA bump: Llama 3 8B shares each K/V head among 4 query heads.
    assert tensor_type("Q2_K", "blk.9.attn_v.weight", 9, n) == Q.Q4_K
    assert tensor_type("Q2_K", "blk.9.attn_v.weight", 9, n, n_gqa=1) == Q.Q3_K
    assert tensor_type("IQ4_XS", "blk.9.attn_v.weight", 9, n, n_gqa=1) == Q.IQ4_XS
    assert tensor_type("IQ2_XS", "blk.9.attn_v.weight", 9, n, n_gqa=1) == Q.Q2_K
    assert tensor_type("Q3_K_M", "blk.1.attn_v.weight", 1, n) == Q.Q5_K
    assert tensor_type("Q3_K_M", "blk.2.attn_v.weight", 2, n) == Q.Q4_K
    assert tensor_type("Q3_K_M", "blk.1.ffn_down.weight", 1, n) == Q.Q5_K
    assert tensor_type("Q3_K_M", "blk.2.ffn_down.weight", 2, n) == Q.Q4_K
    # Only a few rules look at the importance matrix.
    assert tensor_type("Q4_0", "blk.0.ffn_down.weight", 0, n) == Q.Q4_0
    assert tensor_type("Q4_0", "blk.0.ffn_down.weight", 0, n, imatrix=True) == Q.Q4_1
    assert tensor_type("IQ4_XS", "blk.0.ffn_down.weight", 0, n) == Q.Q5_K
    assert tensor_type("IQ4_XS", "blk.0.ffn_down.weight", 0, n, imatrix=True) == Q.IQ4_XS
    with pytest.raises(ValueError):
        tensor_type("Q7_K", "output.weight", -1, n)


def test_imatrix_and_extra_kv(tmp_path: Path) -> None:
    path = make_ladder_gguf(tmp_path / "i.gguf", "Q4_0", imatrix=True, extra_kv={"x.y": 7})
    facts = inspect(path)
    assert facts.tensor_types == {"Q4_0": 221, "Q6_K": 1, "Q4_1": 4, "F32": 65}
    assert read_header(path).metadata["x.y"] == 7
