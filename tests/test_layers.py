"""The layer rule, kept by a test: dependencies run one way (docs/architecture.md).

Every ``import qmgr...`` in the package (at module level or inside a function) is read with
``ast``; a module may import its own package, and packages of a lower layer, never one above
or beside it (feature packages do not import each other). The few edges that break the rule
today are listed in DEBT, each with what removes it: the test fails when a new one appears,
and when a listed one is gone (so the list stays true).
"""

from __future__ import annotations

import ast
from pathlib import Path

QMGR = Path(__file__).resolve().parents[1] / "qmgr"

# Lower number, lower layer. The client (cli, client) stands apart: it may use only the
# bottom layer, and the daemon only through the socket.
LAYERS = {
    "qmgr": 0, "errors": 0, "settings": 0, "refs": 0, "hookspecs": 0, "workerio": 0,
    "gguf": 1, "store": 1, "plugins": 1,
    "catalog": 2, "fit": 2,
    "work": 3,
    "fetch": 4, "quantize": 4, "run": 4, "mirror": 4, "builtin": 4,
    "eval": 5,  # measuring quants builds on running them
    "daemon": 6,
}
# The client side: what each of its packages may import. ``service`` installs the systemd
# units from the client (and asks the daemon through the client whether it came up).
CLIENT = {
    "cli": {"client", "service", "qmgr", "errors", "settings", "plugins"},
    "client": {"qmgr", "errors", "settings"},
    "service": {"client", "qmgr", "errors", "settings"},
}

DEBT = {
    ("builtin", "fetch"): "source plugins use fetch's types: a public plugin module",
    ("builtin", "quantize"): "quantizer plugins use its contract: a public plugin module",
    ("builtin", "run"): "backend plugins use its contract: a public plugin module",
    ("builtin", "eval"): "the backend's scoring uses eval's metrics: a public plugin module",
    ("quantize", "builtin"): "importance matrices hard-wired: a capability a plugin provides",
    ("mirror", "fetch"): "file-name rules (strip_quant_suffix) belong with the references",
    ("cli", "mirror"): "`qmgr mirror serve` runs the mirror in the client's process",
}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qmgr"


def imports() -> set[tuple[str, str, str]]:
    """(importing package, imported package, importing module) across packages."""
    found = set()
    for path in QMGR.rglob("*.py"):
        module = ".".join(path.relative_to(QMGR.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        src = package_of(module)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "qmgr":
                    targets = [f"qmgr.{a.name}" for a in node.names]
                elif node.module.startswith("qmgr."):
                    targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("qmgr.")]
            for target in targets:
                dst = package_of(target)
                if dst in ("__version__", "hookimpl"):
                    dst = "qmgr"
                if dst != src:
                    found.add((src, dst, module))
    return found


def breaks(src: str, dst: str) -> bool:
    if src in CLIENT:
        return dst not in CLIENT[src]
    if dst in CLIENT:
        return True
    return LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] and LAYERS[src] == 4)


def test_every_package_has_a_layer() -> None:
    packages = {package_of(".".join(p.relative_to(QMGR.parent).with_suffix("").parts)
                           .removesuffix(".__init__")) for p in QMGR.rglob("*.py")}
    assert packages <= set(LAYERS) | set(CLIENT), packages - set(LAYERS) - set(CLIENT)


def test_dependencies_run_one_way() -> None:
    edges = imports()
    broken = {(s, d) for s, d, _m in edges if breaks(s, d)}
    new = sorted(broken - set(DEBT))
    assert not new, "imports against the layers: " + ", ".join(
        f"{m} -> {d}" for s, d, m in sorted(edges) if (s, d) in new)
    paid = sorted(set(DEBT) - broken)
    assert not paid, f"no longer imported, remove from DEBT: {paid}"
