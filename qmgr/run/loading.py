"""Loading a cataloged variant into a runner (``qmgr run``/``chat``, ``qmgr bench``/``eval``):
its checks, its placement by the fit estimator, the backend that runs it."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

from qmgr import gguf
from qmgr.catalog import queries
from qmgr.catalog.db import Catalog
from qmgr.catalog.models import VariantState
from qmgr.errors import QmgrError
from qmgr.fit.estimate import ModelShape, place
from qmgr.fit.hardware import Device, Snapshot
from qmgr.plugin.backend import Backend, LoadOptions
from qmgr.run.manager import ModelManager, Runner
from qmgr.settings import knob

DEFAULT_CTX = 4096
# Seconds a model that fits alone waits for busy ones to make room before it is refused.
LOAD_WAIT = 600.0


def check_ctx(name: str, facts: dict[str, Any], ctx: int) -> None:
    """Refuse a context the model was not trained for (``context_length`` in its header):
    past it, without RoPE scaling, llama.cpp's answers degrade into nonsense, with only a
    warning in its log. Before anything loads: asking costs no memory."""
    trained = facts.get("context_length")
    if ctx < 1:
        raise QmgrError(f"--ctx {ctx}: a context is at least 1 token", code="bad_request")
    if trained and ctx > trained:
        raise QmgrError(f"--ctx {ctx} is more than {name} was trained for ({trained} tokens, "
                        f"context_length in its file): past it the model's answers degrade; "
                        f"use --ctx {trained} or less", code="ctx_too_large")


def choose_backend(backends: list[Backend], facts: dict[str, Any], devices: list[Device],
                   wanted: str | None = None) -> str:
    """The backend that runs a model: the one asked for, else the first one whose ``can_run``
    has no objection, in pluggy's order (``tryfirst`` ones, then the last registered first:
    an installed plugin's before the built-in, unless it says ``trylast``). Refused with every
    backend's reason when none can."""
    if not backends:
        raise QmgrError("no runtime backend is installed (the built-in llama.cpp one needs "
                        "pip install 'qmgr[llama]')", code="no_backend")
    if wanted is not None and wanted not in {b.name for b in backends}:
        raise QmgrError(f"no backend named {wanted!r} (installed: "
                        f"{', '.join(b.name for b in backends)})", code="no_backend")
    why = {}
    for backend in backends:
        if wanted is not None and backend.name != wanted:
            continue
        can_run = getattr(backend, "can_run", None)  # without one: no objection
        try:
            objection = can_run(facts, devices) if callable(can_run) else None
        # A plugin's check is third-party code: its crash is a reason, not the daemon's.
        except Exception as e:
            objection = f"can_run raised {type(e).__name__}: {e}"
        if objection is None:
            return backend.name
        why[backend.name] = objection
    raise QmgrError("no installed backend can run this model: " + "; ".join(
        f"{name}: {reason}" for name, reason in why.items()), code="cannot_run")


def less_loaded(devices: list[Device], loaded: list[Runner]) -> list[Device]:
    """``devices`` with what ``loaded`` runners hold taken off their free memory: each
    runner's placement, as the estimator made it when it loaded (so a declared machine,
    ``QMGR_HW``, fills up as a real one does)."""
    used: dict[tuple[str, int], int] = {}
    for r in loaded:
        for d in (r.placement or {}).get("devices", []):
            key = (d.get("kind", "cpu"), d.get("index", 0))
            used[key] = used.get(key, 0) + int(d.get("total") or 0)
    out = []
    for d in devices:
        taken = used.get(("cpu" if d.kind == "cpu" else d.kind, d.index), 0)
        if taken and d.memory_total is not None:
            free = d.memory_total - taken if d.memory_free is None else min(
                d.memory_free, d.memory_total - taken)
            d = dataclasses.replace(d, memory_free=max(0, free))
        out.append(d)
    return out


@functools.lru_cache(maxsize=64)
def _shape(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> ModelShape:
    return ModelShape.from_headers([gguf.read_header(p) for p in paths])


def shape_of(paths: tuple[str, ...]) -> ModelShape:
    """The shape the estimator places, from the files' headers, read once per file as it is
    (a large vocabulary makes a header tens of milliseconds to read)."""
    stamps = []
    for p in paths:
        st = os.stat(p)
        stamps.append((st.st_size, st.st_mtime_ns))
    return _shape(paths, tuple(stamps))


class Running:
    """``hardware(declared)``: the devices to place models on (what ``qmgr hw`` shows);
    ``backends()``: the registered runtime backends."""

    def __init__(self, catalog: Catalog, hardware: Callable[[str | None], Snapshot],
                 backends: Callable[[], list[Backend]], manager: ModelManager):
        self.catalog = catalog
        self.hardware = hardware
        self.backends = backends
        self.manager = manager

    def max_loaded(self) -> int | None:
        value = knob("QMGR_MAX_LOADED")
        return int(value) if value else None

    def backend_for(self, facts: dict[str, Any], wanted: str | None = None,
                    hw: str | None = None) -> str:
        return choose_backend(self.backends(), facts, self.hardware(hw).devices, wanted)

    def variant(self, ref: str) -> tuple[str, list[str], dict[str, Any]]:
        with self.catalog.reading() as session:
            v = queries.resolve_one(session, ref)
            if v.state != VariantState.READY:
                raise QmgrError(f"{v.model.name}:{v.tag} is {v.state}: its file is not usable",
                                code="not_ready")
            return f"{v.model.name}:{v.tag}", queries.local_paths(v), dict(v.facts)

    def runner(self, ref: str, ctx: int | None = None, kv_type: str = "f16",
               hw: str | None = None, backend: str | None = None) -> Runner:
        name, paths, facts = self.variant(ref)
        if ctx:
            check_ctx(name, facts, ctx)
        n_ctx = ctx or min(DEFAULT_CTX, facts.get("context_length") or DEFAULT_CTX)
        loaded = self.manager.find(name, n_ctx, kv_type)
        if loaded is not None and (backend is None or loaded.backend == backend):
            return loaded
        shape = shape_of(tuple(paths))
        alone = place(shape, self.hardware(hw).devices, n_ctx, kv_type)
        if not alone.fits:
            need = sum(d.total for d in alone.devices)
            raise QmgrError(f"{name} needs {need / 2**30:.2f} GiB at --ctx {n_ctx} and does "
                            "not fit this machine's memory (see `qmgr fit`); try a smaller "
                            "--ctx or a smaller quant", code="does_not_fit")
        limit = self.max_loaded()
        deadline = time.monotonic() + LOAD_WAIT
        # One model is placed and started at a time, so two never count the same free memory.
        with self.manager.starting:
            while True:
                loaded = self.manager.find(name, n_ctx, kv_type)  # loaded while we waited
                if loaded is not None and (backend is None or loaded.backend == backend):
                    return loaded
                # What the loaded models hold, by the same estimate, is not there for this one.
                devices = less_loaded(self.hardware(hw).devices, self.manager.loaded())
                placement = place(shape, devices, n_ctx, kv_type)
                too_many = limit is not None and len(self.manager.loaded()) >= limit
                if placement.fits and not too_many:
                    break
                # Room is made by unloading the least recently used idle model, one at a
                # time; while every loaded one is answering, the request waits for one.
                if self.manager.unload_least_recently_used() is not None:
                    continue
                if time.monotonic() > deadline:
                    busy = ", ".join(r.ref for r in self.manager.loaded())
                    raise QmgrError(f"{name} does not fit beside {busy}, which stayed busy "
                                    f"for {LOAD_WAIT:.0f} s", code="does_not_fit")
                self.manager.wait_idle(1.0)
            options = LoadOptions(n_ctx=n_ctx, n_gpu_layers=placement.gpu_layers,
                                  kv_type=kv_type, flash_attn=kv_type != "f16")
            chosen = choose_backend(self.backends(), facts, devices, backend)
            return self.manager.runner(name, paths[0], options, placement.to_dict(), chosen)
