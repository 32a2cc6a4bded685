"""Docs that are generated must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current() -> None:
    env = {"QMGR_PLUGINS": "", "PATH": "/usr/bin:/bin"}
    generated = subprocess.run([sys.executable, str(ROOT / "docs" / "cli_reference.py")],
                               capture_output=True, text=True, env=env, check=True).stdout
    assert "## `qmgr`" in generated and "### `qmgr import`" in generated
    current = (ROOT / "docs" / "cli.md").read_text()
    assert current == generated, (
        "docs/cli.md is out of date: run `python docs/cli_reference.py > docs/cli.md`"
    )
