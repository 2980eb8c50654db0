"""The daemon's indexing loop: takes settled changes off the queue and feeds the indexer."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repd.core.ignore import IgnoreRules
from repd.log import get_logger
from repd.pipeline.changes import ChangeQueue
from repd.pipeline.indexer import Indexer, RunStats

log = get_logger("worker")

# Files per write group in the daemon: smaller than a one-shot run's so that a group
# finishes within seconds (fast SIGTERM, fresh watchdog beats, edits searchable soon).
DAEMON_GROUP_CHUNKS = 512
RATE_WINDOW_S = 30.0


@dataclass
class Counters:
    """Totals since start and a sliding window for rates."""

    total: RunStats = field(default_factory=RunStats)
    window: deque[tuple[float, int, int, int]] = field(default_factory=deque)
    last_error: str | None = None
    last_scan_at: float | None = None

    def record(self, stats: RunStats) -> None:
        """Fold one batch's figures in."""
        self.total.add(stats)
        now = time.monotonic()
        self.window.append((now, stats.indexed + stats.deleted,
                            stats.chunks_embedded + stats.chunks_reused, stats.chunks_embedded))
        while self.window and self.window[0][0] < now - RATE_WINDOW_S:
            self.window.popleft()

    def rates(self) -> tuple[float, float, float]:
        """(files/s, chunks/s, embeds/s) over the window."""
        if not self.window:
            return 0.0, 0.0, 0.0
        span = max(time.monotonic() - self.window[0][0], 1.0)
        files = sum(w[1] for w in self.window)
        chunks = sum(w[2] for w in self.window)
        embeds = sum(w[3] for w in self.window)
        return files / span, chunks / span, embeds / span


class IndexWorker:
    """One thread: the single consumer of the change queue and user of the indexer."""

    def __init__(self, indexer: Indexer, queue: ChangeQueue,
                 rules: Callable[[Path], IgnoreRules], beat: Callable[[], None],
                 on_idle: Callable[[], None] = lambda: None) -> None:
        self.indexer = indexer
        self.queue = queue
        self._rules = rules
        self._beat = beat
        self._on_idle = on_idle
        self.counters = Counters()
        self.paused = threading.Event()
        self.busy = False
        self._stop = threading.Event()
        self._drops: list[Path] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        indexer.group_chunks = DAEMON_GROUP_CHUNKS
        indexer.build_index_inline = False

    def start(self) -> None:
        """Start the loop on its own thread."""
        self._thread = threading.Thread(target=self._run, name="repd-indexer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Finish the current group, then stop; True if it stopped in time."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def drop_root(self, root: Path) -> None:
        """Forget a root's files (it left the config); done on the worker thread."""
        with self._lock:
            self._drops.append(root)

    def _stopping(self) -> bool:
        return self._stop.is_set()

    def _progress(self, done: int, total: int, stats: RunStats) -> None:
        self._beat()

    def _run(self) -> None:
        idle_since = time.monotonic()
        while not self._stop.is_set():
            self._beat()
            with self._lock:
                drops, self._drops = self._drops, []
            for root in drops:
                self._guard(self.indexer.drop_root, root)
            if self.paused.is_set():
                self._stop.wait(0.2)
                continue
            changes = self.queue.get_ready(max_items=256, timeout=0.5)
            if not changes:
                self.busy = False
                if time.monotonic() - idle_since > 1.0:
                    self._guard(self._on_idle)
                    idle_since = time.monotonic()
                continue
            self.busy = True
            by_root: dict[Path, list[str]] = {}
            for ch in changes:
                if ch.kind == "scan":
                    self._guard(self._scan, ch.root, ch.relpath)
                else:
                    by_root.setdefault(ch.root, []).append(ch.relpath)
            for root, paths in by_root.items():
                self._guard(self._paths, root, paths)
            idle_since = time.monotonic()

    def _scan(self, root: Path, subdir: str) -> None:
        if not root.is_dir():
            log.warning("root_missing", root=str(root))
            self.counters.last_error = f"root {root} is missing"
            return
        stats = self.indexer.reconcile(root, self._rules(root), subdir, self._progress,
                                       self._stopping)
        self.counters.record(stats)
        if not subdir:
            self.counters.last_scan_at = time.time()

    def _paths(self, root: Path, paths: list[str]) -> None:
        self.counters.record(
            self.indexer.process_paths(root, self._rules(root), paths, self._stopping))

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        # One failing batch (a store hiccup, a full disk) must not kill the loop: log it,
        # show it in status, and carry on; the next scan retries what was not committed.
        try:
            fn(*args)
        except Exception as exc:
            self.counters.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("pipeline_error", error=self.counters.last_error)
            self._stop.wait(1.0)
