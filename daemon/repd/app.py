"""Composition root of ``repd run``: builds the parts, starts them in order, supervises them,
tells systemd READY only when they are all up, and stops them in reverse on SIGTERM.

Start order: the API first (so ``repd status`` answers ``starting`` while the model
loads, and ``disk_full`` while there is no room to open the store), then the store and
the model, recovery of interrupted writes, the watcher, the start-up scans, the worker.
The main thread then supervises: it restarts a dead thread (the worker, the watcher,
the API), applies SIGHUP reloads, and runs the periodic safety-net rescan.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from repd.adapters.sdnotify import Notifier, WatchdogGate
from repd.api.server import ApiServer
from repd.crashlog import Crash, CrashLog
from repd.engine import QUERY_WARMUP, Engine
from repd.errors import ConfigError
from repd.heap import HeapTrimmer
from repd.log import configure_logging, get_logger
from repd.pipeline.changes import ChangeQueue
from repd.pipeline.generations import Generations
from repd.pipeline.migration import Migrations
from repd.pipeline.supervisor import Supervisor
from repd.pipeline.watcher import Watcher
from repd.pipeline.worker import IndexWorker, disk_full_message
from repd.process import end_process
from repd.service import DaemonService
from repd.settings import LoadedSettings, Settings, load_settings

log = get_logger("daemon")

STOP_TIMEOUT_S = 15.0  # + watcher 5 s + API 5 s stays within TimeoutStopSec=30
STATUS_EVERY_S = 5.0
INDEX_CHECK_EVERY_S = 60.0
# Chunks per embedding call in the daemon: about a second or two of CPU work, so a stop
# request or a watchdog beat never waits long behind the model.
DAEMON_EMBED_SLICE = 128

# Settings a reload applies at once; every other changed key logs "needs restart".
_LIVE_KEYS = ("roots", "include", "exclude", "max_file_bytes", "max_chunks_per_file",
              "batch_tokens", "disk_reserve_mb", "watch", "log_level", "allow_secrets",
              "model", "migration", "vector_cache_bytes")


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
        self.supervisor = Supervisor(on_dead=lambda name, why: self.gate.fail(name))
        self.stopping = False
        self.ready = False
        #: What start-up is doing, for status while not ready.
        self.phase = "starting"
        self.started_at = time.monotonic()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._last_index_check = 0.0
        self._heap = HeapTrimmer()
        self.watcher: Watcher | None = None
        self.worker: IndexWorker | None = None
        self.engine: Engine | None = None
        self.api: ApiServer | None = None
        #: Model upgrades (``repd model ...``); None until the daemon is ready.
        self.models: Migrations | None = None
        #: The previous run's fatal error, found as this one opens the data folder.
        self.previous_crash: Crash | None = None
        self._crash_log: CrashLog | None = None
        self.queue = ChangeQueue.from_settings(self.settings.watch)
        self.service = DaemonService(self)

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
        threading.excepthook = self.supervisor.excepthook
        self.api = ApiServer(self.service, self.settings.api)
        self.api.start()
        self.api.wait_ready(10)
        self.supervisor.add("api", self._api_alive, self._restart_api, ("repd-api",))
        self._wait_for_disk_space()
        if self._stop.is_set():
            return
        self.phase = "loading model and index"
        self.notifier.status(self.phase)
        # The first load of a large model can outlast TimeoutStartSec; ask for more time.
        self.notifier.extend_timeout(300 * 1_000_000)
        self.engine = Engine(self.settings, writer=True)
        # Armed once the data folder's lock is held: the folder's crash file is this run's.
        self._crash_log = CrashLog(self.engine.data_dir)
        self.previous_crash = self._crash_log.arm()
        self.engine.query_widths = True  # long-lived: short queries get their own copies
        # An int8 variant named before any index is calibrated on these roots' files.
        self.engine.calibration_roots = list(self.roots)
        from repd.adapters.openvino_int8 import making_note

        note = making_note(self.engine.model_name)
        if note:  # making it takes a minute: say why the start takes so long
            self.phase = f"loading model and index; the first time, {note}"
            self.notifier.status(self.phase)
        # Tell processes that find the data folder held where to ask (removed on close).
        self.engine.announce(self.settings.api.socket)
        indexer = self.engine.indexer(daemon=True)
        self.engine.embedder()  # READY means the model is loaded, not merely configured
        self._warm_queries()
        indexer.embed_slice = DAEMON_EMBED_SLICE
        # HNSW is built when idle, but a long first index is never idle and one build
        # over all of it would hold the GIL for minutes: build once this many points
        # piled up too, under the watchdog's grace like the idle build.
        from repd.adapters.store_edge import DEFAULT_BUILD_BACKLOG

        indexer.build_backlog = DEFAULT_BUILD_BACKLOG
        indexer.build_guard = lambda: self.gate.grace(600)
        indexer.allow_roots(self.roots)  # with follow_symlinks, links may lead into these
        self.phase = "recovering interrupted writes"
        recovered = indexer.recover()
        if recovered:
            log.warning("recovered_after_crash", files=recovered)
        self.worker = IndexWorker(indexer, self.queue, self.engine.rules,
                                  beat=lambda: self.gate.beat("indexer"),
                                  on_idle=self._on_idle, data_dir=self.settings.store.path,
                                  reserve_bytes=self.settings.disk_reserve_mb * 2**20)
        # Model upgrades run on the worker thread: commands through its inbox, the
        # backfill whenever no live change is ready.
        self.models = Migrations(self.engine, indexer, self.queue, self.worker.call,
                                 lambda: self.settings)
        self.worker.background = self.models.background
        # Registered before the threads start: a crash in their first instant is pinned
        # on the right component, not lost as an unowned error. (The supervisor checks
        # only once start() has returned, so a worker not started yet is not "dead".)
        self.supervisor.add("indexer", self.worker.alive, self._restart_worker,
                            ("repd-indexer",))
        self.supervisor.add("watcher", self._watcher_alive, self._restart_watcher,
                            ("repd-watch", "Thread-"))
        # Watch first, then scan: a change made during the scan is caught by one or the
        # other, never by neither.
        self._start_watcher()
        for root in self.roots:
            self.queue.put_scan(root, "")
        self.gate.register("indexer")
        self.worker.start()
        self.gate.start()
        # A changed `model` setting (or changed weights behind it) starts a migration; the
        # new model loads on a thread of its own while the daemon serves.
        self.models.follow_config()
        self.ready = True
        self.phase = "ready"
        self.notifier.ready(self._status_line())
        log.info("ready", roots=[str(r) for r in self.roots], socket=str(self.settings.api.socket),
                 model=indexer.generation.model_name,
                 device=getattr(self.engine.loaded_embedder, "device", None))

    def _warm_queries(self) -> None:
        """Embed a short and a longer question, one at a time, so the first queries do
        not pay for what their path sets up on first use (torch's first calls; OpenVINO's
        copies for one input width, which ``Engine.load_model`` has compiled already). A
        failure here is only logged: the query path reports its own."""
        assert self.engine is not None
        t0 = time.monotonic()
        try:
            for text in QUERY_WARMUP:
                self.engine.embedder().embed([text])
        except Exception as exc:  # the model loaded; a query will say what is wrong
            log.warning("query_warmup_failed", error=f"{type(exc).__name__}: {exc}")
            return
        log.info("query_path_warm", seconds=round(time.monotonic() - t0, 3))

    def _wait_for_disk_space(self) -> None:
        # Opening Qdrant Edge with no room kills the process with SIGBUS (its files are
        # memory-mapped): wait here, answering status, until space is back.
        reserve = self.settings.disk_reserve_mb * 2**20
        data_dir = self.settings.store.path
        warned = False
        while not self._stop.is_set():
            try:
                data_dir.mkdir(parents=True, exist_ok=True)
                free = shutil.disk_usage(data_dir).free
            except OSError:
                return  # the engine reports an unusable data folder with its own message
            if free >= reserve:
                if warned:
                    log.info("disk_space_back", free_bytes=free)
                return
            if self._reload.is_set():  # lowering disk_reserve_mb takes effect at once
                self._reload.clear()
                self.reload()
                reserve = self.settings.disk_reserve_mb * 2**20
                continue
            self.phase = disk_full_message(data_dir, free, reserve)
            if not warned:
                log.error("disk_full", data_dir=str(data_dir), free_bytes=free,
                          reserve_bytes=reserve)
                self.notifier.status(self.phase)
                warned = True
            self._stop.wait(2.0)

    # -- supervised parts ----------------------------------------------------------------

    def _start_watcher(self) -> None:
        assert self.engine is not None
        self.watcher = Watcher(self.roots, {r: self.engine.rules(r) for r in self.roots},
                               self.queue, self.settings.watch)
        self.watcher.start()

    def _watcher_alive(self) -> bool:
        watcher = self.watcher
        if watcher is None:
            return True
        health = getattr(watcher, "threads_alive", None)
        return bool(health()) if callable(health) else True

    def _restart_watcher(self) -> None:
        if self.watcher is not None:
            self.watcher.stop(5.0)
        self._start_watcher()
        for root in self.roots:  # events may have been lost while it was down
            self.queue.put_scan(root, "")

    def _restart_worker(self) -> None:
        assert self.worker is not None
        for root in self.roots:  # the crashed unit's work is found again by a scan
            self.queue.put_scan(root, "")
        self.worker.start()

    @property
    def generations(self) -> Generations | None:
        """The open generations (which one answers queries); None before the engine opens."""
        return self.engine.generations if self.engine is not None else None

    def _api_alive(self) -> bool:
        return self.api is None or self.api.alive()

    def _restart_api(self) -> None:
        if self.api is not None:
            self.api.stop(2.0)
        self.api = ApiServer(self.service, self.settings.api)
        self.api.start()
        self.api.wait_ready(10)

    # -- loop ----------------------------------------------------------------------------

    def run(self) -> NoReturn:
        """Start, serve until SIGTERM/SIGINT, stop, and end the process with status 0.

        A start that fails raises (after stopping what had started) for the CLI to
        report; once running, the process ends here (``end_process``): nothing returns.
        """
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
            self.supervisor.check()
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            now = time.monotonic()
            if now >= next_status:
                self.notifier.status(self._status_line())
                next_status = now + STATUS_EVERY_S
            interval = self.settings.watch.rescan_interval_s
            if interval and now >= next_rescan:
                # Safety net: events can be lost (NFS, container mounts, overflows).
                for root in self.roots:
                    self.queue.put_scan(root, "")
                next_rescan = now + interval
        self._shutdown()
        end_process(0)

    def _status_line(self) -> str:
        if not self.ready or self.worker is None:
            return self.phase
        snap = self.worker.snapshot
        if snap.problem:
            return snap.problem
        mig = self.models.snapshot().migration if self.models is not None else None
        if mig is not None and mig.state == "backfilling":
            done = mig.files_done / mig.files_total if mig.files_total else 1.0
            return (f"migrating to {mig.model_name}: {done:.0%} of {mig.files_total} files; "
                    f"generation {mig.from_generation} answers")
        depth = self.queue.depth()
        pending = depth.get("paths", 0) + depth.get("scans", 0)
        if pending or snap.busy:
            return f"indexing: {pending} queued, {snap.rates[0]:.1f} files/s"
        return (f"idle: watching {len(self.roots)} root(s), "
                f"{snap.totals.indexed} files indexed this run")

    def _on_idle(self) -> None:
        now = time.monotonic()
        if now - self._last_index_check < INDEX_CHECK_EVERY_S or self.worker is None:
            return
        self._last_index_check = now
        self.worker.indexer.prune_vector_cache()
        # Building HNSW may hold the GIL for a while: tell the watchdog it is expected.
        assert self.engine is not None
        with self.gate.grace(600):
            for handle in self.engine.generations.view.writing():
                handle.store.maybe_build_index()
        # What this process's work freed goes back to the system (see repd.heap).
        t0 = time.monotonic()
        trimmed = self._heap.maybe_trim()
        if trimmed is not None:
            log.info("heap_trimmed", before_mib=trimmed[0] >> 20, after_mib=trimmed[1] >> 20,
                     ms=round((time.monotonic() - t0) * 1000, 1))

    # -- reload --------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config and apply every key that can change live."""
        self.notifier.reloading()
        try:
            loaded = load_settings(self._config, self._overrides)
        except Exception as exc:
            log.error("reload_failed", error=str(exc))
            self.notifier.ready(self._status_line())
            return
        old, new = self.settings, loaded.settings
        changed = [k for k in type(new).model_fields if getattr(new, k) != getattr(old, k)]
        for key in changed:
            if key not in _LIVE_KEYS:
                log.warning("reload_needs_restart", setting=key)
        live = {k: getattr(new, k) for k in _LIVE_KEYS}
        merged = old.model_copy(update=live)
        self.settings = merged
        self.loaded = loaded
        if new.log_level != old.log_level:
            configure_logging(old.log_format, new.log_level)
        if self.ready and self.worker is not None:
            self.worker.submit("apply_settings", lambda: self._apply_settings(old, merged))
        log.info("reloaded", changed=changed)
        self.notifier.ready(self._status_line())

    def _apply_settings(self, old: Settings, new: Settings) -> None:
        """Runs on the worker thread, between two units of work."""
        assert self.engine is not None and self.worker is not None
        worker, indexer = self.worker, self.worker.indexer
        indexer.configure(new)
        worker.reserve_bytes = new.disk_reserve_mb * 2**20
        embedder = self.engine.loaded_embedder
        if embedder is not None and new.batch_tokens != old.batch_tokens:
            embedder.set_token_budget(new.batch_tokens)
        self.queue.retune(new.watch)
        new_roots = list(self._cli_roots or new.roots)
        removed = [r for r in self.roots if r not in new_roots]
        added = [r for r in new_roots if r not in self.roots and r.is_dir()]
        rules_changed = (new.include != old.include or new.exclude != old.exclude
                         or new.watch.gitignore != old.watch.gitignore
                         or new.watch.follow_symlinks != old.watch.follow_symlinks)
        self.engine.update_settings(new)
        rewatch = (new.watch.force_polling != old.watch.force_polling
                   or new.watch.follow_symlinks != old.watch.follow_symlinks)
        for root in removed:
            self.roots.remove(root)
            if self.watcher is not None:
                self.watcher.remove_root(root)
            indexer.drop_root(root)
        self.roots.extend(added)
        indexer.allow_roots(self.roots)
        if rewatch:
            self._restart_watcher()
        elif self.watcher is not None:
            for root in self.roots:  # new rules for every root; added roots get watched
                self.watcher.add_root(root, self.engine.rules(root))
        # A scan applies new rules: files newly excluded are dropped from the index, newly
        # included ones are indexed, new size limits are applied.
        for root in (self.roots if rules_changed or rewatch else added):
            self.queue.put_scan(root, "")
        # Files skipped under a limit or a rule that changed are looked at again.
        reasons = [r for r, changed in (
            ("too_large", new.max_file_bytes != old.max_file_bytes),
            ("too_many_chunks", new.max_chunks_per_file != old.max_chunks_per_file),
            ("secret", new.allow_secrets != old.allow_secrets)) if changed]
        if reasons:
            for root in self.roots:
                self.engine.manifest.forget_skipped(str(root), reasons)
                self.queue.put_scan(root, "")
        if (new.model != old.model or self.engine.model_changed) and self.models is not None:
            self.models.follow_config()  # loads the model on its own thread
        log.info("settings_applied", added=[str(r) for r in added],
                 removed=[str(r) for r in removed], rules_changed=rules_changed)

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
        self.queue.close()
        abandoned = self.worker is not None and not self.worker.stop(STOP_TIMEOUT_S)
        self.gate.stop()
        if self.api is not None:
            self.api.stop(5.0)
        if abandoned:
            # The worker is inside a call that cannot be interrupted (the model, an index
            # build). Exiting without closing the store is safe (the write in flight is
            # bracketed by intents, recovered at the next start); letting the interpreter
            # tear down under a running native thread is not (SIGABRT, a core dump).
            log.warning("worker_did_not_stop_in_time; exiting without closing the store")
            self._disarm_crash_log()
            end_process(0)
        try:
            if self.engine is not None:
                self.engine.close()
        finally:
            self._disarm_crash_log()  # after the close: a crash inside it is still recorded
        log.info("stopped")

    def _disarm_crash_log(self) -> None:
        if self._crash_log is not None:
            self._crash_log.disarm()
            self._crash_log = None
