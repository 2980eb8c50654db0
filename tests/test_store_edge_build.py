"""HNSW builds stay bounded: ``maybe_build_index(backlog=N)`` and the indexer's backstop.

Qdrant Edge's ``optimize()`` seals the whole unindexed backlog into one segment in one
GIL-holding call, so a writer that builds only when idle (the daemon) must also build
once ``backlog`` points were written, or a long first index ends in one huge build.
Real Edge shards, a real manifest and real files; the model is a fake (vectors are
hashes of the text), as in tests/test_generations.py.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repd.adapters.manifest import Manifest
from repd.adapters.store_edge import (
    DEFAULT_BUILD_BACKLOG,
    DEFAULT_INDEX_THRESHOLD,
    TEMP_SEGMENTS,
    EdgeStore,
)
from repd.core.ignore import IgnoreRules
from repd.core.types import PointRecord
from repd.pipeline.generations import GenerationHandle, Generations, GenView
from repd.pipeline.indexer import Indexer
from tests.test_generations import FakeEmbedder, unit

DIM = 8
THRESHOLD = 64


def points(n: int, start: int = 0) -> list[PointRecord]:
    return [PointRecord(f"00000000-0000-0000-0000-{i:012d}", unit(str(i), DIM).tolist(),
                        {"root": "r", "path": f"f{i}.txt"}) for i in range(start, start + n)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EdgeStore]:
    s = EdgeStore.open(tmp_path / "shard", DIM, index_threshold=THRESHOLD)
    yield s
    with contextlib.suppress(Exception):
        s.close()


def test_the_backstop_is_the_threshold() -> None:
    # A bulk write then builds as `repd index` does: each build over about the threshold.
    assert DEFAULT_BUILD_BACKLOG == DEFAULT_INDEX_THRESHOLD


def test_backlog_defers_the_build_until_that_many_points_were_written(
        store: EdgeStore) -> None:
    store.upsert(points(100))  # past the threshold, short of the backlog
    assert store.written_since_build == 100
    assert store.maybe_build_index(backlog=150) is False
    assert store.info()["hnsw_built"] is False
    store.upsert(points(60, start=100))
    assert store.maybe_build_index(backlog=150) is True
    assert store.info()["hnsw_built"] is True
    assert store.written_since_build == 0
    assert store.count() == 160


def test_without_backlog_the_threshold_alone_decides(store: EdgeStore) -> None:
    store.upsert(points(THRESHOLD + 10))
    assert store.maybe_build_index() is True
    assert store.written_since_build == 0
    assert store.maybe_build_index() is False  # nothing due: a no-op


def test_an_overwrite_counts_but_nothing_due_caps_the_count(store: EdgeStore) -> None:
    store.upsert(points(THRESHOLD + 10))
    assert store.maybe_build_index() is True
    store.upsert(points(THRESHOLD + 10))  # the same ids again: overwrites
    store.upsert(points(10, start=500))  # and a few new points
    assert store.written_since_build == THRESHOLD + 20
    built = store.maybe_build_index(backlog=THRESHOLD)
    # Whether the engine rebuilds after overwrites is its call; either way the count
    # never claims more than the threshold's worth of points left unindexed.
    assert store.written_since_build == (0 if built else THRESHOLD - 1)
    assert store.count() == THRESHOLD + 20


def test_a_reopened_store_counts_from_zero_and_the_idle_build_still_finds_the_backlog(
        tmp_path: Path) -> None:
    path = tmp_path / "shard"
    s = EdgeStore.open(path, DIM, index_threshold=THRESHOLD)
    s.upsert(points(100))
    s.close()
    s = EdgeStore.open(path, DIM, index_threshold=THRESHOLD)
    try:
        assert s.written_since_build == 0
        assert s.maybe_build_index(backlog=50) is False  # not written by this process
        assert s.maybe_build_index() is True  # the engine knows the backlog
        assert s.info()["hnsw_built"] is True
    finally:
        s.close()


def _indexer(tmp_path: Path, files: int) -> tuple[Indexer, EdgeStore, Manifest, Path]:
    root = tmp_path / "notes"
    root.mkdir()
    for i in range(files):
        # Three one-line paragraphs: three chunks with a 4-token limit.
        (root / f"n{i:03d}.txt").write_text(
            f"alpha note {i}\n\nbeta note {i}\n\ngamma note {i}\n", encoding="utf-8")
    manifest = Manifest(tmp_path / "data" / "manifest.sqlite")
    emb = FakeEmbedder("a", DIM, 4)
    row = manifest.create_generation(emb.model_name, emb.model_id, DIM, "shards/gen-{id}",
                                     "active")
    store = EdgeStore.open(tmp_path / "data" / row.location, DIM, index_threshold=THRESHOLD)
    handle = GenerationHandle(row, store, lambda: emb)
    registry = Generations(GenView(active=handle))
    indexer = Indexer(manifest, registry, 1_000_000)
    indexer.group_files = 10  # many small groups, as the daemon writes
    indexer.build_index_inline = False  # the daemon's setting: build when idle
    return indexer, store, manifest, root


@pytest.mark.parametrize("backlog", [None, 2 * THRESHOLD])
def test_a_daemon_style_indexer_builds_along_the_way_only_with_a_backlog(
        tmp_path: Path, backlog: int | None) -> None:
    indexer, store, manifest, root = _indexer(tmp_path, files=100)  # 300 chunks
    guarded: list[int] = []

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        guarded.append(store.written_since_build)
        yield

    indexer.build_backlog = backlog
    indexer.build_guard = guard
    try:
        stats = indexer.reconcile(root, IgnoreRules(root, private_dirs=()))
        assert stats.indexed == 100 and store.count() == 300
        if backlog is None:
            # Idle-only: nothing built yet, the whole write is one backlog.
            assert guarded == []
            assert store.info()["hnsw_built"] is False
            assert store.written_since_build == 300
        else:
            # Built each time the backlog was reached, under the guard, so no build
            # covered much more than the backlog (one group's points more at most).
            assert len(guarded) >= 2
            assert all(backlog <= n < backlog + 30 for n in guarded), guarded
            assert store.info()["hnsw_built"] is True
            assert store.written_since_build < backlog
    finally:
        store.close()
        manifest.close()


def test_a_backfill_builds_along_the_way_with_a_backlog(tmp_path: Path) -> None:
    # A migration's backfill of a large index is one long write into the new generation.
    indexer, store, manifest, root = _indexer(tmp_path, files=100)
    new_store: EdgeStore | None = None
    try:
        indexer.reconcile(root, IgnoreRules(root, private_dirs=()))
        emb = FakeEmbedder("b", DIM, 4)
        row = manifest.create_generation(emb.model_name, emb.model_id, DIM,
                                         "shards/gen-{id}", "building")
        new_store = EdgeStore.open(tmp_path / "data" / row.location, DIM,
                                   index_threshold=THRESHOLD)
        building = GenerationHandle(row, new_store, lambda: emb)
        indexer.generations.publish(building=building)
        guarded: list[int] = []

        @contextlib.contextmanager
        def guard() -> Iterator[None]:
            assert new_store is not None
            guarded.append(new_store.written_since_build)
            yield

        indexer.build_backlog = 2 * THRESHOLD
        indexer.build_guard = guard
        while rows := manifest.files_to_backfill(row.id, 0, 20):
            indexer.backfill(building, rows, [], str(rows[-1].id), lambda: False)
        assert new_store.count() == 300
        # Steps of 20 files (60 points): built once the backlog was reached, before the
        # end, never over much more than the backlog.
        assert guarded and all(2 * THRESHOLD <= n < 2 * THRESHOLD + 60 for n in guarded)
        assert new_store.info()["hnsw_built"] is True
    finally:
        if new_store is not None:
            new_store.close()
        store.close()
        manifest.close()


def small_segments(path: Path, n: int) -> set[str]:
    """A shard of ``n`` points in many small sealed segments (a build every threshold's
    worth, merging disabled); returns the ids."""
    store = EdgeStore.open(path, DIM, index_threshold=THRESHOLD)
    for i in range(0, n, THRESHOLD):
        store.upsert(points(THRESHOLD, start=i))
        store.maybe_build_index()
    ids = set(store.iter_ids())
    store.close()
    return ids


def test_a_build_killed_midway_loses_nothing_and_its_leftovers_are_removed(
        tmp_path: Path) -> None:
    shard = tmp_path / "shard"
    ids = small_segments(shard, 60 * THRESHOLD)
    # Another process merges the small segments (a larger max_segment_points makes
    # them due) and is killed as soon as the half-built segment shows on disk.
    merge = textwrap.dedent(f"""
        from pathlib import Path
        from repd.adapters.store_edge import EdgeStore
        store = EdgeStore.open(Path({str(shard)!r}), {DIM}, index_threshold={THRESHOLD},
                               max_segment_points=1_000_000)
        print("open", flush=True)
        store.maybe_build_index()
        print("built", flush=True)
    """)
    temp = shard / TEMP_SEGMENTS
    proc = subprocess.Popen([sys.executable, "-c", merge], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "open\n"
        deadline = time.monotonic() + 120
        while not (temp.is_dir() and any(temp.iterdir())):
            assert proc.poll() is None, "the merge ended before it could be caught mid-way"
            assert time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert any(temp.iterdir())  # the killed build's half-made segment

    store = EdgeStore.open(shard, DIM, index_threshold=THRESHOLD, max_segment_points=1_000_000)
    try:
        assert list(temp.iterdir()) == []
        assert set(store.iter_ids()) == ids
        assert store.maybe_build_index() is True  # the merge runs again, whole
        assert set(store.iter_ids()) == ids
        assert len(store.search(points(1)[0].vector, 5)) == 5
    finally:
        store.close()
