"""qmgr: a local model manager for quantized LLMs.

Plugin authors import :data:`hookimpl` from here::

    from qmgr import hookimpl

    @hookimpl
    def register_sources(register):
        register(MySource())
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers only: at run time __getattr__ below imports pluggy lazily
    import pluggy

    hookimpl: pluggy.HookimplMarker

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # pluggy (and typing) cost ~50 ms to import; the client's start-up path must not pay for it.
    if name == "hookimpl":
        import pluggy

        return pluggy.HookimplMarker("qmgr")
    raise AttributeError(f"module 'qmgr' has no attribute {name!r}")
