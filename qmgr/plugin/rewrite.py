"""Helpers for a quantizer that rewrites a GGUF file with the ``gguf`` package (numpy).

What every such quantizer repeats: refuse a source it cannot read as one file, copy the
metadata the writer does not set itself, and read a tensor's rows as float32 a bounded chunk
at a time. The built-in numpy quantizer and the qmgr-sensitive example plugin use them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from qmgr.plugin.quantizer import QuantizeError

if TYPE_CHECKING:  # numpy and gguf are the plugin's imports, paid when it quantizes
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, ReaderTensor

# Values converted to float32 at a time: bounds the memory a large tensor costs (16 MiB).
CHUNK_VALUES = 1 << 22
BLOCK = 32  # values per block of the legacy quants (Q4_0, Q8_0...)


def read_gguf(src: Path, who: str) -> GGUFReader:
    """``src`` opened with the ``gguf`` package's reader (a memory map), refused with a clear
    :class:`QuantizeError` (code ``unsupported_file``) when it is big-endian, has no
    architecture, or is one shard of a split model. ``who`` names the quantizer in errors."""
    from gguf import GGUFEndian, GGUFReader, Keys

    reader = GGUFReader(src)
    if reader.endianess != GGUFEndian.LITTLE:
        raise QuantizeError(f"{src.name} is a big-endian GGUF file", code="unsupported_file")
    if Keys.General.ARCHITECTURE not in reader.fields:
        raise QuantizeError(f"{src.name} has no general.architecture", code="unsupported_file")
    split = reader.fields.get(Keys.Split.LLM_KV_SPLIT_COUNT)
    if split is not None and split.contents() > 1:
        raise QuantizeError(f"{src.name} is one shard of a split model; {who} reads single "
                            "files", code="unsupported_file")
    return reader


def new_writer(reader: GGUFReader, dst: Path, file_type: int) -> GGUFWriter:
    """A writer for ``dst`` with every key of the source but the reader's own (``GGUF.*``)
    and those a rewrite changes: ``general.file_type`` becomes ``file_type`` (llama.cpp's
    ``llama_ftype``), the quantization version the ``gguf`` package's."""
    from gguf import GGML_QUANT_VERSION, GGUFValueType, GGUFWriter, Keys

    writer = GGUFWriter(dst, reader.fields[Keys.General.ARCHITECTURE].contents())
    own = {Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in own:
            continue
        if field.name == Keys.General.ALIGNMENT:
            writer.add_custom_alignment(field.contents())
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    return writer


def is_weight(t: ReaderTensor, block: int = BLOCK) -> bool:
    """A weight matrix whose rows split into whole blocks (the rest is copied as it is)."""
    return t.name.endswith(".weight") and len(t.shape) >= 2 and int(t.shape[0]) % block == 0


def float_rows(t: ReaderTensor, chunk_values: int = CHUNK_VALUES) -> Iterator[np.ndarray]:
    """The tensor's rows as float32, at most about ``chunk_values`` values at a time."""
    from gguf.quants import dequantize

    rows = t.data.reshape(-1, t.data.shape[-1])
    step = max(1, chunk_values // int(t.shape[0]))
    for start in range(0, len(rows), step):
        yield dequantize(rows[start : start + step], t.tensor_type)


def write_header(writer: GGUFWriter, reader: GGUFReader,
                 types: Mapping[str, GGMLQuantizationType]) -> None:
    """Write the file's header, metadata and tensor infos: every tensor of the source, those
    named in ``types`` as that type, the others as they are. The tensors' data follows, in the
    source's order, with ``writer.write_tensor_data``."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES

    for t in reader.tensors:
        if t.name in types:
            block_size, type_size = GGML_QUANT_SIZES[types[t.name]]
            writer.add_tensor_info(t.name, tuple(int(n) for n in reversed(t.shape)),
                                   np.dtype(np.float32), t.n_elements // block_size * type_size,
                                   types[t.name])
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                   t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
