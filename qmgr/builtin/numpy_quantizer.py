"""Built-in quantizer: Q8_0 and Q4_0 in plain numpy, the readable example of the quantizer
contract (:mod:`qmgr.plugin.quantizer`).

Both formats are ggml's simplest: each row of a weight matrix is cut into blocks of 32 values,
and a block stores one float16 scale ``d`` and 32 small integers ``q``; a value reads back as
``d * q``. Per block of 32 values:

Q8_0, 34 bytes (8.5 bits per weight)::

    d = max(|x|) / 127                    stored as float16
    q = round(x / d)                      int8 in -127..127; halves away from zero (C's roundf)
    bytes: d (2, little-endian), then q[0] .. q[31]
    x' = d * q

Q4_0, 18 bytes (4.5 bits per weight)::

    m = the value of largest magnitude, sign included (the first one, if several)
    d = m / -8                            stored as float16
    q = min(15, trunc(x / d + 8.5))       0..15, that is x / d rounded, plus 8
    bytes: d (2, little-endian), then 16 bytes: byte j = q[j] | q[j + 16] << 4
    x' = d * (q - 8)

Dividing by -8 rather than by 7 puts ``m`` exactly on -8, the end of the range -8..7 that has
one more step: the block's extreme value is stored without error.

Both follow ggml's ``quantize_row_q8_0_ref`` and ``quantize_row_q4_0_ref`` step for step in
float32 (the scale is inverted once per block and multiplied, as in C), so they give the bytes
that llama.cpp writes when it quantizes to these types without an importance matrix.

What is quantized: tensors named ``*.weight`` with two or more dimensions whose rows (the first
GGUF dimension) are a multiple of 32 long. Everything else (norms and biases, which are 1-D) is
copied as it is, and so is all the metadata, except ``general.file_type``, which names the
target. The source is F32, F16 or BF16; a source that is already quantized is dequantized first
(``gguf.quants.dequantize``) only with ``allow_requantize``, since the errors add up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    ReaderTensor,
)

import qmgr
from qmgr import hookimpl
from qmgr.plugin import (
    QuantizeError,
    QuantizeJob,
    Quantizer,
    float_rows,
    is_weight,
    new_writer,
    read_gguf,
    write_header,
)

QK = 32  # values per block, in both formats

# target -> (GGML type of the quantized tensors, llama_ftype written as general.file_type)
TARGETS: dict[str, tuple[GGMLQuantizationType, int]] = {
    "Q8_0": (GGMLQuantizationType.Q8_0, 7),
    "Q4_0": (GGMLQuantizationType.Q4_0, 2),
}

FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                         GGMLQuantizationType.BF16})


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Rows of float values (last dimension a multiple of 32) -> Q8_0 blocks, as uint8."""
    blocks = _blocks(x)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_half_away(blocks * _inverse(d)).astype(np.int8)
    return _pack(x.shape, d, q.view(np.uint8))


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """Rows of float values (last dimension a multiple of 32) -> Q4_0 blocks, as uint8."""
    blocks = _blocks(x)
    # argmax returns the first of equal magnitudes, as ggml's scan with a strict '<' keeps it.
    m = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)
    d = m / np.float32(-8)
    q = np.minimum(np.trunc(blocks * _inverse(d) + np.float32(8.5)), 15).astype(np.uint8)
    return _pack(x.shape, d, q[:, : QK // 2] | (q[:, QK // 2 :] << 4))


QUANTIZE_ROWS = {GGMLQuantizationType.Q8_0: quantize_q8_0,
                 GGMLQuantizationType.Q4_0: quantize_q4_0}


def _blocks(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] % QK:
        raise ValueError(f"rows of {x.shape[-1]} values do not split into blocks of {QK}")
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1 / d, and 0 where d is 0 (a block of zeros quantizes to zeros)."""
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf. Not np.round (halves to even), nor floor(v + 0.5): in float32,
    0.49999997 + 0.5 rounds up to 1; ``v - floor(v)`` is exact."""
    a = np.abs(v)
    r = np.floor(a)
    r += a - r >= 0.5
    return np.copysign(r, v)


def _pack(shape: tuple[int, ...], d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Each block's float16 scale then its quants, rows shaped like the input's."""
    blocks = np.concatenate([d.astype("<f2").view(np.uint8), q], axis=1)
    return blocks.reshape(*shape[:-1], -1)


class NumpyQuantizer:
    """Q8_0 and Q4_0 with numpy alone: slower than llama.cpp, with nothing native to crash."""

    name = "numpy"
    version = qmgr.__version__
    # "pure" costs nothing: this quantizer never mixes types.
    supported_options = frozenset({"allow_requantize", "leave_output", "pure"})

    def targets(self) -> list[str]:
        return list(TARGETS)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        # The worker has checked the target and the options against targets() and
        # supported_options.
        qtype, file_type = TARGETS[job.target]
        job.progress(None, f"reading {job.src.name}")  # a big vocabulary takes seconds
        reader = read_gguf(job.src, "the numpy quantizer")
        plan = [(t, self._quantizes(t, job)) for t in reader.tensors]
        requantized = sorted({t.tensor_type.name for t, quantize in plan
                              if quantize and t.tensor_type not in FLOAT_TYPES})
        if requantized and not job.options.allow_requantize:
            raise QuantizeError(
                f"{job.src.name} is already quantized ({', '.join(requantized)}); quantizing "
                "it again adds the errors of both: allow_requantize to go on anyway",
                code="requantize_refused")

        writer = new_writer(reader, job.dst, file_type)
        try:
            write_header(writer, reader, {t.name: qtype for t, quantize in plan if quantize})

            total = sum(t.n_bytes for t in reader.tensors) or 1
            done = 0
            for t, quantize in plan:
                if job.cancel.is_set():
                    raise QuantizeError("cancelled", code="cancelled")
                job.progress(done / total, t.name)
                writer.write_tensor_data(_quantize_tensor(t, qtype) if quantize else t.data)
                done += t.n_bytes
            job.progress(1.0, "done")
        finally:
            writer.close()

        n_quantized = sum(quantize for _, quantize in plan)
        return {"tensors": len(plan), "quantized": n_quantized,
                "copied": len(plan) - n_quantized, "requantized_from": requantized}

    @staticmethod
    def _quantizes(t: ReaderTensor, job: QuantizeJob) -> bool:
        if job.options.leave_output and t.name == "output.weight":
            return False
        return is_weight(t, QK)


def _quantize_tensor(t: ReaderTensor, qtype: GGMLQuantizationType) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_length = int(t.shape[0])
    out = np.empty((t.n_elements // row_length, row_length // block_size * type_size), np.uint8)
    done = 0
    for rows in float_rows(t):
        out[done : done + len(rows)] = QUANTIZE_ROWS[qtype](rows)
        done += len(rows)
    return out


@hookimpl
def register_quantizers(register: Callable[[Quantizer], None]) -> None:
    register(NumpyQuantizer())
