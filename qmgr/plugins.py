"""The plugin manager: built-in plugins, entry-point plugins, and the switches between them.

Built-in behaviour is itself a list of plugin modules (:data:`DEFAULT_PLUGINS`): the core has no
back door a third party could not use. Third-party plugins are distributions with an entry point
in the ``qmgr`` group. Loading is guarded: a plugin that fails to import, declares an unknown
hook, or raises inside a hook is recorded in :attr:`PluginSet.errors` and skipped.

Switches (environment):

- ``QMGR_PLUGINS``: comma-separated entry-point plugin names to load; set but empty loads none
  (the test suite does this so whatever happens to be installed stays out).
- ``QMGR_DISABLE_PLUGINS``: comma-separated plugin names never to load, built-ins included.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import traceback
from collections.abc import Callable
from typing import Any

import pluggy

import qmgr
from qmgr import hookspecs

log = logging.getLogger(__name__)

DEFAULT_PLUGINS = (
    "qmgr.builtin.cpu_probe",
)

ENTRY_POINT_GROUP = "qmgr"


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

    def __init__(self, env: dict[str, str] | None = None, load_entry_points: bool = True):
        env = dict(os.environ) if env is None else env
        self.pm = pluggy.PluginManager("qmgr")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.allowed = _split(env.get("QMGR_PLUGINS"))
        self.disabled = _split(env.get("QMGR_DISABLE_PLUGINS")) or set()
        for module_name in DEFAULT_PLUGINS:
            name = module_name.rsplit(".", 1)[-1]
            if name not in self.disabled:
                self._load(name, qmgr.__version__, True, lambda m=module_name: importlib.import_module(m))
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.disabled or (self.allowed is not None and ep.name not in self.allowed):
                continue
            version = ep.dist.version if ep.dist is not None else "?"
            self._load(ep.name, version, False, ep.load)

    def _load(self, name: str, version: str, builtin: bool, load: Callable[[], Any]) -> None:
        info = self.info.setdefault(name, PluginInfo(name, version, builtin))
        try:
            plugin = load()
            self.pm.register(plugin, name=name)
        except Exception as e:  # a broken plugin must never take the daemon down
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
        info.hooks = sorted(
            impl.function.__name__
            for hook in self.pm.get_hookcallers(plugin) or []
            for impl in hook.get_hookimpls()
            if impl.plugin is plugin
        )

    def register(self, plugin: Any, name: str, version: str = "test") -> None:
        """Register an in-process plugin object (tests use this; unregister in ``finally``)."""
        self._load(name, version, False, lambda: plugin)

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.info.pop(name, None)

    def collect(self, hook_name: str) -> list[Any]:
        """Call ``hook_name(register)`` on every plugin, one at a time, and gather what each
        registers. A plugin that raises is recorded and contributes nothing."""
        collected: list[Any] = []
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            name = self.pm.get_name(impl.plugin) or "?"
            mine: list[Any] = []
            try:
                impl.function(register=mine.append)
            except Exception as e:
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
        return [info.to_dict() for info in sorted(self.info.values(), key=lambda i: i.name)]
