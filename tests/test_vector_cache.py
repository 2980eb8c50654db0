"""The vector cache's bound: bytes of unreferenced vectors, least recently used dropped first.

Real SQLite manifests throughout; only the clock that stamps last-used times is replaced,
so the order is exact without depending on how fast the machine is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from repd.adapters import manifest as manifest_mod
from repd.adapters.manifest import ChunkRow, Manifest
from repd.core.types import SparseVec
from repd.settings import Settings

DIM = 8
VEC_BYTES = DIM * 4


class Clock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now

    def tick(self) -> int:
        self.now += 1
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(manifest_mod, "_clock", c)
    return c


@pytest.fixture
def m(tmp_path: Path) -> Iterator[Manifest]:
    man = Manifest(tmp_path / "manifest.sqlite")
    yield man
    man.close()


def vec(i: int) -> np.ndarray:
    return np.full(DIM, float(i), dtype=np.float32)


def put(m: Manifest, clock: Clock, model: str, *hashes: str) -> None:
    """Cache one vector per hash, each at its own (later) time."""
    for h in hashes:
        clock.tick()
        with m.transaction() as db:
            Manifest.put_vectors(db, model, [(h, vec(len(h)))])


def cached(m: Manifest, model: str) -> set[str]:
    return {r[0] for r in m._query("SELECT hash FROM vectors WHERE model_id=?", (model,))}


def reference(m: Manifest, *hashes: str) -> None:
    """Chunk rows (generation 1, file 1) that use these hashes."""
    with m.transaction() as db:
        Manifest.replace_chunks(db, 1, 1, [ChunkRow(i, h, f"p{i}", 1, 1)
                                           for i, h in enumerate(hashes)])


def test_prune_keeps_the_most_recently_used_within_the_byte_budget(
        m: Manifest, clock: Clock) -> None:
    put(m, clock, "model", "a", "b", "c", "d", "e")  # a oldest ... e newest
    clock.tick()
    assert set(m.vectors("model", ["a"])) == {"a"}  # a hit makes "a" the most recent
    dropped = m.prune_vectors("model", budget_bytes=3 * VEC_BYTES)
    assert dropped == 2
    assert cached(m, "model") == {"a", "d", "e"}


def test_budget_is_bytes_not_a_count(m: Manifest, clock: Clock) -> None:
    # BM25 vectors differ in size; the budget counts their bytes, shared with the dense
    # cache when both are pruned together.
    big = SparseVec(list(range(100)), [1.0] * 100)  # 4 + 800 bytes
    small = SparseVec([1], [1.0])  # 12 bytes
    clock.tick()
    with m.transaction() as db:
        Manifest.put_sparse_vectors(db, "bm25", [("s_big", big)])
    clock.tick()
    with m.transaction() as db:
        Manifest.put_sparse_vectors(db, "bm25", [("s_small", small)])
    put(m, clock, "dense", "d1")
    # Newest first: d1 (32) and s_small (12) fit in 144 bytes, s_big (804) does not.
    budget = 12 + VEC_BYTES + 100
    assert m.prune_vectors(["dense", "bm25"], budget_bytes=budget) == 1
    assert cached(m, "bm25") == {"s_small"}
    assert cached(m, "dense") == {"d1"}
    assert m.sparse_vectors("bm25", ["s_small"])["s_small"] == small


def test_strict_lru_drops_everything_older_than_the_first_that_does_not_fit(
        m: Manifest, clock: Clock) -> None:
    put(m, clock, "dense", "old")
    clock.tick()
    with m.transaction() as db:
        Manifest.put_sparse_vectors(db, "bm25", [("mid", SparseVec(list(range(50)),
                                                                   [1.0] * 50))])
    put(m, clock, "dense", "new")
    # "mid" (404 bytes) overflows; "old" would fit after it but is older, so it goes too.
    assert m.prune_vectors(["dense", "bm25"], budget_bytes=2 * VEC_BYTES) == 2
    assert cached(m, "dense") == {"new"}


def test_referenced_vectors_are_kept_whatever_the_budget(m: Manifest, clock: Clock) -> None:
    put(m, clock, "model", "used1", "spare", "used2")
    reference(m, "used1", "used2")
    assert m.prune_vectors("model", budget_bytes=0) == 1
    assert cached(m, "model") == {"used1", "used2"}


def test_only_the_named_caches_are_pruned(m: Manifest, clock: Clock) -> None:
    put(m, clock, "mine", "x")
    put(m, clock, "other", "y")
    assert m.prune_vectors("mine", budget_bytes=0) == 1
    assert cached(m, "other") == {"y"}
    assert m.prune_vectors([], budget_bytes=0) == 0


def test_hits_are_written_in_batches_not_per_read(m: Manifest, clock: Clock,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    put(m, clock, "model", "a", "b", "c")
    at = clock.tick()
    m.vectors("model", ["a"])

    def used_at(h: str) -> int:
        return int(m._query("SELECT used_at FROM vectors WHERE hash=?", (h,))[0][0])

    assert used_at("a") < at  # kept in memory: a read costs no write transaction
    monkeypatch.setattr(manifest_mod, "TOUCH_BUFFER", 2)
    m.vectors("model", ["b"])  # the second pending hit reaches the buffer's size
    assert used_at("a") == at and used_at("b") == at


def test_pending_hits_survive_close_and_reopen(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "manifest.sqlite"
    m = Manifest(path)
    put(m, clock, "model", "a", "b")
    clock.tick()
    m.vectors("model", ["a"])  # "a" becomes the most recent, only in memory so far
    m.close()
    m = Manifest(path)
    try:
        assert m.prune_vectors("model", budget_bytes=VEC_BYTES) == 1
        assert cached(m, "model") == {"a"}
    finally:
        m.close()


def test_a_put_of_a_known_vector_keeps_it_and_its_bytes(m: Manifest, clock: Clock) -> None:
    put(m, clock, "model", "a")
    with m.transaction() as db:  # INSERT OR IGNORE: the first vector stays
        Manifest.put_vectors(db, "model", [("a", vec(99))])
    np.testing.assert_array_equal(m.vectors("model", ["a"])["a"], vec(1))


def _old_manifest(path: Path) -> None:
    """A schema-2 manifest as repd wrote it before the cache had a last-used time."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE vectors (
            model_id TEXT NOT NULL,
            hash TEXT NOT NULL,
            vector BLOB NOT NULL,
            PRIMARY KEY (model_id, hash)
        ) WITHOUT ROWID;
        INSERT INTO meta VALUES ('schema_version', '2');
    """)
    db.executemany("INSERT INTO vectors VALUES (?, ?, ?)",
                   [("model", h, vec(i).tobytes()) for i, h in enumerate(["a", "b", "c"])])
    db.commit()
    db.close()


def test_an_old_manifest_opens_and_gets_the_lru_column(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "manifest.sqlite"
    _old_manifest(path)
    m = Manifest(path)
    try:
        assert m.get_meta("schema_version") == str(manifest_mod.SCHEMA_VERSION)
        columns = {r[1] for r in m._query("PRAGMA table_info(vectors)")}
        assert "used_at" in columns
        table = m._query("SELECT sql FROM sqlite_master WHERE name='vectors'")[0][0]
        assert "WITHOUT ROWID" not in table.upper()  # rows of 1.5 KB stay on their page
        indexes = {r[1] for r in m._query("PRAGMA index_list(vectors)")}
        assert "vectors_lru" in indexes
        np.testing.assert_array_equal(m.vectors("model", ["b"])["b"], vec(1))
        # Old entries count as never used: "b", just read, outlives the other two.
        assert m.prune_vectors("model", budget_bytes=VEC_BYTES) == 2
        assert cached(m, "model") == {"b"}
    finally:
        m.close()
    m = Manifest(path)  # opening again migrates nothing twice
    try:
        assert cached(m, "model") == {"b"}
    finally:
        m.close()


def test_a_readonly_manifest_records_no_hits(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "manifest.sqlite"
    m = Manifest(path)
    put(m, clock, "model", "a")
    m.close()
    ro = Manifest.open_readonly(path)
    try:
        assert set(ro.vectors("model", ["a"])) == {"a"}
        assert ro._touched == {}  # nothing to write, and nowhere to write it
    finally:
        ro.close()


def test_the_setting_defaults_to_256_mib_and_refuses_negative() -> None:
    assert Settings().vector_cache_bytes == 256 * 2**20
    with pytest.raises(ValueError):
        Settings(vector_cache_bytes=-1)


def test_cached_vectors_take_little_more_than_their_bytes_on_disk(tmp_path: Path) -> None:
    # Schema 2's WITHOUT ROWID table spilled every 384-float vector into an overflow
    # page of its own: three times its size on disk.
    m = Manifest(tmp_path / "manifest.sqlite")
    try:
        empty = int(m._query("PRAGMA page_count")[0][0])
        rng = np.random.default_rng(3)
        items = [(f"{i:064x}", rng.standard_normal(384).astype(np.float32))
                 for i in range(2000)]
        with m.transaction() as db:
            Manifest.put_vectors(db, "sentence-transformers/all-MiniLM-L6-v2@0123456789abcdef",
                                 items)
        pages = int(m._query("PRAGMA page_count")[0][0]) - empty
        used = pages * int(m._query("PRAGMA page_size")[0][0])
        assert used < 1.6 * 2000 * 384 * 4, used
    finally:
        m.close()


def test_a_prune_with_nothing_written_since_the_last_one_runs_no_query(
        m: Manifest, clock: Clock) -> None:
    put(m, clock, "model", "a", "b")
    assert m.prune_vectors("model", budget_bytes=VEC_BYTES) == 1
    statements: list[str] = []
    m._db.set_trace_callback(statements.append)
    try:
        assert m.prune_vectors("model", budget_bytes=VEC_BYTES) == 0
        assert statements == []  # the idle daemon's once-a-minute prune costs nothing
        m.vectors("model", ["a"])  # a read is not a write: still nothing to do
        assert m.prune_vectors("model", budget_bytes=VEC_BYTES) == 0
        assert not any("DELETE" in s for s in statements)
    finally:
        m._db.set_trace_callback(None)
    # A write, or another budget, and the prune looks again.
    put(m, clock, "model", "c")
    assert m.prune_vectors("model", budget_bytes=VEC_BYTES) == 1
    assert cached(m, "model") == {"c"}
    assert m.prune_vectors("model", budget_bytes=0) == 1
