"""One contract for every store backend: Qdrant Edge and Qdrant server (local mode)."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from repd.adapters.store import Store, StoreError
from repd.adapters.store_edge import DROPPING_SUFFIX, EdgeStore
from repd.adapters.store_replicas import ReplicatedStore
from repd.adapters.store_server import ServerStore, alias_target, resolve_alias, set_alias
from repd.core.types import Hit, PointRecord

DIM = 8
SCORE_TOL = 1e-5


def pid(n: int) -> str:
    """A deterministic UUID string for point number ``n``."""
    return str(uuid.UUID(int=n + 1))


def unit(values: Sequence[float]) -> list[float]:
    """``values`` scaled to length 1."""
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def axis(i: int, sign: float = 1.0) -> list[float]:
    """The unit vector along axis ``i``."""
    v = [0.0] * DIM
    v[i] = sign
    return v


def rec(n: int, vector: Sequence[float], root: str = "r1", path: str = "a.txt",
        **extra: Any) -> PointRecord:
    """A point with repd's payload keys."""
    payload = {"root": root, "path": path, "ordinal": n, "chunk_hash": f"h{n}", **extra}
    return PointRecord(id=pid(n), vector=list(vector), payload=payload)


def random_points(n: int, seed: int, dim: int = DIM) -> list[PointRecord]:
    """``n`` random unit vectors over 2 roots and a few folders (prefix-sharing names)."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    folders = ("src/", "src/sub/", "src2/", "docs/")
    return [rec(i, vecs[i].tolist(), root=f"r{i % 2 + 1}", path=f"{folders[i % 4]}f{i}.py")
            for i in range(n)]


@dataclass
class Backend:
    """How to open (and reopen) one backend's store at a fixed location."""

    name: str
    open: Callable[..., Store]
    #: Whether the location holds data: the shard folder, or the server collection.
    exists: Callable[[], bool]


@pytest.fixture(params=["edge", "replicas", "server"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn (``replicas``: two Edge shards in store processes); every
    store it opened is closed afterwards."""
    opened: list[Store] = []
    client = QdrantClient(":memory:") if request.param == "server" else None

    def open_store(dim: int = DIM, **kwargs: Any) -> Store:
        store: Store
        if request.param == "edge":
            store = EdgeStore.open(tmp_path / "shard", dim, **kwargs)
        elif request.param == "replicas":
            store = ReplicatedStore.open(tmp_path / "shard", dim, **kwargs)
        else:
            store = ServerStore(client, "gen-1", dim, **kwargs)
        opened.append(store)
        return store

    def exists() -> bool:
        if client is None:
            return (tmp_path / "shard").exists()
        return client.collection_exists("gen-1")

    yield Backend(request.param, open_store, exists)
    for store in opened:
        store.close()
    if client is not None:
        client.close()


def ids_of(hits: Sequence[Hit]) -> list[str]:
    """The ids of hits, in order."""
    return [h.id for h in hits]


def expected_ids(points: Sequence[PointRecord], query: Sequence[float], limit: int,
                 keep: Callable[[PointRecord], bool] = lambda p: True) -> list[str]:
    """Brute-force cosine ranking of the points ``keep`` accepts."""
    q = np.asarray(unit(query))
    scored = [(float(np.dot(q, unit(p.vector))), p.id) for p in points if keep(p)]
    scored.sort(key=lambda s: -s[0])
    return [i for _, i in scored[:limit]]


# -- writes ------------------------------------------------------------------------------


def test_upsert_overwrites_by_id(backend: Backend) -> None:
    store = backend.open()
    store.upsert([rec(1, axis(0)), rec(2, axis(1)), rec(3, axis(2))])
    store.upsert([rec(2, axis(3), path="moved.txt")])

    assert store.count() == 3
    assert sorted(store.iter_ids()) == sorted([pid(1), pid(2), pid(3)])
    [again] = store.retrieve([pid(2)])
    assert again.payload["path"] == "moved.txt"
    assert again.vector == pytest.approx(axis(3), abs=1e-6)


def test_delete_ignores_unknown_ids(backend: Backend) -> None:
    store = backend.open()
    store.upsert([rec(1, axis(0)), rec(2, axis(1)), rec(3, axis(2))])

    store.delete([pid(1), pid(99), str(uuid.uuid4())])
    store.delete([pid(1)])
    store.delete([])

    assert store.count() == 2
    assert store.retrieve([pid(1)]) == []
    assert sorted(store.iter_ids()) == sorted([pid(2), pid(3)])


def test_count_follows_writes(backend: Backend) -> None:
    store = backend.open()
    assert store.count() == 0
    store.upsert([])
    store.upsert(random_points(25, seed=1))
    assert store.count() == 25
    store.delete([pid(n) for n in range(10)])
    assert store.count() == 15


def test_wrong_vector_size_is_a_store_error(backend: Backend) -> None:
    store = backend.open()
    with pytest.raises(StoreError, match="floats"):
        store.upsert([PointRecord(pid(1), [1.0] * (DIM + 1), {})])
    with pytest.raises(StoreError, match="floats"):
        store.search([1.0] * (DIM - 1), 3)
    assert store.count() == 0


# -- reads -------------------------------------------------------------------------------


def test_retrieve_round_trips_vectors_and_payload(backend: Backend) -> None:
    store = backend.open()
    points = random_points(10, seed=2)
    payload = {"root": "r1", "path": "docs/ünï cödé.md", "ordinal": 3, "start_line": 1,
               "end_line": 40, "chunk_hash": "ab" * 32, "file_hash": "cd" * 32,
               "mtime_ns": 1_734_567_890_123_456_789, "text": "héllo\nwörld ✓"}
    points[4] = PointRecord(points[4].id, points[4].vector, payload)
    store.upsert(points)

    asked = [points[7].id, pid(1000), points[4].id, points[0].id, points[7].id]
    got = store.retrieve(asked)

    assert [r.id for r in got] == [points[7].id, points[4].id, points[0].id]
    for r in got:
        original = next(p for p in points if p.id == r.id)
        assert len(r.vector) == DIM
        assert max(abs(a - b) for a, b in zip(r.vector, original.vector, strict=True)) < 1e-6
        assert r.payload == original.payload
    bare = store.retrieve([points[4].id], with_vectors=False)
    assert bare == [PointRecord(points[4].id, [], payload)]
    assert store.retrieve([]) == []


def test_search_orders_by_cosine_best_first(backend: Backend) -> None:
    store = backend.open()
    diagonal = unit([1.0, 1.0] + [0.0] * (DIM - 2))
    store.upsert([rec(1, axis(1)), rec(2, axis(0, -1.0)), rec(3, axis(0)), rec(4, diagonal)])

    hits = store.search([2.0] + [0.0] * (DIM - 1), 3)  # not normalised: cosine ignores length

    assert ids_of(hits) == [pid(3), pid(4), pid(1)]
    assert [h.score for h in hits] == pytest.approx([1.0, math.sqrt(0.5), 0.0], abs=SCORE_TOL)
    assert hits[0].payload == {"root": "r1", "path": "a.txt", "ordinal": 3, "chunk_hash": "h3"}
    everything = store.search(axis(0), 10)
    assert ids_of(everything) == [pid(3), pid(4), pid(1), pid(2)]
    assert everything[-1].score == pytest.approx(-1.0, abs=SCORE_TOL)
    assert store.search(axis(0), 0) == []


def test_search_filters_by_root_and_path_prefix(backend: Backend) -> None:
    store = backend.open()
    points = random_points(60, seed=3)
    store.upsert(points)
    query = points[0].vector

    cases: list[tuple[dict[str, Any], Callable[[PointRecord], bool]]] = [
        ({"root": "r2"}, lambda p: p.payload["root"] == "r2"),
        ({"path_prefix": "src/"}, lambda p: p.payload["path"].startswith("src/")),
        # A plain string prefix: "src" also matches "src2/...".
        ({"path_prefix": "src"}, lambda p: p.payload["path"].startswith("src")),
        ({"root": "r1", "path_prefix": "src/sub/"},
         lambda p: p.payload["root"] == "r1" and p.payload["path"].startswith("src/sub/")),
        ({"root": "nowhere"}, lambda p: False),
        ({"path_prefix": "nowhere/"}, lambda p: False),
    ]
    for kwargs, keep in cases:
        hits = store.search(query, 8, **kwargs)
        assert ids_of(hits) == expected_ids(points, query, 8, keep), kwargs
        assert all(keep(PointRecord(h.id, [], h.payload)) for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(store.search(query, 8, path_prefix="")) == 8


def test_iter_ids_is_complete_over_many_pages(backend: Backend) -> None:
    store = backend.open(page_size=7)
    points = random_points(30, seed=4)
    store.upsert(points)

    listed = list(store.iter_ids())

    assert len(listed) == 30
    assert sorted(listed) == sorted(p.id for p in points)


def test_info_reports_the_common_keys(backend: Backend) -> None:
    store = backend.open()
    store.upsert(random_points(12, seed=5))
    info = store.info()
    assert info["points"] == 12
    # Replicas are Edge shards: the engine is the same.
    assert info["backend"] == {"replicas": "edge"}.get(backend.name, backend.name)
    for key in ("indexed_vectors", "segments", "hnsw_built"):
        assert key in info, key


def test_maybe_build_index_does_nothing_on_a_small_store(backend: Backend) -> None:
    store = backend.open()
    store.upsert(random_points(20, seed=6))
    assert store.maybe_build_index() is False
    assert store.info()["hnsw_built"] is False


# -- lifecycle ---------------------------------------------------------------------------


def test_flush_close_and_reopen_keep_the_points(backend: Backend) -> None:
    store = backend.open()
    points = random_points(40, seed=7)
    store.upsert(points)
    store.delete([p.id for p in points[:5]])
    store.flush()
    store.close()
    store.close()  # closing twice is harmless
    with pytest.raises(StoreError, match="closed"):
        store.count()
    with pytest.raises(StoreError, match="closed"):
        store.upsert(points[:1])
    with pytest.raises(StoreError, match="closed"):
        list(store.iter_ids())

    again = backend.open()

    assert again.count() == 35
    assert sorted(again.iter_ids()) == sorted(p.id for p in points[5:])
    got = {r.id: r for r in again.retrieve([p.id for p in points])}
    for p in points[5:]:
        assert got[p.id].vector == pytest.approx(p.vector, abs=1e-6)
    assert ids_of(again.search(points[9].vector, 1)) == [points[9].id]


def test_reopening_with_another_vector_size_is_a_store_error(backend: Backend) -> None:
    store = backend.open()
    store.upsert(random_points(3, seed=8))
    store.close()

    with pytest.raises(StoreError, match=rf"size {DIM}, but {DIM + 4}"):
        backend.open(dim=DIM + 4)
    assert backend.open().count() == 3  # the failed attempt left the index as it was


def test_drop_deletes_the_data_for_good(backend: Backend) -> None:
    store = backend.open()
    points = random_points(30, seed=14)
    store.upsert(points)
    store.flush()
    assert backend.exists()

    store.drop()

    assert not backend.exists()
    with pytest.raises(StoreError, match="dropped"):
        store.count()
    with pytest.raises(StoreError, match="dropped"):
        store.upsert(points[:1])
    with pytest.raises(StoreError, match="dropped"):
        store.search(points[0].vector, 3)
    store.drop()  # dropping twice is harmless
    store.close()  # and so is closing a dropped store

    again = backend.open()  # the same location starts empty

    assert again.count() == 0
    assert list(again.iter_ids()) == []
    assert again.retrieve([p.id for p in points]) == []
    assert again.search(points[0].vector, 5) == []
    again.upsert(points[:3])
    store.drop()  # the old store's second drop leaves the new data alone
    assert again.count() == 3


def test_drop_refuses_a_closed_store(backend: Backend) -> None:
    store = backend.open()
    store.upsert(random_points(5, seed=15))
    store.close()

    with pytest.raises(StoreError, match="closed"):
        store.drop()

    assert backend.exists()
    assert backend.open().count() == 5


def test_backends_give_the_same_answers(tmp_path: Path) -> None:
    client = QdrantClient(":memory:")
    edge = EdgeStore.open(tmp_path / "shard", 16)
    server = ServerStore(client, "gen-1", 16)
    points = random_points(300, seed=9, dim=16)
    for store in (edge, server):
        store.upsert(points[:200])
        store.upsert(points[150:])  # overlapping upserts: 50 overwrites
        store.delete([p.id for p in points[::7]])
    queries = random_points(10, seed=10, dim=16)
    filters: list[dict[str, Any]] = [{}, {"root": "r1"}, {"path_prefix": "src/"},
                                     {"root": "r2", "path_prefix": "src"}]
    try:
        assert edge.count() == server.count() == 300 - len(points[::7])
        assert sorted(edge.iter_ids()) == sorted(server.iter_ids())
        for q in queries:
            for kwargs in filters:
                a = edge.search(q.vector, 10, **kwargs)
                b = server.search(q.vector, 10, **kwargs)
                assert ids_of(a) == ids_of(b), kwargs
                assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=SCORE_TOL)
                assert [h.payload for h in a] == [h.payload for h in b]
    finally:
        edge.close()
        server.close()
        client.close()


# -- Edge only ---------------------------------------------------------------------------

CHILD_PRELUDE = """
import sys, time
from pathlib import Path
import numpy as np
from repd.adapters.store_edge import EdgeStore
from repd.core.types import PointRecord
"""


def start_child(body: str, *args: str) -> subprocess.Popen[str]:
    """A Python subprocess running ``body`` with repd importable."""
    code = CHILD_PRELUDE + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(child: subprocess.Popen[str], line: str) -> None:
    """Block until the child prints ``line``; fail with its stderr if it dies first."""
    assert child.stdout is not None
    got = child.stdout.readline().strip()
    if got != line:
        child.kill()
        _, err = child.communicate(timeout=30)
        pytest.fail(f"child printed {got!r} instead of {line!r}; stderr:\n{err}")


def test_edge_points_survive_sigkill_right_after_flush(tmp_path: Path) -> None:
    shard = tmp_path / "shard"
    child = start_child("""
        rng = np.random.default_rng(11)
        vecs = rng.standard_normal((500, 8))
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        store = EdgeStore.open(Path(sys.argv[1]), 8)
        for k in range(0, 500, 100):
            store.upsert([PointRecord(f"00000000-0000-0000-0000-{i:012d}", vecs[i].tolist(),
                                      {"root": "r", "path": f"f{i}"}) for i in range(k, k + 100)])
        store.flush()
        print("flushed", flush=True)
        time.sleep(60)
    """, str(shard))
    try:
        wait_for_line(child, "flushed")
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.communicate(timeout=30)

    store = EdgeStore.open(shard, DIM)
    try:
        assert store.count() == 500
        rng = np.random.default_rng(11)
        vecs = rng.standard_normal((500, 8))
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        ids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(500)]
        got = store.retrieve(ids)
        assert [r.id for r in got] == ids
        for r, v in zip(got, vecs, strict=True):
            assert r.vector == pytest.approx(v.tolist(), abs=1e-6)
    finally:
        store.close()


def test_edge_second_opener_gets_a_clear_error(tmp_path: Path) -> None:
    shard = tmp_path / "shard"
    EdgeStore.open(shard, DIM).close()
    child = start_child("""
        store = EdgeStore.open(Path(sys.argv[1]), 8)
        print("holding", flush=True)
        time.sleep(60)
    """, str(shard))
    try:
        wait_for_line(child, "holding")
        with pytest.raises(StoreError) as caught:
            EdgeStore.open(shard, DIM)
        assert str(caught.value) == (f"index at {shard} is in use by another process "
                                     "(is a repd daemon running?)")
    finally:
        child.kill()
        child.communicate(timeout=30)
    EdgeStore.open(shard, DIM).close()  # the lock went with the process


def test_edge_maybe_build_index_builds_hnsw_above_the_threshold(tmp_path: Path) -> None:
    store = EdgeStore.open(tmp_path / "shard", DIM, index_threshold=64)
    points = random_points(150, seed=12)
    try:
        store.upsert(points[:40])
        assert store.maybe_build_index() is False
        assert store.info()["hnsw_built"] is False

        ran = False
        for k in range(40, 150, 30):  # the way repd writes: build check after each batch
            store.upsert(points[k : k + 30])
            ran = store.maybe_build_index() or ran
        info = store.info()

        assert ran
        assert info["hnsw_built"] is True
        assert isinstance(info["indexed_vectors"], int) and info["indexed_vectors"] >= 64
        assert info["points"] == 150
        assert store.count() == 150
        # Answers stay right over HNSW segments, filters included.
        query = points[3].vector
        assert ids_of(store.search(query, 5)) == expected_ids(points, query, 5)
        hits = store.search(query, 5, root="r2", path_prefix="src")
        keep = lambda p: p.payload["root"] == "r2" and p.payload["path"].startswith("src")  # noqa: E731
        assert ids_of(hits) == expected_ids(points, query, 5, keep)

        store.close()
        store = EdgeStore.open(tmp_path / "shard", DIM, index_threshold=64)
        assert store.info()["hnsw_built"] is True  # the index is on disk
        assert store.count() == 150
        assert store.maybe_build_index() is False  # reopening leaves nothing to rebuild
    finally:
        store.close()


def test_edge_drop_frees_the_disk_and_finishes_an_interrupted_drop(tmp_path: Path) -> None:
    shard = tmp_path / "shards" / "gen-1"
    store = EdgeStore.open(shard, DIM, index_threshold=64)
    store.upsert(random_points(200, seed=16))
    assert store.maybe_build_index()  # HNSW files too
    store.flush()
    # What a drop that crashed between its rename and its delete leaves behind.
    tomb = shard.with_name("gen-1" + DROPPING_SUFFIX)
    (tomb / "segments").mkdir(parents=True)
    (tomb / "segments" / "left-over").write_bytes(b"x" * 4096)

    store.drop()

    assert sorted(os.listdir(tmp_path / "shards")) == []
    reopened = EdgeStore.open(shard, DIM)  # no lock is left behind either
    try:
        assert reopened.count() == 0
    finally:
        reopened.close()


def test_edge_drop_after_a_failed_delete_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    shard = tmp_path / "shard"
    store = EdgeStore.open(shard, DIM)
    store.upsert(random_points(5, seed=17))
    real_rmtree = shutil.rmtree
    calls: list[str] = []

    def failing_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(str(path))
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(path))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    with pytest.raises(StoreError, match="deleting the index"):
        store.drop()
    assert not shard.exists()  # already out of the way: a reopen starts empty
    with pytest.raises(StoreError, match="dropped"):
        store.count()
    newer = EdgeStore.open(shard, DIM)
    newer.upsert(random_points(2, seed=18))

    store.drop()

    assert os.listdir(tmp_path) == ["shard"]  # the retry deleted only what was its own
    try:
        assert newer.count() == 2
    finally:
        newer.close()


# -- server only -------------------------------------------------------------------------


def test_alias_switches_between_generations() -> None:
    client = QdrantClient(":memory:")
    try:
        ServerStore(client, "repd-gen-1", DIM).upsert([rec(1, axis(0))])
        ServerStore(client, "repd-gen-2", DIM)
        assert resolve_alias is alias_target  # the old name still works
        assert alias_target(client, "repd") is None

        set_alias(client, "repd", "repd-gen-1")
        assert alias_target(client, "repd") == "repd-gen-1"
        assert client.count("repd").count == 1  # readers use the alias

        set_alias(client, "repd", "repd-gen-2")
        set_alias(client, "repd", "repd-gen-2")  # already there: nothing to do
        assert alias_target(client, "repd") == "repd-gen-2"
        assert client.count("repd").count == 0
        assert [a.alias_name for a in client.get_aliases().aliases] == ["repd"]

        with pytest.raises(StoreError, match="missing collection"):
            set_alias(client, "repd", "repd-gen-3")
        assert alias_target(client, "repd") == "repd-gen-2"
    finally:
        client.close()


def test_set_alias_moves_the_alias_in_one_request(monkeypatch: pytest.MonkeyPatch) -> None:
    client = QdrantClient(":memory:")
    real_update = client.update_collection_aliases
    requests: list[list[Any]] = []

    def spy(change_aliases_operations: Sequence[Any], **kwargs: Any) -> bool:
        requests.append(list(change_aliases_operations))
        return real_update(change_aliases_operations=change_aliases_operations, **kwargs)

    monkeypatch.setattr(client, "update_collection_aliases", spy)
    try:
        ServerStore(client, "repd-gen-1", DIM)
        ServerStore(client, "repd-gen-2", DIM)
        set_alias(client, "repd", "repd-gen-1")
        set_alias(client, "repd", "repd-gen-2")
        set_alias(client, "repd", "repd-gen-2")

        first, move = requests  # the no-op sends nothing
        assert [type(op) for op in first] == [models.CreateAliasOperation]
        assert [type(op) for op in move] == [models.DeleteAliasOperation,
                                             models.CreateAliasOperation]
        assert move[0].delete_alias.alias_name == "repd"
        assert (move[1].create_alias.alias_name,
                move[1].create_alias.collection_name) == ("repd", "repd-gen-2")
    finally:
        client.close()


def test_server_drop_leaves_other_generations_and_the_alias_alone() -> None:
    client = QdrantClient(":memory:")
    try:
        old = ServerStore(client, "repd-gen-1", DIM)
        new = ServerStore(client, "repd-gen-2", DIM)
        old.upsert([rec(1, axis(0))])
        new.upsert([rec(2, axis(1)), rec(3, axis(2))])
        set_alias(client, "repd", "repd-gen-1")
        set_alias(client, "repd", "repd-gen-2")  # switch first, then drop the old one

        old.drop()

        assert client.collection_exists("repd-gen-1") is False
        assert client.collection_exists("repd-gen-2") is True
        assert alias_target(client, "repd") == "repd-gen-2"
        assert client.count("repd").count == 2
        assert new.count() == 2
    finally:
        client.close()


def test_server_drop_of_the_aliased_collection_takes_the_alias() -> None:
    # What the server does too: deleting a collection deletes its aliases.
    client = QdrantClient(":memory:")
    try:
        store = ServerStore(client, "repd-gen-1", DIM)
        set_alias(client, "repd", "repd-gen-1")
        store.drop()
        assert alias_target(client, "repd") is None
    finally:
        client.close()


def test_server_drop_closes_an_owned_client_and_tolerates_a_gone_collection() -> None:
    client = QdrantClient(":memory:")
    store = ServerStore(client, "gen-1", DIM, owns_client=True)
    client.delete_collection("gen-1")  # someone else was first: still a drop

    store.drop()
    store.drop()

    with pytest.raises(RuntimeError, match="closed"):
        client.get_collections()


def test_server_drop_that_fails_can_be_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    client = QdrantClient(":memory:")
    real_delete = client.delete_collection
    try:
        store = ServerStore(client, "gen-1", DIM)
        store.upsert([rec(1, axis(0))])

        def refuse(collection_name: str, **kwargs: Any) -> bool:
            raise ConnectionError("server went away")

        monkeypatch.setattr(client, "delete_collection", refuse)
        with pytest.raises(StoreError, match="drop failed on collection 'gen-1'"):
            store.drop()
        assert store.count() == 1  # still open and whole

        monkeypatch.setattr(client, "delete_collection", real_delete)
        store.drop()
        assert client.collection_exists("gen-1") is False
    finally:
        client.close()


def test_server_without_prefix_support_filters_prefixes_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An older server (< 1.19) rejects the prefix option and the prefix condition.
    client = QdrantClient(":memory:")
    real_index, real_query = client.create_payload_index, client.query_points

    def old_index(collection: str, field_name: str, field_schema: Any = None,
                  **kwargs: Any) -> Any:
        if isinstance(field_schema, models.KeywordIndexParams) and field_schema.prefix:
            raise ValueError("unknown field `prefix`")
        return real_index(collection, field_name=field_name, field_schema=field_schema,
                          **kwargs)

    def old_query(collection: str, **kwargs: Any) -> Any:
        flt = kwargs.get("query_filter")
        if flt is not None and any(isinstance(c.match, models.MatchPrefix)
                                   for c in flt.must or []):
            raise ValueError("unknown variant `prefix`")
        return real_query(collection, **kwargs)

    monkeypatch.setattr(client, "create_payload_index", old_index)
    monkeypatch.setattr(client, "query_points", old_query)
    try:
        store = ServerStore(client, "gen-1", DIM)
        points = random_points(200, seed=13)
        store.upsert(points)
        query = points[5].vector
        cases: list[tuple[dict[str, Any], Callable[[PointRecord], bool]]] = [
            ({"path_prefix": "src/sub/"}, lambda p: p.payload["path"].startswith("src/sub/")),
            ({"root": "r1", "path_prefix": "docs/"},
             lambda p: p.payload["root"] == "r1" and p.payload["path"].startswith("docs/")),
            ({"path_prefix": "none/"}, lambda p: False),
        ]
        for kwargs, keep in cases:
            assert ids_of(store.search(query, 6, **kwargs)) == expected_ids(
                points, query, 6, keep), kwargs
    finally:
        client.close()


def test_server_failures_become_store_errors() -> None:
    client = QdrantClient(":memory:")
    try:
        store = ServerStore(client, "gen-1", DIM)
        client.delete_collection("gen-1")
        with pytest.raises(StoreError, match="gen-1"):
            store.count()
        with pytest.raises(StoreError, match="gen-1"):
            store.upsert([rec(1, axis(0))])

        client.create_collection("named", vectors_config={
            "dense": models.VectorParams(size=DIM, distance=models.Distance.COSINE)})
        with pytest.raises(StoreError, match="named vectors"):
            ServerStore(client, "named", DIM)
    finally:
        client.close()
