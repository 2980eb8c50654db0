"""Composition root of ``repd run``: builds the parts, starts them in order, tells systemd
READY only when they are all up, and stops them in reverse on SIGTERM."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

from repd.adapters.sdnotify import Notifier, WatchdogGate
from repd.adapters.store import Store
from repd.api.server import ApiServer
from repd.engine import Engine
from repd.errors import ConfigError
from repd.log import get_logger
from repd.pipeline.changes import ChangeQueue
from repd.pipeline.watcher import Watcher
from repd.pipeline.worker import IndexWorker
from repd.service import DaemonService
from repd.settings import LoadedSettings, Settings, load_settings

log = get_logger("daemon")

STOP_TIMEOUT_S = 15.0  # + watcher 5 s + API 5 s stays within TimeoutStopSec=30
STATUS_EVERY_S = 5.0
INDEX_CHECK_EVERY_S = 60.0


class Daemon:
    """The long-running service: watcher -> queue -> worker -> store, plus the API."""

    def __init__(self, loaded: LoadedSettings, config: Path | None,
                 overrides: dict[str, Any], roots: list[Path] | None = None) -> None:
        self.loaded = loaded
        self.settings: Settings = loaded.settings
        self._config = config
        self._overrides = overrides
        self._cli_roots = roots
        self.roots: list[Path] = list(roots or self.settings.roots)
        self.notifier = Notifier()
        self.gate = WatchdogGate(self.notifier, self.notifier.watchdog_interval())
        self.stopping = False
        self.ready = False
        self.started_at = time.monotonic()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._last_index_check = 0.0
        self.watcher: Watcher | None = None

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bring every part up, in dependency order."""
        if not self.roots:
            # A config problem (exit 2): systemd's RestartPreventExitStatus=2 stops the loop.
            raise ConfigError(["roots: no folders to watch: pass them to `repd run PATH...` "
                               "or set `roots` in the config"])
        for root in self.roots:
            if not root.is_dir():
                raise ConfigError([f"roots: {root}: not a folder"])
        self.notifier.status("loading model and index")
        # The first load of a large model can outlast TimeoutStartSec; ask for more time.
        self.notifier.extend_timeout(300 * 1_000_000)
        self.engine = Engine(self.settings, writer=True)
        self.indexer = self.engine.indexer()
        self.engine.embedder()  # READY means the model is loaded, not merely configured
        self.store: Store = self.engine.store
        recovered = self.indexer.recover()
        if recovered:
            log.warning("recovered_after_crash", files=recovered)
        w = self.settings.watch
        self.queue = ChangeQueue(debounce_ms=w.debounce_ms, settle_ms=w.settle_ms,
                                 max_pending=w.max_pending)
        self.worker = IndexWorker(self.indexer, self.queue, self.engine.rules,
                                  beat=lambda: self.gate.beat("indexer"),
                                  on_idle=self._on_idle)
        # Watch first, then scan: a change made during the scan is caught by one or the
        # other, never by neither.
        self.watcher = Watcher(self.roots, {r: self.engine.rules(r) for r in self.roots},
                               self.queue, w)
        self.watcher.start()
        for root in self.roots:
            self.queue.put_scan(root, "")
        self.service = DaemonService(self)
        self.api = ApiServer(self.service, self.settings.api)
        self.api.start()
        self.api.wait_ready(10)
        self.gate.register("indexer")
        self.worker.start()
        self.gate.start()
        self.ready = True
        self.notifier.ready(self._status_line())
        log.info("ready", roots=[str(r) for r in self.roots], socket=str(self.settings.api.socket),
                 model=self.indexer.generation.model_name, device=self.engine._embedder.device)

    # -- loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop. Returns the exit code."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        try:
            self.start()
        except BaseException:
            self._shutdown()
            raise
        next_status = 0.0
        next_rescan = time.monotonic() + (self.settings.watch.rescan_interval_s or 1e18)
        while not self._stop.wait(0.5):
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            now = time.monotonic()
            if now >= next_status:
                self.notifier.status(self._status_line())
                next_status = now + STATUS_EVERY_S
            if self.settings.watch.rescan_interval_s and now >= next_rescan:
                # Safety net: events can be lost (NFS, container mounts, overflows).
                status = self.watcher.status() if self.watcher else {}
                for root in self.roots:
                    if (self.watcher is not None and root.is_dir()
                            and status.get(root, "").startswith("error")):
                        self.watcher.add_root(root, self.engine.rules(root))  # re-arm
                    self.queue.put_scan(root, "")
                next_rescan = now + self.settings.watch.rescan_interval_s
        self._shutdown()
        return 0

    def _status_line(self) -> str:
        depth = self.queue.depth() if hasattr(self, "queue") else {}
        pending = depth.get("paths", 0) + depth.get("scans", 0)
        total = self.worker.counters.total if hasattr(self, "worker") else None
        if pending or (hasattr(self, "worker") and self.worker.busy):
            files_s = self.worker.counters.rates()[0]
            return f"indexing: {pending} queued, {files_s:.1f} files/s"
        indexed = total.indexed if total else 0
        return f"idle: watching {len(self.roots)} root(s), {indexed} files indexed this run"

    def _on_idle(self) -> None:
        now = time.monotonic()
        if now - self._last_index_check < INDEX_CHECK_EVERY_S:
            return
        self._last_index_check = now
        self.indexer.prune_vector_cache()
        # Building HNSW may hold the GIL for a while: tell the watchdog it is expected.
        with self.gate.grace(600):
            self.store.maybe_build_index()

    def store_info(self) -> dict[str, object]:
        """Store facts for status (cheap; status itself is cached briefly)."""
        return self.store.info()

    # -- reload --------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config; add and drop roots without a restart."""
        self.notifier.reloading()
        try:
            loaded = load_settings(self._config, self._overrides)
        except Exception as exc:
            log.error("reload_failed", error=str(exc))
            self.notifier.ready(self._status_line())
            return
        new_roots = list(self._cli_roots or loaded.settings.roots)
        added = [r for r in new_roots if r not in self.roots and r.is_dir()]
        removed = [r for r in self.roots if r not in new_roots]
        assert self.watcher is not None
        for root in removed:
            self.watcher.remove_root(root)
            self.roots.remove(root)
            self.worker.drop_root(root)
        for root in added:
            self.roots.append(root)
            self.watcher.add_root(root, self.engine.rules(root))
            self.queue.put_scan(root, "")
        for key in ("model", "device", "store", "api"):
            if getattr(loaded.settings, key) != getattr(self.settings, key):
                log.warning("reload_needs_restart", setting=key)
        log.info("reloaded", added=[str(r) for r in added], removed=[str(r) for r in removed])
        self.notifier.ready(self._status_line())

    # -- stop ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to stop (as SIGTERM does)."""
        self._stop.set()

    def _shutdown(self) -> None:
        self.stopping = True
        self.notifier.stopping()
        log.info("stopping")
        if self.watcher is not None:
            self.watcher.stop(5.0)
        if hasattr(self, "queue"):
            self.queue.close()
        if hasattr(self, "worker") and not self.worker.stop(STOP_TIMEOUT_S):
            # The current write group is bracketed by intents: even an abrupt exit now
            # is recovered exactly on the next start.
            log.warning("worker_did_not_stop_in_time")
        self.gate.stop()
        if hasattr(self, "api"):
            self.api.stop(5.0)
        if hasattr(self, "engine"):
            self.engine.close()
        log.info("stopped")
