"""Trees that fight back, in process, with the real model, Qdrant Edge and SQLite.

Bad .gitignore lines, names that are not UTF-8, folders that cannot be listed, transient
errors, trees 1,200 levels deep, symlinks that lead out of the root (by a reindex and by
a race between the check and the read), and housekeeping files. Each case was a way to
lose or leak data; the daemon-level versions are in test_daemon_untrusted.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from repd.core.identity import fs_path, stored_path
from repd.core.ignore import IgnoreRules
from repd.engine import Engine
from repd.errors import TransientError
from repd.pipeline.changes import ChangeQueue
from tests.helpers import make_settings, snapshot

GOOD = "Glaciers carve valleys as they move, grinding rock beneath tons of ice."
SECRET = "The launch codes are kept in the blue folder under the piano."
BAD_NAME = os.fsdecode(b"f15\xff.md")


class World:
    """A root, an outside folder, and an engine indexing the root."""

    def __init__(self, tmp: Path, embedder: Any, **settings: Any) -> None:
        self.root = tmp / "root"
        self.root.mkdir()
        self.outside = tmp / "outside"
        self.outside.mkdir()
        (self.outside / "private.md").write_text(SECRET)
        self.engine = Engine(make_settings(tmp / "data", **settings), writer=True,
                             embedder=embedder)
        self.indexer = self.engine.indexer()
        self.rules = self.engine.rules(self.root)

    def scan(self, subdir: str = "") -> Any:
        return self.indexer.reconcile(self.root, self.rules, subdir)

    def rows(self) -> dict[str, Any]:
        return self.engine.manifest.files_under(str(self.root))

    def texts(self) -> str:
        return " ".join(p["text"] for _, p in snapshot(self.engine).values())

    def payload_paths(self) -> set[str]:
        return {p["path"] for _, p in snapshot(self.engine).values()}


@pytest.fixture
def world(tmp_path: Path, embedder: Any) -> Iterator[World]:
    w = World(tmp_path, embedder)
    yield w
    w.engine.close()


# --- .gitignore lines git accepts and pathspec does not ----------------------------------

@pytest.mark.parametrize("bad", ["[z-a]", "!", "trailing\\"])
def test_a_bad_gitignore_line_is_skipped_with_its_file_and_line(tmp_path: Path,
                                                                 bad: str) -> None:
    (tmp_path / "sub").mkdir()
    gi = tmp_path / "sub" / ".gitignore"
    gi.write_text(f"*.log\n{bad}\nscratch/\n")
    rules = IgnoreRules(tmp_path, private_dirs=[])
    with capture_logs() as logs:
        assert rules.is_ignored("sub/debug.log", False)  # the lines around it still apply
        assert rules.is_ignored("sub/scratch", True)
        assert not rules.is_ignored("sub/notes.md", False)
    warnings = [e for e in logs if e["event"] == "invalid_ignore_line"]
    assert [w["file"] for w in warnings] == [f"{gi}:2"]


def test_ignore_rules_of_a_tree_1200_levels_deep(tmp_path: Path) -> None:
    (tmp_path / ".gitignore").write_text("*.log\n")
    rules = IgnoreRules(tmp_path, private_dirs=[])
    deep = "/".join(["d"] * 1200)
    assert not rules.is_ignored(deep, True)  # RecursionError before
    assert rules.is_ignored(deep + "/x.log", False)
    assert not rules.is_ignored(deep + "/x.md", False)
    assert rules.is_ignored("node_modules/" + deep, True)


# --- names that are not valid UTF-8 -------------------------------------------------------

def test_stored_names_round_trip_and_leave_ordinary_names_alone() -> None:
    assert stored_path("notes/ñandú 日本.md") == "notes/ñandú 日本.md"
    assert stored_path(BAD_NAME) == "f15\\xff.md"
    # Injective: a real backslash name never meets an escaped byte.
    assert stored_path("f15\\xff.md") == "f15\\\\xff.md"
    for name in (BAD_NAME, "f15\\xff.md", "a\\b", os.fsdecode(b"\xed\xa0\x80\\u00ff")):
        stored = stored_path(name)
        stored.encode("utf-8")  # always storable
        assert fs_path(stored) == name


def test_a_name_that_is_not_utf8_is_indexed_under_an_escaped_name(world: World) -> None:
    (world.root / "good.md").write_text(GOOD)
    (world.root / BAD_NAME).write_text("Basaltic lava flows far because it is low in silica.")
    stats = world.scan()  # UnicodeEncodeError (surrogates not allowed) aborted the root
    assert stats.indexed == 2 and stats.failed == 0, stats
    assert set(world.rows()) == {"good.md", "f15\\xff.md"}
    assert world.payload_paths() == {"good.md", "f15\\xff.md"}
    assert world.scan().unchanged == 2  # found again under the same row: no work
    # An event names the file as os does; it maps to the same row.
    (world.root / BAD_NAME).write_text("Shield volcanoes have gentle slopes.")
    stats = world.indexer.process_paths(world.root, world.rules, [BAD_NAME])
    assert stats.indexed == 1 and "gentle slopes" in world.texts()
    (world.root / BAD_NAME).unlink()
    world.indexer.process_paths(world.root, world.rules, [BAD_NAME])
    assert set(world.rows()) == {"good.md"}


# --- folders that cannot be listed ---------------------------------------------------------

def _failing_scandir(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    # Tests run as root, whom chmod 000 does not stop: fail the listing itself.
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(os.fsdecode(path)) == folder:
            raise OSError(code, os.strerror(code), str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_folder_that_cannot_be_listed_keeps_its_files(world: World,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (world.root / "good.md").write_text(GOOD)
    (world.root / "locked" / "deeper").mkdir(parents=True)
    (world.root / "locked" / "a.md").write_text("Oolong tea is partially oxidised.")
    (world.root / "locked" / "deeper" / "b.md").write_text("Honeybees dance to share news.")
    world.scan()
    before = snapshot(world.engine)
    with monkeypatch.context() as m:
        _failing_scandir(m, world.root / "locked", errno.EACCES)
        stats = world.scan()
        assert stats.deleted == 0, stats
        assert set(snapshot(world.engine)) == set(before)  # no point deleted
        rows = world.rows()
        assert {"locked/a.md", "locked/deeper/b.md"} <= set(rows)
        assert rows["locked"].reason == "unreadable"  # the folder's problem is recorded
        assert "cannot list folder" in (rows["locked"].detail or "")
        # A scan of just that folder (an event, a reindex) keeps them too.
        assert world.scan("locked").deleted == 0
        assert "locked/a.md" in world.rows()
    world.scan()  # readable again: the folder's row goes, the files stay
    assert set(world.rows()) == {"good.md", "locked/a.md", "locked/deeper/b.md"}
    assert set(snapshot(world.engine)) == set(before)


def test_an_event_under_a_folder_that_cannot_be_searched_keeps_the_file(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # EACCES from lstat is about a folder above (stat needs no right on the file itself):
    # the event used to record the file "unreadable" and delete its points.
    (world.root / "locked").mkdir()
    (world.root / "locked" / "a.md").write_text(GOOD)
    world.scan()
    before = snapshot(world.engine)
    locked = world.root / "locked"
    real_stat, real_lstat = os.stat, os.lstat

    prefix = str(locked) + "/"

    def denied(path: Any) -> None:
        if not isinstance(path, int) and os.fsdecode(path).startswith(prefix):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        denied(path)
        return real_stat(path, *args, **kwargs)

    def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        denied(path)
        return real_lstat(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "stat", stat)
        m.setattr(os, "lstat", lstat)
        world.indexer.process_paths(world.root, world.rules, ["locked/a.md"])
        plan = world.indexer.planner.plan(world.root, "locked/a.md", "h", "indexed")
        assert plan.action == "touch"
    assert world.rows()["locked/a.md"].state == "indexed"
    assert set(snapshot(world.engine)) == set(before)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.EIO, errno.ENOMEM])
def test_a_transient_listing_error_raises_and_changes_nothing(
        world: World, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    (world.root / "sub").mkdir()
    (world.root / "sub" / "a.md").write_text(GOOD)
    world.scan()
    before = snapshot(world.engine)
    rows_before = world.rows()
    _failing_scandir(monkeypatch, world.root / "sub", code)
    with pytest.raises(TransientError, match="sub"):
        world.scan()
    assert world.rows() == rows_before
    assert set(snapshot(world.engine)) == set(before)


def test_a_transient_read_error_is_not_recorded_against_the_file(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    (world.root / "a.md").write_text(GOOD)
    world.scan()
    (world.root / "a.md").write_text(GOOD + " More ice.")
    target = world.root / "a.md"
    real_open = os.open

    def emfile(p: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(os.fsdecode(p)) == target:
            raise OSError(errno.EMFILE, "Too many open files", str(p))
        return real_open(p, flags, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "open", emfile)
        # It became "unreadable" and its points were deleted.
        with pytest.raises(TransientError, match=r"a\.md"):
            world.indexer.process_paths(world.root, world.rules, ["a.md"])
    assert world.rows()["a.md"].state == "indexed"
    assert GOOD in world.texts()
    world.indexer.process_paths(world.root, world.rules, ["a.md"])  # the retry
    assert "More ice" in world.texts()


# --- reindex of a file, and of a symlink out of the root -----------------------------------

def test_a_scan_request_for_a_file_rereads_it(world: World) -> None:
    (world.root / "docs").mkdir()
    (world.root / "docs" / "a.md").write_text(GOOD)
    world.scan()
    (world.root / "docs" / "a.md").write_text("Geostationary satellites orbit far above.")
    world.engine.manifest.forget_hashes(str(world.root), "docs/a.md")
    stats = world.scan("docs/a.md")  # deleted the file: "cannot list folder"
    assert stats.indexed == 1 and stats.deleted == 0, stats
    assert world.rows()["docs/a.md"].state == "indexed"
    assert "Geostationary" in world.texts()


def test_a_scan_through_a_symlinked_folder_reads_nothing_outside(world: World) -> None:
    (world.root / "good.md").write_text(GOOD)
    (world.root / "link").symlink_to(world.outside, target_is_directory=True)
    world.scan("link")  # what `repd reindex ROOT/link` asks for: it indexed link/private.md
    assert SECRET not in world.texts()
    world.indexer.process_paths(world.root, world.rules, ["link/private.md", "link"])
    assert SECRET not in world.texts()
    assert not any(p.startswith("link/") for p in world.rows())
    assert world.rows()["link"].reason == "symlink"


def _swap_on_first_open(monkeypatch: pytest.MonkeyPatch, path: Path,
                        swap: Any) -> list[str]:
    """Run ``swap`` just before the first ``os.open`` of ``path``: after every check the
    planner makes, before the read (the window an attacker races for)."""
    real_open = os.open
    done: list[str] = []

    def racing_open(p: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if not done and Path(os.fsdecode(p)) == path:
            swap()
            done.append("swapped")
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    return done


def test_a_file_swapped_for_a_symlink_after_its_check_is_not_read(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    target = world.root / "notes.md"
    target.write_text(GOOD)

    def swap() -> None:
        target.unlink()
        target.symlink_to(world.outside / "private.md")

    swapped = _swap_on_first_open(monkeypatch, target, swap)
    world.indexer.process_paths(world.root, world.rules, ["notes.md"])
    assert swapped
    assert SECRET not in world.texts()
    assert world.rows()["notes.md"].reason == "symlink"


def test_a_folder_swapped_for_a_symlink_after_the_check_is_not_read(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # O_NOFOLLOW guards only the last component; the descriptor's real path guards the rest.
    (world.root / "docs").mkdir()
    target = world.root / "docs" / "private.md"
    target.write_text(GOOD)

    def swap() -> None:
        (world.root / "docs").rename(world.root.parent / "docs-away")
        (world.root / "docs").symlink_to(world.outside, target_is_directory=True)

    swapped = _swap_on_first_open(monkeypatch, target, swap)
    world.indexer.process_paths(world.root, world.rules, ["docs/private.md"])
    assert swapped
    assert SECRET not in world.texts()
    row = world.rows().get("docs/private.md")
    assert row is None or row.state != "indexed"


def test_followed_links_may_lead_only_into_configured_roots(tmp_path: Path,
                                                            embedder: Any) -> None:
    w = World(tmp_path, embedder, watch={"follow_symlinks": True})
    try:
        other = tmp_path / "other-root"
        other.mkdir()
        (other / "shared.md").write_text("Octopuses change colour in milliseconds.")
        w.indexer.allow_roots([w.root, other])
        (w.root / "to-other").symlink_to(other, target_is_directory=True)
        (w.root / "to-outside").symlink_to(w.outside, target_is_directory=True)
        (w.root / "secret-file.md").symlink_to(w.outside / "private.md")
        w.scan()
        w.indexer.process_paths(w.root, w.rules, ["to-outside/private.md", "secret-file.md"])
        assert SECRET not in w.texts()
        rows = w.rows()
        assert rows["to-other/shared.md"].state == "indexed"
        assert rows["to-outside"].reason == "outside_roots"
        assert rows["secret-file.md"].reason == "outside_roots"
    finally:
        w.engine.close()


# --- housekeeping files and dangling symlinks ---------------------------------------------

def test_rule_files_are_not_indexed(world: World) -> None:
    (world.root / ".gitignore").write_text("Build output folders and compiled objects\nbuild/\n")
    (world.root / ".repdignore").write_text("Scratch notes to keep out of search\nscratch/\n")
    (world.root / "sub").mkdir()
    (world.root / "sub" / ".gitattributes").write_text("*.md text eol=lf diff=markdown\n")
    (world.root / "good.md").write_text(GOOD)
    world.scan()
    assert set(world.rows()) == {"good.md"}


def test_a_dangling_symlink_event_is_handed_out_and_recorded(world: World) -> None:
    (world.root / "broken").symlink_to(world.root / "nowhere.md")
    queue = ChangeQueue(debounce_ms=10, settle_ms=10)
    queue.put_path(world.root, "broken", created=True)
    got: list[Any] = []
    for _ in range(50):
        got += queue.get_ready(10, 0.05)
        if got:
            break
    assert [c.relpath for c in got] == ["broken"]  # dropped as "created then gone" before
    world.indexer.process_paths(world.root, world.rules, [c.relpath for c in got])
    assert world.rows()["broken"].reason == "symlink"
