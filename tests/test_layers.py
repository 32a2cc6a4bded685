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
    "qmgr": 0, "errors": 0, "settings": 0, "refs": 0, "workerio": 0,
    "gguf": 1, "store": 1,
    "catalog": 2, "fit": 2,
    "plugin": 3, "plugins": 3,  # the public plugin surface, and the loaded plugins
    "work": 4,
    "fetch": 5, "quantize": 5, "run": 5, "mirror": 5, "builtin": 5,
    "fleet": 5,  # nodes, peers' blobs, routing: over the catalog and the jobs
    "eval": 6,  # measuring quants builds on running them
    "serve": 6,  # serving other programs builds on running (and, to come, pulling)
    "daemon": 7,
}
FEATURES = 5  # packages of this layer do not import each other
# The built-in plugins are written as a third party's would be: qmgr's public plugin module
# (and ``from qmgr import hookimpl``) is all of qmgr they use.
BUILTIN = {"plugin", "qmgr"}
# The client side: what each of its packages may import. ``service`` installs the systemd
# units from the client (and asks the daemon through the client whether it came up).
CLIENT = {
    "cli": {"client", "service", "qmgr", "errors", "settings", "plugins"},
    "client": {"qmgr", "errors", "settings"},
    "service": {"client", "qmgr", "errors", "settings"},
}

DEBT: dict[tuple[str, str], str] = {}


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
    if src == "builtin":
        return dst not in BUILTIN
    return LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] == FEATURES)


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


def test_the_public_plugin_module_exports_what_it_says() -> None:
    """Every name of ``qmgr.plugin`` resolves, and ``__all__`` is what the lazy table serves."""
    import qmgr.plugin as public

    assert set(public.__all__) == {"hookimpl", *public._EXPORTS}
    for name in public.__all__:
        assert getattr(public, name) is not None, name
