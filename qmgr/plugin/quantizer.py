"""What a quantizer plugin implements (registered with ``register_quantizers``).

A quantizer turns one GGUF file into another of a target quant type::

    class MyQuantizer:
        name = "my-quantizer"          # unique; what `qmgr quantize --quantizer` names
        version = "1.0"                # recorded in every variant it makes

        def targets(self) -> list[str]:
            return ["Q4_0", "Q8_0"]    # llama.cpp file-type names (or names of its own)

        def quantize(self, job: QuantizeJob) -> dict:
            ...                        # write job.dst; call job.progress(...) as it goes
            return {"tensors": 291}    # anything worth recording in the recipe

It runs in a worker process of its own (``python -m qmgr.quantize.worker``), never in the
daemon: a native library that aborts, leaks or hangs takes down the worker only, and cancel
is a kill. It writes ``job.dst`` (a partial file in qmgr's store); the daemon then hashes it,
reads its header with qmgr's bounded reader, publishes it, and catalogs it with its parent
and the recipe (quantizer, version, options, imatrix digest). A quantizer must not write
anywhere else.

Two capabilities a quantizer may declare:

- ``reports_digest = True``: its ``quantize`` result holds ``output_sha256``, ``output_size``
  (and may hold ``output_facts``) of the file it wrote, computed while writing it; the daemon
  uses them instead of reading the file again (the built-in llama.cpp quantizer does this,
  ``qmgr.builtin.llama_digest``). A quantizer that does not declare it has its output hashed by
  the daemon, whatever its result says.
- ``compute_imatrix(job: ImatrixJob) -> dict``: it computes importance matrices
  (``qmgr imatrix``); the result says what is worth recording (``tokens``, ``chunks``...).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from qmgr.errors import QmgrError


@dataclasses.dataclass
class QuantizeOptions:
    """Options common to quantizers; each one uses those it understands and says which in
    ``supported_options`` (others are refused with a clear error rather than ignored)."""

    imatrix: Path | None = None  # importance matrix (GGUF, as llama.cpp's imatrix tool writes)
    leave_output: bool = False  # keep output.weight as it is in the source
    pure: bool = False  # every tensor of the target type: no k-quant mixing
    allow_requantize: bool = False  # the source is already quantized: go on anyway
    tensor_types: dict[str, str] = dataclasses.field(default_factory=dict)  # regex -> type
    token_embedding_type: str | None = None
    output_tensor_type: str | None = None
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["imatrix"] = str(self.imatrix) if self.imatrix else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizeOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown quantize options: {', '.join(sorted(unknown))}")
        d = dict(d)
        if d.get("imatrix"):
            d["imatrix"] = Path(d["imatrix"])
        return cls(**d)

    def used(self) -> set[str]:
        """Names of options set to something other than their default."""
        default = QuantizeOptions()
        return {f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


@dataclasses.dataclass
class QuantizeJob:
    src: Path  # the source variant's file (the first shard of a split model)
    dst: Path  # where to write the result (one file)
    target: str  # the target type, one of targets()
    options: QuantizeOptions
    # progress(fraction 0..1, message): fraction None when unknown
    progress: Callable[[float | None, str], None] = lambda fraction, message: None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    # What the catalog knows of the source (``qmgr.gguf.ModelFacts.to_dict()``: file_type,
    # tensor_types, ...), read from its header when it was cataloged, so that a quantizer need
    # not parse it again; None when the quantizer is called outside the daemon.
    src_facts: dict[str, Any] | None = None


@dataclasses.dataclass
class ImatrixJob:
    src: Path  # the model's file (the first shard of a split model)
    dst: Path  # where to write the matrix (GGUF, as llama.cpp's imatrix tool writes)
    text: str  # the calibration text
    dataset: str  # the text's name, recorded in the matrix (``imatrix.datasets``)
    n_ctx: int = 512  # tokens per chunk
    threads: int | None = None
    progress: Callable[[float | None, str], None] = lambda fraction, message: None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)


class Quantizer(Protocol):
    """A quantizer. Registered with the ``register_quantizers`` hook."""

    @property
    def name(self) -> str:
        """Unique: what ``qmgr quantize --quantizer`` names."""
        ...

    @property
    def version(self) -> str:
        """Recorded in every variant it makes."""
        ...

    @property
    def supported_options(self) -> frozenset[str]:
        """The :class:`QuantizeOptions` it understands (others are refused, not ignored)."""
        ...

    def targets(self) -> list[str]:
        """The quant types it makes: llama.cpp file-type names, or names of its own."""
        ...

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        """Write ``job.dst``; return what is worth recording in the recipe."""
        ...


class ImatrixMaker(Protocol):
    """A quantizer that also computes importance matrices."""

    @property
    def name(self) -> str: ...

    def compute_imatrix(self, job: ImatrixJob) -> dict[str, Any]: ...


class QuantizeError(QmgrError):
    """A quantizer's refusal with a message for the user (its code reaches the user)."""

    code = "quantize_failed"
