"""Reading GGUF model headers safely and quickly, and the facts qmgr derives from them."""

from qmgr.gguf.byteio import ByteReader, BytesReader, FileReader
from qmgr.gguf.facts import ModelFacts, facts_from_header, inspect
from qmgr.gguf.reader import (
    ArraySummary,
    GGUFHeader,
    TensorInfo,
    read_header,
    read_header_from,
)
from qmgr.gguf.types import GGML_TYPES, LLAMA_FILE_TYPES, GGMLType

__all__ = [
    "GGML_TYPES",
    "LLAMA_FILE_TYPES",
    "ArraySummary",
    "ByteReader",
    "BytesReader",
    "FileReader",
    "GGMLType",
    "GGUFHeader",
    "ModelFacts",
    "TensorInfo",
    "facts_from_header",
    "inspect",
    "read_header",
    "read_header_from",
]
