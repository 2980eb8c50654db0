"""Watches the roots (one inotify observer, polling where inotify cannot) and feeds the ChangeQueue.

The event handler only maps an event to ``put_path``/``put_scan`` after a cached ignore
check. Three things watchdog 7.1 does not do are added by subclassing its inotify
classes (Linux only): ignored directories (``.git``, ``node_modules``...) get no inotify
watch at all, so they cost neither watches nor events; a kernel queue overflow
(``IN_Q_OVERFLOW``), which watchdog only logs, calls :meth:`Watcher.on_lost_events`;
and running out of watches, which watchdog swallows for subdirectories, moves the root
to polling instead of leaving part of it silently unwatched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import DEFAULT_EMITTER_TIMEOUT, BaseObserver, EventQueue, ObservedWatch
from watchdog.observers.inotify import InotifyFullEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD
from watchdog.observers.inotify_move_event_grouper import GroupedInotifyEvent, PathedInotifyEvent
from watchdog.observers.polling import PollingEmitter

from repd.core.ignore import IgnoreRules, is_rule_file
from repd.log import get_logger
from repd.pipeline.changes import ChangeQueue
from repd.settings import WatchSettings

log = get_logger("watcher")

_LIMIT_ERRNOS = frozenset({errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOMEM})
# No opened/closed-without-write events: the indexer reading a file must not look like a change.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent, FileClosedEvent,
    FileAttribEvent, DirCreatedEvent, DirDeletedEvent, DirMovedEvent,
]
_HooksFor = Callable[[str], "_Root | None"]


@dataclass(eq=False)
class _Root:
    """One watched root: its rules, how it is watched, and the hooks its watch calls."""

    path: Path
    rules: IgnoreRules
    watcher: Watcher
    mode: str = "stopped"
    watch: ObservedWatch | None = None
    observer: BaseObserver | None = None
    group: _WatchGroup | None = None
    text: str = field(init=False)

    def __post_init__(self) -> None:
        self.text = str(self.path)

    def rel(self, path: str) -> str | None:
        """``path`` relative to the root, or None when it lies outside."""
        if path == self.text:
            return ""
        prefix = self.text.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else None

    def prune(self, path: bytes) -> bool:
        """True for an ignored directory, which gets no watch and no walk."""
        rel = self.rel(os.fsdecode(path))
        return bool(rel) and self.rules.is_ignored(rel or "", True)

    def listdir(self, path: str | None) -> Iterator[os.DirEntry[str]]:
        """os.scandir without ignored entries, so polling never walks node_modules."""
        rel = self.rel(path or "")
        with os.scandir(path) as it:
            entries = list(it)
        if rel is None:
            return iter(entries)
        base = rel + "/" if rel else ""
        return iter([e for e in entries
                     if not self.rules.is_ignored(base + e.name, e.is_dir(follow_symlinks=False))])


@dataclass(eq=False)
class _WatchGroup(InotifyWatchGroup):
    """watchdog's per-root inotify bookkeeping, with pruning, overflow and limit hooks."""

    hooks: _Root | None = None
    _activating: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except OSError:
            self._remove_callbacks(list(self._active_callbacks_by_watch))  # no half-watched root
            raise
        finally:
            self._activating = False

    def _pruned(self, path: bytes) -> bool:
        return self.hooks is not None and self.hooks.prune(path)

    def _add_all_callbacks(self, path: bytes) -> None:
        # Paths are bytes here, as watchdog keeps them, hence os.path rather than pathlib.
        if self._pruned(path):
            return
        is_dir = os.path.isdir(path)  # noqa: PTH112
        self._add_callback(path)
        if not (is_dir and self.is_recursive):
            return
        for top, dirnames, _ in os.walk(path, followlinks=self.follow_symlink):
            kept = []
            for name in dirnames:
                full = os.path.join(top, name)  # noqa: PTH118
                link = not self.follow_symlink and os.path.islink(full)  # noqa: PTH114
                if not link and not self._pruned(full):
                    kept.append(name)
                    self._add_callback(full)
            dirnames[:] = kept

    def _add_callback(self, path: bytes) -> None:
        if path in self._active_callbacks_by_path:
            return  # already watched (a re-arm walks watched directories again)
        try:
            wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
        except OSError as exc:
            if exc.errno in _LIMIT_ERRNOS:
                if self._activating:
                    raise  # the caller falls back to polling for the whole root
                if self.hooks is not None:
                    self.hooks.watcher._on_watch_limit(self.hooks.path, exc)
            elif path == self.path:
                raise
            return  # a subdirectory that vanished or is unreadable, as watchdog does
        self._active_callbacks_by_path[path] = wd
        self._active_callbacks_by_watch[wd] = path

    def _recursive_simulate(self, src_path: bytes) -> list[InotifyEvent]:
        # watchdog walks a new or moved-in directory to invent "created" events for what
        # it already holds. The handler rescans such a directory as a whole (the scan is
        # queued after its watches exist), so the walk, node_modules and all, is skipped.
        return []

    def on_queue_overflow(self) -> None:
        """The kernel dropped events: watchdog rebuilds the watches; we also ask for a rescan."""
        super().on_queue_overflow()
        if self.is_active and self.hooks is not None:
            self.hooks.watcher.on_lost_events(self.hooks.path)

    def add_subtree(self, path: bytes) -> None:
        """Watch directories under ``path`` that are not watched (rules changed)."""
        with self._lock:
            if self.is_active:
                self._add_all_callbacks(path)

    def drop_subtree(self, path: bytes) -> None:
        """Stop watching a directory moved out of the root (watchdog keeps those watches)."""
        with self._lock:
            if not self.is_active:
                return
            prefix = path + b"/"
            wds = [wd for p, wd in self._active_callbacks_by_path.items()
                   if p == path or p.startswith(prefix)]
            if wds:
                self._remove_callbacks(wds)


class _InotifyEmitter(InotifyFullEmitter):
    """Full emitter (unpaired moves stay moves) building a :class:`_WatchGroup`."""

    def __init__(self, event_queue: EventQueue, watch: ObservedWatch, *,
                 timeout: float = DEFAULT_EMITTER_TIMEOUT,
                 event_filter: list[type[FileSystemEvent]] | None = None,
                 inotify_fd: InotifyFD | None = None, hooks_for: _HooksFor | None = None) -> None:
        super().__init__(event_queue, watch, timeout=timeout, event_filter=event_filter,
                         inotify_fd=inotify_fd)
        self._hooks = hooks_for(watch.path) if hooks_for is not None else None

    def on_thread_start(self) -> None:
        group = _WatchGroup(self._inotify_fd, os.fsencode(self.watch.path),
                            is_recursive=self.watch.is_recursive,
                            event_mask=self.get_event_mask_from_filter(),
                            follow_symlink=self.watch.follow_symlink, hooks=self._hooks)
        self._inotify = group
        if self._hooks is not None:
            self._hooks.group = group

    def build_and_queue_event(self, event: GroupedInotifyEvent, *,
                              full_events: bool = True) -> None:
        # A moved directory becomes one event: the handler rescans both sides, so watchdog's
        # walk of the whole moved tree into per-file events would be wasted work.
        if not isinstance(event, PathedInotifyEvent):
            move_from, move_to = event
            if move_from.ev.is_directory:
                self.queue_event(DirMovedEvent(self._decode_path(move_from.path),
                                               self._decode_path(move_to.path)))
                return
        elif event.ev.is_directory and event.ev.is_moved_from:
            self.queue_event(DirMovedEvent(self._decode_path(event.path), ""))
            if isinstance(self._inotify, _WatchGroup):
                self._inotify.drop_subtree(event.path)
            return
        elif event.ev.is_directory and event.ev.is_moved_to:
            self.queue_event(DirMovedEvent("", self._decode_path(event.path)))
            return
        super().build_and_queue_event(event, full_events=True)


class _InotifyObserver(BaseObserver):
    """An inotify observer of its own (own inotify fd) using :class:`_InotifyEmitter`."""

    def __init__(self, hooks_for: _HooksFor) -> None:
        self._inotify_fd = InotifyFD()  # OSError(EMFILE) at the per-user instance limit
        self._inotify_fd.start()
        super().__init__(_InotifyEmitter, inotify_fd=self._inotify_fd, hooks_for=hooks_for)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()


class _PollingEmitter(PollingEmitter):
    """Polling that skips ignored entries and does not follow symlinks unless told to."""

    def __init__(self, event_queue: EventQueue, watch: ObservedWatch, *,
                 timeout: float = DEFAULT_EMITTER_TIMEOUT,
                 event_filter: list[type[FileSystemEvent]] | None = None,
                 hooks_for: _HooksFor | None = None) -> None:
        hooks = hooks_for(watch.path) if hooks_for is not None else None
        super().__init__(event_queue, watch, timeout=timeout, event_filter=event_filter,
                         stat=os.stat if watch.follow_symlink else os.lstat,
                         listdir=hooks.listdir if hooks is not None else os.scandir)


class _Handler(FileSystemEventHandler):
    """Maps watchdog events of one root to queue entries; no stat, no reads, no hashing."""

    def __init__(self, root: _Root, queue: ChangeQueue) -> None:
        self._root = root
        self._queue = queue

    def dispatch(self, event: FileSystemEvent) -> None:
        """Called by the observer thread for every event of this root."""
        kind = event.event_type
        if kind == "moved":
            for side in (event.src_path, event.dest_path):
                if side:
                    self._one(os.fsdecode(side), event.is_directory, kind)
        elif kind not in ("opened", "closed_no_write"):
            self._one(os.fsdecode(event.src_path), event.is_directory, kind)

    def _one(self, path: str, is_dir: bool, kind: str) -> None:
        root, rules = self._root, self._root.rules
        rel = root.rel(path)
        if rel is None:
            return
        if is_dir:
            if rel == "":
                if kind == "deleted":
                    root.mode = "error: root vanished"
                    self._queue.put_scan(root.path, "")
            elif kind in ("created", "deleted", "moved") and not rules.is_ignored(rel, True):
                self._queue.put_scan(root.path, rel)
            return
        parent, _, name = rel.rpartition("/")
        if is_rule_file(name):
            rules.invalidate(parent)
            self._queue.put_scan(root.path, parent)
            root.watcher._request(root.path, f"rearm:{parent}")
        elif not rules.is_ignored(rel, False):
            self._queue.put_path(root.path, rel, created=kind == "created")


class Watcher:
    """Watches ``roots`` and enqueues their changes; see the module docstring.

    Runs no thread of its own for events: watchdog's threads call the handler. A small
    maintenance thread re-arms watches after rule changes and moves a root to polling
    when inotify runs out of watches while running.
    """

    def __init__(self, roots: Sequence[Path], rules: Mapping[Path, IgnoreRules],
                 queue: ChangeQueue, settings: WatchSettings, *,
                 poll_interval: float = 2.0) -> None:
        self._queue = queue
        self._settings = settings
        self._poll_interval = poll_interval
        self._lock = threading.RLock()
        self._roots: dict[Path, _Root] = {}
        self._by_text: dict[str, _Root] = {}
        for path in roots:
            self._add(path, rules.get(path))
        self._inotify: _InotifyObserver | None = None
        self._polling: BaseObserver | None = None
        self._running = False
        self._tasks: dict[Path, set[str]] = {}
        self._tasks_cond = threading.Condition()
        self._maint: threading.Thread | None = None

    # --- public ------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching every root; a root that cannot be watched reports why in status()."""
        with self._lock:
            if self._running:
                return
            self._running = True
            self._maint = threading.Thread(target=self._maintain, name="repd-watch-maint",
                                           daemon=True)
            self._maint.start()
            for root in self._roots.values():
                self._watch(root)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the observers and the maintenance thread, waiting up to ``timeout`` s in all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._running:
                return
            self._running = False
            observers = [o for o in (self._inotify, self._polling) if o is not None]
            self._inotify = self._polling = None
            for root in self._roots.values():
                root.mode, root.watch, root.observer, root.group = "stopped", None, None, None
        with self._tasks_cond:
            self._tasks_cond.notify_all()
        for observer in observers:
            observer.stop()
        for thread in [*observers, self._maint]:
            if thread is not None and thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def status(self) -> dict[Path, str]:
        """Per root: ``inotify``, ``polling``, ``stopped`` or ``error: ...``."""
        with self._lock:
            return {path: root.mode for path, root in self._roots.items()}

    def add_root(self, root: Path, rules: IgnoreRules) -> None:
        """Watch another root, or replace the rules of a watched one (config reload)."""
        with self._lock:
            known = self._roots.get(root)
            if known is not None:
                known.rules = rules
                if self._running and known.mode.startswith("error"):
                    self._unwatch(known)  # e.g. the folder vanished and is back
                    self._watch(known)
                else:
                    self._request(root, "rearm:")
                return
            added = self._add(root, rules)
            if self._running:
                self._watch(added)

    def remove_root(self, root: Path) -> None:
        """Stop watching ``root`` and forget its pending changes."""
        with self._lock:
            known = self._roots.pop(root, None)
            if known is None:
                return
            self._by_text.pop(known.text, None)
            self._unwatch(known)
        self._queue.drop_root(root)

    def on_lost_events(self, root: Path) -> None:
        """Events of ``root`` were lost (inotify queue overflow): reconcile the whole root."""
        log.warning("filesystem events lost; rescanning root", root=str(root))
        self._queue.put_scan(root, "")

    # --- internals ---------------------------------------------------------------------
    def _on_watch_limit(self, root: Path, exc: OSError) -> None:
        # Called on watchdog's inotify thread: only queue the switch to polling.
        log.warning("inotify watch limit reached; switching root to polling",
                    root=str(root), error=str(exc))
        self._request(root, "poll")

    def _request(self, root: Path, task: str) -> None:
        """Queue maintenance (``poll`` or ``rearm:<dir>``) for the maintenance thread."""
        with self._tasks_cond:
            self._tasks.setdefault(root, set()).add(task)
            self._tasks_cond.notify()

    def _add(self, path: Path, rules: IgnoreRules | None) -> _Root:
        if rules is None:
            rules = IgnoreRules(path, use_gitignore=self._settings.gitignore)
        root = _Root(path, rules, self)
        self._roots[path] = root
        self._by_text[root.text] = root
        return root

    def _hooks_for(self, text: str) -> _Root | None:
        return self._by_text.get(text)

    def _watch(self, root: _Root) -> None:
        if not root.path.is_dir():
            root.mode = "error: not a directory" if root.path.exists() else "error: not found"
            log.error("cannot watch root", root=root.text, reason=root.mode)
            return
        if not self._settings.force_polling:
            try:
                if self._inotify is None:
                    self._inotify = _InotifyObserver(self._hooks_for)
                    self._inotify.start()
                self._schedule(root, self._inotify, "inotify")
                return
            except OSError as exc:
                if exc.errno not in _LIMIT_ERRNOS:
                    root.mode = f"error: {exc.strerror or exc}"
                    log.error("cannot watch root", root=root.text, error=str(exc))
                    return
                log.warning("inotify limit reached; polling this root instead",
                            root=root.text, error=str(exc))
        self._schedule_polling(root)

    def _schedule(self, root: _Root, observer: BaseObserver, mode: str) -> None:
        root.watch = observer.schedule(_Handler(root, self._queue), root.text, recursive=True,
                                       event_filter=_EVENT_FILTER,
                                       follow_symlink=self._settings.follow_symlinks)
        root.observer, root.mode = observer, mode

    def _unwatch(self, root: _Root) -> None:
        if root.observer is not None and root.watch is not None:
            with contextlib.suppress(KeyError):  # its emitter already stopped (root deleted)
                root.observer.unschedule(root.watch)
        root.watch, root.observer, root.group, root.mode = None, None, None, "stopped"

    def _maintain(self) -> None:
        while True:
            with self._tasks_cond:
                while self._running and not self._tasks:
                    self._tasks_cond.wait()
                if not self._running:
                    return
                tasks, self._tasks = self._tasks, {}
            for path, items in tasks.items():
                try:
                    self._run_tasks(path, items)
                except Exception:  # one root's trouble must not end maintenance for all
                    log.exception("watch maintenance failed", root=str(path))

    def _run_tasks(self, path: Path, items: set[str]) -> None:
        with self._lock:
            root = self._roots.get(path)
            if root is None or not self._running:
                return
            if "poll" in items and root.mode == "inotify":
                self._unwatch(root)
                self._schedule_polling(root)
                self._queue.put_scan(path, "")  # after polling started: nothing falls between
                return
            group = root.group if root.mode == "inotify" else None
        for task in sorted(items):
            rel = task.partition(":")[2]
            if group is not None and task.startswith("rearm:"):
                group.add_subtree(os.fsencode(path / rel if rel else path))
                self._queue.put_scan(path, rel)  # again, now that new watches are in place

    def _schedule_polling(self, root: _Root) -> None:
        try:
            if self._polling is None:
                self._polling = BaseObserver(_PollingEmitter, timeout=self._poll_interval,
                                             hooks_for=self._hooks_for)
                self._polling.start()
            self._schedule(root, self._polling, "polling")
        except OSError as exc:
            root.mode = f"error: {exc.strerror or exc}"
            log.error("cannot poll root", root=root.text, error=str(exc))
