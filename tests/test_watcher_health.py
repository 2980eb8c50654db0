"""The watcher under faults, with real files and real watchdog threads: handlers that
raise, emitters that die, roots that vanish and come back, trees 1,200 levels deep."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from repd.core.ignore import IgnoreRules
from repd.pipeline.changes import Change, ChangeQueue
from repd.pipeline.watcher import Watcher, WatchHealth
from repd.settings import WatchSettings

TIMEOUT = 20.0  # generous: the machine is shared


def wait_for(pred: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Rig:
    """A started watcher over ``roots`` and everything it has queued so far."""

    def __init__(self, roots: list[Path], settings: WatchSettings | None = None,
                 rules: dict[Path, IgnoreRules] | None = None) -> None:
        self.queue = ChangeQueue(debounce_ms=20, settle_ms=40)
        rules = rules or {r: IgnoreRules(r, private_dirs=[]) for r in roots}
        self.watcher = Watcher(roots, rules, self.queue, settings or WatchSettings(),
                               poll_interval=0.2, check_interval=0.5)
        self.got: list[Change] = []

    def drain(self) -> list[Change]:
        self.got += self.queue.get_ready(1000, 0.05)
        return self.got

    def wait_change(self, change: Change, what: str) -> None:
        wait_for(lambda: change in self.drain(), what)

    def health(self) -> WatchHealth:
        return self.watcher.health()


@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    out = [tmp_path / "a", tmp_path / "b"]
    for r in out:
        r.mkdir()
    return out


class ExplodingRules(IgnoreRules):
    """Rules that raise for one name, as pathspec did on a bad .gitignore line."""

    def is_ignored(self, relpath: str, is_dir: bool) -> bool:
        if "boom" in relpath:
            raise ValueError("bad character range z-a")
        return super().is_ignored(relpath, is_dir)


def test_a_handler_error_is_counted_rescans_and_kills_nothing(roots: list[Path]) -> None:
    a, b = roots
    rig = Rig(roots, rules={a: ExplodingRules(a, private_dirs=[]),
                            b: IgnoreRules(b, private_dirs=[])})
    rig.watcher.start()
    try:
        (a / "boom.md").write_text("x")
        rig.wait_change(Change(a, "", "scan"), "a rescan of the root whose event failed")
        (a / "fine.md").write_text("x")
        (b / "other.md").write_text("x")
        rig.wait_change(Change(a, "fine.md"), "the next event of the same root")
        rig.wait_change(Change(b, "other.md"), "an event of the other root")
        health = rig.health()
        assert health.alive and all(health.threads.values()), health
        assert health.handler_errors >= 1 and "bad character range" in (health.last_error or "")
        assert "event handling failed" in health.problems[a]
        assert b not in health.problems
    finally:
        rig.watcher.stop()
    assert not rig.watcher.threads_alive()  # stopped: nothing runs


def test_a_dead_emitter_is_seen_and_its_root_watched_again(roots: list[Path]) -> None:
    a, _ = roots
    rig = Rig(roots)
    rig.watcher.start()
    try:
        assert rig.health().problems == {}
        root = rig.watcher._roots[a]
        old_watch = root.watch
        emitter = root.observer._emitter_for_watch[old_watch]  # type: ignore[union-attr,index]
        emitter.stop()  # the thread ends, as if it had crashed
        emitter.join(5)
        # Either the check already re-armed it, or health says what is wrong.
        problem = rig.health().problems.get(a)
        assert problem is None or "stopped" in problem
        wait_for(lambda: a not in rig.health().problems and root.watch is not old_watch,
                 "the root watched again")
        rig.wait_change(Change(a, "", "scan"), "a rescan after the re-arm")
        (a / "after.md").write_text("x")
        rig.wait_change(Change(a, "after.md"), "events from the new watch")
    finally:
        rig.watcher.stop()


@pytest.mark.parametrize("polling", [False, True])
def test_a_root_deleted_and_recreated_is_watched_again(roots: list[Path],
                                                       polling: bool) -> None:
    a, b = roots
    rig = Rig(roots, WatchSettings(force_polling=polling))
    rig.watcher.start()
    try:
        shutil.rmtree(a)
        wait_for(lambda: rig.watcher.status()[a].startswith("error"), "the root in error")
        assert a in rig.health().problems
        a.mkdir()
        wait_for(lambda: not rig.watcher.status()[a].startswith("error"), "the root re-armed")
        rig.wait_change(Change(a, "", "scan"), "a rescan of the recreated root")
        (a / "new.md").write_text("x")
        rig.wait_change(Change(a, "new.md"), "live events from the recreated root")
        (b / "b.md").write_text("x")
        rig.wait_change(Change(b, "b.md"), "the other root unaffected")
    finally:
        rig.watcher.stop()


def _deep(root: Path, depth: int) -> Path:
    rel = Path(*(["d"] * depth))
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(fd)
    return rel


@pytest.mark.deep_tree
@pytest.mark.parametrize("polling", [False, True])
def test_a_tree_1200_levels_deep_is_watched_to_the_bottom(roots: list[Path],
                                                          polling: bool) -> None:
    a, b = roots
    rel = _deep(a, 1200)  # RecursionError in os.walk (inotify) or the snapshot (polling)
    rig = Rig(roots, WatchSettings(force_polling=polling))
    rig.watcher.start()
    try:
        assert rig.watcher.status() == {a: "polling" if polling else "inotify",
                                        b: "polling" if polling else "inotify"}
        time.sleep(0.5)
        (a / rel / "bottom.md").write_text("x")
        rig.wait_change(Change(a, f"{rel.as_posix()}/bottom.md"), "an event at the bottom")
        assert rig.health().alive and rig.health().problems == {}
    finally:
        rig.watcher.stop()
