"""The plugin manager: built-in plugins, entry-point plugins, and the switches between them.

Built-in behaviour is itself a list of plugin modules (:data:`DEFAULT_PLUGINS`): the core has no
back door a third party could not use. Third-party plugins are distributions with an entry point
in the ``qmgr`` group. Loading is guarded: a plugin that fails to import, declares an unknown
hook, or raises inside a hook is recorded in its :class:`PluginInfo` ``errors`` and skipped.

What plugins register (sources, quantizers, probes, backends) is collected once per hook, on
first use: :meth:`PluginSet.registered`. :meth:`PluginSet.describe` collects every kind first,
so ``qmgr plugins`` also reports a plugin that raises while registering.

Switches (environment):

- ``QMGR_PLUGINS``: comma-separated entry-point plugin names to load; set but empty loads none
  (the test suite does this so whatever happens to be installed stays out).
- ``QMGR_DISABLE_PLUGINS``: comma-separated plugin names never to load, built-ins included.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pluggy

import qmgr
from qmgr import hookspecs
from qmgr.errors import QmgrError

log = logging.getLogger(__name__)

DEFAULT_PLUGINS = (
    "qmgr.builtin.cpu_probe",
    "qmgr.builtin.nvidia_probe",
    "qmgr.builtin.amd_probe",
    "qmgr.builtin.apple_probe",
    "qmgr.builtin.numpy_quantizer",
    "qmgr.builtin.llama_quantizer",
    "qmgr.builtin.llama_backend",
    "qmgr.builtin.hf_source",
    "qmgr.builtin.ollama_source",
    "qmgr.builtin.url_source",
)

ENTRY_POINT_GROUP = "qmgr"
# Plugins that add `qmgr` commands name their module in this group too: the client loads only
# these (importing every plugin, with the numpy or torch it brings, would make `qmgr --help`
# slow).
COMMANDS_GROUP = "qmgr.commands"

# Hooks whose only argument is ``register``: what they register is collected and kept.
REGISTER_HOOKS = ("register_sources", "register_quantizers", "register_probes",
                  "register_backends")


class PluginNotFound(QmgrError):
    http_status = 404


@dataclasses.dataclass
class PluginInfo:
    name: str
    version: str
    builtin: bool
    hooks: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _split(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


class PluginSet:
    """Loaded plugins and what they registered."""

    def __init__(self, env: dict[str, str] | None = None, load_entry_points: bool = True,
                 load_builtins: bool | Callable[[str], bool] = True,
                 group: str = ENTRY_POINT_GROUP):
        self.group = group
        env = dict(os.environ) if env is None else env
        self.pm = pluggy.PluginManager("qmgr")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.registries: dict[str, list[Any]] = {}
        # Request handlers run in a thread pool: collect each hook once, not once per thread.
        self.lock = threading.RLock()
        self.allowed = _split(env.get("QMGR_PLUGINS"))
        self.disabled = _split(env.get("QMGR_DISABLE_PLUGINS")) or set()
        # load_builtins may be a filter on module names: a worker that needs only quantizers
        # does not pay for importing the sources' HTTP stack.
        wanted = load_builtins if callable(load_builtins) else (lambda m: bool(load_builtins))
        for module_name in (m for m in DEFAULT_PLUGINS if wanted(m)):
            name = module_name.rsplit(".", 1)[-1]
            if name not in self.disabled:
                self._load(name, qmgr.__version__, True,
                           functools.partial(importlib.import_module, module_name))
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            if ep.name in self.disabled or (
                self.allowed is not None and ep.name not in self.allowed
            ):
                continue
            version = ep.dist.version if ep.dist is not None else "?"
            self._load(ep.name, version, False, ep.load)

    def _load(self, name: str, version: str, builtin: bool, load: Callable[[], Any]) -> None:
        info = self.info.setdefault(name, PluginInfo(name, version, builtin))
        try:
            plugin = load()
            self.pm.register(plugin, name=name)
        # A broken plugin must never take the daemon down, not even by calling sys.exit().
        except (Exception, SystemExit) as e:
            info.errors.append(f"failed to load: {type(e).__name__}: {e}")
            log.warning("plugin %s failed to load: %s", name, e)
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            self.pm.unregister(name=name)
            info.errors.append(f"invalid: {e}")
            log.warning("plugin %s is invalid: %s", name, e)
            return
        # Hook names, not function names: a hookimpl may be named otherwise (``specname``).
        info.hooks = sorted(hook.name for hook in self.pm.get_hookcallers(plugin) or [])
        self.registries.clear()

    def register(self, plugin: Any, name: str, version: str = "test") -> None:
        """Register an in-process plugin object (tests use this; unregister in ``finally``)."""
        self._load(name, version, False, lambda: plugin)

    def unregister(self, name: str) -> None:
        """Remove a plugin, loaded or not (safe in ``finally`` after a failed register)."""
        self.pm.unregister(name=name)
        self.info.pop(name, None)
        self.registries.clear()

    def registered(self, hook_name: str) -> list[Any]:
        """What every plugin registered through ``hook_name`` (collected on first use)."""
        with self.lock:
            if hook_name not in self.registries:
                self.registries[hook_name] = self.collect(hook_name)
            return self.registries[hook_name]

    def find(self, hook_name: str, name: str, what: str) -> Any:
        """The object a plugin registered through ``hook_name`` under ``name`` (``what``: a
        quantizer, a backend... for the error, which lists what is installed)."""
        found = self.registered(hook_name)
        for obj in found:
            if getattr(obj, "name", None) == name:
                return obj
        names = ", ".join(sorted(str(getattr(o, "name", "?")) for o in found)) or "none"
        raise PluginNotFound(f"no {what} named {name!r} (installed: {names})",
                             code=f"no_{what}")

    def collect(self, hook_name: str) -> list[Any]:
        """Call ``hook_name(register)`` on every plugin, one at a time, and gather what each
        registers. A plugin that raises is recorded and contributes nothing."""
        collected: list[Any] = []
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            name = self.pm.get_name(impl.plugin) or "?"
            mine: list[Any] = []
            # pluggy lets an implementation take fewer arguments than the spec names.
            args = {"register": mine.append}
            try:
                impl.function(**{a: args[a] for a in impl.argnames})
            except (Exception, SystemExit) as e:
                detail = traceback.format_exception_only(type(e), e)[-1].strip()
                error = f"{hook_name} raised {detail}"
                errors = self.info[name].errors if name in self.info else []
                if error not in errors:
                    errors.append(error)
                log.warning("plugin %s: %s", name, error)
                continue
            collected.extend(mine)
        return collected

    def describe(self) -> list[dict[str, Any]]:
        # Registering is where a plugin's code first runs: do it now so its errors show here.
        for hook_name in REGISTER_HOOKS:
            self.registered(hook_name)
        return [info.to_dict() for info in sorted(self.info.values(), key=lambda i: i.name)]
