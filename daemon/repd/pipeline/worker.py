"""The daemon's indexing loop: the only writer. Takes settled changes off the queue, feeds the
indexer, retries what failed, and publishes an immutable status snapshot after each step.

Failure handling (nothing here may stop indexing silently):

* a failure about one file is isolated by the indexer (a ``failed`` row, the rest goes on);
* any other failure (no descriptors, disk full, the store or SQLite failing, a bug) ends
  the current unit of work: the half-written group is recovered at once, the unit and
  everything behind it go back on the queue, and the worker waits with exponential
  backoff, showing the problem in status as ``degraded`` until a unit succeeds again;
* short of disk space (``disk_reserve_mb``), nothing is written: status says
  ``disk_full`` and writing resumes by itself when space returns.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from repd.core.faults import fault
from repd.core.ignore import IgnoreRules
from repd.errors import DiskFullError
from repd.log import get_logger
from repd.pipeline.changes import ChangeQueue
from repd.pipeline.indexer import Indexer, Interrupted, RunStats, Yielded

log = get_logger("worker")

# Chunks per write group in the daemon: smaller than a one-shot run's so that a group
# finishes within seconds (fast SIGTERM, fresh watchdog beats, edits searchable soon).
DAEMON_GROUP_CHUNKS = 512
DAEMON_GROUP_SECONDS = 10.0
RATE_WINDOW_S = 30.0
# Rates read as zero once nothing was recorded for this long: idle means idle.
RATE_IDLE_S = 5.0
MAX_BACKOFF_S = 60.0
# How often the per-root counts (GROUP BYs over the manifest) are refreshed while busy.
COUNTS_EVERY_S = 1.0
SPACE_EVERY_S = 2.0
# Files failing one after another with none indexed between: past this many, status says
# the daemon is degraded (a broken model or store), while each file keeps its failed row.
FAILED_IN_A_ROW = 10
# Before each group's flush (which holds the GIL), the API threads get this long to finish
# a query in flight: edits show up in results without waiting for the disk syncs.
FLUSH_YIELD_S = 0.02


@dataclass
class Counters:
    """Totals since start and a sliding window for rates (thread-safe)."""

    total: RunStats = field(default_factory=RunStats)
    window: deque[tuple[float, int, int, int]] = field(default_factory=deque)
    last_error: str | None = None
    last_scan_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, stats: RunStats) -> None:
        """Fold one batch's figures in."""
        now = time.monotonic()
        with self._lock:
            self.total.add(stats)
            self.window.append((now, stats.indexed + stats.deleted,
                                stats.chunks_embedded + stats.chunks_reused,
                                stats.chunks_embedded))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self.window and self.window[0][0] < now - RATE_WINDOW_S:
            self.window.popleft()

    def rates(self) -> tuple[float, float, float]:
        """(files/s, chunks/s, embeds/s) over the window; zero once idle."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            if not self.window or now - self.window[-1][0] > RATE_IDLE_S:
                return 0.0, 0.0, 0.0
            span = max(now - self.window[0][0], 1.0)
            files = sum(w[1] for w in self.window)
            chunks = sum(w[2] for w in self.window)
            embeds = sum(w[3] for w in self.window)
        return files / span, chunks / span, embeds / span

    def totals(self) -> RunStats:
        """A copy of the totals."""
        with self._lock:
            out = RunStats()
            out.add(self.total)
            return out


@dataclass(frozen=True)
class WorkerSnapshot:
    """What the worker is doing, published by one reference assignment; never mutated.

    Readers (the API's status, the systemd status line) take ``worker.snapshot`` once
    and read only that object, so they never touch the manifest or the worker's fields.
    """

    stage: str = "starting"
    busy: bool = False
    #: One line when indexing cannot make progress; None when it can.
    problem: str | None = None
    #: ``disk_full``, ``failing`` (units fail and are retried) or ``failing_files`` (every
    #: file fails), see ``problem``; None when healthy.
    problem_kind: str | None = None
    counts_by_root: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    chunks_by_root: Mapping[str, int] = field(default_factory=dict)
    store: Mapping[str, object] = field(default_factory=dict)
    totals: RunStats = field(default_factory=RunStats)
    rates: tuple[float, float, float] = (0.0, 0.0, 0.0)
    last_error: str | None = None
    last_scan_at: float | None = None


@dataclass(frozen=True)
class _Unit:
    """One piece of work taken off the queue: a scan of a folder, or some paths of a root."""

    root: Path
    scan: str | None = None
    paths: tuple[str, ...] = ()


class IndexWorker:
    """One thread: the single consumer of the change queue and user of the indexer."""

    def __init__(self, indexer: Indexer, queue: ChangeQueue,
                 rules: Callable[[Path], IgnoreRules], beat: Callable[[], None],
                 on_idle: Callable[[], None] = lambda: None, *,
                 data_dir: Path | None = None, reserve_bytes: int = 0) -> None:
        self.indexer = indexer
        self.queue = queue
        self._rules = rules
        self._beat = beat
        self._on_idle = on_idle
        self.data_dir = data_dir
        self.reserve_bytes = reserve_bytes
        self.counters = Counters()
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._inbox: deque[tuple[str, Callable[[], Any]]] = deque()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._problem: tuple[str, str] | None = None
        self._logged_errors: set[str] = set()
        self._needs_recovery = False
        self._counts_at = 0.0
        self._dirty = False
        self._space_at = 0.0
        self._space_ok = True
        self.snapshot = WorkerSnapshot()
        #: Work done when no live change is ready (a migration's backfill): called with a
        #: check for live work waiting; returns True while it has more to do.
        self.background: Callable[[Callable[[], bool]], bool] | None = None
        self._background_due = True
        indexer.group_chunks = DAEMON_GROUP_CHUNKS
        indexer.group_seconds = DAEMON_GROUP_SECONDS
        indexer.build_index_inline = False
        indexer.should_stop = self._stop.is_set
        indexer.on_embedded = lambda n: self._beat()
        indexer.on_stage = self._on_stage
        indexer.check_space = self._check_space
        indexer.before_flush = lambda: time.sleep(FLUSH_YIELD_S)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop on its own thread (again, after a crash: the supervisor's restart)."""
        if self._thread is not None:
            # A restart after the loop died: whatever it was writing is undone first.
            self._needs_recovery = True
        self._thread = threading.Thread(target=self._run, name="repd-indexer", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """True while the loop's thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float) -> bool:
        """Stop between two slices of work; True if it stopped in time."""
        self._stop.set()
        self.queue.close()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- commands (run on the worker thread, between units) ------------------------------

    def submit(self, name: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the worker thread before the next unit of work."""
        self._inbox.append((name, fn))

    def call(self, name: str, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn`` on the worker thread and wait for its result (or its exception)."""
        fut: Future[Any] = Future()

        def run() -> None:
            # Every outcome goes to the caller: a command is never retried behind its back.
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)
        self.submit(name, run)
        return fut.result(timeout)

    def drop_root(self, root: Path) -> None:
        """Forget a root's files (it left the config)."""
        self.submit("drop_root", lambda: self.indexer.drop_root(root))

    # -- loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        self._publish(refresh=True)
        idle_since = time.monotonic()
        while not self._stop.is_set():
            self._beat()
            fault("worker_loop")  # a bug escaping the loop: the supervisor's test
            self._run_commands()
            now = time.monotonic()
            if now < self._retry_at:
                self._stop.wait(min(0.5, self._retry_at - now))
                continue
            if self._needs_recovery and not self._recover():
                continue
            if self.paused.is_set():
                self._publish(busy=False)
                self._stop.wait(0.2)
                continue
            if not self._has_space():
                self._stop.wait(0.5)
                continue
            # With background work waiting, only glance at the queue: live work first.
            wait = 0.0 if self.background is not None and self._background_due else 0.5
            changes = self.queue.get_ready(max_items=256, timeout=wait)
            if changes and self.paused.is_set():
                # Paused while waiting for work: nothing may be indexed; put it back.
                self._requeue([_Unit(ch.root, scan=ch.relpath) if ch.kind == "scan"
                               else _Unit(ch.root, paths=(ch.relpath,)) for ch in changes])
                self.queue.task_done(len(changes))
                continue
            if not changes and self._run_background():
                continue
            if not changes:
                # Counts are refreshed when work was done since, or now and then anyway.
                self._publish(busy=False, refresh=self._dirty or now - self._counts_at > 5.0)
                if time.monotonic() - idle_since > 1.0:
                    self._idle_work()
                    idle_since = time.monotonic()
                continue
            self._publish(busy=True)
            self._dirty = True
            try:
                self._process(self._units(changes))
            finally:
                self.queue.task_done(len(changes))
            idle_since = time.monotonic()
        self._publish(busy=False)

    @staticmethod
    def _units(changes: list[Any]) -> list[_Unit]:
        units: list[_Unit] = []
        by_root: dict[Path, list[str]] = {}
        for ch in changes:
            if ch.kind == "scan":
                units.append(_Unit(ch.root, scan=ch.relpath))
            else:
                by_root.setdefault(ch.root, []).append(ch.relpath)
        units.extend(_Unit(root, paths=tuple(paths)) for root, paths in by_root.items())
        return units

    def _process(self, units: list[_Unit]) -> None:
        for i, unit in enumerate(units):
            if self._stop.is_set():
                return  # what is not committed is found again by the start-up scan
            try:
                fault("worker_unit")  # a failure of a whole unit: the retry path's test
                if unit.scan is not None:
                    self._scan(unit.root, unit.scan)
                else:
                    self._paths(unit.root, list(unit.paths))
            except Interrupted:
                return
            except Exception as exc:
                self._failed(exc, units[i:])
                return
            self._succeeded()
            self._check_failing_files()
            self._publish(busy=True, refresh=time.monotonic() - self._counts_at > COUNTS_EVERY_S)

    def _scan(self, root: Path, subdir: str) -> None:
        if not root.is_dir():
            log.warning("root_missing", root=str(root))
            self.counters.last_error = f"root {root} is missing"
            return
        stats = self.indexer.reconcile(root, self._rules(root), subdir,
                                       lambda *_: self._beat(), self._stop.is_set)
        self.counters.record(stats)
        if not subdir:
            self.counters.last_scan_at = time.time()

    def _paths(self, root: Path, paths: list[str]) -> None:
        self.counters.record(
            self.indexer.process_paths(root, self._rules(root), paths, self._stop.is_set))

    def _run_commands(self) -> None:
        while self._inbox:
            name, fn = self._inbox.popleft()
            try:
                fn()
            except Exception as exc:
                # A command that failed is retried like any unit: put it back, back off.
                self._inbox.appendleft((name, fn))
                self._failed(exc, [])
                return

    def _run_background(self) -> bool:
        """One step of background work; True when the loop should come straight back."""
        if self.background is None:
            return False
        try:
            self._background_due = self.background(self.queue.has_ready)
        except Yielded:
            self._background_due = True
            return True  # live work is ready: take it now
        except Interrupted:
            return False
        except Exception as exc:
            self._background_due = True
            self._failed(exc, [])
            return False
        if self._background_due:
            self._succeeded()
            self._publish(busy=True, refresh=time.monotonic() - self._counts_at > COUNTS_EVERY_S)
            return True
        return False

    def _idle_work(self) -> None:
        try:
            self._on_idle()
        except Exception as exc:
            self._failed(exc, [])

    # -- failures ------------------------------------------------------------------------

    def _succeeded(self) -> None:
        if self._failures:
            log.info("indexing_recovered", after_failures=self._failures)
        self._failures = 0
        if self._problem is not None and self._problem[0] == "failing":
            self._problem = None

    def _check_failing_files(self) -> None:
        """Loud when every file fails: a broken model or store is not the files' fault,
        even though each failure was recorded against its file."""
        n = self.indexer.failed_in_a_row
        if n >= FAILED_IN_A_ROW:
            if self._problem is None or self._problem[0] == "failing_files":
                self._problem = ("failing_files", f"{n} files in a row failed to index, the "
                                 f"last with {self.indexer.last_failure}; the model or the "
                                 "store may be broken (`repd files --state failed` lists them)")
        elif self._problem is not None and self._problem[0] == "failing_files":
            self._problem = None

    def _failed(self, exc: Exception, pending: list[_Unit]) -> None:
        """Recover the half-written group, put the work back, and back off."""
        self._failures += 1
        text = f"{type(exc).__name__}: {exc}"[:400]
        self.counters.last_error = text
        if text not in self._logged_errors:  # the traceback once, then one line per retry
            self._logged_errors.add(text)
            log.exception("indexing_failed", error=text, failures=self._failures)
        else:
            log.warning("indexing_failed_again", error=text, failures=self._failures)
        self._needs_recovery = True
        self._recover()
        self._requeue(pending)
        delay = min(MAX_BACKOFF_S, 2.0 ** min(self._failures - 1, 6))
        self._retry_at = time.monotonic() + delay
        if isinstance(exc, DiskFullError):
            self._space_at = 0.0  # re-check at once; _has_space reports it
            self._problem = ("disk_full", str(exc))
        else:
            self._problem = ("failing", f"indexing is failing ({text}); retrying in "
                                        f"{delay:.0f} s, failure {self._failures} in a row")
        self._publish(busy=False, refresh=True)

    def _requeue(self, units: list[_Unit]) -> None:
        for unit in units:
            if unit.scan is not None:
                self.queue.put_scan(unit.root, unit.scan)
            else:
                for rel in unit.paths:
                    self.queue.put_path(unit.root, rel)

    def _recover(self) -> bool:
        """Resolve open intents as at start-up; False (and a problem shown) if it fails."""
        try:
            self.indexer.recover()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"[:400]
            log.error("recovery_failed", error=text)
            self._problem = ("failing", f"the index cannot recover a failed write ({text}); "
                                        "retrying")
            self._retry_at = time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** min(self._failures, 6))
            self._failures += 1
            self._publish(busy=False)
            return False
        self._needs_recovery = False
        return True

    # -- disk space ----------------------------------------------------------------------

    def free_bytes(self) -> int | None:
        """Free bytes where the index lives, or None when unknown."""
        if self.data_dir is None:
            return None
        try:
            return shutil.disk_usage(self.data_dir).free
        except OSError:
            return None

    def _check_space(self) -> None:
        # Called by the indexer before each write: Qdrant Edge dies of SIGBUS, not with an
        # error, when a memory-mapped file cannot grow.
        free = self.free_bytes()
        if free is not None and free < self.reserve_bytes:
            raise DiskFullError(disk_full_message(self.data_dir, free, self.reserve_bytes))

    def _has_space(self) -> bool:
        now = time.monotonic()
        if now - self._space_at < SPACE_EVERY_S:
            return self._space_ok
        self._space_at = now
        free = self.free_bytes()
        ok = free is None or free >= self.reserve_bytes
        if not ok and self._space_ok:
            log.error("disk_full", data_dir=str(self.data_dir), free_bytes=free,
                      reserve_bytes=self.reserve_bytes)
        elif ok and not self._space_ok:
            log.info("disk_space_back", free_bytes=free)
        self._space_ok = ok
        if not ok:
            assert free is not None
            self._problem = ("disk_full", disk_full_message(self.data_dir, free,
                                                            self.reserve_bytes))
            self._publish(busy=False)
        elif self._problem is not None and self._problem[0] == "disk_full":
            self._problem = None
            self._retry_at = 0.0
            self._publish(busy=False)
        return ok

    # -- status --------------------------------------------------------------------------

    def _on_stage(self, stage: str) -> None:
        snap = self.snapshot
        if snap.stage != stage:
            self.snapshot = replace(snap, stage=stage)

    def _publish(self, *, busy: bool | None = None, refresh: bool = False) -> None:
        old = self.snapshot
        counts, chunks, store = old.counts_by_root, old.chunks_by_root, old.store
        if refresh:
            try:
                counts = self.indexer.manifest.counts_by_root()
                chunks = self.indexer.manifest.chunk_counts_by_root(self.indexer.generation.id)
                store = self.indexer.store.info()
            except Exception as exc:  # status must never take the worker down
                log.warning("status_refresh_failed", error=f"{type(exc).__name__}: {exc}")
            self._counts_at = time.monotonic()
            self._dirty = False
        problem = self._problem
        self.snapshot = WorkerSnapshot(
            stage=self.indexer.stage,
            busy=old.busy if busy is None else busy,
            problem=problem[1] if problem else None,
            problem_kind=problem[0] if problem else None,
            counts_by_root=counts, chunks_by_root=chunks,
            store=store, totals=self.counters.totals(), rates=self.counters.rates(),
            last_error=self.counters.last_error, last_scan_at=self.counters.last_scan_at)


def disk_full_message(data_dir: Path | None, free: int, reserve: int) -> str:
    """The one line shown while writing waits for disk space."""
    return (f"disk full: {free // 2**20} MiB free in {data_dir}, below the reserve of "
            f"{reserve // 2**20} MiB (disk_reserve_mb); writing resumes when space is freed")
