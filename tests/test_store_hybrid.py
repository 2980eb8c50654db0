"""The hybrid layout (dense + BM25 sparse vectors) and in-store filters, for every backend.

The same contract as ``test_store_contract.py``, for what hybrid search added: the
layout, lexical and fused search, and the ``exts`` filter in every mode. Expected
rankings are computed by brute force here, with Qdrant's own formulas: IDF is
``ln(1 + (N - n + 0.5) / (n + 0.5))`` over the whole store (N points with a non-empty
sparse vector, n of them holding the term), and RRF scores rank r (1-based) of a list
of weight w as ``1 / (r / w + k - 1)``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from repd.adapters.store import Store, StoreError
from repd.adapters.store_edge import EdgeStore
from repd.adapters.store_server import ServerStore
from repd.core.types import Hit, PointRecord, SearchMode, SparseVec

DIM = 8
SCORE_TOL = 1e-4
MODES: tuple[SearchMode, ...] = ("dense", "lexical", "hybrid")


def pid(n: int) -> str:
    """A deterministic UUID string for point number ``n``."""
    return str(uuid.UUID(int=n + 1))


def axis(i: int, sign: float = 1.0) -> list[float]:
    """The unit vector along axis ``i``."""
    v = [0.0] * DIM
    v[i] = sign
    return v


def unit(values: Sequence[float]) -> list[float]:
    """``values`` scaled to length 1."""
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def terms(*ids: int, weight: float = 1.0) -> SparseVec:
    """A sparse vector with ``weight`` on each of ``ids``."""
    return SparseVec(sorted(ids), [weight] * len(ids))


def rec(n: int, vector: Sequence[float], sparse: SparseVec | None = None,
        root: str = "r1", path: str = "a.txt", **extra: Any) -> PointRecord:
    """A point with repd's payload keys (``ext`` from the path, as the writer sets it)."""
    ext = Path(path).suffix.lower()
    payload = {"root": root, "path": path, "ext": ext, "ordinal": n, **extra}
    return PointRecord(id=pid(n), vector=list(vector), payload=payload, sparse=sparse)


#: Paths over folders that share prefixes, with mixed-case and missing extensions.
PATHS = ("src/a.py", "src/sub/b.PY", "src2/c.md", "docs/d.md", "docs/README", "src/e.rs")


def random_points(n: int, seed: int, vocab: int = 12) -> list[PointRecord]:
    """``n`` random points over 2 roots and ``PATHS``, each with 1-4 random terms."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, DIM))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    points = []
    for i in range(n):
        k = int(rng.integers(1, 5))
        idx = sorted(int(t) for t in rng.choice(vocab, size=k, replace=False))
        vals = [float(v) for v in rng.uniform(0.3, 2.0, size=k)]
        folder, _, name = PATHS[i % len(PATHS)].rpartition("/")
        points.append(rec(i, vecs[i].tolist(), SparseVec(idx, vals), root=f"r{i % 2 + 1}",
                          path=f"{folder}/{i}-{name}"))
    return points


@dataclass
class Backend:
    """How to open (and reopen) one backend's store at a fixed location."""

    name: str
    open: Callable[..., Store]
    exists: Callable[[], bool]


@pytest.fixture(params=["edge", "server"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn; ``open`` makes a hybrid store unless told otherwise."""
    opened: list[Store] = []
    client = QdrantClient(":memory:") if request.param == "server" else None

    def open_store(dim: int = DIM, *, hybrid: bool = True, **kwargs: Any) -> Store:
        store: Store
        if client is None:
            store = EdgeStore.open(tmp_path / "shard", dim, hybrid=hybrid, **kwargs)
        else:
            store = ServerStore(client, "gen-1", dim, hybrid=hybrid, **kwargs)
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


# -- brute force -------------------------------------------------------------------------


def cosine_ranking(points: Sequence[PointRecord], query: Sequence[float],
                   keep: Callable[[PointRecord], bool]) -> list[tuple[str, float]]:
    """(id, cosine) of the kept points, best first."""
    q = np.asarray(unit(query))
    scored = [(p.id, float(np.dot(q, unit(p.vector)))) for p in points if keep(p)]
    return sorted(scored, key=lambda s: -s[1])


def bm25_ranking(points: Sequence[PointRecord], query: SparseVec,
                 keep: Callable[[PointRecord], bool]) -> list[tuple[str, float]]:
    """(id, IDF-weighted dot product) of the kept points sharing a term, best first.

    IDF counts every point of the store (filters do not narrow it).
    """
    docs = [p for p in points if p.sparse is not None and p.sparse.indices]
    big_n = len(docs)
    idf = {}
    for t in query.indices:
        n = sum(1 for p in docs if p.sparse is not None and t in p.sparse.indices)
        idf[t] = math.log(1 + (big_n - n + 0.5) / (n + 0.5))
    qw = dict(zip(query.indices, query.values, strict=True))
    scored = []
    for p in docs:
        if not keep(p) or p.sparse is None:
            continue
        shared = [(t, w) for t, w in zip(p.sparse.indices, p.sparse.values, strict=True)
                  if t in qw]
        if shared:
            scored.append((p.id, sum(idf[t] * qw[t] * w for t, w in shared)))
    return sorted(scored, key=lambda s: -s[1])


def rrf(lists: Sequence[Sequence[tuple[str, float]]], k: int,
        weights: Sequence[float]) -> dict[str, float]:
    """Qdrant's weighted RRF of ranked lists: id -> fused score."""
    fused: dict[str, float] = {}
    for ranked, w in zip(lists, weights, strict=True):
        for rank, (i, _) in enumerate(ranked, start=1):
            fused[i] = fused.get(i, 0.0) + 1.0 / (rank / w + k - 1)
    return fused


def check_scored(hits: Sequence[Hit], expected: dict[str, float], limit: int) -> None:
    """``hits`` are the ``limit`` best of ``expected`` (ties in any order), best first,
    each with its expected score."""
    best = sorted(expected.values(), reverse=True)[:limit]
    assert [h.score for h in hits] == pytest.approx(best, abs=SCORE_TOL)
    for h in hits:
        assert h.score == pytest.approx(expected[h.id], abs=SCORE_TOL), h.id


# -- layout ------------------------------------------------------------------------------


def test_hybrid_round_trip_keeps_dense_and_sparse_vectors(backend: Backend) -> None:
    store = backend.open()
    assert store.hybrid is True
    unsorted = SparseVec([7, 2, 40], [0.5, 1.5, 2.0])
    store.upsert([rec(1, axis(0), unsorted), rec(2, [2.0] + [0.0] * (DIM - 1)),
                  rec(3, axis(2), terms(5))])
    store.upsert([rec(3, axis(3), terms(6, 8, weight=0.25), path="moved.md")])

    got = {r.id: r for r in store.retrieve([pid(1), pid(2), pid(3), pid(99)])}

    assert sorted(got) == [pid(1), pid(2), pid(3)]
    assert got[pid(1)].vector == pytest.approx(axis(0), abs=1e-6)
    assert got[pid(1)].sparse == SparseVec([2, 7, 40], [1.5, 0.5, 2.0])  # sorted by index
    assert got[pid(2)].vector == pytest.approx(axis(0), abs=1e-6)  # normalised
    assert got[pid(2)].sparse == SparseVec([], [])  # None is written as empty
    assert got[pid(3)].sparse == SparseVec([6, 8], [0.25, 0.25])
    assert got[pid(3)].payload["path"] == "moved.md"
    bare = store.retrieve([pid(1)], with_vectors=False)
    assert bare == [PointRecord(pid(1), [], got[pid(1)].payload)]
    assert store.count() == 3
    assert store.info()["hybrid"] is True


def test_dense_only_store_ignores_sparse_vectors(backend: Backend) -> None:
    store = backend.open(hybrid=False)
    assert store.hybrid is False
    store.upsert([rec(1, axis(0), terms(3))])
    [got] = store.retrieve([pid(1)])
    assert got.sparse is None
    assert got.vector == pytest.approx(axis(0), abs=1e-6)
    assert store.info()["hybrid"] is False


def test_invalid_sparse_vectors_are_refused_before_any_write(backend: Backend) -> None:
    store = backend.open()
    bad = [SparseVec([1, 1], [1.0, 2.0]), SparseVec([1, 2], [1.0]),
           SparseVec([-1], [1.0]), SparseVec([2**32], [1.0]), SparseVec([3], [math.nan])]
    for sv in bad:
        with pytest.raises(StoreError, match="sparse vector of point"):
            store.upsert([rec(1, axis(0), terms(1)), rec(2, axis(1), sv)])
    assert store.count() == 0


@pytest.mark.parametrize("created_hybrid", [True, False])
def test_opening_with_the_other_layout_is_a_store_error(
    backend: Backend, created_hybrid: bool,
) -> None:
    store = backend.open(hybrid=created_hybrid)
    store.upsert([rec(1, axis(0), terms(1))])
    store.close()

    asked = "dense-only" if created_hybrid else "hybrid"
    had = "hybrid" if created_hybrid else "dense-only"
    with pytest.raises(StoreError, match=rf"has the {had} layout, but the {asked} layout"):
        backend.open(hybrid=not created_hybrid)

    again = backend.open(hybrid=created_hybrid)  # the failed attempt changed nothing
    assert again.count() == 1
    assert again.hybrid is created_hybrid


def test_edge_without_its_config_file_lets_the_engine_judge_the_layout(
    tmp_path: Path,
) -> None:
    store = EdgeStore.open(tmp_path / "shard", DIM, hybrid=True)
    store.upsert([rec(1, axis(0), terms(1))])
    store.close()
    (tmp_path / "shard" / "edge_config.json").unlink()

    with pytest.raises(StoreError, match="does not have the dense-only layout"):
        EdgeStore.open(tmp_path / "shard", DIM)

    again = EdgeStore.open(tmp_path / "shard", DIM, hybrid=True)
    try:
        assert again.count() == 1
    finally:
        again.close()


def test_server_refuses_collections_it_did_not_lay_out() -> None:
    client = QdrantClient(":memory:")
    try:
        dense = models.VectorParams(size=DIM, distance=models.Distance.COSINE)
        client.create_collection("no-idf", vectors_config={"dense": dense},
                                 sparse_vectors_config={"bm25": models.SparseVectorParams()})
        for hybrid in (True, False):
            with pytest.raises(StoreError, match="not made by repd"):
                ServerStore(client, "no-idf", DIM, hybrid=hybrid)
        client.create_collection("extra", vectors_config=dense,
                                 sparse_vectors_config={"bm25": models.SparseVectorParams()})
        with pytest.raises(StoreError, match="sparse vectors"):
            ServerStore(client, "extra", DIM)
    finally:
        client.close()


def test_drop_deletes_a_hybrid_store(backend: Backend) -> None:
    store = backend.open()
    points = random_points(20, seed=1)
    store.upsert(points)
    store.flush()

    store.drop()

    assert not backend.exists()
    with pytest.raises(StoreError, match="dropped"):
        store.search(points[0].vector, 3, sparse=terms(1), mode="hybrid")
    store.drop()
    again = backend.open()
    assert again.count() == 0
    assert again.search([], 5, sparse=terms(1, 2), mode="lexical") == []
    assert again.hybrid is True


# -- lexical -----------------------------------------------------------------------------


def test_lexical_search_ranks_by_term_overlap_with_idf(backend: Backend) -> None:
    store = backend.open()
    docs = [
        rec(1, axis(0), terms(1, 2, 3)),
        rec(2, axis(1), terms(1, 2)),
        rec(3, axis(2), terms(1)),
        rec(4, axis(3), terms(9)),  # shares no term: never a lexical hit
        rec(5, axis(4), terms(1, 9)),
    ]
    store.upsert(docs)
    query = terms(1, 2, 3)

    hits = store.search([], 10, sparse=query, mode="lexical")  # no dense vector needed

    assert ids_of(hits[:2]) == [pid(1), pid(2)]
    assert set(ids_of(hits[2:])) == {pid(3), pid(5)}  # term 1 only: equal scores
    check_scored(hits, dict(bm25_ranking(docs, query, lambda p: True)), 10)
    assert hits[0].payload["path"] == "a.txt"
    assert ids_of(store.search([], 2, sparse=query, mode="lexical")) == [pid(1), pid(2)]
    # A rare term outweighs a common one (IDF).
    assert ids_of(store.search([], 1, sparse=terms(1, 3), mode="lexical")) == [pid(1)]
    assert ids_of(store.search([], 10, sparse=terms(2, 3), mode="lexical")) == [pid(1), pid(2)]
    assert store.search([], 5, sparse=terms(77), mode="lexical") == []
    assert store.search([], 5, sparse=SparseVec([], []), mode="lexical") == []
    assert store.search([], 0, sparse=query, mode="lexical") == []


def test_lexical_scores_use_the_document_weights(backend: Backend) -> None:
    store = backend.open()
    docs = [rec(1, axis(0), terms(4, weight=0.5)), rec(2, axis(1), terms(4, weight=1.8)),
            rec(3, axis(2), terms(5))]
    store.upsert(docs)
    hits = store.search([], 5, sparse=terms(4), mode="lexical")
    assert ids_of(hits) == [pid(2), pid(1)]
    check_scored(hits, dict(bm25_ranking(docs, terms(4), lambda p: True)), 5)


# -- hybrid ------------------------------------------------------------------------------


def fusion_points() -> list[PointRecord]:
    """One point only dense finds, one only BM25 finds, and 20 fillers in between."""
    rng = np.random.default_rng(5)
    fillers = [rec(10 + i, unit([0.3, *rng.uniform(-1, 1, DIM - 1).tolist()]), terms(50 + i))
               for i in range(20)]
    dense_only = rec(1, axis(0), terms(40))
    sparse_only = rec(2, axis(0, -1.0), terms(7, 8))
    return [dense_only, sparse_only, *fillers]


def test_hybrid_search_fuses_dense_and_lexical_hits(backend: Backend) -> None:
    store = backend.open()
    points = fusion_points()
    store.upsert(points)
    query, sparse = axis(0), terms(7, 8)

    dense_hits = store.search(query, 2)
    lexical_hits = store.search(query, 2, sparse=sparse, mode="lexical")
    fused = store.search(query, 2, sparse=sparse, mode="hybrid")

    assert pid(2) not in ids_of(dense_hits)
    assert ids_of(lexical_hits) == [pid(2)]
    assert set(ids_of(fused)) == {pid(1), pid(2)}  # each strong in one list only
    lists = [cosine_ranking(points, query, lambda p: True),
             bm25_ranking(points, sparse, lambda p: True)]
    check_scored(fused, rrf(lists, 60, (1.0, 1.0)), 2)


# 2.5, not a whole number: with w = 2 or 3 a dense filler at rank 2 or 3 would tie with
# the sparse-only point's 1 / (1 + 59).
@pytest.mark.parametrize(("weights", "first"), [((1.0, 2.5), 2), ((2.5, 1.0), 1)])
def test_hybrid_weights_shift_the_order(
    backend: Backend, weights: tuple[float, float], first: int,
) -> None:
    store = backend.open()
    points = fusion_points()
    store.upsert(points)
    query, sparse = axis(0), terms(7, 8)

    # prefetch 3: the dense-only point is not in the sparse list and vice versa.
    hits = store.search(query, 3, sparse=sparse, mode="hybrid", weights=weights, prefetch=3)

    assert ids_of(hits)[0] == pid(first)
    assert pid(3 - first) in ids_of(hits)
    lists = [cosine_ranking(points, query, lambda p: True)[:3],
             bm25_ranking(points, sparse, lambda p: True)[:3]]
    check_scored(hits, rrf(lists, 60, weights), 3)
    assert hits[0].score == pytest.approx(1 / (1 / max(weights) + 59), abs=SCORE_TOL)
    [top] = store.search(query, 1, sparse=sparse, mode="hybrid", weights=weights, rrf_k=1,
                         prefetch=1)
    assert top.id == pid(first)
    assert top.score == pytest.approx(max(weights), abs=SCORE_TOL)  # 1 / (1 / w + 1 - 1)


def test_hybrid_prefetch_bounds_the_candidates(backend: Backend) -> None:
    store = backend.open()
    points = random_points(60, seed=6)
    store.upsert(points)
    query, sparse = points[0].vector, terms(1, 4)
    for prefetch in (None, 3, 10):
        depth = max(prefetch or 100, 5)
        hits = store.search(query, 5, sparse=sparse, mode="hybrid", prefetch=prefetch)
        lists = [cosine_ranking(points, query, lambda p: True)[:depth],
                 bm25_ranking(points, sparse, lambda p: True)[:depth]]
        check_scored(hits, rrf(lists, 60, (1.0, 1.0)), 5)


def test_hybrid_with_an_empty_sparse_query_is_dense_fused_alone(backend: Backend) -> None:
    store = backend.open()
    points = random_points(15, seed=7)
    store.upsert(points)
    query = points[3].vector
    hits = store.search(query, 4, sparse=SparseVec([], []), mode="hybrid")
    ranked = cosine_ranking(points, query, lambda p: True)
    assert ids_of(hits) == [i for i, _ in ranked[:4]]
    assert [h.score for h in hits] == pytest.approx([1 / (r + 59) for r in range(1, 5)],
                                                    abs=SCORE_TOL)


# -- filters in every mode ---------------------------------------------------------------

FILTERS: list[tuple[dict[str, Any], Callable[[PointRecord], bool]]] = [
    ({}, lambda p: True),
    ({"root": "r2"}, lambda p: p.payload["root"] == "r2"),
    ({"path_prefix": "src/"}, lambda p: p.payload["path"].startswith("src/")),
    ({"path_prefix": "src"}, lambda p: p.payload["path"].startswith("src")),  # plain prefix
    ({"exts": (".py",)}, lambda p: p.payload["ext"] == ".py"),  # ".PY" stored lower-cased
    ({"exts": [".MD", ".rs"]}, lambda p: p.payload["ext"] in (".md", ".rs")),  # asked as-is
    ({"exts": ("",)}, lambda p: p.payload["ext"] == ""),  # files without an extension
    ({"root": "r1", "path_prefix": "src/", "exts": (".py",)},
     lambda p: p.payload["root"] == "r1" and p.payload["path"].startswith("src/")
     and p.payload["ext"] == ".py"),
    ({"root": "r2", "exts": (".md", ".py")},
     lambda p: p.payload["root"] == "r2" and p.payload["ext"] in (".md", ".py")),
    ({"exts": (".java",)}, lambda p: False),
    ({"root": "nowhere"}, lambda p: False),
    ({"path_prefix": "nowhere/"}, lambda p: False),
]


@pytest.mark.parametrize("mode", MODES)
def test_every_filter_works_in_every_mode(backend: Backend, mode: SearchMode) -> None:
    store = backend.open()
    points = random_points(90, seed=8)
    store.upsert(points)
    query, sparse = points[0].vector, terms(2, 5, 7)
    limit = 6
    for kwargs, keep in FILTERS:
        hits = store.search(query, limit, sparse=sparse, mode=mode, **kwargs)
        assert all(keep(PointRecord(h.id, [], h.payload)) for h in hits), kwargs
        dense = cosine_ranking(points, query, keep)
        lexical = bm25_ranking(points, sparse, keep)
        if mode == "dense":
            expected = dict(dense)
        elif mode == "lexical":
            expected = dict(lexical)
        else:
            # Filtered inside each prefetch: the candidates are already the kept ones.
            expected = rrf([dense[:100], lexical[:100]], 60, (1.0, 1.0))
        assert len(hits) == min(limit, len(expected)), kwargs
        if expected:
            check_scored(hits, expected, limit)


def test_dense_only_store_filters_by_ext(backend: Backend) -> None:
    store = backend.open(hybrid=False)
    points = random_points(40, seed=9)
    store.upsert(points)
    query = points[1].vector
    for kwargs, keep in FILTERS:
        hits = store.search(query, 5, **kwargs)
        assert ids_of(hits) == [i for i, _ in cosine_ranking(points, query, keep)[:5]], kwargs


def test_points_without_ext_never_match_an_ext_filter(backend: Backend) -> None:
    store = backend.open()
    old = [PointRecord(pid(i), axis(i % DIM), {"root": "r1", "path": f"f{i}.py"}, terms(1))
           for i in range(5)]
    store.upsert(old)
    for mode in MODES:
        assert store.search(axis(0), 5, sparse=terms(1), mode=mode, exts=(".py",)) == []
        assert len(store.search(axis(0), 5, sparse=terms(1), mode=mode)) == 5


def test_server_without_prefix_support_filters_prefixes_itself_in_every_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An older server (< 1.19) rejects the prefix option and the prefix condition,
    # wherever the condition sits (the top filter or a prefetch's).
    client = QdrantClient(":memory:")
    real_index, real_query = client.create_payload_index, client.query_points

    def has_prefix(flt: models.Filter | None) -> bool:
        return flt is not None and any(
            isinstance(c, models.FieldCondition) and isinstance(c.match, models.MatchPrefix)
            for c in (flt.must if isinstance(flt.must, list) else []))

    def old_index(collection: str, field_name: str, field_schema: Any = None,
                  **kwargs: Any) -> Any:
        if isinstance(field_schema, models.KeywordIndexParams) and field_schema.prefix:
            raise ValueError("unknown field `prefix`")
        return real_index(collection, field_name=field_name, field_schema=field_schema,
                          **kwargs)

    def old_query(collection: str, **kwargs: Any) -> Any:
        prefetches = kwargs.get("prefetch") or []
        if has_prefix(kwargs.get("query_filter")) or any(has_prefix(f.filter)
                                                          for f in prefetches):
            raise ValueError("unknown variant `prefix`")
        return real_query(collection, **kwargs)

    monkeypatch.setattr(client, "create_payload_index", old_index)
    monkeypatch.setattr(client, "query_points", old_query)
    try:
        store = ServerStore(client, "gen-1", DIM, hybrid=True)
        points = random_points(300, seed=13)
        store.upsert(points)
        query, sparse = points[5].vector, terms(3, 8)
        def keep(p: PointRecord) -> bool:
            return p.payload["root"] == "r1" and str(p.payload["path"]).startswith("docs/")

        def everywhere(p: PointRecord) -> bool:
            return bool(p.payload["root"] == "r1")

        dense = cosine_ranking(points, query, keep)
        lexical = bm25_ranking(points, sparse, keep)
        for mode in MODES:
            hits = store.search(query, 6, sparse=sparse, mode=mode, root="r1",
                                path_prefix="docs/")
            assert all(keep(PointRecord(h.id, [], h.payload)) for h in hits)
            if mode == "dense":
                check_scored(hits, dict(dense), 6)
            elif mode == "lexical":
                check_scored(hits, dict(lexical), 6)
            else:
                # Fused over the whole root's candidates, then cut to the prefix: scores
                # are those of the unprefixed ranking.
                fused = rrf([cosine_ranking(points, query, everywhere)[:100],
                             bm25_ranking(points, sparse, everywhere)[:100]], 60, (1.0, 1.0))
                check_scored(hits, {i: v for i, v in fused.items()
                                    if i in {p.id for p in points if keep(p)}}, 6)
            assert store.search(query, 6, sparse=sparse, mode=mode,
                                path_prefix="none/") == []
    finally:
        client.close()


# -- deletes and IDF ---------------------------------------------------------------------


def test_deleted_points_leave_the_idf_statistics(backend: Backend) -> None:
    store = backend.open()
    points = random_points(120, seed=14, vocab=20)
    store.upsert(points)
    store.upsert(points[40:60])  # overwrites
    store.delete([p.id for p in points[::4]] + [pid(999)])
    kept = [p for i, p in enumerate(points) if i % 4]
    query = terms(1, 2, 3, 4)

    hits = store.search([], 8, sparse=query, mode="lexical")

    check_scored(hits, dict(bm25_ranking(kept, query, lambda p: True)), 8)
    info = store.info()
    assert info["points"] == len(kept)
    assert info["hnsw_built"] is False  # deleted sparse vectors are not counted
    assert info["indexed_vectors"] == 0


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lexical", "hybrid"])
def test_dense_only_store_refuses_sparse_modes(backend: Backend, mode: SearchMode) -> None:
    store = backend.open(hybrid=False)
    store.upsert([rec(1, axis(0))])
    with pytest.raises(StoreError, match="this generation has no sparse vectors"):
        store.search(axis(0), 3, sparse=terms(1), mode=mode)
    assert ids_of(store.search(axis(0), 3, mode="dense")) == [pid(1)]


def test_bad_search_arguments_are_store_errors(backend: Backend) -> None:
    store = backend.open()
    store.upsert([rec(1, axis(0), terms(1))])
    q, sv = axis(0), terms(1)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mode": "lexical"}, "needs a sparse query vector"),
        ({"mode": "hybrid"}, "needs a sparse query vector"),
        ({"mode": "fuzzy", "sparse": sv}, "unknown search mode"),
        ({"mode": "hybrid", "sparse": sv, "rrf_k": 0}, "rrf_k"),
        ({"mode": "hybrid", "sparse": sv, "weights": (1.0, 0.0)}, "weights"),
        ({"mode": "hybrid", "sparse": sv, "weights": (1.0, math.inf)}, "weights"),
        ({"mode": "hybrid", "sparse": sv, "weights": (1.0,)}, "weights"),
        ({"mode": "hybrid", "sparse": sv, "prefetch": 0}, "prefetch"),
        ({"mode": "lexical", "sparse": SparseVec([1, 1], [1.0, 1.0])}, "repeats index 1"),
        ({"exts": ".py"}, "not the string"),
    ]
    for kwargs, message in cases:
        with pytest.raises(StoreError, match=message):
            store.search(q, 3, **kwargs)
    with pytest.raises(StoreError, match="floats"):
        store.search([1.0] * (DIM - 1), 3, sparse=sv, mode="hybrid")


# -- both backends agree -----------------------------------------------------------------


def same_answers(a: Sequence[Hit], b: Sequence[Hit]) -> None:
    """Equal scores in order, and the same id for every score not tied with the last
    (a tie at the cut may keep either point)."""
    assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=SCORE_TOL)
    if a:
        cut = a[-1].score + SCORE_TOL
        assert {h.id: h.score for h in a if h.score > cut} == pytest.approx(
            {h.id: h.score for h in b if h.score > cut}, abs=SCORE_TOL)


def test_backends_give_the_same_hybrid_answers(tmp_path: Path) -> None:
    client = QdrantClient(":memory:")
    edge = EdgeStore.open(tmp_path / "shard", DIM, hybrid=True)
    server = ServerStore(client, "gen-1", DIM, hybrid=True)
    points = random_points(200, seed=10, vocab=30)
    for store in (edge, server):
        store.upsert(points[:150])
        store.upsert(points[120:])
        store.delete([p.id for p in points[::9]])
    kept = [p for i, p in enumerate(points) if i % 9]
    queries = random_points(6, seed=11, vocab=30)
    try:
        for q in queries:
            for kwargs, _ in FILTERS[:9]:
                for mode in ("lexical", "hybrid"):
                    a = edge.search(q.vector, 10, sparse=q.sparse, mode=mode,
                                    weights=(1.0, 1.7), **kwargs)
                    b = server.search(q.vector, 10, sparse=q.sparse, mode=mode,
                                      weights=(1.0, 1.7), **kwargs)
                    same_answers(a, b)
        # And both match the brute force.
        q = queries[0]
        assert q.sparse is not None
        expected = dict(bm25_ranking(kept, q.sparse, lambda p: True))
        check_scored(edge.search([], 10, sparse=q.sparse, mode="lexical"), expected, 10)
    finally:
        edge.close()
        server.close()
        client.close()


# -- Edge only ---------------------------------------------------------------------------


def test_edge_hybrid_index_build_and_info(tmp_path: Path) -> None:
    store = EdgeStore.open(tmp_path / "shard", DIM, hybrid=True, index_threshold=64)
    points = random_points(150, seed=12)
    try:
        store.upsert(points[:40])
        assert store.maybe_build_index() is False
        info = store.info()
        # The engine counts the sparse vectors as indexed; the store leaves them out.
        assert info["hnsw_built"] is False
        assert info["indexed_vectors"] == 0

        ran = False
        for k in range(40, 150, 30):
            store.upsert(points[k : k + 30])
            ran = store.maybe_build_index() or ran
        info = store.info()
        assert ran
        assert info["hnsw_built"] is True
        assert isinstance(info["indexed_vectors"], int)
        assert 64 <= info["indexed_vectors"] <= 150
        # Answers stay right over HNSW segments, in every mode, filters included.
        query, sparse = points[3].vector, terms(1, 6)
        keep = lambda p: p.payload["root"] == "r2" and p.payload["ext"] == ".md"  # noqa: E731
        for mode in MODES:
            hits = store.search(query, 5, sparse=sparse, mode=mode, root="r2", exts=(".md",))
            dense, lexical = cosine_ranking(points, query, keep), bm25_ranking(
                points, sparse, keep)
            expected = {"dense": dict(dense), "lexical": dict(lexical),
                        "hybrid": rrf([dense, lexical], 60, (1.0, 1.0))}[mode]
            check_scored(hits, expected, 5)
    finally:
        store.close()
