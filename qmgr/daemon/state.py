"""The daemon's long-lived parts, opened in order at start and closed at stop."""

from __future__ import annotations

import logging
import time

from qmgr.catalog.db import Catalog
from qmgr.daemon.recovery import Report, reconcile
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
        self.recovery: Report = reconcile(self.catalog, self.store)
        self.plugins = PluginSet()
        self.watcher = Watcher(self.catalog, self.store, settings.watch_settle)
        self.watcher.start()
        self.jobs = JobRunner(self.catalog)
        self.puller = Puller(self.catalog, self.store, self.plugins)
        self.fitter = Fitter(self.puller, settings)
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

    def close(self) -> None:
        self.models.shutdown()
        self.jobs.shutdown()
        self.watcher.stop()
        self.catalog.close()
