"""The change queue between the watcher and the indexer: coalescing, debouncing, settling, bounded.

Producers (watchdog's threads) only record that a path or a subtree changed; the
consumer asks for what is ready. An entry is ready once no change has touched it for
``debounce_ms`` and, for a file, once its size, mtime and inode stayed the same for
``settle_ms`` (the consumer stats inside :meth:`ChangeQueue.get_ready`, outside the
lock, never in a producer).

The fast path: when the last event of a path says its writer is done (a ``close()``
after writing, inotify's ``IN_CLOSE_WRITE``, or a rename into place), waiting for the
file to stop changing is pointless: the entry is ready after a short ``close_debounce_ms``
(30 ms, so that the events of one editor save still coalesce into one change) and needs
no settle. Any later event without that mark (a write by a writer that keeps the file
open) puts the entry back on the slow path, debounce and settle. A path changed again
within ``settle_ms`` of its last hand-out is likely a writer that opens, appends and
closes in a loop (a log): that entry takes the slow path until it is handed out, so such
a file is not indexed at every close.
Polling sees no ``close()``: it always takes the slow path.

A path that was *created* and is gone again when checked
(a temp file renamed away, vim's ``4913`` probe) was never seen by the index and is
dropped. Memory is bounded: past ``max_pending`` distinct paths, the busiest root's
entries collapse into one reconcile scan of that root.
"""

from __future__ import annotations

import math
import stat
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from repd.log import get_logger

if TYPE_CHECKING:
    from repd.settings import WatchSettings

log = get_logger("changes")

ChangeKind = Literal["path", "scan"]
_Key = tuple[Path, str]
_Sample = tuple[int, int, int]  # size, mtime_ns, inode
_GONE: Literal["gone"] = "gone"
_NOW: Literal["now"] = "now"  # not a regular file, or unreadable: the indexer decides now
_RECENT_WINDOW_S = 30.0
_RECENT_MAX = 8192
CLOSE_DEBOUNCE_MS = 30  # after a writer's close(): editor saves still collapse into one change


@dataclass(frozen=True, slots=True)
class Change:
    """Something the indexer must look at: one path, or a whole subtree (``kind="scan"``).

    ``relpath`` is POSIX and relative to ``root``; ``""`` with ``scan`` means the whole root.
    A ``path`` change says nothing about what happened: the indexer looks at the disk.
    """

    root: Path
    relpath: str
    kind: ChangeKind = "path"


@dataclass(slots=True)
class _Entry:
    first_seen: float
    last_seen: float
    created: bool = False  # the first event created the path: vanishing again is a no-op
    quick: bool = False  # the last event closed the file after writing: no settle wait
    busy: bool = False  # first seen within settle of the path's last hand-out: no fast path
    version: int = 0
    sample: _Sample | None = None
    sampled_at: float = 0.0


def _probe(path: Path) -> _Sample | Literal["gone", "now"]:
    try:
        st = path.stat()
    except FileNotFoundError:
        # A dangling symlink is there (it is recorded as one), not gone: dropping it as
        # "created then gone" left it unrecorded until the next full scan.
        return _NOW if path.is_symlink() else _GONE
    except NotADirectoryError:
        return _GONE
    except OSError:
        return _NOW
    if not stat.S_ISREG(st.st_mode):
        return _NOW
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class ChangeQueue:
    """Thread-safe, bounded, coalescing and debouncing queue of :class:`Change`.

    ``clock`` and ``probe`` exist for tests; ``max_delay_ms`` caps how long a scan
    request can be postponed by a stream of changes under it; ``close_debounce_ms`` is the
    debounce of a path whose last event was a close after writing (``None``: no fast
    path, every file settles; never longer than ``debounce_ms``).
    """

    def __init__(self, debounce_ms: int = 150, settle_ms: int = 300, max_pending: int = 20_000,
                 *, max_delay_ms: int = 5_000, close_debounce_ms: int | None = CLOSE_DEBOUNCE_MS,
                 clock: Callable[[], float] = time.monotonic,
                 probe: Callable[[Path], _Sample | Literal["gone", "now"]] = _probe) -> None:
        self.debounce = debounce_ms / 1000
        self.settle = settle_ms / 1000
        self.close_debounce = None if close_debounce_ms is None else close_debounce_ms / 1000
        self.max_pending = max(1, max_pending)
        self.max_delay = max_delay_ms / 1000
        self._clock = clock
        self._probe = probe
        self._cond = threading.Condition(threading.Lock())
        self._paths: OrderedDict[_Key, _Entry] = OrderedDict()  # debouncing, by last_seen
        self._quick: OrderedDict[_Key, _Entry] = OrderedDict()  # closed after writing, ditto
        self._settling: OrderedDict[_Key, _Entry] = OrderedDict()  # by sampled_at
        self._scans: dict[_Key, _Entry] = {}
        self._by_dir: dict[_Key, set[str]] = {}  # (root, parent dir) -> pending relpaths
        self._per_root: Counter[Path] = Counter()  # pending entries (paths and scans) per root
        self._recent: OrderedDict[_Key, float] = OrderedDict()  # handed out lately
        self._closed = False
        self._waiters = 0
        self._wake_at = math.inf
        # Handed out by get_ready and not yet acknowledged by task_done: counted under the
        # same lock as the hand-out, so "queue empty" and "worker idle" are never both
        # seen true while a change is between the two.
        self._inflight = 0
        self.overflows = 0

    @classmethod
    def from_settings(cls, settings: WatchSettings) -> ChangeQueue:
        """A queue tuned by the ``[watch]`` settings."""
        return cls(settings.debounce_ms, settings.settle_ms, settings.max_pending)

    def retune(self, settings: WatchSettings) -> None:
        """Apply new ``[watch]`` timings and bound (a config reload); pending entries stay."""
        with self._cond:
            self.debounce = settings.debounce_ms / 1000
            self.settle = settings.settle_ms / 1000
            self.max_pending = max(1, settings.max_pending)
            self._cond.notify_all()

    # --- producers ---------------------------------------------------------------------
    def put_path(self, root: Path, relpath: str, *, created: bool = False,
                 closed: bool = False) -> None:
        """Note that ``relpath`` changed; ``created``: the event says it did not exist before;
        ``closed``: its writer is done with it (a close after writing, a rename into place),
        so it needs no settle wait unless a later event says otherwise."""
        now = self._clock()
        key = (root, relpath)
        with self._cond:
            if self._closed:
                return
            scan = self._covering_scan(root, relpath)
            if scan is not None:
                scan.last_seen = now
                return
            recent = self._recent.get(key)
            entry = self._paths.pop(key, None)
            if entry is None:
                entry = self._quick.pop(key, None)
            if entry is None:
                entry = self._settling.pop(key, None)
                if entry is None:
                    # A change of this path may still be in the indexer's hands; dropping a
                    # "created then gone" entry could then leave what it indexed behind.
                    fresh = recent is None or now - recent > _RECENT_WINDOW_S
                    # Changed again soon after its last hand-out: a writer that opens,
                    # appends and closes in a loop, which settles until it pauses.
                    busy = recent is not None and now - recent < self.settle
                    entry = _Entry(now, now, created=created and fresh, busy=busy)
                    self._index_add(key)
                else:
                    entry.sample = None
            entry.quick = closed and self.close_debounce is not None and not entry.busy
            (self._quick if entry.quick else self._paths)[key] = entry  # last: by last_seen
            entry.last_seen = now
            entry.version += 1
            self._bound(now)
            self._wake(now + (self._quick_debounce() if entry.quick else self.debounce))

    def put_scan(self, root: Path, rel_dir: str = "") -> None:
        """Ask for a reconcile of ``rel_dir`` (``""``: whole root); subsumes entries under it."""
        now = self._clock()
        with self._cond:
            if self._closed:
                return
            self._add_scan(root, rel_dir.strip("/"), now)
            self._bound(now)
            self._wake(now + self.debounce)

    def close(self) -> None:
        """Shut down: wake every consumer; later puts are ignored and get_ready returns []."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drop_root(self, root: Path) -> None:
        """Forget everything pending for ``root`` (it is no longer watched)."""
        with self._cond:
            self._drop_paths(root, "")
            for key in [k for k in self._scans if k[0] == root]:
                self._del_scan(key)

    def depth(self) -> dict[str, int]:
        """Pending path entries (settling ones included), pending scans, settling files, and
        changes handed out but not yet done (``inflight``)."""
        with self._cond:
            return {"paths": len(self._paths) + len(self._quick) + len(self._settling),
                    "scans": len(self._scans), "settling": len(self._settling),
                    "inflight": self._inflight}

    def task_done(self, n: int) -> None:
        """The consumer finished ``n`` changes it got from :meth:`get_ready`."""
        with self._cond:
            self._inflight = max(0, self._inflight - n)

    # --- consumer ----------------------------------------------------------------------
    def has_ready(self) -> bool:
        """True when :meth:`get_ready` would hand out work now (a backfill yields to it)."""
        with self._cond:
            if self._closed:
                return False
            now = self._clock()
            if any(now >= e.last_seen + self.debounce or now >= e.first_seen + self.max_delay
                   for e in self._scans.values()):
                return True
            return bool(self._due(now, 1))

    def get_ready(self, max_items: int, timeout: float) -> list[Change]:
        """Up to ``max_items`` ready changes, waiting up to ``timeout`` s; [] on timeout/close."""
        deadline = self._clock() + max(0.0, timeout)
        max_items = max(1, max_items)
        while True:
            with self._cond:
                if self._closed:
                    return []
                now = self._clock()
                out = self._ready_scans(now, max_items)
                self._inflight += len(out)
                due = self._due(now, max_items - len(out)) if len(out) < max_items else []
                if not out and not due:
                    wait = min(deadline, self._next_due()) - now
                    if now >= deadline:
                        return []
                    self._waiters += 1
                    self._wake_at = min(self._wake_at, now + wait)
                    try:
                        self._cond.wait(wait)
                    finally:
                        self._waiters -= 1
                        if not self._waiters:
                            self._wake_at = math.inf
                    continue
            probed = [(key, entry, version, self._probe(key[0] / key[1]))
                      for key, entry, version in due]  # stat without holding the lock
            with self._cond:
                before = len(out)
                self._apply(probed, self._clock(), out, max_items)
                self._inflight += len(out) - before
            if out:
                return out

    # --- internals (lock held) ---------------------------------------------------------
    def _quick_debounce(self) -> float:
        return min(self.debounce, self.close_debounce or 0.0)

    def _wake(self, due: float) -> None:
        # Waking a consumer for nothing costs a context switch per event during a storm,
        # so a lone waiter is only woken when this change is due before it would wake anyway.
        if self._waiters > 1 or (self._waiters and due < self._wake_at):
            self._cond.notify_all()

    def _covering_scan(self, root: Path, relpath: str) -> _Entry | None:
        scans = self._scans
        if not scans:
            return None
        found = scans.get((root, ""))
        cut = relpath.find("/")
        while found is None and cut != -1:
            found = scans.get((root, relpath[:cut]))
            cut = relpath.find("/", cut + 1)
        return found if found is not None else scans.get((root, relpath))

    def _add_scan(self, root: Path, rel_dir: str, now: float) -> None:
        covering = self._covering_scan(root, rel_dir)
        if covering is not None:
            covering.last_seen = now
            return
        self._drop_paths(root, rel_dir)
        prefix = rel_dir + "/"
        for key in [k for k in self._scans
                    if k[0] == root and (not rel_dir or k[1].startswith(prefix))]:
            self._del_scan(key)
        self._scans[(root, rel_dir)] = _Entry(now, now)
        self._per_root[root] += 1

    def _del_scan(self, key: _Key) -> None:
        del self._scans[key]
        self._count_down(key[0])

    def _drop_paths(self, root: Path, rel_dir: str) -> None:
        prefix = rel_dir + "/"
        dirs = [k for k in self._by_dir
                if k[0] == root and (not rel_dir or k[1] == rel_dir or k[1].startswith(prefix))]
        keys = [(root, rel) for d in dirs for rel in self._by_dir[d]]
        keys.append((root, rel_dir))  # a path entry for the directory itself
        for key in keys:
            if (self._paths.pop(key, None) is not None or self._quick.pop(key, None) is not None
                    or self._settling.pop(key, None) is not None):
                self._index_remove(key)

    def _index_add(self, key: _Key) -> None:
        self._by_dir.setdefault((key[0], key[1].rpartition("/")[0]), set()).add(key[1])
        self._per_root[key[0]] += 1

    def _index_remove(self, key: _Key) -> None:
        dir_key = (key[0], key[1].rpartition("/")[0])
        names = self._by_dir.get(dir_key)
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._by_dir[dir_key]
        self._count_down(key[0])

    def _count_down(self, root: Path) -> None:
        self._per_root[root] -= 1
        if self._per_root[root] <= 0:
            del self._per_root[root]

    def _bound(self, now: float) -> None:
        """Past max_pending entries, the busiest root's entries become one scan of that root."""
        pending = len(self._paths) + len(self._quick) + len(self._settling) + len(self._scans)
        if pending <= self.max_pending:
            return
        root, count = self._per_root.most_common(1)[0]
        self.overflows += 1
        log.warning("change storm: pending paths collapsed into a root scan",
                    root=str(root), dropped=count, max_pending=self.max_pending)
        self._add_scan(root, "", now)

    def _ready_scans(self, now: float, max_items: int) -> list[Change]:
        out: list[Change] = []
        for key, e in list(self._scans.items()):
            if len(out) >= max_items:
                break
            if now >= e.last_seen + self.debounce or now >= e.first_seen + self.max_delay:
                self._del_scan(key)
                out.append(Change(key[0], key[1], "scan"))
        return out

    def _due(self, now: float, room: int) -> list[tuple[_Key, _Entry, int]]:
        limit = max(room, 64)  # some due entries only move on to settling
        due: list[tuple[_Key, _Entry, int]] = []
        quick = self._quick_debounce()
        for key, e in self._quick.items():
            if len(due) >= limit or e.last_seen + quick > now:
                break
            due.append((key, e, e.version))
        for key, e in self._paths.items():
            if len(due) >= limit or e.last_seen + self.debounce > now:
                break
            due.append((key, e, e.version))
        for key, e in self._settling.items():
            if len(due) >= 2 * limit or e.sampled_at + self.settle > now:
                break
            due.append((key, e, e.version))
        return due

    def _next_due(self) -> float:
        nxt = math.inf
        if self._paths:
            nxt = next(iter(self._paths.values())).last_seen + self.debounce
        if self._quick:
            nxt = min(nxt, next(iter(self._quick.values())).last_seen + self._quick_debounce())
        if self._settling:
            nxt = min(nxt, next(iter(self._settling.values())).sampled_at + self.settle)
        for e in self._scans.values():
            nxt = min(nxt, e.last_seen + self.debounce, e.first_seen + self.max_delay)
        return nxt

    def _apply(self, probed: list[tuple[_Key, _Entry, int, _Sample | Literal["gone", "now"]]],
               now: float, out: list[Change], max_items: int) -> None:
        for key, entry, version, result in probed:
            home = (self._settling if entry.sample is not None
                    else self._quick if entry.quick else self._paths)
            if home.get(key) is not entry or entry.version != version:
                continue  # changed, subsumed or collapsed while we were looking
            if result == _GONE and entry.created:
                del home[key]
                self._index_remove(key)
            elif (result in (_GONE, _NOW) or not self.settle or entry.quick
                  or entry.sample == result):
                if len(out) >= max_items:
                    continue  # stays due; handed out by the next call
                del home[key]
                self._index_remove(key)
                self._remember(key, now)
                out.append(Change(key[0], key[1], "path"))
            else:  # a first sample, or the file is still changing: (re)start settling
                assert not isinstance(result, str)
                del home[key]
                entry.sample, entry.sampled_at = result, now
                self._settling[key] = entry

    def _remember(self, key: _Key, now: float) -> None:
        self._recent.pop(key, None)
        self._recent[key] = now
        while self._recent and (len(self._recent) > _RECENT_MAX
                                or next(iter(self._recent.values())) < now - _RECENT_WINDOW_S):
            self._recent.popitem(last=False)
