"""The memory a GGUF variant needs on this machine, from its header alone.

What llama.cpp allocates for a model loaded with ``n_ctx`` context and a KV cache type:

- **weights**: the tensor data, layer by layer (``blk.N.*``), plus the input embedding (always
  on the CPU in llama.cpp) and the output head (on the GPU only when every layer is);
- **KV cache**: per layer, cache cells × (KV heads × key dim × bytes(type_k) + KV heads ×
  value dim × bytes(type_v)); cells are ``n_ctx`` padded to 256. Sliding-window layers keep
  as many (llama-cpp-python leaves llama.cpp's ``swa_full`` on); with ``swa_full`` off they
  would keep ``n_swa + n_ubatch``;
- **compute buffer**: the graph's scratch memory, reserved for the worst batch (``n_ubatch``
  tokens): the larger of the output stage (logits, vocabulary × batch × 4 bytes, plus two
  copies of the hidden state) and, without flash attention, the attention stage (scores and
  mask, cache cells × batch × (heads + 1) × 4 bytes, plus five hidden-state-sized tensors);
- **overhead**: on a GPU, the CUDA context; on the CPU, the runtime's own memory;
- **repacked originals** (CPU only): llama.cpp's CPU backend copies weights of some types
  (:data:`REPACKED_TYPES`) into an interleaved layout at load; the copy is counted in the
  weights, and the memory-mapped original it was read from stays resident beside it.

Each device kind is modelled the way it behaves: a CUDA buffer is allocated (and resident)
whole, while on the CPU only the touched part of the compute buffer becomes resident and the
weights are memory-mapped pages that become resident as they are read. The constants below are
calibrated against real loads (bench/bench_estimate.py; docs/fit.md says how).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qmgr.errors import QmgrError
from qmgr.fit.hardware import Device
from qmgr.gguf import GGUFHeader, facts_from_header

MiB = 1 << 20
GiB = 1 << 30

# bytes per element of the KV cache types llama.cpp offers (block types: bytes / block size)
KV_TYPES: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0,
    "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}
KV_PAD = 256  # llama.cpp pads the number of cache cells to this
N_UBATCH = 512  # llama.cpp's default physical batch

# Sliding-window layer patterns llama.cpp sets per architecture when the file does not say:
# layer i uses the window when i % n < n - 1 (every n-th layer is global).
SWA_PATTERNS = {"gemma3": 6, "gemma2": 2, "cohere2": 4, "gemma3n": 5}

# -- calibration (see docs/fit.md, bench/bench_estimate.py) ------------------------------------
CUDA_CONTEXT = 630 * MiB  # measured on an H200 (CUDA 13): context + cuBLAS workspace
# On the CPU, measured with llama-cpp-python 0.3.36 (bench/bench_estimate.py, docs/fit.md):
# beyond the mapped weights and the KV cache, a process grows by a fixed runtime part, a part
# that follows the vocabulary (llama.cpp's token tables), and the touched part of the compute
# buffer, which grows with the context up to ~8k cells and then levels off.
CPU_RUNTIME = 44 * MiB
CPU_PER_VOCAB_TOKEN = 80  # bytes
CPU_COMPUTE_PER_CELL = 2816  # bytes, up to CPU_COMPUTE_CELLS cells
CPU_COMPUTE_CELLS = 8192
# Weight types llama.cpp's CPU backend repacks into interleaved copies at load (AVX2/NEON).
# Loaded with mmap (llama-cpp-python's default, and qmgr's backend), the mapped original, read
# once while loading, stays resident beside the copy. It is clean file memory, but the kernel
# does not give it back for free: under a memory limit that leaves it out the process thrashes
# (bench/bench_estimate.py --pressure, Gemma 3 270M Q4_0 at ctx 2048, limited to the figure
# without these pages + 5%: 118 major faults after loading; with them + 5%: none). So they
# count: 3.1 GiB of Llama-3-8B Q4_K_M's 7.8 (docs/fit.md).
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})


@dataclass
class ModelShape:
    """What the estimator needs from a header."""

    architecture: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: list[int]
    n_head_kv: list[int]
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int | None
    n_swa: int
    swa_layers: list[bool]
    layer_bytes: list[int]
    input_bytes: int  # token embedding and anything not in a block nor the output head
    output_bytes: int  # output head + final norm
    tied_bytes: int  # the token embedding, when the head reuses it (tied embeddings)
    file_size: int
    repacked_bytes: list[int]  # per layer, bytes of weights the CPU backend repacks
    quant_type: str | None = None

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.input_bytes + self.output_bytes

    @classmethod
    def from_headers(cls, headers: list[GGUFHeader]) -> ModelShape:
        """A model split in shards: the first shard's metadata, every shard's tensors."""
        if len(headers) == 1:
            return cls.from_header(headers[0])
        import dataclasses

        merged = dataclasses.replace(
            headers[0], tensors=[t for h in headers for t in h.tensors],
            file_size=sum(h.file_size for h in headers))
        return cls.from_header(merged)

    @classmethod
    def from_header(cls, header: GGUFHeader) -> ModelShape:
        facts = facts_from_header(header)
        arch = facts.architecture or "?"
        n_layer = facts.block_count
        if not n_layer or not facts.embedding_length:
            raise QmgrError(f"the header does not say how many layers ({arch}): cannot "
                            "estimate memory", code="cannot_estimate")
        heads = _per_layer(facts.head_count, n_layer, 1)
        heads_kv = _per_layer(facts.head_count_kv, n_layer, heads[0])
        n_embd = facts.embedding_length
        head_k = facts.key_length or n_embd // max(1, heads[0])
        head_v = facts.value_length or head_k
        pattern = facts.sliding_window_pattern
        n_swa = facts.sliding_window or 0
        if isinstance(pattern, list) and len(pattern) == n_layer:
            swa = [bool(x) for x in pattern]
        else:
            n = pattern if isinstance(pattern, int) else SWA_PATTERNS.get(arch, 0)
            swa = [bool(n_swa) and (n == 0 or (i % n) < n - 1) for i in range(n_layer)]
        layer_bytes = [0] * n_layer
        repacked = [0] * n_layer
        input_bytes = output_bytes = 0
        has_output = False
        block = re.compile(r"^blk\.(\d+)\.")
        for t in header.tensors:
            m = block.match(t.name)
            if m and int(m.group(1)) < n_layer:
                layer_bytes[int(m.group(1))] += t.n_bytes
                if t.type_name in REPACKED_TYPES and len(t.shape) >= 2:
                    repacked[int(m.group(1))] += t.n_bytes
            elif t.name.startswith("output"):
                output_bytes += t.n_bytes
                has_output = has_output or t.name == "output.weight"
            else:
                input_bytes += t.n_bytes
        # Tied embeddings: the head reuses token_embd. On the CPU that is the same mapped
        # memory; a GPU running the head gets its own copy.
        tied = 0 if has_output else next(
            (t.n_bytes for t in header.tensors if t.name == "token_embd.weight"), 0)
        return cls(arch, n_layer, n_embd, facts.vocab_size or 0, heads, heads_kv, head_k,
                   head_v, facts.context_length, n_swa, swa, layer_bytes, input_bytes,
                   output_bytes, tied, header.file_size, repacked, facts.quant_type)


def _per_layer(value: Any, n: int, default: int) -> list[int]:
    if isinstance(value, list) and len(value) == n:
        return [int(v) for v in value]
    if isinstance(value, int) and value > 0:
        return [value] * n
    return [default] * n


def _pad(n: int, to: int = KV_PAD) -> int:
    return -(-n // to) * to


def kv_cells(shape: ModelShape, layer: int, n_ctx: int, n_ubatch: int = N_UBATCH,
             swa_full: bool = True) -> int:
    full = _pad(n_ctx)
    if shape.swa_layers[layer] and shape.n_swa and not swa_full:
        return min(full, _pad(shape.n_swa + n_ubatch))
    return full


def kv_bytes(shape: ModelShape, layer: int, n_ctx: int, kv_type: str = "f16",
             swa_full: bool = True) -> int:
    per = KV_TYPES[kv_type]
    cells = kv_cells(shape, layer, n_ctx, swa_full=swa_full)
    kv = shape.n_head_kv[layer]
    return int(cells * kv * (shape.head_dim_k + shape.head_dim_v) * per)


def compute_bytes(shape: ModelShape, n_ctx: int, n_ubatch: int = N_UBATCH,
                  with_output: bool = True, flash_attn: bool = False) -> int:
    """The compute buffer llama.cpp reserves (what a GPU allocates whole).

    Checked against llama.cpp's own figure (``sched_reserve: CPU compute buffer size``, from a
    simulated load with ``no_alloc``): Gemma 3 270M 514.5 MiB at every context (the logits of
    a 262k vocabulary dominate); Llama-3-8B 266.5 MiB up to 2048 and 572 MiB at 8192 without
    flash attention (the attention scores take over), 266.5 MiB with it.
    """
    u = min(n_ubatch, _pad(n_ctx))
    cells = _pad(n_ctx)
    hidden = 4 * u * shape.n_embd
    output = 4 * u * shape.n_vocab + 2 * hidden if with_output else 2 * hidden
    attention = 0 if flash_attn else 4 * u * cells * (max(shape.n_head) + 1) + 5 * hidden
    return max(output, attention)


@dataclass
class DeviceUse:
    kind: str
    index: int
    name: str
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    overhead: int = 0
    layers: int = 0
    repacked_originals: int = 0  # mapped file pages of weights the CPU repacked (see above)
    budget: int = 0  # what may be used of this device (free memory minus headroom)

    @property
    def total(self) -> int:
        return (self.weights + self.kv_cache + self.compute + self.overhead
                + self.repacked_originals)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "name": self.name,
                "weights": self.weights, "kv_cache": self.kv_cache, "compute": self.compute,
                "overhead": self.overhead, "repacked_originals": self.repacked_originals,
                "total": self.total, "layers": self.layers, "budget": self.budget,
                "fits": self.total <= self.budget}


@dataclass
class Placement:
    """Where the model goes: layers per device, and what each device then holds."""

    n_layer: int
    gpu_layers: int
    output_on_gpu: bool
    devices: list[DeviceUse] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(d.total <= d.budget for d in self.devices)

    @property
    def kind(self) -> str:
        """``gpu`` (everything on GPUs), ``partial`` or ``cpu``."""
        if self.gpu_layers == 0:
            return "cpu"
        return "gpu" if self.output_on_gpu and self.gpu_layers == self.n_layer else "partial"

    def to_dict(self) -> dict[str, Any]:
        return {"n_layer": self.n_layer, "gpu_layers": self.gpu_layers,
                "output_on_gpu": self.output_on_gpu, "kind": self.kind, "fits": self.fits,
                "devices": [d.to_dict() for d in self.devices]}


def _cpu_use(shape: ModelShape, n_ctx: int, kv_type: str, cpu_layers: range,
             output_on_cpu: bool, cpu: Device | None) -> DeviceUse:
    use = DeviceUse("cpu", 0, cpu.name if cpu else "cpu")
    use.weights = shape.input_bytes + sum(shape.layer_bytes[i] for i in cpu_layers)
    if output_on_cpu:
        use.weights += shape.output_bytes
    use.repacked_originals = sum(shape.repacked_bytes[i] for i in cpu_layers)
    use.kv_cache = sum(kv_bytes(shape, i, n_ctx, kv_type) for i in cpu_layers)
    # Only the part of the CPU compute buffer a batch touches becomes resident, not the whole
    # reserve (which is sized for 512 rows of logits).
    use.compute = 4 * shape.n_vocab + CPU_COMPUTE_PER_CELL * min(_pad(n_ctx), CPU_COMPUTE_CELLS)
    use.overhead = CPU_RUNTIME + CPU_PER_VOCAB_TOKEN * shape.n_vocab
    use.layers = len(cpu_layers)
    return use


def place(shape: ModelShape, devices: list[Device], n_ctx: int, kv_type: str = "f16",
          headroom: float = 0.10) -> Placement:
    """As many layers on the GPUs as fit (the last ones, as llama.cpp offloads them), the rest
    and the input embedding on the CPU. ``devices`` are :class:`qmgr.fit.hardware.Device`-like
    objects (kind, index, name, memory_total, memory_free)."""
    if kv_type not in KV_TYPES:
        raise QmgrError(f"unknown KV cache type {kv_type!r}: one of {', '.join(KV_TYPES)}",
                        code="bad_request")
    cpu = next((d for d in devices if d.kind == "cpu"), None)
    gpus = [d for d in devices if d.kind in ("cuda", "rocm", "metal")]

    def budget(d: Device) -> int:
        total = d.memory_total or 0
        free = d.memory_free if d.memory_free is not None else total
        # On unified memory only a share of RAM is the GPU's (Metal's working-set limit).
        share = getattr(d, "usable_fraction", None)
        if share:
            free = min(free, int(total * share))
        return max(0, int(free - headroom * total))

    best: Placement | None = None
    # Try from everything offloaded down to nothing: the first that fits is llama.cpp's
    # best placement for this context.
    for n_gpu in range(shape.n_layer if gpus else 0, -1, -1):
        for output_on_gpu in ((True, False) if gpus and n_gpu == shape.n_layer else (False,)):
            p = _placement(shape, cpu, gpus, n_gpu, output_on_gpu, n_ctx, kv_type, budget)
            if p.fits:
                return p
            if best is None:
                best = p
    assert best is not None
    # Nothing fits: report the CPU-only placement (what is missing is clearest there).
    return _placement(shape, cpu, gpus, 0, False, n_ctx, kv_type, budget)


def _placement(shape: ModelShape, cpu: Device | None, gpus: list[Device], n_gpu: int,
               output_on_gpu: bool, n_ctx: int, kv_type: str,
               budget: Callable[[Device], int]) -> Placement:
    first_gpu_layer = shape.n_layer - n_gpu
    p = Placement(shape.n_layer, n_gpu, output_on_gpu)
    cpu_use = _cpu_use(shape, n_ctx, kv_type, range(first_gpu_layer), not output_on_gpu, cpu)
    cpu_use.budget = budget(cpu) if cpu else 0
    p.devices.append(cpu_use)
    if n_gpu:
        # Split the offloaded layers over the GPUs in proportion to their budgets, in order.
        budgets = [budget(g) for g in gpus]
        total_budget = sum(budgets) or 1
        start = first_gpu_layer
        for i, g in enumerate(gpus):
            share = (n_gpu * budgets[i] + total_budget - 1) // total_budget
            end = shape.n_layer if i == len(gpus) - 1 else min(shape.n_layer, start + share)
            use = DeviceUse(g.kind, g.index, g.name, budget=budgets[i])
            use.layers = end - start
            use.weights = sum(shape.layer_bytes[j] for j in range(start, end))
            use.kv_cache = sum(kv_bytes(shape, j, n_ctx, kv_type) for j in range(start, end))
            last = i == len(gpus) - 1
            if last and output_on_gpu:
                use.weights += shape.output_bytes + shape.tied_bytes
            if use.layers or (last and output_on_gpu):
                use.compute = compute_bytes(shape, n_ctx, with_output=last and output_on_gpu)
                use.overhead = CUDA_CONTEXT if g.kind == "cuda" else 0
            p.devices.append(use)
            if getattr(g, "unified_memory", False):
                # Apple silicon: the GPU's memory is the CPU's RAM; what one takes, the other
                # does not have.
                cpu_use.budget = max(0, cpu_use.budget - use.total)
            start = end
    return p
