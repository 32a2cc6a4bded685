"""The plugin manager: built-in plugins, entry-point plugins, and the switches between them.

Built-in behaviour is itself a list of plugin modules (:data:`DEFAULT_PLUGINS`): the core has no
back door a third party could not use. Third-party plugins are distributions with an entry point
in the ``qmgr`` group. Loading is guarded: a plugin that fails to import, declares an unknown
hook, or raises inside a hook is recorded in its :class:`PluginInfo` ``errors`` and skipped.

What plugins register (sources, quantizers, probes, backends) is collected once per hook, on
first use: :meth:`PluginSet.registered`, through pluggy's hook caller, so ``tryfirst``,
``trylast`` and wrappers work as pluggy documents. Each implementation runs guarded: one that
raises is recorded and contributes nothing, and the others still run.
:meth:`PluginSet.describe` collects every kind first, so ``qmgr plugins`` also reports a
plugin that raises while registering.

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
from typing import TYPE_CHECKING, Any, cast

import pluggy

import qmgr
from qmgr.errors import QmgrError
from qmgr.plugin import hookspecs
from qmgr.settings import knob

if TYPE_CHECKING:
    from qmgr.fit.hardware import Probe
    from qmgr.plugin.backend import Backend
    from qmgr.plugin.quantizer import Quantizer
    from qmgr.plugin.source import Source

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

# Hooks whose only argument is ``register``: what they register is collected and kept, and
# the kind of thing each registers (for ``qmgr plugins`` and errors).
REGISTER_HOOKS = {"register_sources": "source", "register_quantizers": "quantizer",
                  "register_probes": "probe", "register_backends": "backend"}


# The error code of a name no plugin registered, per hook.
MISSING_CODES = {"register_sources": "no_source", "register_quantizers": "no_quantizer",
                 "register_probes": "no_probe", "register_backends": "no_backend"}


class PluginNotFound(QmgrError):
    """No plugin registered an object of that name."""


@dataclasses.dataclass
class PluginInfo:
    name: str  # the entry point's name (a built-in's module name)
    version: str  # its distribution's version
    builtin: bool
    # The distribution a user installed it with (``pip install qmgr-sensitive``); ``qmgr``
    # for the built-ins.
    distribution: str = "qmgr"
    hooks: list[str] = dataclasses.field(default_factory=list)
    # What it registered, as ``kind:name`` (``quantizer:sensitive``).
    provides: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        allowed = knob("QMGR_PLUGINS", env)
        self.allowed = None if allowed is None else set(allowed)
        self.disabled = set(knob("QMGR_DISABLE_PLUGINS", env))
        # load_builtins may be a filter on module names: a worker that needs only quantizers
        # does not pay for importing the sources' HTTP stack.
        wanted = load_builtins if callable(load_builtins) else (lambda m: bool(load_builtins))
        # pluggy calls the last registered first: register the built-ins backwards so their
        # objects come in DEFAULT_PLUGINS' order (the CPU probe first), entry points before.
        for module_name in (m for m in reversed(DEFAULT_PLUGINS) if wanted(m)):
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
            dist = ep.dist.name if ep.dist is not None else "?"
            self._load(ep.name, version, False, ep.load, dist)

    def _load(self, name: str, version: str, builtin: bool, load: Callable[[], Any],
              distribution: str = "qmgr") -> None:
        info = self.info.setdefault(name, PluginInfo(name, version, builtin, distribution))
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
        callers = self.pm.get_hookcallers(plugin) or []
        info.hooks = sorted(hook.name for hook in callers)
        for caller in callers:
            if caller.name not in REGISTER_HOOKS:
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                    # pluggy calls impl.function (Final in its type hints only).
                    impl.function = self._guarded(  # type: ignore[misc]
                        info, caller.name, impl.function, impl.argnames)
        self.registries.clear()

    def _guarded(self, info: PluginInfo, hook_name: str, function: Callable[..., Any],
                 argnames: tuple[str, ...]) -> Callable[..., None]:
        """``function`` as pluggy will call it (positional arguments named ``argnames``),
        made safe: what it registers is kept only if it returns; what it raises is recorded
        in ``info``, not passed on to the other plugins' implementations."""
        kind = REGISTER_HOOKS[hook_name]

        def guarded(*args: Any) -> None:
            given = dict(zip(argnames, args, strict=True))
            mine: list[Any] = []
            try:
                function(*(mine.append if a == "register" else given[a] for a in argnames))
            except (Exception, SystemExit) as e:
                self._failed(info, f"{hook_name} raised "
                             + traceback.format_exception_only(type(e), e)[-1].strip())
                return
            for obj in mine:
                info.provides.append(f"{kind}:{getattr(obj, 'name', type(obj).__name__)}")
                if "register" in given:
                    given["register"](obj)

        return guarded

    @staticmethod
    def _failed(info: PluginInfo, error: str) -> None:
        if error not in info.errors:
            info.errors.append(error)
        log.warning("plugin %s: %s", info.name, error)

    def register(self, plugin: Any, name: str, version: str = "test") -> None:
        """Register an in-process plugin object (tests use this; unregister in ``finally``)."""
        self._load(name, version, False, lambda: plugin, name)

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

    def find(self, hook_name: str, name: str) -> object:
        """The object a plugin registered through ``hook_name`` under ``name``; else an error
        that lists what is installed."""
        found = self.registered(hook_name)
        for obj in found:
            if getattr(obj, "name", None) == name:
                return obj
        names = ", ".join(sorted(str(getattr(o, "name", "?")) for o in found)) or "none"
        what = REGISTER_HOOKS[hook_name]
        raise PluginNotFound(f"no {what} named {name!r} (installed: {names})",
                             code=MISSING_CODES[hook_name])

    def collect(self, hook_name: str) -> list[Any]:
        """Call ``hook_name(register)`` through pluggy and gather what every plugin registers.
        Implementations are guarded (see ``_guarded``); a wrapper that raises is recorded."""
        collected: list[Any] = []
        kind = REGISTER_HOOKS.get(hook_name)
        self._forget_provided(kind)
        caller = getattr(self.pm.hook, hook_name)
        try:
            caller(register=collected.append)
        except (Exception, SystemExit) as e:
            # Only a wrapper can raise here: blame the one whose code the traceback passes.
            wrappers = {impl.function.__code__: self.pm.get_name(impl.plugin)
                        for impl in caller.get_hookimpls() if impl.hookwrapper or impl.wrapper}
            tb, culprit = e.__traceback__, None
            while tb is not None:
                culprit = wrappers.get(tb.tb_frame.f_code, culprit)
                tb = tb.tb_next
            detail = traceback.format_exception_only(type(e), e)[-1].strip()
            if culprit in self.info:
                self._failed(self.info[culprit], f"{hook_name} (a wrapper) raised {detail}")
            else:
                log.warning("%s raised %s", hook_name, detail)
            # A wrapper that raised before its yield ran none of the others: run them without
            # the wrappers, in pluggy's order, so one broken plugin costs only its own part.
            collected = []
            self._forget_provided(kind)
            for impl in reversed(caller.get_hookimpls()):
                if not (impl.hookwrapper or impl.wrapper):
                    impl.function(*(collected.append if a == "register" else None
                                    for a in impl.argnames))
        return collected

    def _forget_provided(self, kind: str | None) -> None:
        """Drop what plugins provided of ``kind``: it is about to be collected again."""
        for info in self.info.values():
            info.provides = [p for p in info.provides if not p.startswith(f"{kind}:")]

    def sources(self) -> list[Source]:
        return cast("list[Source]", self.registered("register_sources"))

    def quantizers(self) -> list[Quantizer]:
        return cast("list[Quantizer]", self.registered("register_quantizers"))

    def probes(self) -> list[Probe]:
        return cast("list[Probe]", self.registered("register_probes"))

    def backends(self) -> list[Backend]:
        return cast("list[Backend]", self.registered("register_backends"))

    def describe(self) -> list[dict[str, Any]]:
        # Registering is where a plugin's code first runs: do it now so its errors show here.
        for hook_name in REGISTER_HOOKS:
            self.registered(hook_name)
        return [info.to_dict() for info in sorted(self.info.values(), key=lambda i: i.name)]
