"""The daemon's long-lived parts, opened in order at start and closed at stop."""

from __future__ import annotations

import logging
import time
from typing import Any

from qmgr.catalog.db import Catalog
from qmgr.daemon.recovery import Report, reconcile
from qmgr.fleet.node import FleetNode, check_fleet
from qmgr.plugins import PluginSet
from qmgr.settings import Settings, knob
from qmgr.store import Store

log = logging.getLogger(__name__)


class Daemon:
    """Catalog, store, plugins and watcher: what every request handler works with."""

    def __init__(self, settings: Settings):
        from qmgr.daemon.watcher import Watcher
        from qmgr.eval.jobs import Measuring
        from qmgr.fetch.fitting import Fitter
        from qmgr.fetch.pull import Puller
        from qmgr.quantize.job import Quantizing
        from qmgr.run.loading import Running
        from qmgr.run.manager import ModelManager
        from qmgr.work.jobs import JobRunner

        self.settings = settings
        self.started = time.monotonic()
        settings.home.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.store = Store(settings.store)
        self.store.create()
        self.catalog = Catalog(settings.database_url)
        if self.catalog.migrate():
            log.info("catalog migrated to the newest schema")
        self.plugins = PluginSet()
        self.jobs = JobRunner(self.catalog)
        self.puller = Puller(self.catalog, self.store, self.plugins, fleet_key=settings.fleet_key)
        self.fitter = Fitter(self.puller, settings)
        self.fleet: FleetNode | None = None
        if settings.node:
            # Registered before recovery: which copies of blobs are this node's.
            check_fleet(settings, self.catalog)
            self.fleet = FleetNode(self.catalog, settings, self.jobs,
                                   lambda: self.fitter.hardware().to_dict(), self._loaded)
            self.fleet.register()
        self.recovery: Report = reconcile(self.catalog, self.store)
        self.watcher = Watcher(self.catalog, self.store, settings.watch_settle)
        self.watcher.start()
        self.jobs.register("pull", self.puller.run)
        self.quantizing = Quantizing(self.catalog, self.store)
        self.jobs.register("quantize", self.quantizing.run)
        self.jobs.register("imatrix", self.quantizing.run_imatrix)
        keep_alive = knob("QMGR_KEEP_ALIVE")
        # A runner kept warm where models are served to other programs (the API listener).
        self.models = ModelManager(keep_alive, max_queue=knob("QMGR_MAX_QUEUE"),
                                   warm=bool(settings.listen) and knob("QMGR_WARM_WORKERS"))
        self.running = Running(self.catalog, self.fitter.hardware, self.plugins.backends,
                               self.models)
        self.measuring = Measuring(self.catalog, self.running, self.fitter.hardware)
        self.jobs.register("eval", self.measuring.run_eval)
        self.jobs.register("bench", self.measuring.run_bench)
        self.jobs.resume_unfinished()
        if self.fleet is not None:
            self.fleet.start()

    def _loaded(self) -> list[dict[str, Any]]:
        """What this node's runners hold, as its heartbeat tells the fleet."""
        return [{k: r[k] for k in ("ref", "ctx", "rss", "busy", "backend")}
                for r in self.models.ps()]

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
        self.models.shutdown()
        self.jobs.shutdown()
        self.watcher.stop()
        self.catalog.close()
