"""Short names for popular model families (:data:`qmgr.refs.BUILTIN_ALIASES`), and the
user's own (``qmgr alias add``). A user alias of the same name wins. A user alias may also
point at a cataloged variant (``qmgr alias add mine llama3:Q4_K_M``).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from qmgr.catalog.models import Alias
from qmgr.catalog.queries import alias_target, locked_or_created, resolve_one
from qmgr.errors import NotFound, QmgrError
from qmgr.refs import BUILTIN_ALIASES, Reference, parse

lookup = alias_target  # what a short name stands for


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
        return expanded  # a cataloged variant (`qmgr alias add mine llama3:Q4_K_M`)
    if ref.quant:
        if expanded.kind == "hf" and not expanded.file:
            expanded = Reference("hf", target, expanded.name, quant=ref.quant)
        elif expanded.kind == "ollama":
            expanded = Reference("ollama", target, expanded.name, quant=ref.quant,
                                 host=expanded.host)
        elif expanded.kind not in ("hf", "url"):  # a source plugin's own scheme
            expanded = Reference(expanded.kind, target, expanded.name, quant=ref.quant)
    return expanded


def all_aliases(session: Session) -> list[dict[str, str | bool]]:
    users = {a.name: a.reference for a in session.scalars(select(Alias))}
    names = sorted({*BUILTIN_ALIASES, *users})
    return [{"name": n, "reference": users.get(n) or BUILTIN_ALIASES[n], "builtin": n not in users}
            for n in names]


def set_alias(session: Session, name: str, target: str) -> dict[str, str]:
    """Add or replace the user alias ``name``, a plain name. A target that is not a
    repository is a cataloged variant (llama3:Q4_K_M), kept by its catalog name."""
    typed = parse(name)
    if typed.kind != "alias" or typed.quant:
        raise QmgrError(f"alias name {name!r} must be a plain name (no ':' or '/')",
                        code="bad_name")
    if parse(target).kind == "alias":
        found = resolve_one(session, target)
        target = f"{found.model.name}:{found.tag}"
        if target.partition(":")[0] == typed.name:
            raise QmgrError(f"{name!r} is that model's own name already", code="bad_name")
    alias, _ = locked_or_created(session, select(Alias).where(Alias.name == typed.name),
                                 lambda: Alias(name=typed.name, reference=target))
    alias.reference = target
    return {"name": typed.name, "reference": target}


def remove_alias(session: Session, name: str) -> None:
    alias = session.scalar(select(Alias).where(Alias.name == name).with_for_update())
    if alias is None:
        raise NotFound(f"no user alias {name!r} (built-in names cannot be removed)")
    session.delete(alias)
