"""Incremental indexing with the real model, the real Qdrant Edge store and real SQLite.

After every step the store must equal a fresh index of the same files, and the step
must embed only what is new.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from repd.engine import Engine
from repd.pipeline.indexer import RunStats
from tests.helpers import assert_same_index, fresh_snapshot, make_settings, snapshot

PARAS = [
    "Solar panels convert sunlight into electricity using photovoltaic cells made of silicon.",
    "The migration of monarch butterflies spans thousands of kilometres across North America.",
    "Sourdough bread rises thanks to wild yeast and lactic acid bacteria in the starter.",
    "Rust's borrow checker enforces memory safety without a garbage collector.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War in Europe.",
    "Octopuses can change the colour and texture of their skin in milliseconds.",
]


class World:
    """A root folder, an engine over it, and a comparison with a fresh index."""

    def __init__(self, tmp: Path, embedder: Any) -> None:
        self.root = tmp / "notes"
        self.root.mkdir()
        self.tmp = tmp
        self.embedder = embedder
        self.engine = Engine(make_settings(tmp / "data"), writer=True, embedder=embedder)
        self.indexer = self.engine.indexer()
        self._fresh = 0

    def index(self) -> RunStats:
        return self.indexer.reconcile(self.root, self.engine.rules(self.root))

    def check_fresh(self) -> None:
        self._fresh += 1
        fresh = fresh_snapshot(self.root, self.tmp / f"fresh{self._fresh}", self.embedder)
        assert_same_index(snapshot(self.engine), fresh)

    def paths(self) -> set[str]:
        return {p["path"] for _, p in snapshot(self.engine).values()}


@pytest.fixture
def world(tmp_path: Path, embedder: Any) -> Iterator[World]:
    w = World(tmp_path, embedder)
    yield w
    w.engine.close()


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def doc(*idx: int) -> str:
    return "# Notes\n\n" + "\n\n".join(PARAS[i] for i in idx) + "\n"


def test_add_modify_delete(world: World) -> None:
    write(world.root / "a.md", doc(0, 1, 2))
    write(world.root / "b.txt", PARAS[3])
    s = world.index()
    assert (s.indexed, s.chunks_reused) == (2, 0)
    assert s.chunks_embedded >= 2
    world.check_fresh()

    write(world.root / "a.md", doc(0, 1, 2) + "\nA brand new closing paragraph about tides.\n")
    s = world.index()
    assert s.indexed == 1 and s.unchanged == 1
    assert 1 <= s.chunks_embedded <= 2
    world.check_fresh()

    (world.root / "b.txt").unlink()
    s = world.index()
    assert s.deleted == 1 and s.chunks_embedded == 0
    assert world.paths() == {"a.md"}
    world.check_fresh()


def test_rename_copy_revert_cost_no_embeddings(world: World) -> None:
    write(world.root / "a.md", doc(0, 1))
    world.index()
    (world.root / "a.md").rename(world.root / "renamed.md")
    s = world.index()
    assert (s.chunks_embedded, s.deleted, s.indexed) == (0, 1, 1)
    assert world.paths() == {"renamed.md"}
    world.check_fresh()

    (world.root / "sub").mkdir()
    shutil.copy(world.root / "renamed.md", world.root / "sub" / "copy.md")
    s = world.index()
    assert s.chunks_embedded == 0 and s.indexed == 1
    world.check_fresh()

    original = (world.root / "renamed.md").read_text()
    write(world.root / "renamed.md", original.replace("silicon", "perovskite"))
    s = world.index()
    assert s.chunks_embedded >= 1
    write(world.root / "renamed.md", original)
    s = world.index()
    assert s.chunks_embedded == 0 and s.indexed == 1  # undo: the old vectors come back
    world.check_fresh()


def test_touch_without_change(world: World) -> None:
    write(world.root / "a.md", doc(2, 3))
    world.index()
    st = (world.root / "a.md").stat()
    os.utime(world.root / "a.md", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    s = world.index()
    assert (s.indexed, s.chunks_embedded, s.unchanged) == (0, 0, 1)
    s = world.index()  # the new stat was recorded: a pure stat pass now
    assert (s.indexed, s.unchanged) == (0, 1)
    world.check_fresh()


def test_same_tick_change_is_caught(world: World) -> None:
    # Same size, same mtime, different bytes: only the racy check can catch it.
    path = world.root / "r.txt"
    write(path, "alpha beta gamma")
    st = path.stat()
    world.index()
    write(path, "gamma beta alpha")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    s = world.index()
    assert s.indexed == 1 and s.chunks_embedded == 1
    world.check_fresh()


def test_file_replaced_by_directory_and_back(world: World) -> None:
    write(world.root / "x", PARAS[4])
    world.index()
    (world.root / "x").unlink()
    write(world.root / "x" / "inner.md", doc(5))
    s = world.index()
    assert s.deleted == 1 and s.indexed == 1
    assert world.paths() == {"x/inner.md"}
    world.check_fresh()
    shutil.rmtree(world.root / "x")
    write(world.root / "x", PARAS[4])
    s = world.index()
    assert s.deleted == 1 and s.indexed == 1 and s.chunks_embedded == 0
    assert world.paths() == {"x"}
    world.check_fresh()


def test_process_paths_follows_events(world: World) -> None:
    write(world.root / "a.md", doc(0))
    write(world.root / "d" / "b.md", doc(1))
    world.index()
    rules = world.engine.rules(world.root)
    (world.root / "a.md").unlink()
    write(world.root / "c.md", doc(2))
    s = world.indexer.process_paths(world.root, rules, ["a.md", "c.md"])
    assert s.deleted == 1 and s.indexed == 1
    shutil.rmtree(world.root / "d")
    s = world.indexer.process_paths(world.root, rules, ["d"])
    assert s.deleted == 1
    assert world.paths() == {"c.md"}
    world.check_fresh()
