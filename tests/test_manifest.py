"""The SQLite manifest: rows, chunks, the vector cache and intents."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from repd.adapters.manifest import ChunkRow, Manifest
from repd.core.identity import StatSig, is_racy, point_id


@pytest.fixture
def m(tmp_path: Path) -> Manifest:
    return Manifest(tmp_path / "m.sqlite")


def test_wal_mode_and_generation(m: Manifest) -> None:
    mode = sqlite3.connect(str(m.path)).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert m.active_generation() is None
    g = m.create_generation("mini", "id-1", 384, "shards/gen-{id}", "active")
    assert m.active_generation() == g and g.dim == 384


def test_files_chunks_and_prefix_queries(m: Manifest) -> None:
    sig = StatSig(10, 1, 2, 3)
    with m.transaction() as db:
        fid = Manifest.upsert_file(db, "/r", "a/b.md", sig, "h", "indexed", None, None, 5)
        Manifest.upsert_file(db, "/r", "a_b.md", sig, "h", "indexed", None, None, 5)
        Manifest.upsert_file(db, "/r", "a%/c.md", sig, None, "skipped", "binary", "x", 5)
        Manifest.replace_chunks(db, 1, fid, [ChunkRow(0, "c0", "p0", 1, 3),
                                             ChunkRow(1, "c1", "p1", 4, 9)])
    assert set(m.files_under("/r", "a")) == {"a/b.md"}  # LIKE wildcards are escaped
    assert set(m.files_under("/r", "a%")) == {"a%/c.md"}
    assert [c.point_id for c in m.chunks(1, fid)] == ["p0", "p1"]
    assert m.point_ids(1) == {"p0", "p1"} and m.chunk_count(1) == 2
    assert m.files_with_points(1, ["p1", "nope"]) == {fid}
    rows, total = m.file_issues(None, 10, 0)
    assert total == 1 and rows[0].reason == "binary"
    assert m.counts_by_root() == {"/r": {"indexed": 2, "skipped": 1}}
    assert m.forget_hashes("/r", "a") == 1
    row = m.file("/r", "a/b.md")
    assert row is not None and row.content_hash is None and row.sig.size == -1
    assert len(m.chunks(1, fid)) == 2  # points stay until the rewrite


def test_vector_cache_round_trip_and_prune(m: Manifest) -> None:
    v = np.arange(4, dtype=np.float32)
    with m.transaction() as db:
        Manifest.put_vectors(db, "model", [("h1", v), ("h2", v + 1)])
    got = m.vectors("model", ["h1", "h2", "h3"])
    assert set(got) == {"h1", "h2"}
    np.testing.assert_array_equal(got["h2"], v + 1)
    assert m.vectors("other-model", ["h1"]) == {}
    assert m.prune_vectors("model", budget_bytes=v.nbytes) == 1


def test_intents_and_rollback(m: Manifest) -> None:
    with m.transaction() as db:
        Manifest.add_intent(db, 1, "/r", "x", ["b", "a", "a"])
    (it,) = m.intents()
    assert it.point_ids == ["a", "b"]
    with pytest.raises(RuntimeError), m.transaction() as db:
        Manifest.clear_intents(db, [it.id])
        raise RuntimeError("crash inside the transaction")
    assert len(m.intents()) == 1


def test_point_ids_are_deterministic_and_distinct() -> None:
    a = point_id("/r", "x.md", 0, "h")
    assert a == point_id("/r", "x.md", 0, "h")
    assert len({a, point_id("/r", "x.md", 1, "h"), point_id("/r", "y.md", 0, "h"),
                point_id("/s", "x.md", 0, "h"), point_id("/r", "x.md", 0, "g")}) == 5


def test_racy_window() -> None:
    sig = StatSig(1, 10_000_000_000, 1, 10_000_000_000)
    assert is_racy(sig, indexed_at_ns=11_000_000_000)
    assert not is_racy(sig, indexed_at_ns=13_000_000_000)
