"""Watches the roots (one inotify observer, polling where inotify cannot) and feeds the ChangeQueue.

The event handler only maps an event to ``put_path``/``put_scan`` after a cached ignore
check; a writer's ``close()`` (``IN_CLOSE_WRITE``) and a rename into place are marked
``closed``, the queue's fast path past the settle wait. Three things watchdog 7.1 does
not do are added by subclassing its inotify classes (Linux only): ignored directories
(``.git``, ``node_modules``...) get no inotify watch at all, so they cost neither
watches nor events; a kernel queue overflow (``IN_Q_OVERFLOW``), which watchdog only
logs, calls :meth:`Watcher.on_lost_events`; and running out of watches, which watchdog
swallows for subdirectories, moves the root to polling instead of leaving part of it
silently unwatched.

Nothing about one event or one root may stop the watching of the others: the handler and
the inotify callbacks never raise (an error is logged, counted, and becomes a rescan of
the root); folders are walked iteratively (a tree 1,000 levels deep crashed ``repd run``);
a root that cannot be watched is an error of that root only. The maintenance thread
checks every few seconds that each root is still watched: a root in an error state whose
folder is back (deleted and recreated), a root replaced by another folder, or a root
whose emitter thread died is watched again and rescanned. :meth:`Watcher.health` says
whether the threads are alive and which roots have a problem.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from watchdog.observers import inotify as watchdog_inotify
from watchdog.observers.api import DEFAULT_EMITTER_TIMEOUT, BaseObserver, EventQueue, ObservedWatch
from watchdog.observers.inotify import InotifyFullEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD, WatchDescriptor
from watchdog.observers.inotify_move_event_grouper import GroupedInotifyEvent, PathedInotifyEvent
from watchdog.observers.polling import PollingEmitter
from watchdog.utils.dirsnapshot import DirectorySnapshot
from watchdog.version import VERSION_STRING

from repd.core.ignore import IgnoreRules, is_rule_file
from repd.log import get_logger
from repd.pipeline.changes import ChangeQueue
from repd.settings import WatchSettings

log = get_logger("watcher")

#: The watchdog releases whose inotify internals :class:`_WatchGroup` was written against
#: and tested with (it overrides private methods and state): 7.1.0 keeps a group's watches
#: in two dicts, 7.1.1 in a tree of nodes (where the code for 7.1.0 alone received no
#: event at all: silent). pyproject pins one; another release installed beside it is
#: watched by polling, loudly, and ``.ci/run`` runs the watcher's tests on both.
INOTIFY_WATCHDOG_VERSIONS = frozenset({"7.1.0", "7.1.1"})
#: The newest of them: the one to install where another is found.
NEWEST_KNOWN_WATCHDOG = max(INOTIFY_WATCHDOG_VERSIONS,
                            key=lambda v: tuple(int(part) for part in v.split(".")))
#: watchdog 7.1.1's layout: a tree of ``DirNode`` (``_insert_node`` and friends).
_WATCH_TREE = hasattr(InotifyWatchGroup, "_insert_node")
#: What 7.1.1 marks a tree node without a watch of its own with (its own constant; 7.1.0,
#: which has no tree, has none).
_INVALID_WD = getattr(watchdog_inotify, "_INVALID_WD", None)
#: The installed watchdog release.
WATCHDOG_VERSION: str = VERSION_STRING

_LIMIT_ERRNOS = frozenset({errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOMEM})
# No opened/closed-without-write events: the indexer reading a file must not look like a change.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent, FileClosedEvent,
    FileAttribEvent, DirCreatedEvent, DirDeletedEvent, DirMovedEvent,
]
_HooksFor = Callable[[str], "_Root | None"]
# How often the maintenance thread checks that every root is still watched, and the
# longest it waits between two tries at a root that keeps failing.
CHECK_INTERVAL_S = 3.0
MAX_RETRY_S = 60.0
# A handler error is logged with its traceback once per root per this many seconds (an
# error that repeats on every event must not flood the log); every one is counted.
_ERROR_LOG_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class WatchHealth:
    """The watcher's own view of its health, for status and the supervisor.

    ``threads``: each thread the watcher relies on and whether it is alive
    (``maintenance``, ``inotify-observer``, ``inotify-reader``, ``polling-observer``; only
    those that were started). ``problems``: per root, why it is not fully watched right
    now (``error: ...``, a dead emitter), or its last event-handling error within the last
    minute. ``handler_errors``: exceptions caught while handling events since start.
    """

    alive: bool
    threads: dict[str, bool]
    problems: dict[Path, str]
    handler_errors: int
    last_error: str | None


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
    ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the folder when watched
    retry_at: float = 0.0  # monotonic time of the next re-arm try while in error
    retry_delay: float = CHECK_INTERVAL_S
    last_error: tuple[float, str] | None = None  # (monotonic time, text) of a handler error
    last_logged: float = -1e18
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
        if not rel:
            return False
        try:
            return self.rules.is_ignored(rel, True)
        except Exception as exc:  # watching too much beats killing watchdog's thread
            self.watcher._handler_failed(self, exc, "ignore rules")
            return False

    def listdir(self, path: str | None) -> Iterator[os.DirEntry[str]]:
        """os.scandir without ignored entries, so polling never walks node_modules."""
        rel = self.rel(path or "")
        with os.scandir(path) as it:
            entries = list(it)
        if rel is None:
            return iter(entries)
        base = rel + "/" if rel else ""
        kept = []
        for e in entries:
            try:
                if self.rules.is_ignored(base + e.name, e.is_dir(follow_symlinks=False)):
                    continue
            except Exception as exc:  # keep the entry: the poller's thread must live on
                self.watcher._handler_failed(self, exc, "ignore rules")
            kept.append(e)
        return iter(kept)


@dataclass(eq=False)
class _WatchGroup(InotifyWatchGroup):
    """watchdog's per-root inotify bookkeeping, with pruning, overflow and limit hooks."""

    hooks: _Root | None = None
    _activating: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except OSError:
            self._remove_callbacks(self._watch_descriptors())  # no half-watched root
            raise
        finally:
            self._activating = False

    def _pruned(self, path: bytes) -> bool:
        return self.hooks is not None and self.hooks.prune(path)

    def _add_all_callbacks(self, path: bytes) -> None:
        # Paths are bytes here, as watchdog keeps them, hence os rather than pathlib. An
        # explicit stack, not os.walk: Python 3.11's os.walk recurses once per level and
        # a tree ~1,000 levels deep raised RecursionError at start-up.
        if self._pruned(path):
            return
        is_dir = os.path.isdir(path)  # noqa: PTH112
        self._add_callback(path)
        if not (is_dir and self.is_recursive):
            return
        seen: set[tuple[int, int]] = set()  # followed links can loop
        stack = [path]
        while stack:
            top = stack.pop()
            try:
                with os.scandir(top) as it:
                    entries = list(it)
            except OSError:
                continue  # vanished or unreadable meanwhile, as os.walk skips it
            for de in entries:
                try:
                    if de.is_symlink() and not self.follow_symlink:
                        continue
                    if not de.is_dir(follow_symlinks=True):
                        continue
                    if self.follow_symlink:
                        st = de.stat(follow_symlinks=True)
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                except OSError:
                    continue
                full = de.path
                if self._pruned(full):
                    continue
                self._add_callback(full)
                stack.append(full)

    # -- watchdog's bookkeeping of the watches, in either release's layout ------------------
    # ``tree`` is this group typed loosely: the attributes of 7.1.1's layout do not exist
    # in 7.1.0's type stubs, and the checker runs against whichever release is installed.

    def _watch_descriptors(self) -> list[WatchDescriptor]:
        """Every watch descriptor the group holds."""
        tree: Any = self
        return list(tree._nodes_by_wd if _WATCH_TREE else tree._active_callbacks_by_watch)

    def _is_watched(self, path: bytes) -> bool:
        tree: Any = self
        if _WATCH_TREE:
            node = tree._find_node_by_path(path)
            return node is not None and node.wd != _INVALID_WD
        return path in tree._active_callbacks_by_path

    def _remember(self, path: bytes, wd: WatchDescriptor) -> None:
        tree: Any = self
        if _WATCH_TREE:
            if tree._insert_node(path, wd) is None:
                # outside the root (cannot happen from our walks): not kept, not watched
                self._inotify_fd.remove_callbacks([(wd, self._id)])
            return
        tree._active_callbacks_by_path[path] = wd
        tree._active_callbacks_by_watch[wd] = path

    def watched_paths(self) -> set[bytes]:
        """The directories watched now (for checks; not a fast path on 7.1.1)."""
        return set(self._active_callbacks_by_path)

    def _add_callback(self, path: bytes) -> None:
        if self._is_watched(path):
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
        self._remember(path, wd)

    def _recursive_simulate(self, src_path: bytes) -> list[InotifyEvent]:
        # watchdog walks a new or moved-in directory to invent "created" events for what
        # it already holds. The handler rescans such a directory as a whole (the scan is
        # queued after its watches exist), so the walk, node_modules and all, is skipped.
        return []

    def on_event(self, event: InotifyEvent) -> None:
        """watchdog's per-event callback, run on the inotify reader thread shared by every
        root: an exception here would end watching for all of them, so none escapes."""
        try:
            super().on_event(event)
        except Exception as exc:
            self._failed(exc)

    def on_queue_overflow(self) -> None:
        """The kernel dropped events: watchdog rebuilds the watches; we also ask for a rescan."""
        try:
            super().on_queue_overflow()
        except Exception as exc:
            self._failed(exc)
        if self.is_active and self.hooks is not None:
            self.hooks.watcher.on_lost_events(self.hooks.path)

    def _failed(self, exc: Exception) -> None:
        if self.hooks is not None:
            self.hooks.watcher._handler_failed(self.hooks, exc, "inotify")
        else:
            log.error("inotify_callback_failed", error=f"{type(exc).__name__}: {exc}")

    def add_subtree(self, path: bytes) -> None:
        """Watch directories under ``path`` that are not watched (rules changed)."""
        with self._lock:
            if self.is_active:
                self._add_all_callbacks(path)

    def drop_subtree(self, path: bytes) -> None:
        """Stop watching a directory moved out of the root (watchdog 7.1.0 keeps those
        watches; 7.1.1 drops them in the emitter step this module replaces)."""
        if _WATCH_TREE:
            # It takes the group's lock itself (not reentrant), and keeps a watch whose
            # path a newer event already created again.
            tree: Any = self
            tree.remove_watched_directory(path)
            return
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

    def queue_events(self, timeout: float, *, full_events: bool = False) -> None:
        """One round of the emitter's loop; an error is reported, never the thread's end."""
        try:
            super().queue_events(timeout, full_events=full_events)
        except Exception as exc:
            if self._hooks is None:
                raise
            self._hooks.watcher._handler_failed(self._hooks, exc, "emitter")
            time.sleep(min(timeout, 1.0))  # an error that repeats must not spin the CPU

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

    def reader_alive(self) -> bool:
        """Whether the thread reading the inotify descriptor (all roots' events) runs."""
        return self._inotify_fd.is_alive()


class _Snapshot(DirectorySnapshot):
    """watchdog's snapshot with an iterative walk (its own recurses once per level)."""

    def walk(self, root: str) -> Iterator[tuple[str, os.stat_result]]:
        """Every path below ``root`` with its stat, depth first, without recursion."""
        stack = [root]
        while stack:
            top = stack.pop()
            try:
                paths = [os.path.join(top, entry.name)  # noqa: PTH118
                         for entry in self.listdir(top)]
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EINVAL):
                    continue  # gone meanwhile: empty, as watchdog treats it
                if top != root and isinstance(exc, PermissionError):
                    continue  # an unreadable subfolder is skipped, as watchdog does
                raise
            for p in paths:
                try:
                    st = self.stat(p)
                except OSError:
                    continue
                yield p, st
                if self.recursive and stat_mod.S_ISDIR(st.st_mode):
                    stack.append(p)


class _PollingEmitter(PollingEmitter):
    """Polling that skips ignored entries and does not follow symlinks unless told to."""

    def __init__(self, event_queue: EventQueue, watch: ObservedWatch, *,
                 timeout: float = DEFAULT_EMITTER_TIMEOUT,
                 event_filter: list[type[FileSystemEvent]] | None = None,
                 hooks_for: _HooksFor | None = None) -> None:
        hooks = hooks_for(watch.path) if hooks_for is not None else None
        stat = os.stat if watch.follow_symlink else os.lstat
        listdir = hooks.listdir if hooks is not None else os.scandir
        super().__init__(event_queue, watch, timeout=timeout, event_filter=event_filter,
                         stat=stat, listdir=listdir)
        self._take_snapshot = lambda: _Snapshot(self.watch.path,
                                                recursive=self.watch.is_recursive,
                                                stat=stat, listdir=listdir)


class _Handler(FileSystemEventHandler):
    """Maps watchdog events of one root to queue entries; no stat, no reads, no hashing."""

    def __init__(self, root: _Root, queue: ChangeQueue) -> None:
        self._root = root
        self._queue = queue

    def dispatch(self, event: FileSystemEvent) -> None:
        """Called by the observer thread for every event of this root; never raises.

        An exception here used to end watchdog's dispatch thread, and with it live
        indexing of every root while status still said ``inotify``. Now it is logged,
        counted, and the root is rescanned, which covers whatever the event meant.
        """
        try:
            self._dispatch(event)
        except Exception as exc:
            self._root.watcher._handler_failed(self._root, exc, "handler")

    def _dispatch(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind == "moved":
            if event.src_path:
                self._one(os.fsdecode(event.src_path), event.is_directory, kind)
            if event.dest_path:  # renamed into place: complete, like a file closed after writing
                self._one(os.fsdecode(event.dest_path), event.is_directory, kind, closed=True)
        elif kind not in ("opened", "closed_no_write"):
            # "closed" is inotify's IN_CLOSE_WRITE: the writer is done, no settle wait needed.
            self._one(os.fsdecode(event.src_path), event.is_directory, kind,
                      closed=kind == "closed")

    def _one(self, path: str, is_dir: bool, kind: str, *, closed: bool = False) -> None:
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
            self._queue.put_path(root.path, rel, created=kind == "created", closed=closed)


class Watcher:
    """Watches ``roots`` and enqueues their changes; see the module docstring.

    Runs no thread of its own for events: watchdog's threads call the handler. A small
    maintenance thread re-arms watches after rule changes, moves a root to polling when
    inotify runs out of watches while running, and every ``check_interval`` seconds
    watches again any root that lost its watch (see the module docstring).
    """

    def __init__(self, roots: Sequence[Path], rules: Mapping[Path, IgnoreRules],
                 queue: ChangeQueue, settings: WatchSettings, *,
                 poll_interval: float = 2.0, check_interval: float = CHECK_INTERVAL_S) -> None:
        self._queue = queue
        self._settings = settings
        self._poll_interval = poll_interval
        self._check_interval = check_interval
        self._handler_errors = 0
        self._last_error: str | None = None
        self._told_unsupported = False
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

    def threads_alive(self) -> bool:
        """True while every thread the watcher started is running (False once stopped)."""
        return self.health().alive

    def health(self) -> WatchHealth:
        """Threads alive, per-root problems and handler errors; see :class:`WatchHealth`."""
        now = time.monotonic()
        with self._lock:
            threads: dict[str, bool] = {}
            if self._maint is not None:
                threads["maintenance"] = self._maint.is_alive()
            if self._inotify is not None:
                threads["inotify-observer"] = self._inotify.is_alive()
                threads["inotify-reader"] = self._inotify.reader_alive()
            if self._polling is not None:
                threads["polling-observer"] = self._polling.is_alive()
            problems: dict[Path, str] = {}
            for path, root in self._roots.items():
                why = self._root_problem(root)
                if why is None and root.last_error and now - root.last_error[0] < 60:
                    why = f"event handling failed: {root.last_error[1]}"
                if why is not None:
                    problems[path] = why
            alive = self._running and all(threads.values())
            return WatchHealth(alive, threads, problems, self._handler_errors, self._last_error)

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
    def _handler_failed(self, root: _Root, exc: BaseException, where: str) -> None:
        """An event of ``root`` could not be handled: count it, log it, rescan the root.

        Called on watchdog's threads, so it must not raise either.
        """
        try:
            text = f"{type(exc).__name__}: {exc}"[:500]
            now = time.monotonic()
            self._handler_errors += 1
            self._last_error = f"{root.text}: {text}"
            root.last_error = (now, text)
            if now - root.last_logged >= _ERROR_LOG_EVERY_S:
                root.last_logged = now
                log.error("watch_event_failed", root=root.text, where=where, error=text,
                          exc_info=exc)
            self._queue.put_scan(root.path, "")  # whatever the event meant, a scan finds
        except Exception:  # the last line of defence of watchdog's threads: never raise
            pass

    def _root_problem(self, root: _Root) -> str | None:
        """Why ``root`` is not watched right now, or None."""
        if root.mode.startswith("error"):
            return root.mode
        if not self._running or root.mode == "stopped":
            return None
        emitter = _emitter(root)
        if emitter is not None and not emitter.is_alive():
            return "error: its watch thread stopped"
        return None

    def _check_roots(self) -> None:
        """Watch again every root that lost its watch; rebuild dead observers.

        Runs on the maintenance thread every few seconds. Catches: a root deleted and
        recreated (it stayed unwatched until the hourly rescan), a root replaced by
        another folder (the old watch follows the old folder), an emitter thread that
        died, and an observer whose threads died.
        """
        with self._lock:
            if not self._running:
                return
            self._rebuild_dead_observers()
            now = time.monotonic()
            for root in list(self._roots.values()):
                if not self._needs_rearm(root) or now < root.retry_at:
                    continue
                self._unwatch(root)
                self._watch(root)
                if root.mode.startswith("error"):
                    root.retry_delay = min(root.retry_delay * 2, MAX_RETRY_S)
                    root.retry_at = now + root.retry_delay
                    continue
                root.retry_delay, root.retry_at = self._check_interval, 0.0
                log.info("root_watched_again", root=root.text, mode=root.mode)
                self._queue.put_scan(root.path, "")  # after the watch: nothing falls between

    def _needs_rearm(self, root: _Root) -> bool:
        try:
            st = root.path.stat()
        except OSError:
            if not root.mode.startswith("error"):
                root.mode = "error: root vanished"
                log.error("root_vanished", root=root.text)
            return False  # not back yet
        if not stat_mod.S_ISDIR(st.st_mode):
            return False
        if root.mode.startswith("error"):
            return True
        if root.ident is not None and root.ident != (st.st_dev, st.st_ino):
            log.warning("root_replaced", root=root.text)
            return True  # deleted and recreated between two checks
        return self._root_problem(root) is not None

    def _rebuild_dead_observers(self) -> None:
        if self._inotify is not None and not (self._inotify.is_alive()
                                               and self._inotify.reader_alive()):
            log.error("inotify_observer_died", action="watching its roots again")
            dead: BaseObserver = self._inotify
            self._inotify = None
            self._drop_observer(dead)
        if self._polling is not None and not self._polling.is_alive():
            log.error("polling_observer_died", action="watching its roots again")
            dead = self._polling
            self._polling = None
            self._drop_observer(dead)

    def _drop_observer(self, dead: BaseObserver) -> None:
        for root in self._roots.values():
            if root.observer is dead:
                root.watch, root.observer, root.group = None, None, None
                root.mode = "error: watch thread died"
                root.retry_at = 0.0
        with contextlib.suppress(Exception):
            dead.stop()

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
        # Whatever goes wrong is an error of this root only: never of the daemon.
        try:
            self._watch_unguarded(root)
        except Exception as exc:
            root.mode = f"error: {type(exc).__name__}: {exc}"[:300]
            log.exception("cannot watch root", root=root.text)

    def _watch_unguarded(self, root: _Root) -> None:
        try:
            st = root.path.stat()
        except OSError:
            st = None
        if st is None or not stat_mod.S_ISDIR(st.st_mode):
            mode = "error: not a directory" if st is not None else "error: not found"
            if root.mode != mode:  # the periodic re-arm must not log the same line forever
                log.error("cannot watch root", root=root.text, reason=mode)
            root.mode = mode
            return
        root.ident = (st.st_dev, st.st_ino)
        if not self._settings.force_polling and self._inotify_usable():
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

    def _inotify_usable(self) -> bool:
        """Whether the installed watchdog is one this watcher's inotify code knows; an
        error (once per watcher) where it is not, and the roots are polled."""
        if WATCHDOG_VERSION in INOTIFY_WATCHDOG_VERSIONS:
            return True
        if not self._told_unsupported:
            self._told_unsupported = True
            log.error("watchdog_version_unsupported", version=WATCHDOG_VERSION,
                      supported=sorted(INOTIFY_WATCHDOG_VERSIONS), action="polling every root",
                      fix=f"pip install 'watchdog=={NEWEST_KNOWN_WATCHDOG}'"
                          " (the newest release repd knows)")
        return False

    def _schedule(self, root: _Root, observer: BaseObserver, mode: str) -> None:
        root.watch = observer.schedule(_Handler(root, self._queue), root.text, recursive=True,
                                       event_filter=_EVENT_FILTER,
                                       follow_symlink=self._settings.follow_symlinks)
        root.observer, root.mode = observer, mode

    def _unwatch(self, root: _Root) -> None:
        if root.observer is not None and root.watch is not None:
            with contextlib.suppress(Exception):  # its emitter already stopped (root deleted)
                root.observer.unschedule(root.watch)
        root.watch, root.observer, root.group, root.mode = None, None, None, "stopped"

    def _maintain(self) -> None:
        next_check = time.monotonic() + self._check_interval
        while True:
            with self._tasks_cond:
                while self._running and not self._tasks:
                    wait = next_check - time.monotonic()
                    if wait <= 0:
                        break
                    self._tasks_cond.wait(wait)
                if not self._running:
                    return
                tasks, self._tasks = self._tasks, {}
            for path, items in tasks.items():
                try:
                    self._run_tasks(path, items)
                except Exception:  # one root's trouble must not end maintenance for all
                    log.exception("watch maintenance failed", root=str(path))
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self._check_interval
                try:
                    self._check_roots()
                except Exception:
                    log.exception("watch check failed")

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


def _emitter(root: _Root) -> threading.Thread | None:
    """The emitter thread of ``root``'s watch (watchdog keeps them in a private map)."""
    if root.observer is None or root.watch is None:
        return None
    emitters: dict[ObservedWatch, threading.Thread] = getattr(
        root.observer, "_emitter_for_watch", {})
    return emitters.get(root.watch)
