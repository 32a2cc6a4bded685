"""qmgr-sensitive: Q4_0 where it does little harm, Q8_0 where it does the most.

Q4_0 hurts some tensors more than others. This quantizer measures, for every weight tensor,
the relative error of a Q4_0 round trip::

    error = ||dequantize(quantize(x)) - x|| / ||x||

and keeps the most damaged fraction of the tensors (by count) at Q8_0; the rest become Q4_0.
The target names the fraction: ``MIX_Q4_0_Q8_0`` keeps a quarter, ``MIX_Q4_0_Q8_0_K10`` and
``MIX_Q4_0_Q8_0_K50`` keep 10% and 50%.

Written as any third-party plugin is: it uses qmgr's public surface only (``qmgr.plugin``: the
quantizer contract and the helpers for rewriting a GGUF file), and the ``gguf`` package for the
block formats.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, ReaderTensor
from gguf.quants import dequantize, quantize

from qmgr.plugin import (
    QuantizeError,
    QuantizeJob,
    float_rows,
    hookimpl,
    is_weight,
    new_writer,
    read_gguf,
    write_header,
)

__version__ = "0.1.0"

LOW = GGMLQuantizationType.Q4_0
HIGH = GGMLQuantizationType.Q8_0
LLAMA_FTYPES = {LOW: 2, HIGH: 7}  # general.file_type of a file mostly of that type

# target -> fraction of the weight tensors kept at HIGH
TARGETS = {"MIX_Q4_0_Q8_0": 0.25, "MIX_Q4_0_Q8_0_K10": 0.10, "MIX_Q4_0_Q8_0_K50": 0.50}

FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                         GGMLQuantizationType.BF16})


class SensitiveQuantizer:
    name = "sensitive"
    version = __version__
    supported_options = frozenset({"allow_requantize"})

    def targets(self) -> list[str]:
        return list(TARGETS)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        job.progress(None, f"reading {job.src.name}")
        reader = read_gguf(job.src, "qmgr-sensitive")
        weights = [t for t in reader.tensors if is_weight(t)]
        quantized = sorted({t.tensor_type.name for t in weights
                            if t.tensor_type not in FLOAT_TYPES})
        if quantized and not job.options.allow_requantize:
            raise QuantizeError(f"{job.src.name} is already quantized ({', '.join(quantized)})"
                                ": allow_requantize to go on anyway", code="requantize_refused")

        # Pass 1: how much does Q4_0 hurt each weight tensor?
        errors = {}
        for i, t in enumerate(weights):
            check_cancel(job)
            job.progress(0.5 * i / len(weights), f"measuring {t.name}")
            errors[t.name] = relative_error(t)
        n_high = math.ceil(TARGETS[job.target] * len(weights))
        high = sorted(errors, key=errors.__getitem__, reverse=True)[:n_high]
        types = {t.name: HIGH if t.name in high else LOW for t in weights}
        params = {qtype: sum(t.n_elements for t in weights if types[t.name] == qtype)
                  for qtype in (LOW, HIGH)}
        dominant = max(params, key=params.__getitem__)

        # Pass 2: write the file.
        writer = new_writer(reader, job.dst, LLAMA_FTYPES[dominant])
        try:
            write_header(writer, reader, types)
            for i, t in enumerate(reader.tensors):
                check_cancel(job)
                job.progress(0.5 + 0.5 * i / len(reader.tensors), f"writing {t.name}")
                if t.name in types:
                    writer.write_tensor_data(
                        np.concatenate([quantize(rows, types[t.name]) for rows in float_rows(t)]))
                else:
                    writer.write_tensor_data(t.data)
            job.progress(1.0, "done")
        finally:
            writer.close()

        return {
            "low_type": LOW.name,
            "high_type": HIGH.name,
            "fraction_high": TARGETS[job.target],
            "file_type": dominant.name,
            "parameters": {qtype.name: n for qtype, n in params.items()},
            # The tensors kept at HIGH, most sensitive first, with their Q4_0 relative error.
            "kept_high": {name: round(errors[name], 6) for name in high},
            "max_error_at_low": round(max((e for n, e in errors.items() if n not in high),
                                          default=0.0), 6),
        }


def relative_error(t: ReaderTensor) -> float:
    """||Q4_0 round trip - x|| / ||x||; 0 for a tensor of zeros."""
    error = norm = 0.0
    for x in float_rows(t):
        error += float(np.square(dequantize(quantize(x, LOW), LOW) - x, dtype=np.float64).sum())
        norm += float(np.square(x, dtype=np.float64).sum())
    return math.sqrt(error / norm) if norm else 0.0


def check_cancel(job: QuantizeJob) -> None:
    if job.cancel.is_set():
        raise QuantizeError("cancelled", code="cancelled")


@hookimpl
def register_quantizers(register):
    register(SensitiveQuantizer())
