"""A real ``repd run`` daemon against trees that used to stop it, leak through it, or
lose files in it: a bad .gitignore line, names that are not UTF-8, ``repd reindex FILE``,
a reindex through a symlink out of the root, dangling symlinks, rule files, a root
deleted and recreated, and a tree 1,200 folders deep. (In-process versions of these,
with injected faults, are in test_untrusted_tree.py.)
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from repd.api.client import ApiRequestError
from tests.daemon_harness import DaemonProc, wait_for
from tests.helpers import cli_env, index_json, run_cli

FACTS = {
    "volcano": "Basaltic lava from shield volcanoes flows far because it is low in silica.",
    "bees": "Honeybees communicate the direction of flowers with a waggle dance.",
    "chess": "The Sicilian Defence is the most popular response to the king's pawn opening.",
    "tea": "Oolong tea is partially oxidised, between green and black tea.",
    "orbit": "Geostationary satellites orbit at about 35,786 kilometres above the equator.",
    "octopus": "Octopuses change the colour and texture of their skin in milliseconds.",
    "sourdough": "Sourdough bread rises thanks to wild yeast and lactic acid bacteria.",
    "westphalia": "The Treaty of Westphalia in 1648 ended the Thirty Years' War in Europe.",
}
SECRET = "The launch codes are kept in the blue folder under the grand piano."
LIVE_S = 40  # generous: the test machine is shared and busy


class Trees:
    """Two roots watched by one daemon, and a folder outside both."""

    def __init__(self, base: Path) -> None:
        self.a = base / "root-a"
        self.b = base / "root-b"
        self.outside = base / "outside"
        for folder in (self.a, self.b, self.outside):
            folder.mkdir()
        (self.a / "volcano.md").write_text(FACTS["volcano"])
        (self.a / ".gitignore").write_text("Compiled build output folders and caches\nout/\n")
        (self.b / "westphalia.md").write_text(FACTS["westphalia"])
        (self.outside / "private.md").write_text(SECRET)
        (self.a / "link").symlink_to(self.outside, target_is_directory=True)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> Trees:
    return Trees(tmp_path_factory.mktemp("untrusted"))


@pytest.fixture(scope="module")
def daemon(trees: Trees, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path_factory.mktemp("home"), [trees.a, trees.b]).start()
    yield d
    d.stop()


def hit_paths(d: DaemonProc, text: str, root: Path, k: int = 5) -> list[str]:
    return [h["path"] for h in d.client.query(text, k=k)["hits"] if h["root"] == str(root)]


def searchable(d: DaemonProc, text: str, root: Path, path: str) -> bool:
    return path in hit_paths(d, text, root)


def issues(d: DaemonProc) -> dict[str, str]:
    return {it["path"]: it["reason"] for it in d.client.files(limit=500)["items"]}


_sentinels = itertools.count()


def settle(d: DaemonProc, root: Path) -> None:
    """Wait until everything queued for ``root`` before now has been processed.

    Status may lag a moment behind the queue, so "idle" alone does not prove that a
    request made just before was handled: a sentinel file written now is handled after
    it, and once the sentinel is searchable, so is everything before it.
    """
    n = next(_sentinels)
    name = f"zz-sentinel-{n}.md"
    (root / name).write_text(f"Sentinel number {n}: the zebras of the savanna were counted.")
    wait_for(lambda: name in hit_paths(d, "zebras of the savanna counted", root, k=100),
             LIVE_S, f"sentinel {name}")


def test_a_bad_gitignore_line_stops_neither_this_root_nor_the_others(
        daemon: DaemonProc, trees: Trees) -> None:
    # One line git accepts and pathspec does not killed watchdog's dispatch thread: no
    # root was indexed live any more, while status still said "inotify".
    (trees.a / "gi").mkdir()
    (trees.a / "gi" / ".gitignore").write_text("*.log\n[z-a]\n!\ntrailing\\\n")
    time.sleep(1.0)  # let the rule file's own events go through first
    (trees.a / "gi" / "bees.md").write_text(FACTS["bees"])
    (trees.a / "gi" / "debug.log").write_text(FACTS["sourdough"])
    (trees.b / "chess.md").write_text(FACTS["chess"])
    wait_for(lambda: searchable(daemon, "waggle dance of honeybees", trees.a, "gi/bees.md"),
             LIVE_S, "a new file under the bad .gitignore")
    wait_for(lambda: searchable(daemon, "Sicilian Defence opening", trees.b, "chess.md"),
             LIVE_S, "a new file in the other root")
    settle(daemon, trees.a)
    assert "gi/debug.log" not in hit_paths(daemon, "sourdough wild yeast", trees.a, k=20)
    watch = {r["path"]: r["watch"] for r in daemon.status()["roots"]}
    assert watch == {str(trees.a): "inotify", str(trees.b): "inotify"}
    log = daemon.log.read_text()
    assert "invalid_ignore_line" in log and f"{trees.a}/gi/.gitignore:2" in log


def test_reindex_of_a_file_rereads_it(daemon: DaemonProc, trees: Trees) -> None:
    (trees.a / "re").mkdir()
    doc = trees.a / "re" / "tea.md"
    doc.write_text(FACTS["tea"])
    wait_for(lambda: searchable(daemon, "partially oxidised oolong", trees.a, "re/tea.md"),
             LIVE_S, "the file indexed")
    daemon.wait_idle()
    # It was scanned as a folder: "cannot list folder: Not a directory", and deleted.
    out = run_cli(["reindex", str(doc)], daemon.env)
    assert "queued" in out.stdout
    daemon.client.reindex(str(doc))  # and through the API
    settle(daemon, trees.a)
    assert searchable(daemon, "partially oxidised oolong", trees.a, "re/tea.md")
    assert "re/tea.md" not in issues(daemon)


def test_reindex_through_a_symlink_out_of_the_root_is_refused(
        daemon: DaemonProc, trees: Trees) -> None:
    daemon.wait_idle()
    with pytest.raises(ApiRequestError) as err:
        daemon.client.reindex(str(trees.a / "link"))  # indexed link/private.md before
    assert err.value.status == 403 and "outside" in err.value.message
    with pytest.raises(ApiRequestError):
        daemon.client.reindex(str(trees.a / "link" / "private.md"))
    settle(daemon, trees.a)
    hits = daemon.client.query("launch codes under the grand piano", k=20)["hits"]
    assert not [h for h in hits if "launch codes" in h["snippet"]]
    assert issues(daemon).get("link") == "symlink"


def test_a_name_that_is_not_utf8_does_not_cost_its_neighbours(
        daemon: DaemonProc, trees: Trees) -> None:
    # The good files of the same write group were dropped with the bad name.
    folder = trees.a / "names"
    folder.mkdir()
    (folder / "orbit.md").write_text(FACTS["orbit"])
    (folder / os.fsdecode(b"f15\xff.md")).write_text(FACTS["octopus"])
    wait_for(lambda: searchable(daemon, "geostationary satellites", trees.a, "names/orbit.md"),
             LIVE_S, "the good neighbour")
    wait_for(lambda: searchable(daemon, "octopus skin colour", trees.a, "names/f15\\xff.md"),
             LIVE_S, "the file with the bad name, under its escaped name")


def test_a_dangling_symlink_made_live_is_recorded(daemon: DaemonProc, trees: Trees) -> None:
    (trees.a / "dangling").symlink_to(trees.a / "nowhere.md")
    wait_for(lambda: issues(daemon).get("dangling") == "symlink", LIVE_S,
             "the dangling symlink in `repd files`")


def test_rule_files_are_never_hits(daemon: DaemonProc, trees: Trees) -> None:
    (trees.a / ".repdignore").write_text("Scratch folders full of drafts about cats\nscratch/\n")
    (trees.a / "cats.md").write_text(FACTS["sourdough"])  # an event after the rule file's
    wait_for(lambda: searchable(daemon, "sourdough starter yeast", trees.a, "cats.md"), LIVE_S,
             "a file written after the rule file")
    settle(daemon, trees.a)
    paths = hit_paths(daemon, "compiled build output folders caches drafts cats", trees.a, 50)
    assert ".gitignore" not in paths and ".repdignore" not in paths


def test_a_root_deleted_and_recreated_is_watched_again(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    root.mkdir()
    (root / "volcano.md").write_text(FACTS["volcano"])
    d = DaemonProc(tmp_path / "home", [root]).start()
    try:
        shutil.rmtree(root)
        time.sleep(2.0)  # the deletion is seen; the root is in an error state
        root.mkdir()
        (root / "tea.md").write_text(FACTS["tea"])
        # Not watched again until the hourly rescan before: never within the test.
        wait_for(lambda: searchable(d, "partially oxidised oolong", root, "tea.md"), LIVE_S,
                 "a file in the recreated root")
        (root / "bees.md").write_text(FACTS["bees"])  # and live changes flow again
        wait_for(lambda: searchable(d, "waggle dance of honeybees", root, "bees.md"), LIVE_S,
                 "a live change in the recreated root")
        wait_for(lambda: not searchable(d, "lava low in silica", root, "volcano.md"), LIVE_S,
                 "the deleted file gone")
        assert d.status()["roots"][0]["watch"] == "inotify"
    finally:
        d.stop()


def make_deep_tree(root: Path, depth: int) -> str:
    """``root/d/d/.../d/bottom.md`` ``depth`` folders down; returns the relative path.

    Made with descriptors relative to the parent, as a person's tool would, so no call
    needs the whole path at once.
    """
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("bottom.md", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, FACTS["orbit"].encode())
        os.close(out)
    finally:
        os.close(fd)
    return "/".join(["d"] * depth) + "/bottom.md"


@pytest.mark.deep_tree
def test_a_tree_1200_folders_deep_is_indexed_by_index_and_by_the_daemon(
        tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    bottom = make_deep_tree(deep, 1200)
    (deep / "top.md").write_text(FACTS["bees"])
    # `repd index`: RecursionError in the ignore rules before.
    out: dict[str, Any] = index_json(deep, cli_env(tmp_path / "cli-home"))
    assert out["indexed"] == 2, out
    # The daemon: RecursionError in the watcher's os.walk at start-up, for every root.
    other = tmp_path / "other"
    other.mkdir()
    (other / "tea.md").write_text(FACTS["tea"])
    d = DaemonProc(tmp_path / "home", [deep, other]).start()
    try:
        assert searchable(d, "geostationary satellites", deep, bottom)
        assert searchable(d, "waggle dance of honeybees", deep, "top.md")
        watch = {r["path"]: r["watch"] for r in d.status()["roots"]}
        assert watch == {str(deep): "inotify", str(other): "inotify"}
        (other / "chess.md").write_text(FACTS["chess"])  # live changes still flow
        wait_for(lambda: searchable(d, "Sicilian Defence opening", other, "chess.md"), LIVE_S,
                 "a live change next to the deep root")
        # ... and in the deep root itself: every level is watched.
        fd = os.open(deep / bottom.rpartition("/")[0], os.O_RDONLY | os.O_DIRECTORY)
        try:
            out_fd = os.open("late.md", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(out_fd, FACTS["westphalia"].encode())
            os.close(out_fd)
        finally:
            os.close(fd)
        late = bottom.rpartition("/")[0] + "/late.md"
        wait_for(lambda: searchable(d, "Treaty of Westphalia", deep, late), LIVE_S,
                 "a live change at the bottom of the deep tree")
    finally:
        d.stop()


def test_repd_index_survives_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "good.md").write_text(FACTS["tea"])
    (root / os.fsdecode(b"f15\xff.md")).write_text(FACTS["volcano"])
    env = cli_env(tmp_path / "home")
    out = index_json(root, env)  # crashed with 0 files indexed before
    assert out["indexed"] == 2 and out["failed"] == 0, out
    again = index_json(root, env)
    assert again["indexed"] == 0 and again["deleted"] == 0, again
    hits = json.loads(run_cli(["query", "basaltic lava silica", "--json", "-k", "1"],
                              env).stdout)["hits"]
    assert hits[0]["path"] == "f15\\xff.md"
