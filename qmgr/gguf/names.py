"""What GGUF file names say: the quant a name announces, shards, projectors, model names.

The naming conventions of llama.cpp and of the uploaders on the Hugging Face Hub, shared by
the sources, the importer and the mirror (standard library only).
"""

from __future__ import annotations

import re

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


def model_name_from(text: str) -> str:
    """A catalog model name from a repository or model name (``Meta-Llama-3-8B-GGUF`` ->
    ``meta-llama-3-8b``)."""
    name = re.sub(r"[-_.]gguf$", "", text.strip(), flags=re.IGNORECASE)
    name = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return name[:128] or "model"
