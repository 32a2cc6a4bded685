"""The plugin system: built-ins, real entry-point distributions, broken plugins, the switches,
plugin commands in the client, PluginSet in process, and the author guide.

Entry-point plugins are installed for real: a package and its ``NAME-1.0.dist-info`` (METADATA,
entry_points.txt) in a temporary folder that goes on the daemon's and the client's PYTHONPATH,
which is all ``importlib.metadata`` needs to find them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Env

import qmgr
from qmgr import hookimpl
from qmgr.plugin import hookspecs
from qmgr.plugins import DEFAULT_PLUGINS, PluginSet

DOCS = Path(__file__).parent.parent / "docs" / "plugins.md"
# Built-ins are named after their module (qmgr.builtin.cpu_probe -> cpu_probe).
BUILTINS = {module.rsplit(".", 1)[-1]: module for module in DEFAULT_PLUGINS}

# name -> module source. Module names carry a prefix so they cannot clash with real packages.
PLUGINS = {
    "hello": """
        import click
        from qmgr import hookimpl

        class HelloProbe:
            name = "hello"

            def devices(self):
                return []

        @hookimpl
        def register_probes(register):
            register(HelloProbe())

        @hookimpl
        def register_commands(cli):
            @cli.command(name="hello")
            @click.argument("who")
            @click.pass_context
            def hello(ctx, who):
                from qmgr.cli import client

                version = client(ctx).get("/v1/status")["version"]
                click.echo(f"hello {who}, from qmgrd {version}")
    """,
    "broken_import": """
        import qmgr_no_such_module_anywhere
    """,
    "unknown_hook": """
        from qmgr import hookimpl

        @hookimpl
        def register_widgets(register):
            register(object())
    """,
    "raising": """
        from qmgr import hookimpl

        @hookimpl
        def register_probes(register):
            raise ValueError("no such device")

        @hookimpl
        def register_commands(cli):
            raise RuntimeError("no commands today")
    """,
    "exits": """
        raise SystemExit(3)
    """,
}


def install(site: Path, name: str, source: str, version: str = "1.0") -> None:
    """A minimal installed distribution ``qmgr-test-NAME`` with entry point ``NAME``."""
    module = f"qmgr_test_{name}"
    (site / module).mkdir()
    (site / module / "__init__.py").write_text(textwrap.dedent(source))
    info = site / f"qmgr_test_{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: qmgr-test-{name}\nVersion: {version}\n")
    groups = "[qmgr]\n{0}\n"
    if "register_commands" in source:  # the client loads command plugins from their own group
        groups += "[qmgr.commands]\n{0}\n"
    (info / "entry_points.txt").write_text(groups.format(f"{name} = {module}"))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    for name, source in PLUGINS.items():
        install(site, name, source)
    return site


@pytest.fixture
def plugin_env(qenv: Env, site: Path) -> Env:
    qenv.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site),
                                                           qenv.env.get("PYTHONPATH")]))
    return qenv


def by_name(env: Env) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in env.json("plugins")}


# -- through the real daemon and the real client ------------------------------------------


def hookimpls_of(module_name: str) -> list[str]:
    """The hooks a plugin module implements, read from the module itself."""
    module = importlib.import_module(module_name)
    return sorted(name for name, fn in inspect.getmembers(module, inspect.isfunction)
                  if hasattr(fn, "qmgr_impl"))


def test_builtins_are_listed_with_name_version_hooks_errors(daemon: Env) -> None:
    plugins = daemon.json("plugins")
    assert [p["name"] for p in plugins] == sorted(BUILTINS)
    for p in plugins:
        provides = p.pop("provides")
        assert p == {"name": p["name"], "version": qmgr.__version__, "builtin": True,
                     "distribution": "qmgr", "hooks": hookimpls_of(BUILTINS[p["name"]]),
                     "errors": []}
        # Each built-in registers one object of the kind its hook says.
        kinds = {h.removeprefix("register_").removesuffix("s") for h in p["hooks"]}
        assert len(provides) == 1 and provides[0].split(":")[0] in kinds, provides
    cpu = next(p for p in plugins if p["name"] == "cpu_probe")
    assert cpu["hooks"] == ["register_probes"]
    r = daemon.qmgr("plugins")
    assert re.search(r"^cpu_probe\s+qmgr\s+" + re.escape(qmgr.__version__) + r"\s+built-in\s+"
                     r"probe:cpu$", r.stdout, re.M), r.stdout
    assert r.stderr == ""


def test_an_installed_plugin_loads_only_when_named(plugin_env: Env) -> None:
    env = plugin_env
    env.start()  # QMGR_PLUGINS="" from the fixture: installed, but not loaded
    assert set(by_name(env)) == set(BUILTINS)
    r = env.qmgr("hello", "world", check=False)
    assert r.returncode == 2 and "No such command 'hello'" in r.stderr
    assert env.stop() == 0

    env.env["QMGR_PLUGINS"] = "hello"
    env.start()
    plugins = by_name(env)
    assert set(plugins) == {*BUILTINS, "hello"}
    # The distribution a user installed (as `llm plugins` shows it), and what it provides.
    assert plugins["hello"] == {"name": "hello", "version": "1.0", "builtin": False,
                                "distribution": "qmgr-test-hello",
                                "hooks": ["register_commands", "register_probes"],
                                "provides": ["probe:hello"], "errors": []}
    assert re.search(r"^hello\s+qmgr-test-hello\s+1\.0\s+installed\s+probe:hello$",
                     env.qmgr("plugins").stdout, re.M)
    # The plugin's command, found by the client's lazy loading, works against the daemon.
    r = env.qmgr("hello", "world")
    assert r.stdout == f"hello world, from qmgrd {qmgr.__version__}\n"
    help_text = env.qmgr("--help").stdout
    assert re.search(r"^\s+hello\s", help_text, re.M), help_text


def test_broken_plugins_are_reported_and_the_rest_keeps_working(plugin_env: Env) -> None:
    env = plugin_env
    env.env["QMGR_PLUGINS"] = ",".join(PLUGINS)
    env.start()
    plugins = by_name(env)
    assert set(plugins) == {*BUILTINS, *PLUGINS}
    errors = {name: p["errors"] for name, p in plugins.items()}
    assert all(errors[name] == [] for name in BUILTINS) and errors["hello"] == []
    assert errors["broken_import"] == [
        "failed to load: ModuleNotFoundError: No module named 'qmgr_no_such_module_anywhere'"]
    assert len(errors["unknown_hook"]) == 1
    assert errors["unknown_hook"][0].startswith("invalid: ")
    assert "unknown hook 'register_widgets'" in errors["unknown_hook"][0]
    assert plugins["unknown_hook"]["hooks"] == []
    assert errors["raising"] == ["register_probes raised ValueError: no such device"]
    assert errors["exits"] == ["failed to load: SystemExit: 3"]
    # Asking again neither repeats nor loses an error.
    assert by_name(env) == plugins
    assert env.json("status")["plugin_errors"] == 4
    assert env.proc is not None and env.proc.poll() is None

    r = env.qmgr("plugins")
    assert "Error: plugin raising: register_probes raised ValueError" in r.stderr
    assert "Error: plugin broken_import: failed to load" in r.stderr

    # In the client: the good plugin's command works beside the broken ones, which cost a
    # line each on stderr; built-in commands do not load plugins at all.
    r = env.qmgr("hello", "world")
    assert r.stdout == f"hello world, from qmgrd {qmgr.__version__}\n"
    assert "plugin raising failed to add commands: no commands today" in r.stderr
    # broken_import adds no commands (no qmgr.commands entry point): the client never imports it.
    assert "broken_import" not in r.stderr
    r = env.qmgr("list")
    assert "plugin" not in r.stderr and "broken_import" not in r.stderr, r.stderr


def test_disabling_removes_a_builtin_and_an_installed_plugin(plugin_env: Env) -> None:
    env = plugin_env
    env.env["QMGR_PLUGINS"] = "hello"
    env.env["QMGR_DISABLE_PLUGINS"] = "cpu_probe, hello"
    env.start()
    assert {p["name"] for p in env.json("plugins")} == set(BUILTINS) - {"cpu_probe"}
    r = env.qmgr("hello", "world", check=False)
    assert r.returncode == 2 and "No such command 'hello'" in r.stderr


# -- PluginSet in process --------------------------------------------------------------------


class FakeProbe:
    name = "fake"

    def devices(self) -> list[dict[str, Any]]:
        return [{"kind": "cuda", "name": "Fake GPU", "memory_total": 8 << 30,
                 "memory_free": 6 << 30}]


class FakePlugin:
    @hookimpl
    def register_probes(self, register: Any) -> None:
        register(FakeProbe())


class RaisingPlugin:
    @hookimpl
    def register_probes(self, register: Any) -> None:
        register(FakeProbe())  # dropped: the call as a whole failed
        raise KeyError("boom")


class BrokenWrapperPlugin:
    @hookimpl(wrapper=True)
    def register_probes(self, register: Any) -> Iterator[None]:
        raise RuntimeError("before its yield")
        yield  # a generator: pluggy's wrapper protocol


class RenamedPlugin:
    @hookimpl(specname="register_probes")
    def probes(self) -> None:  # fewer arguments than the spec: pluggy allows it
        pass


class MisspelledPlugin:
    @hookimpl
    def register_probes(self, registr: Any) -> None:
        pass


@pytest.fixture
def plugins() -> PluginSet:
    return PluginSet(env={"QMGR_PLUGINS": ""})


def probe_names(plugins: PluginSet) -> list[str]:
    return sorted(p.name for p in plugins.registered("register_probes"))


def test_register_and_unregister_a_plugin_object(plugins: PluginSet) -> None:
    before = probe_names(plugins)  # collected, and cached, before the plugin arrives
    assert "cpu" in before and "fake" not in before
    plugins.register(FakePlugin(), name="fake", version="9")
    try:
        assert probe_names(plugins) == sorted([*before, "fake"])
        fake = next(p for p in plugins.registered("register_probes") if p.name == "fake")
        assert fake.devices()[0]["kind"] == "cuda"
        assert {"name": "fake", "version": "9", "builtin": False, "distribution": "fake",
                "hooks": ["register_probes"], "provides": ["probe:fake"],
                "errors": []} in plugins.describe()
    finally:
        plugins.unregister("fake")
    assert probe_names(plugins) == before
    assert [p["name"] for p in plugins.describe()] == sorted(BUILTINS)


def test_a_plugin_that_raises_is_recorded_and_others_still_register(plugins: PluginSet) -> None:
    before = probe_names(plugins)
    plugins.register(RaisingPlugin(), name="raising")
    plugins.register(FakePlugin(), name="fake")
    try:
        assert probe_names(plugins) == sorted([*before, "fake"])
        described = {p["name"]: p for p in plugins.describe()}
        assert described["raising"]["errors"] == ["register_probes raised KeyError: 'boom'"]
        assert described["fake"]["errors"] == [] and described["cpu_probe"]["errors"] == []
    finally:
        plugins.unregister("fake")
        plugins.unregister("raising")


def test_a_wrapper_that_raises_before_its_yield_costs_only_itself(plugins: PluginSet) -> None:
    before = probe_names(plugins)
    plugins.register(BrokenWrapperPlugin(), name="wrapper")
    try:
        # pluggy runs no implementation when a wrapper fails before its yield: qmgr runs them
        # again without the wrappers, and blames the one that failed.
        assert probe_names(plugins) == before and "cpu" in before
        described = {p["name"]: p for p in plugins.describe()}
        assert described["wrapper"]["errors"] == [
            "register_probes (a wrapper) raised RuntimeError: before its yield"]
        assert described["cpu_probe"]["provides"] == ["probe:cpu"]
    finally:
        plugins.unregister("wrapper")


def test_built_ins_come_in_their_declared_order(plugins: PluginSet) -> None:
    """pluggy calls the last registered first; the built-ins are registered so that their
    objects still come in DEFAULT_PLUGINS' order (the CPU probe first in `qmgr hw`)."""
    for hook in ("sources", "quantizers", "probes", "backends"):
        order = [type(o).__module__ for o in getattr(plugins, hook)()]
        assert len(order) > 0 and order == [m for m in DEFAULT_PLUGINS if m in order], hook
    assert [p.name for p in plugins.probes()][0] == "cpu"


def test_invalid_plugin_objects_are_refused_with_a_reason(plugins: PluginSet) -> None:
    before = probe_names(plugins)
    try:
        plugins.register(MisspelledPlugin(), name="misspelled")
        plugins.register(RenamedPlugin(), name="renamed")
        described = {p["name"]: p for p in plugins.describe()}
        [error] = described["misspelled"]["errors"]
        assert error.startswith("failed to load: PluginValidationError") and "registr" in error
        assert described["misspelled"]["hooks"] == []
        # A hookimpl named otherwise is listed under its hook, and is called with the
        # arguments it takes.
        assert described["renamed"] == {"name": "renamed", "version": "test", "builtin": False,
                                        "distribution": "renamed", "hooks": ["register_probes"],
                                        "provides": [], "errors": []}
        assert probe_names(plugins) == before
    finally:
        plugins.unregister("misspelled")  # never registered: unregistering must not fail
        plugins.unregister("renamed")


def test_the_switches_in_process(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(site))
    try:
        every = PluginSet(env={})  # QMGR_PLUGINS unset: every installed plugin
        assert set(PLUGINS) <= {p["name"] for p in every.describe()}
        only = PluginSet(env={"QMGR_PLUGINS": "hello, raising"})
        assert [p["name"] for p in only.describe()] == sorted({*BUILTINS, "hello", "raising"})
        no_cpu = PluginSet(env={"QMGR_PLUGINS": "hello", "QMGR_DISABLE_PLUGINS": "cpu_probe"})
        assert [p["name"] for p in no_cpu.describe()] == sorted(
            {*BUILTINS, "hello"} - {"cpu_probe"})
        assert "hello" in probe_names(no_cpu) and "cpu" not in probe_names(no_cpu)
    finally:
        for module in [m for m in sys.modules if m.startswith("qmgr_test_")]:
            del sys.modules[module]


def test_the_cpu_probe_reports_this_machine(plugins: PluginSet) -> None:
    [cpu] = [p for p in plugins.registered("register_probes") if p.name == "cpu"]
    [device] = [d.to_dict() for d in cpu.devices()]
    assert device["kind"] == "cpu" and device["cores"] >= 1
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo on this system: memory is reported as unknown")
    total_kib = int(re.search(r"^MemTotal:\s+(\d+) kB", meminfo.read_text(), re.M)[1])
    # A cgroup limit may make it smaller than MemTotal, never larger.
    assert 0 < device["memory_total"] <= total_kib * 1024
    assert 0 < device["memory_free"] <= device["memory_total"]


# -- the plugin author guide -------------------------------------------------------------


def hookspec_signatures() -> dict[str, str]:
    """Each hook's signature as written in hookspecs.py (annotations are strings there)."""
    out = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if not hasattr(fn, "qmgr_spec"):
            continue
        sig = inspect.signature(fn)
        params = []
        for p in sig.parameters.values():
            text = p.name if p.annotation is p.empty else f"{p.name}: {p.annotation}"
            if p.default is not p.empty:
                text += f" = {p.default!r}"
            params.append(text)
        ret = "" if sig.return_annotation is sig.empty else f" -> {sig.return_annotation}"
        out[name] = f"{name}({', '.join(params)}){ret}"
    return out


def test_every_hook_is_documented_with_its_signature() -> None:
    specs = hookspec_signatures()
    assert {"register_probes", "register_commands"} <= set(specs), "hookspecs not found"
    headings = [line.lstrip("#").strip().strip("`")
                for line in DOCS.read_text().splitlines() if line.startswith("#")]
    for name, signature in specs.items():
        assert signature in headings, f"docs/plugins.md lacks a heading `{signature}`"
        doc = (inspect.getdoc(getattr(hookspecs, name)) or "").replace("``", "`")
        assert doc and doc in DOCS.read_text(), (
            f"docs/plugins.md does not repeat the docstring of {name}")
    documented = {h.split("(")[0] for h in headings if re.match(r"\w+\(", h)}
    assert documented == set(specs), "docs/plugins.md documents hooks that do not exist"


def test_the_guide_names_the_switches_and_the_entry_point_group() -> None:
    from qmgr.plugins import ENTRY_POINT_GROUP

    text = DOCS.read_text()
    for needle in ("QMGR_PLUGINS", "QMGR_DISABLE_PLUGINS", "qmgr plugins --json",
                   f"[project.entry-points.{ENTRY_POINT_GROUP}]", "from qmgr import hookimpl"):
        assert needle in text, needle


@pytest.fixture(autouse=True)
def _no_leftover_test_modules() -> Iterator[None]:
    yield
    assert not [m for m in sys.modules if m.startswith("qmgr_test_")]
