"""Replicated embedded store: two Edge shards in store processes (adapters/store_replicas).

Real store processes and real Qdrant Edge shards. A replica is frozen with SIGSTOP to
play a long build: what must not wait for it (writes returning, queries, flushes) is
checked while it cannot answer at all, so the checks hold on a loaded machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from repd.adapters import store_replicas, store_worker
from repd.adapters.store import StoreError
from repd.adapters.store_edge import TEMP_SEGMENTS, EdgeStore
from repd.adapters.store_replicas import (
    REPLICA_DIRS,
    REPLICAS_FILE,
    ReplicatedStore,
    open_edge_store,
)
from repd.core.types import PointRecord, SparseVec
from tests.daemon_harness import DaemonProc, wait_for
from tests.helpers import run_cli

DIM = 16
THRESHOLD = 300


def points(n: int, start: int = 0, seed: int = 0) -> list[PointRecord]:
    """``n`` random unit points with a sparse vector each."""
    rng = np.random.default_rng(seed + start)
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return [PointRecord(str(uuid.UUID(int=i + 1)), vecs[i - start].tolist(),
                        {"root": "r", "path": f"d/f{i}.txt", "ext": ".txt",
                         "chunk_hash": f"h{i}"},
                        SparseVec([i % 50, 100 + i % 7], [1.0, 0.5]))
            for i in range(start, start + n)]


def replica_ids(path: Path, replica: str, dim: int = DIM) -> set[str]:
    """The ids one replica's shard holds, read with a plain EdgeStore (store closed)."""
    store = EdgeStore.open(path / replica, dim, hybrid=True)
    try:
        return set(store.iter_ids())
    finally:
        store.close()


def state(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((path / REPLICAS_FILE).read_text())
    return data


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block: it answers nothing meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReplicatedStore]:
    s = ReplicatedStore.open(tmp_path / "gen", DIM, hybrid=True, index_threshold=THRESHOLD)
    yield s
    with contextlib.suppress(StoreError):
        s.close()


def test_writes_and_queries_do_not_wait_for_a_busy_standby(
        store: ReplicatedStore, tmp_path: Path) -> None:
    _, standby = store.process_ids()
    pts = points(200)
    with frozen(standby):
        store.upsert(pts)
        store.delete([pts[0].id])
        store.flush()
        # Everything was answered by r0 alone, while r1 could not run at all.
        assert store.count() == 199
        hit = store.search(pts[5].vector, 1)
        assert hit[0].id == pts[5].id
        assert store.info()["replicas"] == {"serving": "r0", "building": None,
                                             "lag_points": 201}
        assert state(tmp_path / "gen") == {"serving": 0, "synced": False}
    store.wait_idle(timeout=60)
    assert store.info()["replicas"]["lag_points"] == 0
    store.close()
    assert state(tmp_path / "gen") == {"serving": 0, "synced": True}
    ids = {p.id for p in pts[1:]}
    assert replica_ids(tmp_path / "gen", "r0") == ids
    assert replica_ids(tmp_path / "gen", "r1") == ids


def test_a_read_goes_to_an_idle_standby_while_the_serving_replica_is_busy(
        store: ReplicatedStore) -> None:
    serving, _ = store.process_ids()
    first = points(50)
    store.upsert(first)
    later = points(50, start=50)
    with ThreadPoolExecutor(1) as pool, frozen(serving):
        # The write waits for the frozen serving replica; the standby applies it.
        writing = pool.submit(store.upsert, later)
        # (Polled on the client: info() itself is a read that could reach the frozen one.)
        standby = store._replicas[1]
        wait_for(lambda: standby.pending == 0, timeout=60,
                 what="the standby to apply the write")
        # Answered by the standby while the serving replica cannot run at all, with
        # every write that returned (and the one under way).
        assert store.search(first[3].vector, 1)[0].id == first[3].id
        assert store.count() == 100
        assert not writing.done()
    writing.result(timeout=60)
    assert store.search(later[7].vector, 1)[0].id == later[7].id


def test_a_request_to_an_idle_replica_is_written_by_the_caller_and_order_is_kept(
        store: ReplicatedStore, monkeypatch: pytest.MonkeyPatch) -> None:
    serving = store._replicas[0]
    queued: list[bytes | None] = []

    class Outbox:  # the real queue, with what goes through it recorded
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def put(self, item: bytes | None) -> None:
            queued.append(item)
            self.inner.put(item)

        def get(self) -> bytes | None:
            item: bytes | None = self.inner.get()
            return item

    serving._outbox = Outbox(serving._outbox)  # type: ignore[assignment]
    pts = points(20)
    store.upsert(pts)
    assert store.search(pts[3].vector, 1)[0].id == pts[3].id
    assert queued == []  # small requests, each to an idle replica: no hand-off
    with frozen(store.process_ids()[0]):
        first = serving.call("count")  # nothing pending: written at once, into the pipe
        second = serving.call("search", pts[4].vector, 1)  # behind it: the sender's
        assert len(queued) == 1 and not first.done()
    assert first.result(timeout=60) == 20
    assert second.result(timeout=60)[0].id == pts[4].id
    monkeypatch.setattr(store_replicas, "DIRECT_WRITE_BYTES", 0)  # too large to risk
    assert store.search(pts[5].vector, 1)[0].id == pts[5].id
    assert len(queued) == 2


def test_a_build_runs_in_the_standby_then_both_swap_and_end_built(
        store: ReplicatedStore, tmp_path: Path) -> None:
    pts = points(3 * THRESHOLD)
    store.upsert(pts)
    store.flush()
    _, r1 = store.process_ids()
    with frozen(r1):
        assert store.maybe_build_index() is True
        assert store.info()["replicas"]["building"] == "r1"
        # The build is stuck in r1: r0 still answers queries and takes writes.
        assert store.search(pts[7].vector, 1)[0].id == pts[7].id
        more = points(2 * THRESHOLD, start=len(pts))
        store.upsert(more)
        assert store.count() == len(pts) + len(more)
        assert store.maybe_build_index() is False  # one build at a time
        assert store.info()["hnsw_built"] is False  # r0 has not built
    store.wait_idle(timeout=300)
    info = store.info()
    # r1 built, caught up with the writes queued meanwhile, and took over; r0 built all
    # of it and took over; r1 then built the points written during its first build:
    # with no call asking, both end built.
    total = len(pts) + len(more)
    assert info["replicas"]["building"] is None
    assert info["hnsw_built"] is True
    assert store.count() == total
    assert info["indexed_vectors"] == total
    assert store.search(more[3].vector, 1)[0].id == more[3].id
    store.close()
    for replica in REPLICA_DIRS:
        built = EdgeStore.open(tmp_path / "gen" / replica, DIM, hybrid=True)
        try:
            assert built.info()["indexed_vectors"] == total, replica
            assert built.count() == total
        finally:
            built.close()


_CRASHER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from repd.adapters.store_replicas import ReplicatedStore
    from tests.test_store_replicas import DIM, points
    store = ReplicatedStore.open(Path(sys.argv[1]), DIM, hybrid=True, index_threshold=300)
    store.upsert(points(100))
    store.flush()
    store.wait_idle(timeout=60)
    os.kill(store.process_ids()[1], signal.SIGSTOP)  # r1 falls behind
    store.upsert(points(80, start=100))
    store.delete([points(1)[0].id])
    store.flush()
    print(*store.process_ids(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_crash_leaves_a_lagging_replica_that_the_next_open_repairs(tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _CRASHER, str(gen)], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(x) for x in proc.stdout.split()]

    def gone() -> bool:
        # The store processes die with the daemon (parent-death signal), the frozen one
        # too, so no old process holds a shard's lock when the next one opens it.
        return all(not Path(f"/proc/{pid}").exists()
                   or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
                   for pid in pids)
    wait_for(gone, 60, "the store processes to die with their parent")
    assert state(gen) == {"serving": 0, "synced": False}
    wanted = {p.id for p in points(180)[1:]}
    assert replica_ids(gen, "r0") == wanted
    assert replica_ids(gen, "r1") != wanted  # r1 lagged when the writer died

    again = ReplicatedStore.open(gen, DIM, hybrid=True, index_threshold=THRESHOLD)
    assert state(gen) == {"serving": 0, "synced": True}  # r1 is a copy of r0 now
    assert set(again.iter_ids()) == wanted
    again.close()
    assert replica_ids(gen, "r1") == wanted


def test_a_writer_far_ahead_of_a_build_waits_for_it_but_queries_do_not(
        store: ReplicatedStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_replicas, "WRITER_WAIT", 120.0)
    store.upsert(points(3 * THRESHOLD))
    _, r1 = store.process_ids()
    with frozen(r1):
        assert store.maybe_build_index() is True
        start = time.monotonic()
        ahead = store_replicas.BUILD_AHEAD * THRESHOLD
        store.upsert(points(ahead, start=3 * THRESHOLD))  # up to BUILD_AHEAD
        store.search(points(1)[0].vector, 3)
        # Far below the 120 s it would have waited for the build (which cannot end).
        assert time.monotonic() - start < 60
        monkeypatch.setattr(store_replicas, "WRITER_WAIT", 1.0)
        start = time.monotonic()
        store.upsert(points(10, start=3 * THRESHOLD + ahead))  # beyond: waits
        waited = time.monotonic() - start
        # The build cannot end (r1 is stopped): the write went on after WRITER_WAIT.
        assert waited >= store_replicas.WRITER_WAIT
        assert store.count() == 3 * THRESHOLD + ahead + 10
    store.wait_idle(timeout=300)
    assert store.info()["indexed_vectors"] == 3 * THRESHOLD + ahead + 10


def stuck_standby_closed(store: ReplicatedStore, gen: Path) -> None:
    """Close ``store`` while its standby (r1) is frozen in a build with writes queued
    behind it: close kills it after CLOSE_STANDBY_WAIT."""
    store.upsert(points(3 * THRESHOLD))
    store.flush()
    os.kill(store.process_ids()[1], signal.SIGSTOP)  # a build that will not end soon
    assert store.maybe_build_index() is True
    # Behind the build, so r1 has not got them: new points, and some old ones deleted.
    store.upsert(points(10, start=3 * THRESHOLD))
    store.delete([p.id for p in points(5)])
    store.flush()
    start = time.monotonic()
    store.close()  # does not wait for r1 beyond CLOSE_STANDBY_WAIT (then kills it)
    assert time.monotonic() - start < 30


def test_close_kills_a_standby_stuck_in_a_build_and_replays_the_writes_behind_it(
        store: ReplicatedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_replicas, "CLOSE_STANDBY_WAIT", 0.5)
    monkeypatch.setattr(store_replicas, "CATCH_UP_WAIT", 120.0)  # a loaded machine
    gen = tmp_path / "gen"
    r1_inode = (gen / "r1").stat().st_ino
    stuck_standby_closed(store, gen)
    # A fresh store process replayed the 10 points (and the flush) into r1: it is kept.
    assert state(gen) == {"serving": 0, "synced": True}
    assert (gen / "r1").stat().st_ino == r1_inode
    assert replica_ids(gen, "r1") == replica_ids(gen, "r0") == {
        p.id for p in points(3 * THRESHOLD + 10)[5:]}


def test_a_standby_that_cannot_catch_up_in_time_is_repaired_at_the_next_open(
        store: ReplicatedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_replicas, "CLOSE_STANDBY_WAIT", 0.5)
    monkeypatch.setattr(store_replicas, "CATCH_UP_WAIT", 0.0)  # the replay is cut short
    gen = tmp_path / "gen"
    stuck_standby_closed(store, gen)
    assert state(gen) == {"serving": 0, "synced": False}

    again = ReplicatedStore.open(gen, DIM, hybrid=True, index_threshold=THRESHOLD)
    assert again.count() == 3 * THRESHOLD + 5
    again.close()
    assert replica_ids(gen, "r1") == replica_ids(gen, "r0")


def test_a_standby_stopped_mid_merge_with_nothing_written_behind_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A single shard of many small segments (merging off: segments of 1.5 thresholds),
    # as a large index in one copy is when store.replicas is turned on.
    gen = tmp_path / "gen"
    single = EdgeStore.open(gen, DIM, hybrid=True, index_threshold=THRESHOLD)
    for i in range(0, 40 * THRESHOLD, THRESHOLD):
        single.upsert(points(THRESHOLD, start=i))
        single.maybe_build_index()
    single.close()
    ids = replica_ids(gen, "")

    store = ReplicatedStore.open(gen, DIM, hybrid=True, index_threshold=THRESHOLD)
    standby = gen / "r1"
    copy_inode = standby.stat().st_ino
    # Replicas merge segments up to REPLICA_SEGMENT_POINTS: the standby starts a merge,
    # and the daemon stops (CLOSE_STANDBY_WAIT: 0) as soon as the merge shows on disk.
    monkeypatch.setattr(store_replicas, "CLOSE_STANDBY_WAIT", 0.0)
    temp = standby / TEMP_SEGMENTS
    store.upsert(points(5, start=40 * THRESHOLD))  # written before the build: both have it
    ids |= {p.id for p in points(5, start=40 * THRESHOLD)}
    assert state(gen)["synced"] is False
    assert store.maybe_build_index() is True
    wait_for(lambda: temp.is_dir() and any(temp.iterdir()), 120, "the merge to start")
    store.close()
    assert any(temp.iterdir())  # it was stopped mid-merge
    # Nothing was written behind the build: the standby holds every point, so it is
    # kept (not replaced by a copy of r0) and the merge can resume from it.
    assert state(gen) == {"serving": 0, "synced": True}

    again = ReplicatedStore.open(gen, DIM, hybrid=True, index_threshold=THRESHOLD)
    try:
        assert standby.stat().st_ino == copy_inode
        assert list(temp.iterdir()) == []  # the half-made segment is gone
        assert set(again.iter_ids()) == ids
        assert again.maybe_build_index() is True
        again.wait_idle(timeout=120)
        info = again.info()
    finally:
        again.close()
    assert replica_ids(gen, "r0") == replica_ids(gen, "r1") == ids
    assert isinstance(info["segments"], int) and info["segments"] < 10


def test_store_processes_outlive_terminal_and_stop_signals(
        store: ReplicatedStore, tmp_path: Path) -> None:
    # Ctrl-C, a closed terminal and systemd's stop signal the whole process group or
    # unit: the daemon stops (or reloads) in order, so its store processes must not die
    # under it; they end when the daemon closes them.
    store.upsert(points(20))
    for pid in store.process_ids():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(pid, sig)
    store.upsert(points(5, start=20))
    store.flush()
    assert store.count() == 25
    store.close()
    assert state(tmp_path / "gen") == {"serving": 0, "synced": True}


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="per-thread priorities are Linux's")
def test_a_build_runs_at_lower_priority_in_threads_that_inherit_it() -> None:
    # Edge builds in threads it starts for each build: they must inherit the lower
    # priority, and the store process's own thread (its queries) must keep its own.
    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = priority()
    seen: list[int] = []

    def build() -> str:
        inner = threading.Thread(target=lambda: seen.append(priority()))
        inner.start()
        inner.join()
        return "built"

    assert store_worker.in_low_priority_thread(build) == "built"
    assert seen == [min(19, before + store_worker.BUILD_NICE)]
    assert priority() == before

    def fail() -> None:
        raise StoreError("disk full")

    with pytest.raises(StoreError, match="disk full"):
        store_worker.in_low_priority_thread(fail)


def test_a_dead_store_process_is_a_clear_error_not_a_hang(store: ReplicatedStore) -> None:
    store.upsert(points(10))
    os.kill(store.process_ids()[1], signal.SIGKILL)
    # The write r1 could not apply puts the store out of step: it refuses from then on,
    # saying how it is mended, rather than answer from replicas that differ.
    with contextlib.suppress(StoreError):
        store.upsert(points(5, start=10))
    wait_for(lambda: store._fault is not None, 30, "the fault to be seen")
    with pytest.raises(StoreError, match=r"replica r1 .* restart repd to repair it"):
        store.search(points(1)[0].vector, 3)
    os.kill(store.process_ids()[0], signal.SIGKILL)
    with pytest.raises(StoreError):
        store.count()
    start = time.monotonic()
    with contextlib.suppress(StoreError):
        store.close()
    assert time.monotonic() - start < 60


def test_the_layout_converts_both_ways_and_keeps_every_point(tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    single = EdgeStore.open(gen, DIM, hybrid=True)
    single.upsert(points(40))
    single.close()
    ids = {p.id for p in points(40)}

    replicated = open_edge_store(gen, DIM, hybrid=True, replicas=True)
    assert isinstance(replicated, ReplicatedStore)
    assert set(replicated.iter_ids()) == ids
    replicated.upsert(points(5, start=40))
    replicated.close()
    assert replica_ids(gen, "r0") == replica_ids(gen, "r1") == ids | {
        p.id for p in points(5, start=40)}

    back = open_edge_store(gen, DIM, hybrid=True, replicas=False)
    assert isinstance(back, EdgeStore)
    assert back.count() == 45
    back.close()
    assert not (gen / REPLICAS_FILE).exists()


def test_a_reader_uses_the_authoritative_copy_in_process_and_changes_nothing(
        store: ReplicatedStore, tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    store.upsert(points(20))
    store.flush()
    _, r1 = store.process_ids()
    with frozen(r1):
        store.upsert(points(5, start=20))  # r1 lags, r0 is authoritative
        store.flush()
    store.wait_idle(timeout=60)
    store.close()

    reader = open_edge_store(gen, DIM, hybrid=True, replicas=True, writer=False)
    assert isinstance(reader, EdgeStore)  # no store processes for a one-off read
    assert reader.path == gen / "r0"
    assert reader.count() == 25
    reader.close()
    assert state(gen) == {"serving": 0, "synced": True}
    # A reader never finishes a conversion (a writer does): it says so.
    gen.rename(tmp_path / "gen.single")
    with pytest.raises(StoreError, match="being converted"):
        open_edge_store(gen, DIM, hybrid=True, replicas=False, writer=False)


def test_an_interrupted_conversion_is_finished_by_the_next_open(tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    single = EdgeStore.open(gen, DIM, hybrid=True)
    single.upsert(points(30))
    single.close()
    # A crash right after the first step of a conversion: the shard moved aside, the
    # new folder made and still empty.
    gen.rename(tmp_path / "gen.single")
    gen.mkdir()

    store = open_edge_store(gen, DIM, hybrid=True, replicas=True)
    assert store.count() == 30
    store.close()
    assert not (tmp_path / "gen.single").exists()
    assert replica_ids(gen, "r1") == {p.id for p in points(30)}


def test_a_damaged_marker_is_a_clear_error(tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    ReplicatedStore.open(gen, DIM, hybrid=True).close()
    (gen / REPLICAS_FILE).write_text("{not json")
    with pytest.raises(StoreError, match=r"replicas\.json is damaged"):
        ReplicatedStore.open(gen, DIM, hybrid=True)


# -- a real daemon -----------------------------------------------------------------------

WORDS = ("granite harbor lantern meadow orchard pepper quartz river saffron timber umbrella "
         "velvet walnut yonder zephyr anchor bramble cobalt dune ember fjord glacier").split()


def store_processes(pid: int) -> list[int]:
    """The daemon's child processes running ``store_worker``."""
    children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    return [c for c in children
            if b"store_worker" in Path(f"/proc/{c}/cmdline").read_bytes()]


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting to be reaped."""
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_daemon_on_replicas_serves_edits_and_recovers_from_kill_9(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for i in range(6):
        (root / f"doc{i}.md").write_text(
            " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(60)) + f" entry {i}")
    d = DaemonProc(tmp_path / "home", [root], {"REPD_STORE__REPLICAS": "true"}).start()
    try:
        st = d.status()
        assert st["store"]["replicas"]["serving"] == "r0"
        assert len(store_processes(d.pid)) == 2
        shards = tmp_path / "home" / "data" / "repd" / "shards"
        markers = list(shards.glob(f"*/{REPLICAS_FILE}"))
        assert len(markers) == 1
        (root / "late.md").write_text("a lighthouse keeper logs the passing ships at dawn")
        wait_for(lambda: "late.md" in d.paths_for("lighthouse keeper ships", k=3), 60,
                 "an edit to be searchable")
        text = run_cli(["status"], d.env, timeout=60).stdout
        assert "r0 serves" in text or "r1 serves" in text

        workers = store_processes(d.pid)
        d.kill9()
        # Both store processes die with the daemon: none keeps a shard locked.
        wait_for(lambda: all(dead(p) for p in workers), 60, "the store processes to die")

        st = d.start().wait_idle()
        points = st["totals"]["chunks"]
        assert st["store"]["points"] == points and st["totals"]["files"] == 7
        assert d.paths_for("lighthouse keeper ships", k=1) == ["late.md"]
        # The copy that lagged at the kill was replaced by a copy of the other.
        assert "store_replica_repaired" in d.log.read_text()
        d.stop()
        # A clean stop leaves both copies holding the same points.
        gen = markers[0].parent
        assert json.loads(markers[0].read_text())["synced"] is True
        r0, r1 = replica_ids(gen, "r0", 384), replica_ids(gen, "r1", 384)
        assert r0 == r1 and len(r0) == points
    finally:
        d.stop()


def test_a_repair_copies_the_shard_with_its_holes(tmp_path: Path) -> None:
    """Edge's storage files are sparse; the copy that repairs (or converts to) a replica
    keeps them sparse, so it takes the disk of the replica it copies, not ~3x."""
    gen = tmp_path / "gen"
    single = EdgeStore.open(gen, DIM, hybrid=True, index_threshold=THRESHOLD)
    single.upsert(points(50))
    single.close()

    def blocks(root: Path) -> tuple[int, int]:
        files = [p for p in root.rglob("*") if p.is_file()]
        return (sum(p.stat().st_blocks for p in files), sum(p.stat().st_size for p in files))

    used, apparent = blocks(gen)
    assert used * 512 < apparent / 2  # Edge preallocates: mostly holes (else no test)
    replicated = open_edge_store(gen, DIM, hybrid=True, replicas=True)  # copies r0 to r1
    replicated.close()
    r0, r1 = blocks(gen / "r0"), blocks(gen / "r1")
    assert r1[1] == r0[1]  # the same apparent sizes
    assert r1[0] <= r0[0] * 1.1 + 64, (r0, r1)  # and about the same blocks on disk
    assert replica_ids(gen, "r1") == {p.id for p in points(50)}


def test_copy_sparse_copies_data_between_holes_exactly(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as fh:
        fh.truncate(8 << 20)
        fh.seek(1 << 20)
        fh.write(b"a" * 5000)
        fh.seek(6 << 20)
        fh.write(b"b" * 70_000)
    store_replicas.copy_sparse(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks <= src.stat().st_blocks
    empty_src, empty_dst = tmp_path / "e", tmp_path / "e2"
    with open(empty_src, "wb") as fh:
        fh.truncate(1 << 20)  # a hole to the end: no data at all
    store_replicas.copy_sparse(str(empty_src), str(empty_dst))
    assert empty_dst.stat().st_size == 1 << 20 and empty_dst.stat().st_blocks == 0
