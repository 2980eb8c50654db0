"""ChangeQueue: coalescing, debounce, settling, the close fast path, created-then-gone, bounded
storms, scans, close."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Literal

from repd.pipeline.changes import Change, ChangeQueue

ROOT = Path("/r")
OTHER = Path("/other")
Probe = tuple[int, int, int] | Literal["gone", "now"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1000


class FakeDisk:
    """What the queue's probe sees: path -> (size, mtime_ns, inode); absent means gone."""

    def __init__(self) -> None:
        self.files: dict[Path, tuple[int, int, int]] = {}
        self.probes = 0

    def __call__(self, path: Path) -> Probe:
        self.probes += 1
        return self.files.get(path, "gone")

    def write(self, relpath: str, size: int, root: Path = ROOT) -> None:
        self.files[root / relpath] = (size, size * 1000, 7)


def make(debounce: int = 100, settle: int = 200, max_pending: int = 1000
         ) -> tuple[ChangeQueue, FakeClock, FakeDisk]:
    clock, disk = FakeClock(), FakeDisk()
    return ChangeQueue(debounce, settle, max_pending, clock=clock, probe=disk), clock, disk


def ready(q: ChangeQueue, max_items: int = 1000) -> list[Change]:
    return q.get_ready(max_items, 0)


def test_repeated_changes_coalesce_into_one_entry() -> None:
    q, clock, disk = make(settle=0)
    disk.write("a.md", 10)
    for _ in range(100):
        q.put_path(ROOT, "a.md")
        clock.advance(1)
    assert q.depth() == {"paths": 1, "scans": 0, "settling": 0, "inflight": 0}
    clock.advance(100)
    assert ready(q) == [Change(ROOT, "a.md", "path")]
    assert ready(q) == []
    assert q.depth()["paths"] == 0


def test_debounce_waits_for_quiet() -> None:
    q, clock, disk = make(debounce=100, settle=0)
    disk.write("a.md", 1)
    q.put_path(ROOT, "a.md")
    clock.advance(90)
    assert ready(q) == []
    q.put_path(ROOT, "a.md")  # a new change restarts the wait
    clock.advance(90)
    assert ready(q) == []
    clock.advance(15)
    assert ready(q) == [Change(ROOT, "a.md")]


def test_a_growing_file_is_handed_out_only_once_it_settles() -> None:
    q, clock, disk = make(debounce=100, settle=200)
    disk.write("big.bin.md", 1)
    q.put_path(ROOT, "big.bin.md")
    clock.advance(100)
    assert ready(q) == [] and q.depth()["settling"] == 1  # first sample taken
    for size in range(2, 6):  # the writer keeps going without producing events
        clock.advance(200)
        disk.write("big.bin.md", size)
        assert ready(q) == [], f"handed out while still growing (size {size})"
    clock.advance(190)
    assert ready(q) == []
    clock.advance(20)
    assert ready(q) == [Change(ROOT, "big.bin.md")]


def test_settle_with_real_time_and_a_real_file(tmp_path: Path) -> None:
    q = ChangeQueue(debounce_ms=20, settle_ms=150)
    target = tmp_path / "download.md"
    target.write_text("x")
    q.put_path(tmp_path, "download.md")
    done = threading.Event()

    def writer() -> None:
        with target.open("a") as fh:
            for _ in range(8):  # one append every 50 ms, well inside settle_ms
                time.sleep(0.05)
                fh.write("more\n")
                fh.flush()
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    got = q.get_ready(10, timeout=5.0)
    finished_first = done.is_set()
    thread.join()
    assert got == [Change(tmp_path, "download.md")]
    assert finished_first, "handed out while the file was still being written"


def write_and_close(q: ChangeQueue, disk: FakeDisk, relpath: str, size: int,
                    *, created: bool = False) -> None:
    """The events of ``open(O_TRUNC)``, ``write``, ``close``: modify(s), then IN_CLOSE_WRITE."""
    disk.write(relpath, size)
    q.put_path(ROOT, relpath, created=created)
    q.put_path(ROOT, relpath)
    q.put_path(ROOT, relpath, closed=True)


def test_close_after_write_is_ready_after_a_short_debounce_before_settle() -> None:
    q, clock, disk = make(debounce=150, settle=300)
    write_and_close(q, disk, "a.md", 10, created=True)
    clock.advance(29)
    assert ready(q) == [], "some debounce stays: one save's events must coalesce"
    clock.advance(1)
    assert ready(q) == [Change(ROOT, "a.md")]  # 30 ms, not 150 + 300
    assert disk.probes == 1, "one stat, no settle sample"
    assert q.depth() == {"paths": 0, "scans": 0, "settling": 0, "inflight": 1}
    q.task_done(1)
    assert q.depth()["inflight"] == 0


def test_a_file_still_held_open_waits_for_settle() -> None:
    q, clock, disk = make(debounce=150, settle=300)
    disk.write("log.md", 1)
    q.put_path(ROOT, "log.md", created=True)
    q.put_path(ROOT, "log.md")  # written, flushed, never closed
    clock.advance(150)
    assert ready(q) == [] and q.depth()["settling"] == 1  # first sample
    clock.advance(299)
    assert ready(q) == []
    clock.advance(1)
    assert ready(q) == [Change(ROOT, "log.md")]


def test_a_write_after_the_close_re_arms_the_settle() -> None:
    q, clock, disk = make(debounce=150, settle=300)
    write_and_close(q, disk, "a.md", 10)
    clock.advance(10)
    disk.write("a.md", 20)
    q.put_path(ROOT, "a.md")  # another writer, which keeps the file open, goes on
    clock.advance(100)
    assert ready(q) == []
    clock.advance(50)
    assert ready(q) == [] and q.depth()["settling"] == 1
    clock.advance(300)
    assert ready(q) == [Change(ROOT, "a.md")]


def test_a_close_while_settling_skips_the_rest_of_the_settle() -> None:
    q, clock, disk = make(debounce=150, settle=300)
    disk.write("big.md", 1)
    q.put_path(ROOT, "big.md")
    clock.advance(150)
    assert ready(q) == [] and q.depth()["settling"] == 1
    disk.write("big.md", 2)
    q.put_path(ROOT, "big.md", closed=True)  # the writer is done
    clock.advance(30)
    assert ready(q) == [Change(ROOT, "big.md")]
    assert q.depth()["paths"] == 0


def test_temp_file_then_rename_yields_one_change_of_the_final_path() -> None:
    q, clock, disk = make(debounce=150, settle=300)
    disk.write("a.md", 5)
    write_and_close(q, disk, ".a.md.tmp123", 9, created=True)
    disk.files[ROOT / "a.md"] = disk.files.pop(ROOT / ".a.md.tmp123")
    q.put_path(ROOT, ".a.md.tmp123")  # moved: the source side...
    q.put_path(ROOT, "a.md", closed=True)  # ...and the destination, complete
    clock.advance(30)
    assert ready(q) == [Change(ROOT, "a.md")]
    clock.advance(1000)
    assert ready(q) == [], "the temp file was created and is gone: never handed out"
    assert q.depth()["paths"] == 0


def test_a_writer_closing_in_a_loop_takes_the_settle_path() -> None:
    q, clock, disk = make(debounce=150, settle=300)
    write_and_close(q, disk, "app.md", 1)
    clock.advance(30)
    assert ready(q) == [Change(ROOT, "app.md")]
    q.task_done(1)
    got: list[Change] = []
    for size in range(2, 22):  # open, append, close every 100 ms for 2 s
        clock.advance(100)
        write_and_close(q, disk, "app.md", size)
        got += ready(q)
    assert got == [], "changed again right after a hand-out: no fast path for a busy writer"
    clock.advance(150)
    assert ready(q) == [] and q.depth()["settling"] == 1
    clock.advance(300)
    assert ready(q) == [Change(ROOT, "app.md")]
    clock.advance(1000)
    write_and_close(q, disk, "app.md", 50)  # a save a while later is fast again
    clock.advance(30)
    assert ready(q) == [Change(ROOT, "app.md")]


def test_without_the_close_fast_path_every_file_settles() -> None:
    clock, disk = FakeClock(), FakeDisk()
    q = ChangeQueue(150, 300, close_debounce_ms=None, clock=clock, probe=disk)
    write_and_close(q, disk, "a.md", 10)
    clock.advance(150)
    assert ready(q) == [] and q.depth()["settling"] == 1
    clock.advance(300)
    assert ready(q) == [Change(ROOT, "a.md")]


def test_the_close_debounce_is_never_longer_than_the_debounce() -> None:
    q, clock, disk = make(debounce=10, settle=300)
    write_and_close(q, disk, "a.md", 10)
    clock.advance(10)
    assert ready(q) == [Change(ROOT, "a.md")]


def test_a_consumer_waiting_wakes_for_a_closed_file_in_time(tmp_path: Path) -> None:
    q = ChangeQueue(debounce_ms=150, settle_ms=5000)
    (tmp_path / "a.md").write_text("x")
    timer = threading.Timer(0.05, lambda: q.put_path(tmp_path, "a.md", closed=True))
    timer.start()
    start = time.monotonic()
    got = q.get_ready(10, timeout=10.0)
    took = time.monotonic() - start
    timer.join()
    assert got == [Change(tmp_path, "a.md")]
    assert took < 4.0, f"waited {took:.2f} s: the settle was not skipped"


def test_a_path_created_and_gone_again_is_dropped_but_a_deletion_is_not() -> None:
    q, clock, _ = make(settle=0)
    q.put_path(ROOT, ".x.tmp", created=True)
    q.put_path(ROOT, "old.md")  # existed before: a deletion the index must see
    clock.advance(100)
    assert ready(q) == [Change(ROOT, "old.md")]
    assert q.depth()["paths"] == 0


def test_created_then_gone_is_kept_when_a_change_of_it_was_just_handed_out() -> None:
    q, clock, disk = make(settle=0)
    disk.write("a.md", 1)
    q.put_path(ROOT, "a.md")
    clock.advance(100)
    assert ready(q) == [Change(ROOT, "a.md")]  # the indexer may be reading it right now
    del disk.files[ROOT / "a.md"]
    q.put_path(ROOT, "a.md", created=True)
    clock.advance(100)
    assert ready(q) == [Change(ROOT, "a.md")]


def test_a_change_during_settling_restarts_the_debounce() -> None:
    q, clock, disk = make(debounce=100, settle=200)
    disk.write("a.md", 1)
    q.put_path(ROOT, "a.md")
    clock.advance(100)
    assert ready(q) == [] and q.depth()["settling"] == 1
    q.put_path(ROOT, "a.md")
    assert q.depth() == {"paths": 1, "scans": 0, "settling": 0, "inflight": 0}
    clock.advance(100)
    assert ready(q) == []
    clock.advance(200)
    assert ready(q) == [Change(ROOT, "a.md")]


def test_storm_is_bounded_and_collapses_into_a_root_scan() -> None:
    q, clock, disk = make(max_pending=1000)
    q.put_path(OTHER, "calm.md")
    disk.write("calm.md", 1, root=OTHER)
    for i in range(50_000):
        q.put_path(ROOT, f"d{i % 97}/f{i}.md", created=True)
        if i % 1000 == 0:
            depth = q.depth()
            assert depth["paths"] + depth["scans"] <= 1000
    depth = q.depth()
    assert depth["paths"] == 1 and depth["scans"] == 1  # calm.md and the scan
    assert q.overflows == 1
    clock.advance(400)
    got = ready(q)
    assert Change(ROOT, "", "scan") in got
    assert not [c for c in got if c.root == ROOT and c.kind == "path"]
    clock.advance(400)
    assert [*got, *ready(q)].count(Change(OTHER, "calm.md")) == 1, "the calm root is untouched"


def test_many_directory_scans_are_bounded_too() -> None:
    q, _, _ = make(max_pending=100)
    for i in range(5000):
        q.put_scan(ROOT, f"dir{i}")
    assert q.depth()["scans"] == 1


def test_scan_subsumes_paths_and_narrower_scans() -> None:
    q, clock, disk = make(settle=0)
    disk.write("b/z.md", 1)
    for rel in ("a/x.md", "a/deep/y.md", "a", "b/z.md", "ab/w.md"):
        q.put_path(ROOT, rel)
    q.put_scan(ROOT, "a/deep")
    q.put_scan(ROOT, "a")
    assert q.depth() == {"paths": 2, "scans": 1, "settling": 0, "inflight": 0}
    q.put_path(ROOT, "a/new.md")  # absorbed by the pending scan
    q.put_scan(ROOT, "a/deep/er")  # so is a narrower scan
    assert q.depth() == {"paths": 2, "scans": 1, "settling": 0, "inflight": 0}
    disk.write("ab/w.md", 1)
    clock.advance(100)
    got = ready(q)
    assert sorted(got, key=repr) == sorted(
        [Change(ROOT, "a", "scan"), Change(ROOT, "b/z.md"), Change(ROOT, "ab/w.md")], key=repr)
    q.put_scan(ROOT, "x")
    q.put_scan(ROOT, "")
    assert q.depth()["scans"] == 1


def test_scans_are_postponed_by_activity_below_but_not_forever() -> None:
    clock, disk = FakeClock(), FakeDisk()
    q = ChangeQueue(100, 0, 1000, max_delay_ms=1000, clock=clock, probe=disk)
    q.put_scan(ROOT, "")
    for _ in range(9):
        clock.advance(90)
        q.put_path(ROOT, "busy.log")
        assert ready(q) == []
    clock.advance(200)
    assert ready(q) == [Change(ROOT, "", "scan")]


def test_max_items_is_respected_and_the_rest_follows() -> None:
    q, clock, disk = make(settle=0)
    for i in range(10):
        disk.write(f"f{i}.md", 1)
        q.put_path(ROOT, f"f{i}.md")
    clock.advance(100)
    first = ready(q, max_items=4)
    rest = ready(q)
    assert len(first) == 4 and len(rest) == 6
    assert {c.relpath for c in first + rest} == {f"f{i}.md" for i in range(10)}


def test_drop_root_forgets_its_entries() -> None:
    q, _, _ = make()
    q.put_path(ROOT, "a.md")
    q.put_scan(ROOT, "d")
    q.put_path(OTHER, "b.md")
    q.drop_root(ROOT)
    assert q.depth() == {"paths": 1, "scans": 0, "settling": 0, "inflight": 0}


def test_get_ready_times_out_and_wakes_up_for_a_new_change(tmp_path: Path) -> None:
    q = ChangeQueue(debounce_ms=20, settle_ms=0)
    start = time.monotonic()
    assert q.get_ready(10, timeout=0.2) == []
    assert 0.15 <= time.monotonic() - start < 2.0
    (tmp_path / "a.md").write_text("x")
    timer = threading.Timer(0.1, q.put_path, args=(tmp_path, "a.md"))
    timer.start()
    start = time.monotonic()
    got = q.get_ready(10, timeout=10.0)
    assert got == [Change(tmp_path, "a.md")]
    assert time.monotonic() - start < 2.0, "a waiting consumer must wake for a new change"
    timer.join()


def test_close_unblocks_waiting_consumers() -> None:
    q = ChangeQueue()
    results: list[list[Change]] = []
    threads = [threading.Thread(target=lambda: results.append(q.get_ready(10, 30.0)))
               for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    start = time.monotonic()
    q.close()
    for t in threads:
        t.join(5.0)
    assert not any(t.is_alive() for t in threads)
    assert results == [[], []]
    assert time.monotonic() - start < 5.0
    q.put_path(ROOT, "late.md")
    assert q.depth()["paths"] == 0 and q.get_ready(1, 0) == []


def test_producers_and_a_consumer_in_parallel(tmp_path: Path) -> None:
    q = ChangeQueue(debounce_ms=5, settle_ms=0, max_pending=100_000)
    names = [f"f{i}.md" for i in range(400)]
    for name in names:
        (tmp_path / name).write_text("x")
    seen: list[Change] = []

    def produce(part: list[str]) -> None:
        for _ in range(3):
            for name in part:
                q.put_path(tmp_path, name)

    producers = [threading.Thread(target=produce, args=(names[i::4],)) for i in range(4)]
    for t in producers:
        t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and {c.relpath for c in seen} != set(names):
        seen += q.get_ready(64, 0.05)
    for t in producers:
        t.join()
    seen += q.get_ready(1000, 0.1)
    assert {c.relpath for c in seen} == set(names)
    assert q.depth()["paths"] == 0
