"""Error codes have one source of truth: ``qmgr.errors.CODES`` (code -> HTTP status, meaning).

The source is read with ``ast``: every code qmgr (or the sample plugin) raises is declared,
every declared one is raised somewhere, no call site or error class sets an HTTP status of its
own, and docs/errors.md is the same table.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from qmgr.errors import CODES, NotFound, QmgrError, status_of
from qmgr.plugins import MISSING_CODES

ROOT = Path(__file__).resolve().parents[1]


def sources() -> list[Path]:
    return sorted([*(ROOT / "qmgr").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])


def constants(node: ast.expr) -> list[str]:
    """The string constants a ``code=`` value can be (``a if x else b`` gives both)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return constants(node.body) + constants(node.orelse)
    return []


def used_codes() -> dict[str, list[str]]:
    """code -> where it is raised (``code="..."`` arguments, ``code = "..."`` in classes,
    ``CODE = "..."`` constants)."""
    used: dict[str, list[str]] = {}
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            found: list[str] = []
            if isinstance(node, ast.Call):
                found = [c for k in node.keywords if k.arg == "code" for c in constants(k.value)]
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name.endswith("error_response") and node.args:  # (code, message, status)
                    found += constants(node.args[0])
            elif isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and (t.id == "CODE" or t.id.endswith("_CODE"))
                    for t in node.targets):  # a module's own constant (run/crash.py: CODE)
                found = constants(node.value)
            elif isinstance(node, ast.ClassDef):
                found = [c for stmt in node.body if isinstance(stmt, ast.Assign)
                         and any(isinstance(t, ast.Name) and t.id == "code"
                                 for t in stmt.targets) for c in constants(stmt.value)]
            for code in found:
                used.setdefault(code, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    for code in MISSING_CODES.values():
        used.setdefault(code, []).append("qmgr/plugins.py MISSING_CODES")
    return used


def test_every_code_raised_is_declared() -> None:
    unknown = {code: where for code, where in used_codes().items() if code not in CODES}
    assert not unknown, f"codes not in qmgr.errors.CODES: {unknown}"


def test_every_declared_code_is_raised_somewhere() -> None:
    unused = set(CODES) - set(used_codes()) - {"error"}  # "error": QmgrError's own default
    assert not unused, f"declared but never raised: {sorted(unused)}"


def test_no_status_but_the_registry() -> None:
    """A status is the code's: no call passes ``http_status=``, no class sets one."""
    own = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(k.arg == "http_status" for k in node.keywords):
                own.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(s, ast.Assign) and any(isinstance(t, ast.Name)
                                                      and t.id == "http_status"
                                                      for t in s.targets) for s in node.body):
                own.append(f"{path.relative_to(ROOT)}:{node.lineno} class {node.name}")
    assert not own, f"HTTP statuses set outside qmgr.errors.CODES: {own}"


def test_the_docs_table_is_the_registry() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| (.+) \|$",
                      (ROOT / "docs" / "errors.md").read_text(), re.M)
    assert [(c, int(s), m) for c, s, m in rows] == [(c, s, m) for c, (s, m) in CODES.items()]


@pytest.mark.parametrize("code", ["not_found", "no_space", "does_not_fit", "registry_busy"])
def test_a_code_brings_its_status(code: str) -> None:
    assert QmgrError("x", code=code).http_status == status_of(code) == CODES[code][0]


def test_classes_take_their_status_from_their_code() -> None:
    from qmgr.plugin import FetchError, QuantizeError, Refusal

    assert NotFound("x").http_status == 404
    assert FetchError("x").http_status == CODES["fetch_failed"][0]
    assert QuantizeError("x", code="bad_target").http_status == 400
    assert Refusal("x", "no_chat_template").http_status == 409
    # A code from a newer daemon, unknown here, is still an error the client can show.
    assert QmgrError("x", code="from_the_future").http_status == 400
