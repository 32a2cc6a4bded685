"""Short names for popular model families, and the user's own (``qmgr alias add``).

Each built-in name points at a public GGUF repository that offers the usual quant ladder
(Q2_K ... Q8_0, mostly with IQ quants too). A user alias of the same name wins.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from qmgr.catalog.models import Alias
from qmgr.errors import NotFound
from qmgr.refs import Reference, parse

BUILTIN_ALIASES: dict[str, str] = {
    "llama3": "hf.co/bartowski/Meta-Llama-3-8B-Instruct-GGUF",
    "llama3.1": "hf.co/bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
    "llama3.2": "hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF",
    "llama3.2-1b": "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF",
    "qwen2.5": "hf.co/bartowski/Qwen2.5-7B-Instruct-GGUF",
    "qwen2.5-coder": "hf.co/bartowski/Qwen2.5-Coder-7B-Instruct-GGUF",
    "qwen3": "hf.co/unsloth/Qwen3-8B-GGUF",
    "gemma3": "hf.co/unsloth/gemma-3-4b-it-GGUF",
    "gemma3-270m": "hf.co/unsloth/gemma-3-270m-it-GGUF",
    "mistral": "hf.co/bartowski/Mistral-7B-Instruct-v0.3-GGUF",
    "phi3": "hf.co/bartowski/Phi-3.5-mini-instruct-GGUF",
    "phi4": "hf.co/bartowski/phi-4-GGUF",
    "deepseek-r1": "hf.co/bartowski/DeepSeek-R1-Distill-Qwen-7B-GGUF",
    "deepseek-r1-llama": "hf.co/bartowski/DeepSeek-R1-Distill-Llama-8B-GGUF",
}


def lookup(session: Session, name: str) -> str | None:
    user = session.scalar(select(Alias).where(Alias.name == name))
    return user.reference if user else BUILTIN_ALIASES.get(name)


def expand(session: Session, ref: Reference) -> Reference:
    """An alias reference turned into what it stands for (the quant carried over)."""
    if ref.kind != "alias":
        return ref
    target = lookup(session, ref.name)
    if target is None:
        raise NotFound(f"unknown model name {ref.name!r}: see `qmgr alias list`, or name a "
                       "repository (hf.co/OWNER/REPO, ollama://MODEL, https://.../FILE.gguf)")
    expanded = parse(target)
    if expanded.kind == "alias":
        raise NotFound(f"alias {ref.name!r} points at another alias ({target!r})")
    if ref.quant:
        if expanded.kind == "hf" and not expanded.file:
            expanded = Reference("hf", target, expanded.name, quant=ref.quant)
        elif expanded.kind == "ollama":
            expanded = Reference("ollama", target, expanded.name, quant=ref.quant,
                                 host=expanded.host)
    return expanded


def all_aliases(session: Session) -> list[dict[str, str | bool]]:
    users = {a.name: a.reference for a in session.scalars(select(Alias))}
    names = sorted({*BUILTIN_ALIASES, *users})
    return [{"name": n, "reference": users.get(n) or BUILTIN_ALIASES[n], "builtin": n not in users}
            for n in names]
