"""Every hook a qmgr plugin can implement.

Hooks receive a ``register`` callback (the style of simonw/llm) instead of returning lists, so
a plugin can register any number of objects, and the core registers its own built-ins the same
way. docs/plugins.md documents each hook; tests/test_plugins.py fails when one is missing there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from qmgr.fit.hardware import Probe
    from qmgr.plugin.backend import Backend
    from qmgr.plugin.quantizer import Quantizer
    from qmgr.plugin.source import Source

hookspec = pluggy.HookspecMarker("qmgr")


@hookspec
def register_sources(register: Callable[[Source], None]) -> None:
    """Register sources: objects that parse references they own and fetch GGUF files."""


@hookspec
def register_quantizers(register: Callable[[Quantizer], None]) -> None:
    """Register quantizers: objects that turn one variant into another quant type."""


@hookspec
def register_probes(register: Callable[[Probe], None]) -> None:
    """Register hardware probes: objects that report devices and their memory."""


@hookspec
def register_backends(register: Callable[[Backend], None]) -> None:
    """Register runtime backends: objects that load a variant and generate text."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``qmgr`` click group (``cli`` is the group)."""
