"""Two copies of one Qdrant Edge shard, each in a process of its own: builds never pause the daemon.

Qdrant Edge's ``optimize()`` (the HNSW build) holds the GIL of the process that calls it,
for about 3 s per 8k points (minutes for a segment merge), and every other Edge call
holds it too. In the daemon's process that freezes the API. Here the daemon's process
never calls Edge: each replica is a ``store_worker`` process owning one shard, and:

* a write goes to both (the same requests in the same order), and returns once the
  *serving* replica applied it; the other applies it when it can (it may be building);
* a read (search, retrieve, count...) goes to the serving replica, which has every
  write that returned, or to the standby when the serving one is busy and the standby
  has applied everything sent to it (so it holds every write that returned too);
* ``maybe_build_index`` sends the build to the other (standby) replica, which builds in
  its own process while the serving one answers; once it has built and caught up
  with the writes queued meanwhile, the two swap roles and the new standby builds the
  same, so both end up indexed; whenever a build did something the two swap again, so
  points written during a build are built too, until a build finds nothing due.

Folder layout of a replicated generation ``P``: ``P/r0`` and ``P/r1`` (two Edge shards)
and ``P/replicas.json`` (``serving``: which one is authoritative, ``synced``: whether
the other is known to hold the same points). Every flush waits for the serving
replica, so after a crash that replica holds exactly what a single shard would, and the
other may lag: the open finds ``synced`` false and copies the authoritative shard over
the other before anything reads it. A clean ``close`` drains both and marks them synced;
so does one that has to kill a busy standby, once that standby holds every write (it
replays those it had not confirmed; see ``close``).

Costs: twice the disk and the page cache of one shard, two processes of ~60 MB, every
build done twice (in a process of its own, on another core when there is one), and one
pipe round trip per call (~0.1-0.3 ms). ``open_edge_store`` converts a folder between
the single-shard and the replicated layouts, so the setting can be changed at any
time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import IO, Any

from repd.adapters import store_edge
from repd.adapters.store import DEFAULT_RRF_K, Store, StoreError, check_dim, check_sparse
from repd.adapters.store_edge import DROPPING_SUFFIX, EdgeStore, shard_exists
from repd.adapters.store_worker import pack_points, read_frame
from repd.core.types import Hit, PointRecord, SearchMode, SparseVec
from repd.log import get_logger
from repd.process import child_env

log = get_logger("store")

#: The marker of the replicated layout (see the module doc).
REPLICAS_FILE = "replicas.json"
#: The two replicas' shard folders inside the generation's folder.
REPLICA_DIRS = ("r0", "r1")
#: Suffix of the sibling folder a conversion moves the authoritative shard through.
_MOVING_SUFFIX = ".single"
#: Suffix of the folder a repair copies into before it replaces the lagging replica.
_COPY_SUFFIX = ".copy"
#: Points queued for a busy standby at which a write waits for it to catch up: bounds
#: the daemon's memory during a long build (~2 KB a point), not its answers.
MAX_LAG_POINTS = 65536
#: Largest request written by the calling thread when its replica is idle (see
#: ``_Replica.send``): a pipe holds at least 16 KiB (64 KiB on Linux), so such a write
#: into an empty pipe never blocks.
DIRECT_WRITE_BYTES = 16 * 1024
#: Seconds ``close`` gives a store process to exit once its input is closed.
_EXIT_WAIT = 30.0
#: Seconds ``close`` waits for a busy standby (a build) before killing it.
CLOSE_STANDBY_WAIT = 20.0
#: Seconds ``close`` then gives a fresh store process to replay the writes the killed
#: standby had not confirmed (a stopping service has 30 s in all before systemd kills
#: it; cut short, the next open copies the serving replica instead).
CATCH_UP_WAIT = 8.0
#: Largest segment a replica's optimizer builds or merges. Builds never pause the daemon
#: here, so segments may grow well past the threshold: fewer segments make queries
#: faster (163,840 random points, hybrid: 4 segments answer in 3.7 ms at p50 where 21
#: segments of at most 12,288 take 15.3 ms), for 2.5x the build work (merges reuse the
#: larger segment's graph: 214 s of builds against 87 s).
REPLICA_SEGMENT_POINTS = 65536
#: Points per write request: the serving replica gets a group's parts one after the
#: other, so a query waits behind one part at most, not a whole group (64 points take
#: ~10-15 ms on a loaded 2-core machine, 256 took 50-60 ms: most of it is turning the
#: payloads into Edge's points, which holds the store process's GIL).
WRITE_PART = 64
#: Thresholds' worth of points a writer may write while a build runs before it waits
#: for the build (see ``ReplicatedStore._wait_for_build``).
BUILD_AHEAD = 4
#: Longest a write waits for a build or a lagging replica, in seconds.
WRITER_WAIT = 20.0

# Every store process is started from this one long-lived thread: the kernel's
# parent-death signal (repd.process.die_with_parent) fires when the *thread* that
# forked the child ends, and the threads that open stores may be short-lived.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repd-store-spawn")


def _spawn() -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "repd.adapters.store_worker", str(os.getpid())]
    return _SPAWNER.submit(subprocess.Popen, argv, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, env=child_env()).result()


def frame(method: str, *args: Any, **kwargs: Any) -> bytes:
    """One request as a ``store_worker`` frame."""
    data = pickle.dumps((method, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(8, "big") + data


class _Replica:
    """The client of one store process: calls return futures, answered in order."""

    def __init__(self, name: str, on_idle: Any) -> None:
        self.name = name
        self._on_idle = on_idle
        self._proc = _spawn()
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: IO[bytes] = self._proc.stdin
        self._stdout: IO[bytes] = self._proc.stdout
        self._lock = threading.Lock()
        #: (future, points, the frame when it is a write) of each unanswered request.
        self._pending: deque[tuple[Future[Any], int, bytes | None]] = deque()
        #: Points of the writes sent and not yet applied.
        self.lag_points = 0
        self._dead: str | None = None
        # Requests go through a queue and a thread of their own, so a caller never
        # blocks on a full pipe while the process is busy building (but see ``send``).
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._stopping = False
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                         name=f"repd-store-{name}-send")
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True,
                                          name=f"repd-store-{name}-receive")
        self._sender.start()
        self._receiver.start()

    @property
    def pid(self) -> int:
        """The store process's pid."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """False once the process is known to have exited."""
        with self._lock:
            return self._dead is None

    @property
    def pending(self) -> int:
        """Requests sent and not yet answered."""
        with self._lock:
            return len(self._pending)

    def call(self, method: str, *args: Any, points: int = 0, **kwargs: Any) -> Future[Any]:
        """Send one request; ``points`` counts towards ``lag_points`` until answered."""
        return self.send(frame(method, *args, **kwargs), points)

    def send(self, data: bytes, points: int = 0, *, write: bool = False) -> Future[Any]:
        """Send one request made by ``frame`` (one pickle for both replicas); a ``write``
        is kept until answered (see ``unanswered_writes``)."""
        fut: Future[Any] = Future()
        with self._lock:
            if self._dead is not None:
                fut.set_exception(StoreError(self._dead))
                return fut
            self._pending.append((fut, points, data if write else None))
            self.lag_points += points
            if len(self._pending) > 1 or len(data) > DIRECT_WRITE_BYTES or self._stopping:
                self._outbox.put(data)
                return fut
            # Nothing was pending: the process has read every frame sent before, so the
            # pipe is empty and a frame this small cannot block. Written from here, a
            # query skips a hand-off to the sender thread, and the wake-up of a thread
            # (on an idle core, tens of microseconds); in order, as the next frame can
            # only be queued once this lock is released.
            with contextlib.suppress(OSError, ValueError):  # gone: the receiver fails it
                self._stdin.write(data)
                self._stdin.flush()
        return fut

    def unanswered_writes(self) -> list[bytes]:
        """The frames of the writes sent and not yet answered, in order."""
        with self._lock:
            return [data for _, _, data in self._pending if data is not None]

    def oldest(self) -> Future[Any] | None:
        """The oldest unanswered request, if any."""
        with self._lock:
            return self._pending[0][0] if self._pending else None

    def stop(self, *, kill: bool = False) -> None:
        """End the process: close its input (it closes its shard and exits) or kill it."""
        with self._lock:
            self._stopping = True  # the sender closes the input: no more direct writes
            self._outbox.put(None)
        if kill:
            with contextlib.suppress(OSError):
                self._proc.kill()
        try:
            self._proc.wait(timeout=_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._receiver.join(timeout=_EXIT_WAIT)

    def _send_loop(self) -> None:
        while (frame := self._outbox.get()) is not None:
            try:
                self._stdin.write(frame)
                self._stdin.flush()
            except OSError:
                return  # the process is gone: the receiver reports it
        with contextlib.suppress(OSError):
            self._stdin.close()

    def _receive_loop(self) -> None:
        while True:
            try:
                status, value = read_frame(self._stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            with self._lock:
                fut, points, _ = self._pending.popleft()
                self.lag_points -= points
                idle = not self._pending
            if status == "ok":
                fut.set_result(value)
            elif status == "err":
                fut.set_exception(StoreError(value))
            else:
                fut.set_exception(StoreError(f"store process {self.name} failed: {value}"))
            if idle:
                self._on_idle()
        rc = self._proc.wait()
        with self._lock:
            self._dead = f"the store process of {self.name} has exited (status {rc})"
            failed = [f for f, _, _ in self._pending]
            self._pending.clear()
            self.lag_points = 0
        for fut in failed:
            fut.set_exception(StoreError(self._dead))


class ReplicatedStore:
    """A ``Store`` over two Edge shard replicas in store processes (see the module doc).

    Use ``ReplicatedStore.open``. Thread-safe as ``EdgeStore`` is: one writer thread and
    any number of readers.
    """

    #: The shards flush in their own processes.
    flush_holds_gil = False

    def __init__(self, path: Path, dim: int, hybrid: bool, serving: int,
                 index_threshold: int) -> None:
        """Start both store processes (no shard opened yet); prefer ``open``."""
        self.path = path
        self.dim = dim
        self.hybrid = hybrid
        self.index_threshold = index_threshold
        #: Points written since the last build was sent (the indexer's backstop reads it).
        self.written_since_build = 0
        self._lock = threading.RLock()
        self._serving = serving
        self._marked_unsynced = False
        self._build: Future[Any] | None = None
        self._building: int | None = None
        self._swap_due = False
        self._writing = False
        self._written_during_build = 0
        self._closed = False
        self._dropped = False
        #: Set when one replica failed alone (see ``_standby_done``).
        self._fault: str | None = None
        #: The replica ``close`` is killing: its requests failing then is no fault.
        self._killing: int | None = None
        #: What ``open`` gave each store process's ``EdgeStore.open`` (set by ``open``).
        self._edge_options: dict[str, Any] = {}
        self._replicas: list[_Replica] = []
        try:
            for d in REPLICA_DIRS:
                self._replicas.append(_Replica(f"{path.name}/{d}", self._on_idle))
        except OSError as exc:  # no process could be started (no memory, no fds)
            for r in self._replicas:
                r.stop(kill=True)
            raise StoreError(f"cannot start a store process for {path}: {exc}") from exc

    @classmethod
    def open(cls, path: Path, dim: int, *, hybrid: bool = False,
             **edge_options: Any) -> ReplicatedStore:
        """Open (or create) the replicated generation at ``path``.

        A single Edge shard at ``path`` is converted first (its folder becomes ``r0`` and
        is copied to ``r1``); a replica left behind by a crash is replaced by a copy of
        the authoritative one. ``edge_options`` go to ``EdgeStore.open`` in each
        process. Raises ``StoreError`` as ``EdgeStore.open`` does.
        """
        try:
            serving, synced = _prepare(path)
            if not synced:
                _repair(path, serving)
        except OSError as exc:
            raise StoreError(f"cannot prepare the replicated index at {path}: {exc}") from exc
        # Read at call time: a benchmark may change the module's default.
        threshold = int(edge_options.get("index_threshold")
                        or store_edge.DEFAULT_INDEX_THRESHOLD)
        # Explicit, so both processes use the threshold this process was configured with.
        edge_options = {"max_segment_points": max(REPLICA_SEGMENT_POINTS, 2 * threshold),
                        # Half the cores for a build (a new shard's setting): the serving
                        # replica and the daemon keep the rest while the standby builds.
                        "indexing_threads": max(1, (os.cpu_count() or 2) // 2),
                        **edge_options, "index_threshold": threshold}
        store = cls(path, dim, hybrid, serving, threshold)
        store._edge_options = edge_options
        futures = [r.call("open", path / d, dim, hybrid=hybrid, **edge_options)
                   for r, d in zip(store._replicas, REPLICA_DIRS, strict=True)]
        errors = [f.exception() for f in futures]
        if any(errors):
            for r in store._replicas:
                r.stop()
            raise next(e for e in errors if e is not None)
        return store

    # -- writes --------------------------------------------------------------------------

    def upsert(self, points: Sequence[PointRecord]) -> None:
        """Insert or overwrite points by id in both replicas (see ``EdgeStore.upsert``)."""
        if not points:
            return
        # Checked here so the two replicas can only fail alike on a bad request, never
        # one of them alone.
        for p in points:
            check_dim(p.vector, self.dim, f"point {p.id}", f"the index at {self.path}")
            if self.hybrid and p.sparse is not None:
                check_sparse(p.sparse, f"sparse vector of point {p.id}")
        # In parts, sent to the serving replica one after the other, so that a query
        # waits for one part at most, not for a whole group of thousands of points.
        self._wait_for_build()
        self._write([(frame("upsert_packed", *pack_points(points[i:i + WRITE_PART])),
                      len(points[i:i + WRITE_PART]))
                     for i in range(0, len(points), WRITE_PART)])
        self.written_since_build += len(points)
        with self._lock:
            self._written_during_build += len(points)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id in both replicas; unknown ids are ignored."""
        if ids:
            self._write([(frame("delete", list(ids[i:i + WRITE_PART])),
                          len(ids[i:i + WRITE_PART]))
                         for i in range(0, len(ids), WRITE_PART)])

    def flush(self) -> None:
        """Make every write durable in the serving replica (the authoritative one)."""
        self._write([(frame("flush"), 0)])

    def _write(self, parts: list[tuple[bytes, int]]) -> None:
        """Send ``parts`` (frames and their points) to both replicas, in order; return
        once the serving one applied them all."""
        self._usable()
        self._mark_unsynced()
        self._wait_for_lag()
        with self._lock:
            # No swap while the parts go out (see _on_idle): the serving replica stays
            # the one that gets them one by one.
            self._writing = True
            serving = self._serving
            standby = 1 - serving
            queued = [self._replicas[standby].send(data, n, write=True) for data, n in parts]
        try:
            for data, n in parts:
                self._replicas[serving].send(data, n, write=True).result()
        finally:
            for fut in queued:
                fut.add_done_callback(lambda f: self._standby_done(standby, f))
            with self._lock:
                self._writing = False
            self._on_idle()

    def _wait_for_build(self) -> None:
        """Hold a write back while a build runs and ``BUILD_AHEAD`` thresholds' worth of
        points were written since it began.

        Edge seals a replica's whole unindexed backlog in one build, so a writer that
        ran on freely would make each build larger and slower than the last, and
        leave the serving replica scanning ever more unindexed points. Bulk writing thus
        goes at the pace of the builds, as it does without replicas, but the waiting is
        the writer's alone: queries never wait for a build. At most ``WRITER_WAIT``
        seconds per write (the daemon's watchdog expects its worker back well within
        a minute); a longer build lets the backlog grow a little instead.
        """
        with self._lock:
            build = self._build
            ahead = self._written_during_build
        if build is None or ahead < BUILD_AHEAD * self.index_threshold:
            return
        with contextlib.suppress(StoreError, FutureTimeout):
            build.result(timeout=WRITER_WAIT)

    def _wait_for_lag(self) -> None:
        """Hold a write back while a replica lags by over ``MAX_LAG_POINTS`` (at most
        ``WRITER_WAIT`` seconds, as ``_wait_for_build``)."""
        deadline = time.monotonic() + WRITER_WAIT
        for r in self._replicas:
            while r.lag_points > MAX_LAG_POINTS and (oldest := r.oldest()) is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                with contextlib.suppress(StoreError, FutureTimeout):
                    oldest.result(timeout=left)

    def _standby_done(self, index: int, fut: Future[Any]) -> None:
        exc = fut.exception()
        if exc is not None and index != self._killing:
            # The replicas got the same checked requests: one failing alone is a fault
            # of its process or disk. Refuse everything until a restart repairs it from
            # the authoritative one, rather than serve a store that went out of step.
            with self._lock:
                self._fault = (f"the replica {REPLICA_DIRS[index]} of the index at "
                               f"{self.path} failed ({exc}); restart repd to repair it "
                               "from the other")
            log.error("store_replica_failed", path=str(self.path),
                      replica=REPLICA_DIRS[index], error=str(exc))

    # -- reads ---------------------------------------------------------------------------

    def _read(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._usable()
        with self._lock:
            fut = self._replicas[self._reader()].call(method, *args, **kwargs)
        return fut.result()

    def _reader(self) -> int:
        """The replica a read goes to (called under the lock): the serving one, unless
        it is busy (a write part, a flush) while the standby has answered everything
        sent to it. Every write is queued to the standby before the serving replica
        gets it, so an idle standby holds every write that returned: the read sees them
        all, and does not wait behind the serving replica's work."""
        serving, standby = self._replicas[self._serving], self._replicas[1 - self._serving]
        if serving.pending and not standby.pending and standby.alive:
            return 1 - self._serving
        return self._serving

    def search(
        self,
        vector: Sequence[float],
        limit: int,
        *,
        root: str | None = None,
        path_prefix: str | None = None,
        exts: Sequence[str] = (),
        sparse: SparseVec | None = None,
        mode: SearchMode = "dense",
        rrf_k: int = DEFAULT_RRF_K,
        weights: tuple[float, float] | None = None,
        prefetch: int | None = None,
    ) -> list[Hit]:
        """``Store.search``, answered by the serving replica."""
        return list(self._read("search", [float(x) for x in vector], limit, root=root,
                               path_prefix=path_prefix, exts=list(exts), sparse=sparse,
                               mode=mode, rrf_k=rrf_k, weights=weights, prefetch=prefetch))

    def retrieve(self, ids: Sequence[str], *, with_vectors: bool = True) -> list[PointRecord]:
        """``Store.retrieve``, answered by the serving replica."""
        if not ids:
            return []
        return list(self._read("retrieve", list(ids), with_vectors=with_vectors))

    def iter_ids(self) -> Iterator[str]:
        """Every point id of the serving replica."""
        return iter(self._read("ids"))

    def count(self) -> int:
        """Exact number of points."""
        return int(self._read("count"))

    def info(self) -> dict[str, object]:
        """The serving replica's ``info`` plus the replicas' state."""
        info = dict(self._read("info"))
        with self._lock:
            info.update(location=str(self.path), replicas={
                "serving": REPLICA_DIRS[self._serving],
                "building": None if self._building is None else REPLICA_DIRS[self._building],
                "lag_points": max(r.lag_points for r in self._replicas),
            })
        return info

    # -- builds --------------------------------------------------------------------------

    def maybe_build_index(self, *, backlog: int | None = None) -> bool:
        """Start a build in the standby replica when one may be due; True if started.

        Returns at once: the standby builds in its own process while the serving one
        answers, then the two swap and the other builds the same. Does nothing while a
        build is under way. ``backlog`` as in ``EdgeStore.maybe_build_index``.
        """
        self._usable()
        if backlog is not None and self.written_since_build < backlog:
            return False
        if self._build is not None or self.count() < self.index_threshold:
            return False
        with self._lock:
            if self._build is not None or self._swap_due:
                return False
            self._start_build(1 - self._serving, backlog)
        self.written_since_build = 0
        return True

    def _start_build(self, index: int, backlog: int | None) -> None:
        """Send a build to replica ``index`` (called under the lock)."""
        fut = self._replicas[index].call("maybe_build_index", backlog=backlog)
        self._build, self._building = fut, index
        self._written_during_build = 0
        fut.add_done_callback(lambda f: self._build_done(index, f))

    def _build_done(self, index: int, fut: Future[Any]) -> None:
        with self._lock:
            self._build, self._building = None, None
            if fut.exception() is not None:
                self._standby_done(index, fut)
                return
            # A replica that built something is the better one to serve: it swaps in
            # once it has caught up (_on_idle), and the other then builds in turn. The
            # chain ends at the first build that finds nothing due (in microseconds),
            # so points written during a build are built without anyone asking.
            if fut.result() and not self._closed:
                self._swap_due = True
        self._on_idle()

    def _on_idle(self) -> None:
        """Swap roles once a standby that built has applied every write sent to it."""
        with self._lock:
            if not self._swap_due or self._fault is not None or self._writing or self._closed:
                return  # closing: the roles stay as close read them
            standby = 1 - self._serving
            if self._replicas[standby].pending:
                return
            self._swap_due = False
            # The marker first: from here on the old serving replica may lag.
            _write_state(self.path, standby, synced=False)
            self._serving = standby
            # The new standby holds the same points, so it has the same build due.
            self._start_build(1 - standby, None)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close both replicas and mark them synced; later calls raise ``StoreError``.

        The serving replica is always waited for. The standby gets ``CLOSE_STANDBY_WAIT``
        seconds to finish a build and the writes queued behind it; past that it is
        killed (a stopping service has 30 s before systemd kills it anyway; a merge
        build at 1M points takes minutes). A standby killed with no write unanswered
        (in a build, say) holds every point the serving one does (Edge keeps the old
        segments whole until a new one is swapped in, and its WAL has every write the
        process applied): its files are synced to disk and both are marked synced, so
        the next open keeps it with the merges it finished (a long merge, such as the
        one that turning ``store.replicas`` on for a large index starts, then resumes
        where it was instead of starting over). When writes were unanswered (queued
        behind a build, or a lagging standby's), a fresh store process replays them
        into it (``_catch_up``, at most ``CATCH_UP_WAIT`` seconds) and closes it, and it
        is kept the same way. Only when that fails does the marker stay unsynced, and
        the next open replaces the standby by a copy of the serving one.
        """
        if self._closed:
            return
        self._closed = True
        with self._lock:
            serving = self._serving
        futures = [r.call("close") for r in self._replicas]
        errors = [futures[serving].exception()]
        standby = 1 - serving
        try:
            errors.append(futures[standby].exception(timeout=CLOSE_STANDBY_WAIT))
            stopped_early = False
        except FutureTimeout:
            stopped_early = True
        with self._lock:
            if stopped_early:
                self._killing = standby
            complete = self._fault is None
        # Taken before the kill, which fails them all (no write can be queued any more:
        # the store is closed). None unanswered: the standby applied every write, and
        # whatever it was busy with (a build) left its points whole. Replaying a write it
        # did apply changes nothing (each one sets or removes whole points), so a write
        # answered meanwhile does no harm.
        behind = self._replicas[standby].unanswered_writes() if stopped_early else []
        for i, r in enumerate(self._replicas):
            r.stop(kill=stopped_early and i == standby)
        if any(errors):
            raise next(e for e in errors if e is not None)
        if stopped_early:
            if complete:
                # A replay ends with a clean close (a flush); a killed process's last
                # writes are in the page cache only.
                complete = (self._catch_up(standby, behind) if behind
                            else self._synced_to_disk(standby))
            log.warning("store_replica_stopped_busy", path=str(self.path),
                        replica=REPLICA_DIRS[standby], waited_s=CLOSE_STANDBY_WAIT,
                        kept=complete, replayed_writes=len(behind))
        if complete:
            _write_state(self.path, serving, synced=True)

    def _synced_to_disk(self, index: int) -> bool:
        """Write a killed replica's files through to disk; False if that failed (it is
        then not known durable, and the next open copies the other over it)."""
        try:
            _sync_tree(self.path / REPLICA_DIRS[index])
        except OSError as exc:
            log.warning("store_replica_not_kept", path=str(self.path),
                        replica=REPLICA_DIRS[index], error=str(exc))
            return False
        return True

    def _catch_up(self, index: int, frames: list[bytes]) -> bool:
        """Replay ``frames`` (the writes a killed replica had not confirmed) into that
        replica in a fresh store process and close it; True once it has, within
        ``CATCH_UP_WAIT`` seconds. It then holds what the serving one does."""
        deadline = time.monotonic() + CATCH_UP_WAIT
        try:
            replica = _Replica(f"{self.path.name}/{REPLICA_DIRS[index]}", lambda: None)
        except OSError:
            return False
        done = False
        try:
            futures = [replica.call("open", self.path / REPLICA_DIRS[index], self.dim,
                                    hybrid=self.hybrid, **self._edge_options)]
            futures += [replica.send(data) for data in frames]
            futures.append(replica.call("close"))
            for fut in futures:
                if fut.exception(timeout=max(0.0, deadline - time.monotonic())) is not None:
                    return False
            done = True
        except FutureTimeout:
            return False
        finally:
            replica.stop(kill=not done)
            if not done:
                log.warning("store_replica_catch_up_failed", path=str(self.path),
                            replica=REPLICA_DIRS[index], writes=len(frames))
        return True

    def drop(self) -> None:
        """Stop both processes and delete the generation's folder (see ``Store.drop``)."""
        if self._dropped:
            return
        if self._closed:
            raise StoreError(f"index at {self.path} is closed; open it again to drop it")
        self._closed = True
        for r in self._replicas:
            r.stop(kill=True)  # the data is going: no need to wait for a build
        tomb = self.path.with_name(self.path.name + DROPPING_SUFFIX)
        try:
            if tomb.exists():
                shutil.rmtree(tomb)
            if self.path.exists():
                self.path.rename(tomb)
            if tomb.exists():
                shutil.rmtree(tomb)
        except OSError as exc:
            raise StoreError(f"deleting the index at {self.path} failed: {exc}") from exc
        self._dropped = True

    @property
    def building(self) -> str | None:
        """The replica building HNSW now, if any."""
        with self._lock:
            return None if self._building is None else REPLICA_DIRS[self._building]

    def process_ids(self) -> list[int]:
        """The store processes' pids, replica ``r0`` first."""
        return [r.pid for r in self._replicas]

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until both replicas answered everything sent so far, builds and swaps
        included (for tests and benchmarks)."""
        while True:
            with self._lock:
                waits = [f for f in (r.oldest() for r in self._replicas) if f is not None]
                if not waits and self._build is None and not self._swap_due:
                    return
                build = self._build
            for f in [*waits, *([build] if build else [])]:
                with contextlib.suppress(StoreError):
                    f.result(timeout)

    # -- helpers -------------------------------------------------------------------------

    def _usable(self) -> None:
        if self._closed:
            state = "dropped" if self._dropped else "closed"
            raise StoreError(f"index at {self.path} is {state}")
        if self._fault is not None:
            raise StoreError(self._fault)

    def _mark_unsynced(self) -> None:
        if not self._marked_unsynced:
            _write_state(self.path, self._serving, synced=False)
            self._marked_unsynced = True



# -- layout ----------------------------------------------------------------------------

def open_edge_store(path: Path, dim: int, *, hybrid: bool, replicas: bool,
                    writer: bool = True, **options: Any) -> Store:
    """The embedded store at ``path``: replicated or single, converting the folder when
    it has the other layout (a single shard becomes replica ``r0``; the authoritative
    replica becomes the single shard).

    Not ``writer`` (a one-off reader such as ``repd query`` with no daemon running):
    the folder is used as it is, never converted or repaired, and a replicated one is
    read through its authoritative shard in this process (no store processes to start).
    """
    if not writer:
        if _sibling(path, _MOVING_SUFFIX).exists():
            raise StoreError(f"the index at {path} was being converted when repd stopped; "
                             "start the daemon (or run `repd index`) to finish that first")
        if is_replicated(path):
            serving, _ = _read_state(path)
            return EdgeStore.open(path / REPLICA_DIRS[serving], dim, hybrid=hybrid, **options)
        return EdgeStore.open(path, dim, hybrid=hybrid, **options)
    if replicas:
        return ReplicatedStore.open(path, dim, hybrid=hybrid, **options)
    try:
        _finish_move(path)
        if (path / REPLICAS_FILE).exists():
            serving, _ = _read_state(path)
            moving = _sibling(path, _MOVING_SUFFIX)
            (path / REPLICA_DIRS[serving]).rename(moving)
            _finish_move(path)
    except OSError as exc:
        raise StoreError(f"cannot convert the replicated index at {path}: {exc}") from exc
    return EdgeStore.open(path, dim, hybrid=hybrid, **options)


def is_replicated(path: Path) -> bool:
    """Whether ``path`` holds a replicated generation."""
    return (path / REPLICAS_FILE).exists()


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _finish_move(path: Path) -> None:
    """A conversion's sibling folder is the authoritative shard: put it back at ``path``
    (whatever a crash left there is older or a copy)."""
    moving = _sibling(path, _MOVING_SUFFIX)
    if not moving.exists():
        return
    if path.exists():
        shutil.rmtree(path)
    moving.rename(path)
    _fsync_path(path.parent)


def _prepare(path: Path) -> tuple[int, bool]:
    """Bring ``path`` to the replicated layout; returns (serving replica, synced)."""
    _finish_move(path)
    if (path / REPLICAS_FILE).exists():
        return _read_state(path)
    if shard_exists(path):  # a single shard: it becomes r0, the authoritative replica
        moving = _sibling(path, _MOVING_SUFFIX)
        path.rename(moving)
        path.mkdir()
        moving.rename(path / REPLICA_DIRS[0])
        _write_state(path, 0, synced=False)
        return 0, False
    path.mkdir(parents=True, exist_ok=True)
    if shard_exists(path / REPLICA_DIRS[0]):  # a crash just before the marker
        _write_state(path, 0, synced=False)
        return 0, False
    _write_state(path, 0, synced=True)  # new: both replicas are created empty
    return 0, True


def _repair(path: Path, serving: int) -> None:
    """Replace the other replica by a copy of the authoritative one, then mark synced."""
    source = path / REPLICA_DIRS[serving]
    target = path / REPLICA_DIRS[1 - serving]
    copy = _sibling(target, _COPY_SUFFIX)
    if copy.exists():
        shutil.rmtree(copy)
    if shard_exists(source):
        shutil.copytree(source, copy, copy_function=copy_sparse)
        if target.exists():
            shutil.rmtree(target)
        copy.rename(target)
    elif target.exists():
        shutil.rmtree(target)  # nothing authoritative yet: both start empty
    _fsync_path(path)
    log.info("store_replica_repaired", path=str(path), source=REPLICA_DIRS[serving])
    _write_state(path, serving, synced=True)


def copy_sparse(src: str, dst: str) -> str:
    """Copy a file keeping its holes, then its metadata (``shutil.copy2`` otherwise).

    Edge preallocates its storage files sparse: a 1M-point shard of 3.3 GB on disk is
    9.6 GB of apparent size, and a plain copy (``shutil.copy2``) writes every hole out
    as zeros, so a repaired or converted replica took three times the disk of the one it
    copies. Here only the data extents are copied (``SEEK_DATA``/``SEEK_HOLE``; through
    ``copy_file_range``, so in the kernel, and a reflink where the filesystem has them)
    and the size is set last, so the holes stay holes. Where the filesystem cannot say
    where its holes are, or the system has no ``copy_file_range`` (Linux's), the copy is
    a plain one.
    """
    if not hasattr(os, "copy_file_range") or not hasattr(os, "SEEK_DATA"):
        return str(shutil.copy2(src, dst))
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        try:
            extents = list(_data_extents(fin.fileno(), size))
        except OSError:  # the filesystem cannot say where its holes are
            return str(shutil.copy2(src, dst))
        with open(dst, "wb") as fout:
            for start, end in extents:
                offset = start
                while offset < end:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), end - offset,
                                           offset, offset)
                    if n == 0:  # the file shrank meanwhile: nothing more to read
                        break
                    offset += n
            fout.truncate(size)
    shutil.copystat(src, dst)
    return dst


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of data in the file; raises OSError where the
    filesystem does not support ``SEEK_DATA``."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from pos to the end
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def _read_state(path: Path) -> tuple[int, bool]:
    try:
        data = json.loads((path / REPLICAS_FILE).read_text(encoding="utf-8"))
        serving = int(data["serving"])
        if serving not in (0, 1):
            raise ValueError(serving)
        return serving, bool(data["synced"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{path / REPLICAS_FILE} is damaged ({exc}); it names the "
                         "replica to trust: restore it or reindex") from exc


def _write_state(path: Path, serving: int, *, synced: bool) -> None:
    """Replace the marker atomically and durably."""
    tmp = path / (REPLICAS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"serving": serving, "synced": synced}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path / REPLICAS_FILE)
    _fsync_path(path)


def _sync_tree(path: Path) -> None:
    """Write every file and folder under ``path`` through to disk (what a killed store
    process wrote is in the page cache only; ``fsync`` from any process flushes it)."""
    for entry in [path, *path.rglob("*")]:
        if entry.is_file() or entry.is_dir():  # links, sockets: nothing Edge writes
            _fsync_path(entry)


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (through a read-only descriptor, which Linux allows)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
