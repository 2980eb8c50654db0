"""Watcher with real files and a real watchdog observer: event mapping, editor saves, fallbacks."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD, Mask

from repd.core.ignore import IgnoreRules
from repd.pipeline.changes import Change, ChangeQueue
from repd.pipeline.watcher import Watcher
from repd.settings import WatchSettings

_counter = itertools.count()


class Harness:
    """A started Watcher over ``root`` plus helpers that wait with deadlines."""

    def __init__(self, tmp_path: Path, settings: WatchSettings | None = None,
                 poll_interval: float = 2.0, queue: ChangeQueue | None = None) -> None:
        self.root = tmp_path / "root"
        self.root.mkdir(exist_ok=True)
        self.outside = tmp_path / "outside"
        self.outside.mkdir(exist_ok=True)
        self.queue = queue or ChangeQueue(debounce_ms=40, settle_ms=80)
        self.settings = settings or WatchSettings()
        self.watcher = Watcher([self.root], {self.root: self.rules(self.root)}, self.queue,
                               self.settings, poll_interval=poll_interval)

    @staticmethod
    def rules(root: Path) -> IgnoreRules:
        return IgnoreRules(root, private_dirs=[])

    def changes_until_sentinel(self, root: Path | None = None, timeout: float = 10.0
                               ) -> list[Change]:
        """Everything enqueued before a fresh sentinel file's change comes out.

        Events arrive in order, so once the sentinel (written last) is handed out, every
        earlier event has reached the queue and, being older, has been handed out too. That
        holds because the sentinel takes the slowest path, debounce and settle: it appears
        by a hard link of a file written outside the root, so the root sees no ``close()``
        of it (a file closed after writing takes the fast path and would overtake others).
        """
        root = root or self.root
        name = f"zz-sentinel-{next(_counter)}.txt"
        (self.outside / name).write_text("s")
        os.link(self.outside / name, root / name)
        got: list[Change] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got += self.queue.get_ready(100, 0.05)
            if Change(root, name) in got:
                got += self.queue.get_ready(100, 0)
                return [c for c in got if c.relpath != name]
        raise AssertionError(f"sentinel never arrived; got {got}")

    def changes_until(self, pred: Callable[[list[Change]], bool], timeout: float = 10.0
                      ) -> list[Change]:
        got: list[Change] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not pred(got):
            got += self.queue.get_ready(100, 0.05)
        assert pred(got), f"condition never met; got {got}"
        return got


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    (harness.root / "sub").mkdir()
    (harness.root / "sub" / "a.md").write_text("a")
    harness.watcher.start()
    yield harness
    harness.watcher.stop(5.0)


def path(h: Harness, rel: str) -> Change:
    return Change(h.root, rel, "path")


def scan(h: Harness, rel: str) -> Change:
    return Change(h.root, rel, "scan")


def test_status_reports_inotify_and_stopped(h: Harness) -> None:
    assert h.watcher.status() == {h.root: "inotify"}
    h.watcher.stop(5.0)
    assert h.watcher.status() == {h.root: "stopped"}


def test_create_modify_delete_file(h: Harness) -> None:
    target = h.root / "new.md"
    target.write_text("one")
    assert h.changes_until_sentinel() == [path(h, "new.md")]
    with target.open("a") as fh:
        fh.write("two")
    assert h.changes_until_sentinel() == [path(h, "new.md")]
    target.unlink()
    assert h.changes_until_sentinel() == [path(h, "new.md")]


def test_create_then_delete_quickly_yields_nothing(h: Harness) -> None:
    target = h.root / "flash.md"
    target.write_text("x")
    target.unlink()
    assert h.changes_until_sentinel() == []


def test_reading_a_file_is_not_a_change(h: Harness) -> None:
    assert (h.root / "sub" / "a.md").read_text() == "a"
    assert h.changes_until_sentinel() == []


def test_move_file_inside_into_and_out_of_the_root(h: Harness) -> None:
    (h.root / "sub" / "a.md").rename(h.root / "b.md")
    assert sorted(h.changes_until_sentinel(), key=repr) == [path(h, "b.md"), path(h, "sub/a.md")]
    (h.root / "b.md").rename(h.outside / "b.md")
    assert h.changes_until_sentinel() == [path(h, "b.md")]
    (h.outside / "b.md").rename(h.root / "back.md")
    assert h.changes_until_sentinel() == [path(h, "back.md")]


def test_directories_created_moved_and_deleted_become_scans(h: Harness) -> None:
    (h.root / "fresh").mkdir()
    (h.root / "fresh" / "f.md").write_text("x")
    assert h.changes_until_sentinel() == [scan(h, "fresh")]
    (h.root / "fresh").rename(h.root / "renamed")
    assert sorted(h.changes_until_sentinel(), key=repr) == [scan(h, "fresh"), scan(h, "renamed")]
    (h.root / "renamed" / "later.md").write_text("x")
    assert h.changes_until_sentinel() == [path(h, "renamed/later.md")], "watch moved along"
    shutil.move(h.root / "renamed", h.outside / "gone")
    assert h.changes_until_sentinel() == [scan(h, "renamed")]
    group = h.watcher._roots[h.root].group
    assert group is not None
    assert not [p for p in group.watched_paths() if b"renamed" in p], "watch dropped"
    (h.outside / "gone" / "ignored-now.md").write_text("x")
    (h.outside / "incoming" / "deep").mkdir(parents=True)
    (h.outside / "incoming" / "deep" / "x.md").write_text("x")
    shutil.move(h.outside / "incoming", h.root / "incoming")
    assert h.changes_until_sentinel() == [scan(h, "incoming")]
    (h.root / "incoming" / "deep" / "y.md").write_text("y")
    assert h.changes_until_sentinel() == [path(h, "incoming/deep/y.md")], "moved-in dirs watched"
    shutil.rmtree(h.root / "incoming")
    assert h.changes_until_sentinel() == [scan(h, "incoming")]


def test_vim_save_yields_one_change(h: Harness) -> None:
    target = h.root / "sub" / "a.md"
    swap = h.root / "sub" / ".a.md.swp"
    swap.write_bytes(b"b0VIM")  # opened for editing
    probe = h.root / "sub" / "4913"  # can vim create files here?
    probe.write_text("")
    probe.unlink()
    backup = h.root / "sub" / "a.md~"
    target.rename(backup)
    with target.open("w") as fh:
        fh.write("edited")
        fh.flush()
        os.fsync(fh.fileno())
    backup.unlink()
    swap.unlink()  # vim quits
    assert h.changes_until_sentinel() == [path(h, "sub/a.md")]


def test_emacs_save_yields_one_change(h: Harness) -> None:
    target = h.root / "sub" / "a.md"
    lock = h.root / "sub" / ".#a.md"
    lock.symlink_to("user@host.1234:1700000000")
    autosave = h.root / "sub" / "#a.md#"
    autosave.write_text("draft")
    target.rename(h.root / "sub" / "a.md~")  # first save keeps a backup
    target.write_text("saved")
    autosave.unlink()
    lock.unlink()
    assert h.changes_until_sentinel() == [path(h, "sub/a.md")]


@pytest.mark.parametrize("temp_name", [".a.md.tmp123", "a.md.XK3J9q", "a.md.new"])
def test_atomic_rename_save_yields_one_change(h: Harness, temp_name: str) -> None:
    temp = h.root / "sub" / temp_name
    temp.write_text("atomic")
    temp.rename(h.root / "sub" / "a.md")
    assert h.changes_until_sentinel() == [path(h, "sub/a.md")]


def test_a_file_written_in_bursts_yields_one_change_after_it_settles(h: Harness) -> None:
    target = h.root / "growing.md"
    with target.open("w") as fh:
        for _ in range(6):
            fh.write("chunk\n")
            fh.flush()
            time.sleep(0.03)
    assert h.changes_until_sentinel() == [path(h, "growing.md")]


# The close fast path, with a settle long enough that the two paths cannot be confused.
LONG_SETTLE_MS = 1500


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path, queue=ChangeQueue(debounce_ms=40, settle_ms=LONG_SETTLE_MS))
    (harness.root / "sub").mkdir()
    (harness.root / "sub" / "a.md").write_text("a")
    harness.watcher.start()
    yield harness
    harness.watcher.stop(5.0)


def timed(h: Harness, save: Callable[[], None]) -> tuple[list[Change], float]:
    """Every change ``save`` makes, and the seconds until ``sub/a.md`` was handed out."""
    start = time.monotonic()
    save()
    got = h.changes_until(lambda g: path(h, "sub/a.md") in g)
    took = time.monotonic() - start
    return got + h.changes_until_sentinel(), took


def test_a_file_closed_after_writing_is_handed_out_before_settle(slow: Harness) -> None:
    got, took = timed(slow, lambda: (slow.root / "sub" / "a.md").write_text("saved"))
    assert got == [path(slow, "sub/a.md")]
    assert took < 1.0, f"{took:.2f} s: the close did not skip the settle"


def test_a_file_held_open_waits_for_settle(slow: Harness) -> None:
    target = slow.root / "held.md"
    with target.open("w") as fh:
        fh.write("still writing")
        fh.flush()
        start = time.monotonic()
        got = slow.changes_until(lambda g: bool(g), timeout=LONG_SETTLE_MS / 1000 + 10)
        took = time.monotonic() - start
        assert got == [path(slow, "held.md")]
        assert took >= LONG_SETTLE_MS / 1000, f"handed out after {took:.2f} s, before settle"


def _temp_then_rename(h: Harness) -> None:
    temp = h.root / "sub" / "a.md.XK3J9q"  # not an ignored name: only the debounce hides it
    temp.write_text("atomic")
    os.replace(temp, h.root / "sub" / "a.md")


def _vim_save(h: Harness) -> None:
    target, backup = h.root / "sub" / "a.md", h.root / "sub" / "a.md~"
    (h.root / "sub" / "4913").write_text("")
    (h.root / "sub" / "4913").unlink()
    target.rename(backup)
    target.write_text("vim")
    backup.unlink()


def _truncate_and_write(h: Harness) -> None:
    with (h.root / "sub" / "a.md").open("r+") as fh:
        fh.truncate(0)
        fh.write("rewritten in place")


@pytest.mark.parametrize("save", [_temp_then_rename, _vim_save, _truncate_and_write])
def test_editor_saves_are_one_fast_change_of_the_final_path(
        slow: Harness, save: Callable[[Harness], None]) -> None:
    got, took = timed(slow, lambda: save(slow))
    assert got == [path(slow, "sub/a.md")]
    assert took < 1.0, f"{took:.2f} s: the save waited for settle"


def test_ignored_paths_produce_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    (h.root / ".gitignore").write_text("*.log\nscratch/\n")
    (h.root / "scratch").mkdir()
    (h.root / "node_modules" / "pkg").mkdir(parents=True)
    (h.root / ".git").mkdir()
    h.watcher.start()
    try:
        (h.root / "debug.log").write_text("x")
        (h.root / "scratch" / "a.md").write_text("x")
        (h.root / "node_modules" / "pkg" / "index.js").write_text("x")
        (h.root / ".git" / "index").write_text("x")
        (h.root / ".ssh").mkdir()  # a secret folder is never walked nor watched
        (h.root / ".ssh" / "config").write_text("Host x")
        (h.root / "build").mkdir()
        (h.root / "build" / "out.md").write_text("x")
        assert h.changes_until_sentinel() == []
    finally:
        h.watcher.stop(5.0)


def test_ignored_directories_get_no_inotify_watch(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    (h.root / "node_modules" / "a" / "b").mkdir(parents=True)
    (h.root / ".git" / "objects").mkdir(parents=True)
    (h.root / "docs").mkdir()
    h.watcher.start()
    try:
        group = h.watcher._roots[h.root].group
        assert group is not None
        watched = {os.fsdecode(p) for p in group.watched_paths()}
        assert watched == {str(h.root), str(h.root / "docs")}
    finally:
        h.watcher.stop(5.0)


def test_gitignore_change_invalidates_and_rescans_its_directory(h: Harness) -> None:
    (h.root / "sub" / ".gitignore").write_text("*.md\n")
    assert set(h.changes_until_sentinel()) == {scan(h, "sub")}
    (h.root / "sub" / "hidden.md").write_text("x")
    assert h.changes_until_sentinel() == []


def test_unignored_directory_gets_watched_after_rules_change(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    (h.root / "sub" / "data").mkdir(parents=True)
    (h.root / "sub" / ".gitignore").write_text("data/\n")
    h.watcher.start()
    try:
        group = h.watcher._roots[h.root].group
        assert group is not None
        data = os.fsencode(h.root / "sub" / "data")
        assert data not in group.watched_paths()
        (h.root / "sub" / ".gitignore").write_text("")
        wait_for(lambda: data in group.watched_paths())
        assert set(h.changes_until_sentinel()) == {scan(h, "sub")}
        (h.root / "sub" / "data" / "now-seen.md").write_text("x")
        assert h.changes_until_sentinel() == [path(h, "sub/data/now-seen.md")]
    finally:
        h.watcher.stop(5.0)


def test_symlinks_are_not_followed_out_of_the_root(h: Harness) -> None:
    (h.outside / "target").mkdir()
    (h.root / "link").symlink_to(h.outside / "target")
    assert h.changes_until_sentinel() == [path(h, "link")]  # the link itself is a change
    (h.outside / "target" / "x.md").write_text("x")
    assert h.changes_until_sentinel() == []


def test_queue_overflow_enqueues_a_root_scan_and_watching_goes_on(h: Harness) -> None:
    observer = h.watcher._inotify
    assert observer is not None
    # Exactly what InotifyFD.read_events hands over when the kernel queue overflowed.
    overflow = InotifyEvent(-1, Mask(InotifyConstants.IN_Q_OVERFLOW), 0, b"")  # type: ignore[arg-type]
    observer._inotify_fd.handle_event(overflow)
    assert h.changes_until(lambda got: scan(h, "") in got) == [scan(h, "")]
    (h.root / "sub" / "after.md").write_text("x")
    assert h.changes_until_sentinel() == [path(h, "sub/after.md")]


def test_watch_limit_at_start_falls_back_to_polling(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_watches(self: InotifyFD, path: bytes, *args: object) -> int:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(InotifyFD, "add_callback", no_watches)
    h = Harness(tmp_path, poll_interval=0.1)
    (h.root / "node_modules").mkdir()
    h.watcher.start()
    try:
        assert h.watcher.status() == {h.root: "polling"}
        (h.root / "polled.md").write_text("x")
        (h.root / "node_modules" / "skip.js").write_text("x")
        assert h.changes_until_sentinel() == [path(h, "polled.md")]
    finally:
        h.watcher.stop(5.0)


def test_watch_limit_below_the_root_falls_back_and_leaves_no_watches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = InotifyFD.add_callback

    def limit_on_deep(self: InotifyFD, path: bytes, *args: object) -> int:
        if path.endswith(b"/deep"):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return real(self, path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(InotifyFD, "add_callback", limit_on_deep)
    h = Harness(tmp_path, poll_interval=0.1)
    (h.root / "a" / "deep").mkdir(parents=True)
    h.watcher.start()
    try:
        assert h.watcher.status() == {h.root: "polling"}
        assert h.watcher._inotify is not None
        assert h.watcher._inotify._inotify_fd._watch_for_wd == {}, "partial watches removed"
        (h.root / "a" / "deep" / "x.md").write_text("x")
        assert h.changes_until_sentinel() == [path(h, "a/deep/x.md")]
    finally:
        h.watcher.stop(5.0)


def test_watch_limit_while_running_switches_to_polling_and_rescans(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    real = InotifyFD.add_callback

    def limit_on_new(self: InotifyFD, path: bytes, *args: object) -> int:
        if b"/late" in path:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return real(self, path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(InotifyFD, "add_callback", limit_on_new)
    (h.root / "late").mkdir()
    h.changes_until(lambda got: scan(h, "") in got)
    assert h.watcher.status() == {h.root: "polling"}


def test_force_polling(tmp_path: Path) -> None:
    h = Harness(tmp_path, WatchSettings(force_polling=True), poll_interval=0.1)
    h.watcher.start()
    try:
        assert h.watcher.status() == {h.root: "polling"}
        (h.root / "p.md").write_text("x")
        (h.root / "p.md~").write_text("x")
        assert h.changes_until_sentinel() == [path(h, "p.md")]
        (h.root / "p.md").rename(h.root / "q.md")
        assert sorted(h.changes_until_sentinel(), key=repr) == [path(h, "p.md"), path(h, "q.md")]
    finally:
        h.watcher.stop(5.0)


def test_roots_added_and_removed_at_run_time(h: Harness, tmp_path: Path) -> None:
    second = tmp_path / "second"
    second.mkdir()
    h.watcher.add_root(second, Harness.rules(second))
    assert h.watcher.status() == {h.root: "inotify", second: "inotify"}
    (second / "n.md").write_text("x")
    assert h.changes_until_sentinel(second) == [Change(second, "n.md")]
    h.watcher.remove_root(second)
    assert h.watcher.status() == {h.root: "inotify"}
    (second / "unwatched.md").write_text("x")
    assert h.changes_until_sentinel() == []


def test_missing_root_reports_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    watcher = Watcher([missing], {}, ChangeQueue(), WatchSettings())
    watcher.start()
    try:
        assert watcher.status() == {missing: "error: not found"}
    finally:
        watcher.stop(5.0)


def test_deleting_the_root_asks_for_a_root_scan(h: Harness) -> None:
    shutil.rmtree(h.root)
    h.changes_until(lambda got: scan(h, "") in got)
    assert h.watcher.status() == {h.root: "error: root vanished"}


def test_the_watchdog_release_asked_for_is_the_one_imported() -> None:
    """``.ci/run`` runs the watcher's tests again on each release it knows, shadowed in by
    PYTHONPATH: the run proves something only if that release is the one imported."""
    from repd.pipeline import watcher as watcher_mod

    wanted = os.environ.get("REPD_TEST_WATCHDOG") or watcher_mod.WATCHDOG_VERSION
    assert wanted == watcher_mod.WATCHDOG_VERSION
    assert wanted in watcher_mod.INOTIFY_WATCHDOG_VERSIONS
    # 7.1.0 keeps the watches in two dicts, 7.1.1 in a tree: the layout the code takes.
    assert watcher_mod._WATCH_TREE is (wanted != "7.1.0")


def test_a_watchdog_release_the_inotify_code_does_not_know_is_polled_loudly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """watchdog 7.1.1 rewrote the inotify internals _WatchGroup overrides, and a daemon on
    it saw no change at all until the watcher learnt that layout too. Any release other
    than those it was written for is polled, with an error that names the one to install."""
    from repd.pipeline import watcher as watcher_mod

    assert watcher_mod.WATCHDOG_VERSION in watcher_mod.INOTIFY_WATCHDOG_VERSIONS  # pyproject's
    monkeypatch.setattr(watcher_mod, "WATCHDOG_VERSION", "7.2.0")
    h = Harness(tmp_path, poll_interval=0.1)
    h.watcher.start()
    try:
        assert h.watcher.status() == {h.root: "polling"}
        (h.root / "p.md").write_text("x")
        assert h.changes_until_sentinel() == [path(h, "p.md")]
    finally:
        h.watcher.stop(5.0)
    out = capsys.readouterr().out
    assert out.count("watchdog_version_unsupported") == 1 and "watchdog==7.1.1" in out


def test_doctor_warns_of_a_watchdog_release_the_watcher_does_not_know(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from repd import doctor
    from repd.pipeline import watcher as watcher_mod
    from repd.settings import Settings

    settings = Settings(roots=[tmp_path], store={"path": tmp_path / "data"})
    assert doctor.check_inotify(settings).level == "ok"
    monkeypatch.setattr(watcher_mod, "WATCHDOG_VERSION", "7.2.0")
    check = doctor.check_inotify(settings)
    assert check.level == "warn" and "watchdog 7.2.0" in check.message
    assert "polled" in check.message and "watchdog==7.1.1" in check.message
