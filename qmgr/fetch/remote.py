"""What a source says a registry offers: variants made of files with sizes and digests."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qmgr.gguf.types import LLAMA_FILE_TYPES

# Known quant names, longest first so Q4_K_M wins over Q4_K. Besides llama.cpp's own file
# types: the names uploaders give their mixes, bartowski's ``Q4_K_L`` (Q8_0 embeddings and
# output) and Unsloth's dynamic ``Q4_K_XL`` (written ``UD-Q4_K_XL``, the prefix kept), and the
# ARM repacks ``Q4_0_4_4``...
UPLOADER_QUANTS = {f"Q{n}_K_{s}" for n in range(2, 9) for s in ("L", "XL")} | {
    "Q4_K", "Q5_K", "Q3_K", "IQ4_NL", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8"}
QUANT_NAMES = sorted({*LLAMA_FILE_TYPES.values(), *UPLOADER_QUANTS}, key=len, reverse=True)
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:" + "|".join(re.escape(q) for q in QUANT_NAMES)
    + r"))(?![A-Za-z0-9])",
    re.IGNORECASE,
)
# Vision projectors (llama.cpp's mmproj files, ``mmproj-F16.gguf``): attachments of a model,
# never a quant of it. Importance matrices may be GGUF files too (llama.cpp >= b5900).
PROJECTOR_RE = re.compile(r"(?<![A-Za-z0-9])mmproj(?![A-Za-z])", re.IGNORECASE)
IMATRIX_RE = re.compile(r"imatrix", re.IGNORECASE)
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
QUANT_SUFFIX_RE = re.compile(
    r"[-._](?:u?[fF](?:16|32)|[bB][fF]16|I?Q\d[A-Za-z0-9_]*|TQ\d_\d|MXFP4)$", re.IGNORECASE
)


def strip_quant_suffix(stem: str) -> str:
    """``tiny-Q8_0`` -> ``tiny``: the model's name without the quant it comes in."""
    return QUANT_SUFFIX_RE.sub("", stem) or stem


def quant_from_name(name: str) -> str | None:
    """The quant type a file name announces (``Llama-3-8B-Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    base = name.rsplit("/", 1)[-1]
    found = _QUANT_RE.findall(base.removesuffix(".gguf"))
    if not found:
        return None
    wanted = found[-1].upper()
    prefix = "UD-" if wanted.startswith("UD-") else ""
    bare = wanted.removeprefix("UD-")
    return prefix + next((q for q in QUANT_NAMES if q.upper() == bare), bare)


def file_kind(path: str) -> str:
    """What a repository file is to qmgr: ``model`` (a GGUF of the model's weights),
    ``projector`` (a vision projector GGUF), or ``extra`` (anything else: README, template,
    imatrix, images...)."""
    base = path.rsplit("/", 1)[-1]
    if not base.lower().endswith(".gguf"):
        return "extra"
    if PROJECTOR_RE.search(base):
        return "projector"
    if IMATRIX_RE.search(base):
        return "extra"
    return "model"


@dataclass
class RemoteFile:
    """One file to fetch. ``headers`` (auth) go to the URL's own host only."""

    name: str
    url: str
    size: int | None = None
    sha256: str | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    # Plain http allowed for this file: its source was configured by the user to speak http
    # (a mirror on the local network), as opposed to a redirect or a registry's whim.
    allow_http: bool = False


@dataclass
class RemoteVariant:
    quant: str | None
    files: list[RemoteFile]
    source_ref: str  # canonical reference of this very variant
    model_name: str  # the catalog name a pull gives it
    # Files pulled with the variant and recorded beside it (a vision projector), by kind.
    attachments: list[tuple[str, RemoteFile]] = field(default_factory=list)

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant": self.quant,
            "size": self.size,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
            "sha256": self.files[0].sha256 if self.files else None,
            "source_ref": self.source_ref,
            "model": self.model_name,
            "attachments": [{"kind": kind, "name": f.name, "size": f.size, "sha256": f.sha256}
                            for kind, f in self.attachments],
        }


@dataclass
class Listing:
    """All a source found for a reference: the variants, and what else the repository holds.

    ``projectors`` are vision projectors (each variant carries the one it is pulled with);
    ``extras`` are files that are not model weights (never fetched); ``skipped`` are entries
    left out, each with why: odd but harmless ones, and refused ones (a path that climbs out,
    a digest that is not one), which fail a pull only when they are what was asked for.
    """

    variants: list[RemoteVariant]
    projectors: list[RemoteFile] = field(default_factory=list)
    extras: list[RemoteFile] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variants": [v.to_dict() for v in self.variants],
            "projectors": [{"name": f.name, "size": f.size, "sha256": f.sha256}
                           for f in self.projectors],
            "extras": [{"name": f.name, "size": f.size} for f in self.extras],
            "skipped": [{"name": s.name, "why": s.why, "refused": s.refused}
                        for s in self.skipped],
        }


@dataclass
class Skipped:
    name: str
    why: str
    refused: bool = False  # dangerous, not just odd: a clear error if it is what was wanted
    quant: str | None = None  # the quant its name announces, to say so when it is wanted


def group_gguf_files(files: list[RemoteFile]) -> dict[str, list[RemoteFile]]:
    """GGUF files grouped into variants: shards ``-0000N-of-0000M`` of one stem together, in
    order; an incomplete shard set is left out."""
    groups: dict[str, list[RemoteFile]] = {}
    numbers: dict[str, list[tuple[int, int]]] = {}
    for f in files:
        if not f.name.endswith(".gguf"):
            continue
        m = SHARD_RE.match(f.name)
        key = m.group("stem") if m else f.name
        if m:
            numbers.setdefault(key, []).append((int(m.group("no")), int(m.group("count"))))
        groups.setdefault(key, []).append(f)
    out = {}
    for key, group in groups.items():
        group.sort(key=lambda f: f.name)
        if key in numbers:
            counts = {c for _, c in numbers[key]}
            # Complete only if every shard agrees on the count and 1..count are all there.
            if len(counts) != 1 or sorted(n for n, _ in numbers[key]) != list(
                    range(1, counts.pop() + 1)):
                continue
        out[key] = group
    return out


def model_name_from(text: str) -> str:
    """A catalog model name from a repository or model name (``Meta-Llama-3-8B-GGUF`` ->
    ``meta-llama-3-8b``)."""
    name = re.sub(r"[-_.]gguf$", "", text.strip(), flags=re.IGNORECASE)
    name = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return name[:128] or "model"


# llama.cpp's own projector files come in F16 (the usual, what `llama-server -hf` takes),
# BF16 and F32; quantized ones lose vision quality for little memory.
PROJECTOR_PREFERENCE = ("F16", "BF16", "F32", "Q8_0")


def preferred_projector(projectors: list[RemoteFile]) -> RemoteFile | None:
    """The projector a model is pulled with: F16 if there is one, else the next best."""
    def rank(f: RemoteFile) -> tuple[int, int]:
        quant = quant_from_name(f.name)
        order = (PROJECTOR_PREFERENCE.index(quant) if quant in PROJECTOR_PREFERENCE
                 else len(PROJECTOR_PREFERENCE))
        return order, f.size or 0

    return min(projectors, key=rank) if projectors else None
