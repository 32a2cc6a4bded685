"""What the user is told when an engine's process dies of a signal.

Native engines run in runner and eval worker processes, never in the daemon, so a crash costs
that process only; the daemon turns its exit status into an error with the stable code
``backend_crashed``. The usual cause on a virtual machine: llama.cpp built natively for a CPU
that advertises instructions its hypervisor does not run (AMX): SIGILL, or SIGSEGV in an
AMX kernel, at the first model load or token.
"""

from __future__ import annotations

import signal

from qmgr.errors import QmgrError

CODE = "backend_crashed"

# Signals a build for the wrong CPU dies of: an illegal instruction, or a kernel that faults.
WRONG_CPU = frozenset({signal.SIGILL, signal.SIGSEGV, signal.SIGBUS})


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def crash_error(backend: str, returncode: int, doing: str) -> QmgrError:
    """The error for an engine process that ended with ``returncode`` (negative: killed by
    that signal) while ``doing`` ("loading gemma:Q4_K_M")."""
    number = -returncode
    message = f"{backend} was killed by {signal_name(number)} (signal {number}) while {doing}."
    if number in WRONG_CPU:
        package = "llama-cpp-python" if backend == "llama.cpp" else backend
        message += (f" This usually means {package} was built for instructions this CPU "
                    "cannot run (e.g. AMX under a hypervisor): rebuild it portably, see "
                    "'Portable build' in the README (README.md#portable-build).")
    elif number == signal.SIGKILL:
        message += (" The kernel's out-of-memory killer stops processes so: a smaller quant "
                    "or --ctx may fit (see `qmgr fit`).")
    elif number == signal.SIGABRT:
        message += f" {backend} stops so on a failed internal check: see the daemon log."
    else:
        message += " See the daemon log."
    return QmgrError(message, code=CODE)
