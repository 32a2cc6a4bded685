"""Every ``QMGR_*`` variable has one source of truth: ``settings.KNOBS``, read with
``settings.knob()``, documented in docs/operations.md.

The source is read with ``ast``: no module but qmgr/settings.py reads a ``QMGR_*`` variable
out of an environment mapping itself, every ``QMGR_*`` name the code or the docs mention is
declared, and every declared one is in the operations guide's tables.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import Env

from qmgr.errors import QmgrError
from qmgr.settings import KNOBS, knob

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bQMGR_[A-Z][A-Z0-9_]*[A-Z0-9]\b")
OPERATIONS = ROOT / "docs" / "operations.md"


def sources() -> list[Path]:
    return sorted((ROOT / "qmgr").rglob("*.py"))


def test_no_module_but_settings_reads_a_qmgr_variable() -> None:
    direct = []
    for path in sources():
        if path.name == "settings.py" and path.parent.name == "qmgr":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            key = None
            # env.get("QMGR_X"...) / os.environ.get(...) / os.getenv(...)
            if isinstance(node, ast.Call) and node.args and isinstance(
                    node.func, ast.Attribute | ast.Name):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                if func in ("get", "getenv", "pop") and isinstance(node.args[0], ast.Constant):
                    key = node.args[0].value
            # env["QMGR_X"], read (an assignment that forwards a value is not a read)
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and \
                    isinstance(node.slice, ast.Constant):
                key = node.slice.value
            if isinstance(key, str) and key.startswith("QMGR_"):
                direct.append(f"{path.relative_to(ROOT)}:{node.lineno} {key}")
    # The client's forwarded environment is a request field, not this process's setting.
    allowed = {"qmgr/work/access.py QMGR_HOME"}
    found = [d for d in direct if " ".join((d.split(":")[0], d.split()[-1])) not in allowed]
    assert not found, f"read without settings.knob(): {found}"


def test_every_variable_mentioned_is_declared() -> None:
    texts = {p: p.read_text() for p in [*sources(), *sorted((ROOT / "docs").glob("*.md")),
                                          ROOT / "README.md", *sorted(
                                              (ROOT / "systemd").glob("*"))] if p.is_file()}
    unknown = {f"{p.relative_to(ROOT)}: {n}" for p, t in texts.items() for n in NAME.findall(t)
               if n not in KNOBS}
    assert not unknown, sorted(unknown)


def test_every_declared_variable_is_in_the_operations_guide() -> None:
    rows = set(re.findall(r"^\| `(QMGR_[A-Z0-9_]+)` \|", OPERATIONS.read_text(), re.M))
    keys = set(re.findall(r"^\*\*`\w+`\*\* \(`(QMGR_[A-Z0-9_]+)`", OPERATIONS.read_text(),
                          re.M))
    missing = set(KNOBS) - rows - keys
    assert not missing, f"docs/operations.md does not describe {sorted(missing)}"


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("QMGR_RETRIES", None, 5), ("QMGR_RETRIES", "", 5), ("QMGR_RETRIES", " 7 ", 7),
    ("QMGR_MIN_SPEED", "2048", 2048.0), ("QMGR_DIRECT_IO", "off", False),
    ("QMGR_DIRECT_IO", "YES", True), ("QMGR_PLUGINS", None, None), ("QMGR_PLUGINS", "", []),
    ("QMGR_PLUGINS", "a, b,,", ["a", "b"]), ("QMGR_CA_BUNDLE", "/etc/ca.pem", "/etc/ca.pem"),
])
def test_values_parse_as_declared(name: str, raw: str | None, value: object) -> None:
    assert knob(name, {} if raw is None else {name: raw}) == value


@pytest.mark.parametrize(("name", "raw"), [
    ("QMGR_RETRIES", "many"), ("QMGR_BUSY_WAIT", "nan"), ("QMGR_KEEP_ALIVE", "inf"),
    ("QMGR_WARM_WORKERS", "maybe"),
])
def test_a_bad_value_is_an_error_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(QmgrError) as e:
        knob(name, {name: raw})
    assert e.value.code == "bad_config"
    assert e.value.message.startswith(f"{name}={raw!r}: ")


def test_the_client_says_which_variable_is_wrong(qenv: Env) -> None:
    qenv.env["QMGR_NO_AUTOSTART"] = "perhaps"
    r = qenv.qmgr("list", check=False)
    assert r.returncode == 1, r
    assert "QMGR_NO_AUTOSTART='perhaps'" in r.stderr and "Traceback" not in r.stderr
