"""Files that are not what they seem: a FIFO, device or symlink where a model was, refused
at once, never read blocking; names from headers never reach a terminal raw."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from conftest import Env
from ggufmake import make_tiny_gguf

from qmgr.errors import QmgrError
from qmgr.store import hash_file, identity

pytestmark = pytest.mark.reliability  # the reliability suite: docs/operations.md


def test_hashing_refuses_a_fifo_swapped_in_without_blocking(tmp_path: Path) -> None:
    model = make_tiny_gguf(tmp_path / "m.gguf")
    seen = identity(model)
    model.unlink()
    os.mkfifo(model)  # nobody ever writes to it: a blocking open would hang forever
    result: list[BaseException] = []

    def attempt() -> None:
        try:
            hash_file(model, same_as=seen)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "hashing a FIFO blocked"
    assert isinstance(result[0], QmgrError) and "not a regular file" in result[0].message


def test_hashing_refuses_a_symlink_or_another_file_swapped_in(tmp_path: Path) -> None:
    model = make_tiny_gguf(tmp_path / "m.gguf")
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    seen = identity(model)
    model.unlink()
    model.symlink_to(secret)
    with pytest.raises(QmgrError, match="symbolic link"):
        hash_file(model, same_as=seen)
    model.unlink()
    make_tiny_gguf(model, seed=3)  # a new file at the same path: another inode
    with pytest.raises(QmgrError, match="replaced"):
        hash_file(model, same_as=seen)


def test_a_symlink_the_user_imports_is_followed(daemon: Env, tmp_path: Path) -> None:
    real = make_tiny_gguf(tmp_path / "real-Q8_0.gguf", ftype="Q8_0")
    link = tmp_path / "link-Q8_0.gguf"
    link.symlink_to(real)
    assert daemon.qmgr("import", str(link)).returncode == 0


def test_importing_a_fifo_or_device_is_refused_at_once(daemon: Env, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        r = daemon.qmgr("import", str(path), check=False, timeout=30)
        assert r.returncode == 1 and "not a regular file" in r.stderr, r.stderr
    assert daemon.json("list") == []


def test_escape_sequences_in_header_names_never_reach_the_terminal(daemon: Env,
                                                                    tmp_path: Path) -> None:
    evil = "\x1b]0;owned\x07\x1b[2Jtiny"
    model = make_tiny_gguf(tmp_path / "evil-Q8_0.gguf", ftype="Q8_0",
                           extra_kv={"general.name": evil})
    daemon.qmgr("import", str(model))
    ref = daemon.json("list")[0]["ref"]
    shown = daemon.qmgr("show", ref)
    assert "\x1b" not in shown.stdout + shown.stderr and "\x07" not in shown.stdout
    assert "\\x1b]0;owned" in shown.stdout
    # JSON keeps the bytes as they are (escaped by JSON itself): programs see the truth.
    assert daemon.json("show", ref)["facts"]["name"] == evil
