"""Generations: the registry, the write protocol over several stores, the schema-v2 manifest.

Real SQLite manifests and real Qdrant Edge shards (small vectors); the Indexer-level
tests use a fake embedder (words as tokens, hashed unit vectors) so that two
"models" can cut the same files differently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from repd.adapters.manifest import (
    SCHEMA_VERSION,
    ChunkRow,
    FileRow,
    Manifest,
    recorded_generations,
)
from repd.adapters.store import Store, StoreError
from repd.adapters.store_edge import EdgeStore
from repd.core.chunking import CHUNKER_VERSION
from repd.core.identity import StatSig, content_hash, point_id
from repd.core.ignore import IgnoreRules
from repd.core.types import Chunk
from repd.pipeline import writer
from repd.pipeline.generations import GenerationHandle, Generations, GenView, current_vectors
from repd.pipeline.indexer import Indexer, Yielded
from repd.pipeline.plan import ZERO_SIG, FilePlan
from repd.pipeline.stats import RunStats

ROOT = "/r"
SIG = StatSig(100, 1_000, 7, 1_000)


# -- fakes and helpers ------------------------------------------------------------------


def unit(text: str, dim: int) -> np.ndarray:
    """A deterministic unit vector for ``text``."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return cast(np.ndarray, v / np.linalg.norm(v))


class FakeEmbedder:
    """Words are tokens; vectors are hashes of (model, text)."""

    def __init__(self, name: str, dim: int, max_tokens: int,
                 chunking_key: str | None = None) -> None:
        self.model_name = name
        self.model_id = f"{name}@00000000"
        self.dim = dim
        self.max_tokens = max_tokens
        self.chunking_key = chunking_key or f"words:{max_tokens}"
        self.embedded: list[str] = []

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded.extend(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([unit(self.model_id + "\x00" + t, self.dim) for t in texts])


class Gens:
    """Opens generations (manifest row + real Edge shard) and closes their stores."""

    def __init__(self, data: Path, manifest: Manifest) -> None:
        self.data = data
        self.manifest = manifest
        self.stores: list[EdgeStore] = []

    def open(self, emb: FakeEmbedder, state: str) -> GenerationHandle:
        row = self.manifest.create_generation(emb.model_name, emb.model_id, emb.dim,
                                              "shards/gen-{id}", state)
        store = EdgeStore.open(self.data / row.location, emb.dim)
        self.stores.append(store)
        return GenerationHandle(row, store, lambda: emb)

    def close(self) -> None:
        for s in self.stores:
            with contextlib.suppress(StoreError):
                s.close()


@pytest.fixture
def manifest(tmp_path: Path) -> Iterator[Manifest]:
    m = Manifest(tmp_path / "data" / "manifest.sqlite")
    yield m
    m.close()


@pytest.fixture
def gens(tmp_path: Path, manifest: Manifest) -> Iterator[Gens]:
    g = Gens(tmp_path / "data", manifest)
    yield g
    g.close()


def plan(rel: str, texts: Sequence[str], sig: StatSig = SIG) -> FilePlan:
    """An ``index`` plan of ``texts`` as chunks (one line each)."""
    chunks = [Chunk(i, t, i + 1, i + 1, hashlib.sha256(t.encode("utf-8")).hexdigest())
              for i, t in enumerate(texts)]
    return FilePlan(ROOT, rel, sig, time.time_ns(), "index",
                    content_hash=content_hash("\n".join(texts).encode("utf-8")),
                    chunks=chunks,
                    point_ids=[point_id(ROOT, rel, c.ordinal, c.hash) for c in chunks])


def delete(rel: str) -> FilePlan:
    return FilePlan(ROOT, rel, ZERO_SIG, time.time_ns(), "delete")


def gen_write(handle: GenerationHandle, plans: Sequence[FilePlan]) -> writer.GenWrite:
    vectors = {c.hash: unit(handle.model_id + c.text, handle.store.dim)
               for p in plans for c in p.chunks}
    return writer.GenWrite(handle, plans, vectors)


def rows_of(m: Manifest, plans: Sequence[FilePlan]) -> dict[tuple[str, str], FileRow | None]:
    return {(p.root, p.relpath): m.file(p.root, p.relpath) for p in plans}


def write(m: Manifest, parts: Sequence[tuple[GenerationHandle, Sequence[FilePlan]]], *,
          primary: bool = True, cursor: tuple[int, str] | None = None) -> RunStats:
    rows = rows_of(m, [p for _, plans in parts for p in plans])
    return writer.write_group(m, [gen_write(h, plans) for h, plans in parts],
                              primary=primary, rows=rows, cursor=cursor)


def gen_files(m: Manifest, gen_id: int) -> dict[int, tuple[str | None, str]]:
    """The gen_files rows of a generation, read on a connection of our own."""
    db = sqlite3.connect(str(m.path))
    try:
        return {int(f): (h, s) for f, h, s in db.execute(
            "SELECT file_id, content_hash, state FROM gen_files WHERE gen_id=?", (gen_id,))}
    finally:
        db.close()


def store_ids(handle: GenerationHandle) -> set[str]:
    return set(handle.store.iter_ids())


def assert_store_matches(m: Manifest, handle: GenerationHandle) -> None:
    present = store_ids(handle)
    wanted = m.point_ids(handle.id)
    assert present == wanted, (f"generation {handle.id}: only in store "
                               f"{sorted(present - wanted)[:3]}, only in manifest "
                               f"{sorted(wanted - present)[:3]}")


def file_id(m: Manifest, rel: str, root: str = ROOT) -> int:
    row = m.file(root, rel)
    assert row is not None, rel
    return row.id


# -- 1. schema v1 -> v2 -------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE generations (
    id INTEGER PRIMARY KEY, model_name TEXT NOT NULL, model_id TEXT NOT NULL,
    dim INTEGER NOT NULL, location TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('building', 'active', 'retired')),
    created_at REAL NOT NULL, activated_at REAL, cursor TEXT);
CREATE TABLE files (
    id INTEGER PRIMARY KEY, root TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    content_hash TEXT,
    state TEXT NOT NULL CHECK (state IN ('indexed', 'skipped', 'failed', 'dirty')),
    reason TEXT, detail TEXT, indexed_at_ns INTEGER NOT NULL, UNIQUE (root, path));
CREATE TABLE chunks (
    gen_id INTEGER NOT NULL, file_id INTEGER NOT NULL, ordinal INTEGER NOT NULL,
    hash TEXT NOT NULL, point_id TEXT NOT NULL, start_line INTEGER NOT NULL,
    end_line INTEGER NOT NULL, PRIMARY KEY (gen_id, file_id, ordinal)) WITHOUT ROWID;
CREATE INDEX chunks_by_file ON chunks (file_id);
CREATE TABLE vectors (
    model_id TEXT NOT NULL, hash TEXT NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (model_id, hash)) WITHOUT ROWID;
CREATE TABLE intents (
    id INTEGER PRIMARY KEY, gen_id INTEGER NOT NULL, root TEXT NOT NULL, path TEXT NOT NULL,
    point_ids TEXT NOT NULL, created_at REAL NOT NULL);
"""


def test_schema_v1_manifest_gets_gen_files_of_the_active_generation(tmp_path: Path) -> None:
    path = tmp_path / "manifest.sqlite"
    db = sqlite3.connect(str(path))
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO generations (id, model_name, model_id, dim, location, state,"
               " created_at, activated_at) VALUES (1, 'mini', 'mini@1', 8, 'shards/gen-1',"
               " 'active', 1.0, 1.0)")
    files = [("a.txt", "ha", "indexed", None), ("b.bin", "hb", "skipped", "binary"),
             ("c.txt", "hc", "indexed", None), ("d.txt", None, "skipped", "symlink")]
    for rel, h, state, reason in files:
        db.execute("INSERT INTO files (root, path, size, mtime_ns, inode, ctime_ns,"
                   " content_hash, state, reason, detail, indexed_at_ns)"
                   " VALUES (?, ?, 1, 1, 1, 1, ?, ?, ?, NULL, 1)", (ROOT, rel, h, state, reason))
    ids = {r: int(i) for r, i in db.execute("SELECT path, id FROM files")}
    db.execute("INSERT INTO chunks VALUES (1, ?, 0, 'c0', 'p0', 1, 2)", (ids["a.txt"],))
    db.commit()
    db.close()

    m = Manifest(path)
    try:
        assert m.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert gen_files(m, 1) == {ids[rel]: (h, state) for rel, h, state, _ in files}
        assert m.chunks(1, ids["a.txt"]) == [ChunkRow(0, "c0", "p0", 1, 2)]
        # The active generation holds exactly what the files table says: nothing to do.
        assert m.files_to_backfill(1, 0, 100) == []
        counts = m.sync_counts(1)
        assert counts["missing"] == 0 and counts["indexed"] == 2
        with m.transaction() as tx:
            Manifest.drop_gen_file(tx, 1, ids["c.txt"])
    finally:
        m.close()
    # Migrated once: opening the migrated manifest again does not copy the files table again.
    m = Manifest(path)
    try:
        assert ids["c.txt"] not in gen_files(m, 1)
        assert m.get_meta("schema_version") == str(SCHEMA_VERSION)
    finally:
        m.close()


# -- 2. generation ids and locations -----------------------------------------------------


def test_generation_ids_are_never_reused_and_locations_get_the_id(tmp_path: Path) -> None:
    path = tmp_path / "data" / "manifest.sqlite"
    m = Manifest(path)
    try:
        g1 = m.create_generation("a", "a@1", 8, "shards/gen-{id}", "active")
        assert (g1.id, g1.location) == (1, "shards/gen-1")
        assert g1.activated_at is not None
        asked: list[int] = []

        def where(gen_id: int) -> str:
            asked.append(gen_id)
            return f"repd-b-gen-{gen_id}"
        g2 = m.create_generation("b", "b@1", 6, where, "building")
        assert asked == [2] and g2.location == "repd-b-gen-2" and g2.activated_at is None
        assert (path.parent / "generations" / "2.json").exists()
        m.delete_generation(g2.id)
        assert m.generation(g2.id) is None
        assert not (path.parent / "generations" / "2.json").exists()
        g3 = m.create_generation("b", "b@1", 6, "shards/gen-{id}", "building")
        assert (g3.id, g3.location) == (3, "shards/gen-3")
        m.delete_generation(g3.id)
    finally:
        m.close()
    m = Manifest(path)  # the high-water mark survives a restart
    try:
        g4 = m.create_generation("c", "c@1", 6, "shards/gen-{id}", "building")
        assert g4.id == 4
        assert [g.id for g in m.generations()] == [1, 4]
    finally:
        m.close()


def test_switch_generations_swaps_states_and_clears_the_cursor(manifest: Manifest) -> None:
    old = manifest.create_generation("a", "a@1", 8, "shards/gen-{id}", "active")
    new = manifest.create_generation("b", "b@1", 6, "shards/gen-{id}", "building")
    with manifest.transaction() as db:
        Manifest.set_cursor(db, new.id, "42")
    building = manifest.generation(new.id)
    assert building is not None and building.cursor == "42"
    manifest.switch_generations(new.id, old.id)
    rows = {g.id: g for g in manifest.generations()}
    assert rows[new.id].state == "active" and rows[new.id].cursor is None
    assert rows[new.id].activated_at is not None
    assert rows[old.id].state == "retired"
    active = manifest.active_generation()
    assert active is not None and active.id == new.id
    recorded = {g.id: g.state for g in recorded_generations(manifest.path.parent)}
    assert recorded == {old.id: "retired", new.id: "active"}


# -- 3. write_group into two generations -------------------------------------------------


def test_write_group_writes_both_generations_and_deletes_from_both(
        manifest: Manifest, gens: Gens) -> None:
    a = gens.open(FakeEmbedder("a", 8, 40), "active")
    b = gens.open(FakeEmbedder("b", 6, 40), "building")
    pa = plan("a.txt", ["alpha one", "alpha two"])
    pb = plan("b.txt", ["beta one", "beta two", "beta three"])
    # The building generation cuts a.txt differently (its own model's chunks).
    pa_b = plan("a.txt", ["alpha one alpha two"])
    pa_b.content_hash = pa.content_hash
    stats = write(manifest, [(a, [pa, pb]), (b, [pa_b, pb])])
    assert stats.indexed == 2 and stats.points_written == 5 + 4
    for h, n in ((a, 5), (b, 4)):
        assert_store_matches(manifest, h)
        assert len(manifest.point_ids(h.id)) == n
    ids = {rel: file_id(manifest, rel) for rel in ("a.txt", "b.txt")}
    for h in (a, b):
        assert gen_files(manifest, h.id) == {ids["a.txt"]: (pa.content_hash, "indexed"),
                                             ids["b.txt"]: (pb.content_hash, "indexed")}
    assert manifest.intents() == []

    # An edit: old points that are no longer wanted go from both stores.
    pa2 = plan("a.txt", ["alpha one", "alpha changed"])
    pa2_b = plan("a.txt", ["alpha one alpha changed"])
    pa2_b.content_hash = pa2.content_hash
    write(manifest, [(a, [pa2]), (b, [pa2_b])])
    for h in (a, b):
        assert_store_matches(manifest, h)
        assert gen_files(manifest, h.id)[ids["a.txt"]] == (pa2.content_hash, "indexed")
    assert set(pa.point_ids[1:]).isdisjoint(store_ids(a))
    assert set(pa_b.point_ids).isdisjoint(store_ids(b))

    stats = write(manifest, [(a, [delete("b.txt")]), (b, [delete("b.txt")])])
    assert stats.deleted == 1
    assert manifest.file(ROOT, "b.txt") is None
    for h in (a, b):
        assert manifest.chunks(h.id, ids["b.txt"]) == []
        assert ids["b.txt"] not in gen_files(manifest, h.id)
        assert_store_matches(manifest, h)
        assert set(pb.point_ids).isdisjoint(store_ids(h))
    assert manifest.intents() == []


def test_write_group_yields_to_readers_only_before_a_flush_that_holds_the_gil(
        manifest: Manifest, gens: Gens) -> None:
    a = gens.open(FakeEmbedder("a", 8, 40), "active")
    assert a.store.flush_holds_gil  # an in-process Edge shard
    calls: list[str] = []
    pa = plan("a.txt", ["alpha one"])
    writer.write_group(manifest, [gen_write(a, [pa])], primary=True,
                       rows=rows_of(manifest, [pa]), before_flush=lambda: calls.append("y"))
    assert calls == ["y"]
    # A store process (replicas) or a server flushes without our GIL: no pause.
    a.store.flush_holds_gil = False
    pb = plan("b.txt", ["beta one"])
    writer.write_group(manifest, [gen_write(a, [pb])], primary=True,
                       rows=rows_of(manifest, [pb]), before_flush=lambda: calls.append("y"))
    assert calls == ["y"]
    assert_store_matches(manifest, a)


def test_write_group_backfill_leaves_file_rows_alone_and_saves_the_cursor(
        manifest: Manifest, gens: Gens) -> None:
    a = gens.open(FakeEmbedder("a", 8, 40), "active")
    pa = plan("a.txt", ["alpha one", "alpha two"])
    pb = plan("b.txt", ["beta one"])
    write(manifest, [(a, [pa, pb])])
    files_before = manifest.files_under(ROOT)
    active_before = manifest.point_ids(a.id)

    b = gens.open(FakeEmbedder("b", 6, 40), "building")
    # A backfill's plans carry another stat and time: the files' rows must not take them.
    other = StatSig(999, 5, 5, 5)
    fill = [plan("a.txt", ["alpha one", "alpha two"], sig=other),
            plan("b.txt", ["beta one"], sig=other)]
    stats = write(manifest, [(b, fill)], primary=False, cursor=(b.id, "17"))
    assert stats.indexed == 2
    assert manifest.files_under(ROOT) == files_before
    row = manifest.generation(b.id)
    assert row is not None and row.cursor == "17"
    assert_store_matches(manifest, b)
    assert len(manifest.point_ids(b.id)) == 3
    assert manifest.point_ids(a.id) == active_before
    assert_store_matches(manifest, a)
    ids = {rel: file_id(manifest, rel) for rel in ("a.txt", "b.txt")}
    assert gen_files(manifest, b.id) == {ids["a.txt"]: (pa.content_hash, "indexed"),
                                         ids["b.txt"]: (pb.content_hash, "indexed")}
    assert manifest.sync_counts(b.id)["missing"] == 0


# -- 4. a crash between upsert and commit ------------------------------------------------


class FlushFailsOnce:
    """Delegates to a real store; the first ``flush`` raises (EIO, as a dying disk would)."""

    def __init__(self, inner: EdgeStore) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.failures_left = 1

    def flush(self) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise StoreError("flush: Input/output error")
        self.inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_crash_between_upsert_and_commit_is_recovered_in_every_generation(
        manifest: Manifest, gens: Gens) -> None:
    a = gens.open(FakeEmbedder("a", 8, 40), "active")
    real_b = gens.open(FakeEmbedder("b", 6, 40), "building")
    pa = plan("a.txt", ["alpha one", "alpha two"])
    pb = plan("b.txt", ["beta one", "beta two"])
    write(manifest, [(a, [pa, pb]), (real_b, [pa, pb])])
    ids = {rel: file_id(manifest, rel) for rel in ("a.txt", "b.txt")}
    b_chunks = {h.id: manifest.chunks(h.id, ids["b.txt"]) for h in (a, real_b)}
    assert all(b_chunks.values())

    flaky = FlushFailsOnce(cast(EdgeStore, real_b.store))
    b = GenerationHandle(real_b.row, cast(Store, flaky), lambda: FakeEmbedder("b", 6, 40))
    pa2 = plan("a.txt", ["alpha one", "alpha edited", "alpha three"])
    with pytest.raises(StoreError):
        write(manifest, [(a, [pa2]), (b, [pa2])])
    assert {i.gen_id for i in manifest.intents()} == {a.id, b.id}
    # The new points reached both stores before the failure; nothing was committed.
    assert set(pa2.point_ids) <= store_ids(a)
    assert set(pa2.point_ids) <= store_ids(b)

    assert writer.recover(manifest, a, primary=True) == 1
    assert writer.recover(manifest, b, primary=False) == 1
    assert manifest.intents() == []
    for h in (a, b):
        assert_store_matches(manifest, h)
        assert set(pa.point_ids + pa2.point_ids).isdisjoint(store_ids(h))
        assert manifest.chunks(h.id, ids["a.txt"]) == []
        assert manifest.chunks(h.id, ids["b.txt"]) == b_chunks[h.id]  # other files untouched
        assert gen_files(manifest, h.id)[ids["b.txt"]] == (pb.content_hash, "indexed")
    row = manifest.file(ROOT, "a.txt")
    assert row is not None and row.state == "dirty" and row.content_hash is None
    assert gen_files(manifest, b.id)[ids["a.txt"]] == (None, "dirty")
    other = manifest.file(ROOT, "b.txt")
    assert other is not None and other.state == "indexed"

    # The next write of the file brings both generations back.
    write(manifest, [(a, [pa2]), (b, [pa2])])
    for h in (a, b):
        assert_store_matches(manifest, h)
        assert gen_files(manifest, h.id)[ids["a.txt"]] == (pa2.content_hash, "indexed")


# -- 5. what a generation lacks -----------------------------------------------------------


def test_files_to_backfill_files_to_clear_and_sync_counts(manifest: Manifest) -> None:
    manifest.create_generation("a", "a@1", 8, "shards/gen-{id}", "active")
    gen = manifest.create_generation("b", "b@1", 6, "shards/gen-{id}", "building").id
    with manifest.transaction() as db:
        def add(rel: str, h: str | None, state: str = "indexed") -> int:
            return Manifest.upsert_file(db, ROOT, rel, SIG, h, state,
                                        None if state == "indexed" else "binary", None, 1)

        def hold(fid: int, h: str | None, state: str, chunks: int = 0) -> None:
            Manifest.set_gen_file(db, gen, fid, h, state)
            Manifest.replace_chunks(db, gen, fid, [
                ChunkRow(i, f"c{fid}.{i}", f"p{fid}.{i}", 1, 1) for i in range(chunks)])

        lacking = add("lacking.txt", "h1")
        same = add("same.txt", "h2")
        hold(same, "h2", "indexed", 2)
        older = add("older.txt", "h3-new")
        hold(older, "h3-old", "indexed", 1)
        skipped = add("skipped.txt", "h4")
        hold(skipped, "h4", "skipped")
        failed = add("failed.txt", "h5")
        hold(failed, "h5", "failed")
        dirty = add("dirty.txt", "h6")
        hold(dirty, None, "dirty")
        deleted = add("deleted.txt", "h7")
        hold(deleted, "h7", "indexed", 2)
        not_indexed = add("now-binary.bin", "h8", "skipped")
        hold(not_indexed, "h8-old", "indexed", 1)
        last = add("zlast.txt", "h9")
        # Not the highest id, so no later row can take it (see the rename test below).
        Manifest.delete_file(db, deleted)

    listed = [r.id for r in manifest.files_to_backfill(gen, 0, 100)]
    assert listed == sorted([lacking, older, dirty, last])
    assert [r.id for r in manifest.files_to_backfill(gen, lacking, 100)] == sorted(
        [older, dirty, last])
    assert [r.id for r in manifest.files_to_backfill(gen, 0, 1)] == [lacking]
    assert manifest.files_to_clear(gen, 100) == sorted([deleted, not_indexed])
    assert manifest.files_to_clear(gen, 1) == [min(deleted, not_indexed)]
    counts = manifest.sync_counts(gen)
    assert counts["indexed"] == 7
    assert counts["missing"] == 4  # lacking, older, dirty, zlast
    assert counts["failed"] == 2  # skipped and failed with the same content
    assert counts["extra"] == 2
    assert counts["dirty"] == 0
    assert manifest.chunk_counts(gen, [same, older, lacking]) == {same: 2, older: 1}
    sample = manifest.sample_points(gen, 3)
    assert len(sample) == 3 and set(sample) <= manifest.point_ids(gen)
    # The int8 calibration's sample: one point per distinct chunk, by hash, repeatable.
    spread = manifest.spread_points(gen, 100)
    assert spread == manifest.spread_points(gen, 100)
    assert set(spread) <= manifest.point_ids(gen)
    distinct = {r[0] for r in manifest._query("SELECT hash FROM chunks WHERE gen_id=?", (gen,))}
    assert len(spread) == len(distinct)
    assert manifest.spread_points(gen, 2) == spread[:2]

    manifest.mark_for_reindex([same])
    row = manifest.file(ROOT, "same.txt")
    assert row is not None and row.state == "dirty" and row.sig.size == -1
    assert manifest.chunk_counts(gen, [same]) == {same: 2}  # chunk rows stay for the diff


def test_a_retired_generation_still_sees_a_renamed_file_as_changed(
        manifest: Manifest, gens: Gens) -> None:
    """A file deleted while a generation is retired must show up for that generation
    (files_to_clear, or its successor in files_to_backfill), so a rollback's catch-up
    removes its points. A rename of the newest file with the same content is the case
    where the new row could take the deleted row's id."""
    a = gens.open(FakeEmbedder("a", 8, 40), "active")
    old = gens.open(FakeEmbedder("b", 6, 40), "retired")
    texts = ["gamma one", "gamma two"]
    write(manifest, [(a, [plan("a.txt", ["alpha"]), plan("b.txt", texts)]),
                     (old, [plan("a.txt", ["alpha"]), plan("b.txt", texts)])])
    b_id = file_id(manifest, "b.txt")
    # `mv b.txt c.txt` while generation `old` is retired: the live path writes the active
    # generation only, the deletion first (as a scan does), then the new name.
    write(manifest, [(a, [delete("b.txt")])])
    write(manifest, [(a, [plan("c.txt", texts)])])
    c_id = file_id(manifest, "c.txt")
    assert_store_matches(manifest, a)
    # The retired store still holds b.txt's points (payload path b.txt).
    held = old.store.retrieve(sorted(manifest.point_ids(old.id)), with_vectors=False)
    assert {r.payload["path"] for r in held} == {"a.txt", "b.txt"}
    to_clear = manifest.files_to_clear(old.id, 100)
    to_fill = [r.id for r in manifest.files_to_backfill(old.id, 0, 100)]
    assert to_clear or c_id in to_fill, (
        f"generation {old.id} holds the points of deleted b.txt (file id {b_id}) but neither "
        f"files_to_clear ({to_clear}) nor files_to_backfill ({to_fill}) names them: c.txt "
        f"got file id {c_id}, the deleted row's id, so its chunk rows now look like c.txt's "
        "current content")


# -- 6. the registry -----------------------------------------------------------------------


def test_for_query_and_publish(manifest: Manifest, gens: Gens) -> None:
    reg = Generations()
    with pytest.raises(LookupError, match="nothing is indexed"):
        reg.for_query()
    a = gens.open(FakeEmbedder("a", 8, 40), "active")
    b = gens.open(FakeEmbedder("b", 6, 40), "building")
    c = gens.open(FakeEmbedder("c", 6, 40), "retired")
    reg.publish(active=a, building=b, retired=(c,))
    assert reg.for_query() is a and reg.for_query(None) is a
    assert reg.for_query(b.id) is b
    assert reg.for_query(c.id) is c
    assert reg.for_query(a.id) is a
    with pytest.raises(LookupError) as info:
        reg.for_query(99)
    msg = str(info.value)
    assert "99" in msg and all(str(h.id) in msg for h in (a, b, c)), msg
    assert reg.view.writing() == [a, b]
    assert reg.view.all() == [a, b, c]

    before = reg.view
    after = reg.publish(active=b, building=None, retired=(a, c))
    assert reg.view is after and after is not before
    assert (before.active, before.building, before.retired) == (a, b, (c,))
    assert (after.active, after.building, after.retired) == (b, None, (a, c))
    assert reg.for_query() is b and reg.for_query(a.id) is a
    with pytest.raises(FrozenInstanceError):
        before.active = b  # type: ignore[misc]
    with pytest.raises(LookupError, match="none"):
        Generations(GenView()).for_query(1)


def test_a_reader_never_sees_half_a_switch(manifest: Manifest, gens: Gens) -> None:
    a = gens.open(FakeEmbedder("a", 8, 40), "active")
    b = gens.open(FakeEmbedder("b", 6, 40), "building")
    reg = Generations(GenView(active=a, building=b))
    allowed = {(a, b), (b, None)}
    seen: list[tuple[GenerationHandle | None, GenerationHandle | None]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            view = reg.view
            pair = (view.active, view.building)
            if pair not in allowed:
                seen.append(pair)

    t = threading.Thread(target=read)
    t.start()
    try:
        for i in range(5000):
            if i % 2:
                reg.publish(active=a, building=b)
            else:
                reg.publish(active=b, building=None)
    finally:
        stop.set()
        t.join()
    assert seen == []


# -- 7. the indexer with two generations -------------------------------------------------

PARAS = ["Solar panels convert sunlight into electricity using photovoltaic cells made of "
         "silicon wafers and thin films.",
         "The migration of monarch butterflies spans thousands of kilometres across North "
         "America every single autumn.",
         "Sourdough bread rises thanks to wild yeast and lactic acid bacteria living in the "
         "starter jar on the counter.",
         "The borrow checker enforces memory safety without a garbage collector at compile "
         "time in every crate."]


def note(i: int, extra: str = "") -> str:
    paras = [f"Note {i}. {PARAS[(i + k) % len(PARAS)]}" for k in range(3)]
    return "\n\n".join(paras) + (f"\n\n{extra}\n" if extra else "\n")


class Rig:
    """A folder of notes, a manifest, real stores and an indexer over a registry."""

    def __init__(self, tmp: Path, manifest: Manifest, gens: Gens) -> None:
        self.root = tmp / "notes"
        self.root.mkdir()
        for i in range(4):
            (self.root / f"n{i}.txt").write_text(note(i), encoding="utf-8")
        self.manifest = manifest
        self.gens = gens
        self.emb_a = FakeEmbedder("a", 8, 24)
        self.a = gens.open(self.emb_a, "active")
        self.registry = Generations(GenView(active=self.a))
        self.indexer = Indexer(manifest, self.registry, 1_000_000)
        self.rules = IgnoreRules(self.root, private_dirs=())

    def building(self, emb: FakeEmbedder) -> GenerationHandle:
        handle = self.gens.open(emb, "building")
        self.registry.publish(building=handle)
        return handle

    def scan(self) -> None:
        stats = self.indexer.reconcile(self.root, self.rules)
        assert stats.failed == 0, stats

    def ids(self) -> dict[str, int]:
        return {rel: row.id for rel, row in self.manifest.files_under(str(self.root)).items()}

    def check_in_step(self, handle: GenerationHandle) -> None:
        """The generation holds the current content of every indexed file, and no more."""
        files = self.manifest.files_under(str(self.root))
        held = gen_files(self.manifest, handle.id)
        assert held == {r.id: (r.content_hash, "indexed") for r in files.values()}
        assert self.manifest.sync_counts(handle.id)["missing"] == 0
        assert self.manifest.files_to_clear(handle.id, 100) == []
        assert_store_matches(self.manifest, handle)
        assert handle.store.count() > 0


@pytest.fixture
def rig(tmp_path: Path, manifest: Manifest, gens: Gens) -> Rig:
    return Rig(tmp_path, manifest, gens)


def catch_up(rig: Rig, handle: GenerationHandle) -> None:
    """What the backfill's passes do: write what the generation lacks, clear the rest."""
    rows = rig.manifest.files_to_backfill(handle.id, 0, 100)
    clear = rig.manifest.files_to_clear(handle.id, 100)
    rig.indexer.backfill(handle, rows, clear, None, lambda: False)


def test_live_indexing_writes_the_active_generation_and_the_backfill_catches_up(
        rig: Rig) -> None:
    b = rig.building(FakeEmbedder("b", 6, 9))  # cuts the same text into more chunks
    rig.scan()
    rig.check_in_step(rig.a)
    # Live changes reach the active generation only (an edit is searchable after one
    # model embedded it); the building one finds what it lacks by content hash.
    assert b.store.count() == 0
    assert rig.manifest.sync_counts(b.id)["missing"] == 4
    catch_up(rig, b)
    rig.check_in_step(b)
    assert len(rig.manifest.point_ids(b.id)) > len(rig.manifest.point_ids(rig.a.id))
    assert rig.manifest.intents() == []

    (rig.root / "n1.txt").write_text(note(1, "An edited closing line about glaciers."),
                                     encoding="utf-8")
    (rig.root / "n2.txt").unlink()
    gone = rig.ids()["n2.txt"]
    rig.scan()
    assert "n2.txt" not in rig.ids()
    rig.check_in_step(rig.a)
    assert [r.path for r in rig.manifest.files_to_backfill(b.id, 0, 100)] == ["n1.txt"]
    assert rig.manifest.files_to_clear(b.id, 100) == [gone]
    catch_up(rig, b)
    for h in (rig.a, b):
        rig.check_in_step(h)
        assert rig.manifest.chunks(h.id, gone) == []
    paths = {r.payload["path"] for r in b.store.retrieve(sorted(store_ids(b)),
                                                         with_vectors=False)}
    assert paths == {"n0.txt", "n1.txt", "n3.txt"}


@pytest.mark.parametrize("same_chunking", [True, False], ids=["same-chunks", "other-chunks"])
def test_backfill_fills_a_building_generation(rig: Rig, same_chunking: bool) -> None:
    rig.scan()
    emb_b = FakeEmbedder("b", 6, 24 if same_chunking else 9)
    b = rig.building(emb_b)
    assert rig.manifest.sync_counts(b.id)["missing"] == 4
    files = rig.manifest.files_to_backfill(b.id, 0, 100)
    changed: list[tuple[str, str]] = []
    stats = rig.indexer.backfill(b, files, [], str(files[-1].id), lambda: False, changed)
    assert changed == []
    assert stats.indexed == 4
    rig.check_in_step(b)
    row = rig.manifest.generation(b.id)
    assert row is not None and row.cursor == str(files[-1].id)
    if same_chunking:
        assert rig.manifest.point_ids(b.id) == rig.manifest.point_ids(rig.a.id)
    else:
        assert rig.manifest.point_ids(b.id).isdisjoint(rig.manifest.point_ids(rig.a.id))
    assert_store_matches(rig.manifest, rig.a)

    # A file deleted while the building generation was not written: the backfill clears it.
    rig.registry.publish(building=None)
    gone = rig.ids()["n3.txt"]
    (rig.root / "n3.txt").unlink()
    rig.scan()
    rig.registry.publish(building=b)
    assert rig.manifest.files_to_clear(b.id, 100) == [gone]
    rig.indexer.backfill(b, [], [gone], None, lambda: False)
    rig.check_in_step(b)
    assert rig.manifest.chunks(b.id, gone) == []


def test_backfill_yields_before_writing_anything(rig: Rig) -> None:
    rig.scan()
    emb_b = FakeEmbedder("b", 6, 24)
    b = rig.building(emb_b)
    files = rig.manifest.files_to_backfill(b.id, 0, 100)
    assert len(files) == 4
    with pytest.raises(Yielded):
        rig.indexer.backfill(b, files, [], "9", lambda: True)
    assert b.store.count() == 0
    assert rig.manifest.chunk_count(b.id) == 0
    assert gen_files(rig.manifest, b.id) == {}
    assert rig.manifest.intents() == []
    row = rig.manifest.generation(b.id)
    assert row is not None and row.cursor is None
    assert emb_b.embedded == []
    assert rig.indexer.stage == "idle"


def test_backfill_leaves_a_file_edited_since_to_the_live_path(rig: Rig) -> None:
    rig.scan()
    (rig.root / "n1.txt").write_text(note(1, "Edited after the scan recorded it."),
                                     encoding="utf-8")
    b = rig.building(FakeEmbedder("b", 6, 9))  # reads and cuts the files again
    files = rig.manifest.files_to_backfill(b.id, 0, 100)
    changed: list[tuple[str, str]] = []
    stats = rig.indexer.backfill(b, files, [], "c", lambda: False, changed)
    assert changed == [(str(rig.root), "n1.txt")]
    assert stats.indexed == 3
    edited = rig.ids()["n1.txt"]
    assert edited not in gen_files(rig.manifest, b.id)
    assert rig.manifest.chunks(b.id, edited) == []
    assert_store_matches(rig.manifest, b)
    paths = {r.payload["path"] for r in b.store.retrieve(sorted(store_ids(b)),
                                                         with_vectors=False)}
    assert paths == {"n0.txt", "n2.txt", "n3.txt"}
    assert [r.id for r in rig.manifest.files_to_backfill(b.id, 0, 100)] == [edited]


def test_registry_close_closes_every_store(manifest: Manifest, gens: Gens) -> None:
    a = gens.open(FakeEmbedder("a", 8, 40), "active")
    b = gens.open(FakeEmbedder("b", 6, 40), "building")
    reg = Generations(GenView(active=a, building=b))
    reg.close()
    assert reg.view.all() == []
    for h in (a, b):
        with pytest.raises(StoreError):
            h.store.count()


def test_handle_loads_its_model_once_and_keys_chunking(manifest: Manifest, gens: Gens) -> None:
    calls: list[int] = []
    emb = FakeEmbedder("a", 8, 40, chunking_key="tok-x:40")
    store = EdgeStore.open(gens.data / "shards" / "solo", 8)
    gens.stores.append(store)
    row = manifest.create_generation("a", emb.model_id, 8, "shards/solo", "active")

    def load() -> FakeEmbedder:
        calls.append(1)
        return emb
    h = GenerationHandle(row, store, load)
    assert h.loaded_embedder is None and calls == []
    # A row that records no chunker version was cut by chunker 1.
    assert h.chunking_key() == "tok-x:40|chunker1"
    assert h.embedder is emb and h.embedder is emb and calls == [1]
    today = GenerationHandle(replace(row, vectors=current_vectors()), store, load)
    assert today.chunking_key() == f"tok-x:40|chunker{CHUNKER_VERSION}" != h.chunking_key()
    vec = h.embed_query("hello")
    assert len(vec) == 8 and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    h.release_model()
    assert h.loaded_embedder is None
    assert json.loads((manifest.path.parent / "generations" / f"{row.id}.json").read_text()
                      )["model_id"] == emb.model_id
