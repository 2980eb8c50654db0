"""The embedded store: one Qdrant Edge shard directory per index generation."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from repd.adapters.store import (
    DEFAULT_RRF_K,
    DENSE_VECTOR,
    SPARSE_VECTOR,
    StoreError,
    check_dim,
    check_search,
    check_sparse,
)
from repd.core.types import Hit, PointRecord, SearchMode, SparseVec
from repd.log import get_logger

#: Unindexed points (the shard's appendable segment) at which ``maybe_build_index``
#: seals them into an HNSW segment. Below it a query scans them brute force, which is
#: cheap (under 1 ms for 8k points of 384 floats on 2 cores); each build covers about
#: this many points, which bounds the GIL pause it causes: 2-3 s on an idle 2-core
#: machine, up to 11 s on a saturated one (bench/store_edge_bench.py).
DEFAULT_INDEX_THRESHOLD = 8192
#: Unindexed points written by this process at which a writer that otherwise builds only
#: when idle (the daemon) builds anyway: ``optimize()`` seals the whole unindexed backlog
#: into one segment in one GIL-holding call, however large (40,000 points: 185 s on a
#: saturated 2-core machine), so the backlog must never grow far past the threshold.
#: Equal to the threshold: a bulk write then builds as ``repd index`` does, each build
#: over about the threshold; ordinary editing rarely writes that much between two idle
#: checks, so it still builds when idle.
DEFAULT_BUILD_BACKLOG = DEFAULT_INDEX_THRESHOLD
#: Points per ``iter_ids`` page.
DEFAULT_PAGE_SIZE = 1024

# Payload fields with a keyword index. ``path`` also gets the prefix option so
# ``MatchPrefix`` is served by the index; the engine also matches prefixes without
# one (by reading payloads), so the option is a speed-up, not a requirement. ``ext``
# is indexed on old shards too: points without it are simply not in the index.
_KEYWORD_FIELDS = ("root", "path", "chunk_hash", "ext")
_EDGE_CONFIG_FILE = "edge_config.json"
#: Suffix of the name a dropped shard folder is renamed to before it is deleted.
DROPPING_SUFFIX = ".dropping"
_FLOAT_BYTES = 4


log = get_logger("store")

#: Folder of a shard where the optimizer assembles a segment before it swaps it in.
TEMP_SEGMENTS = "temp_segments"


def _kb(points: int, dim: int) -> int:
    # Edge sizes segments in KiB of vector storage; round down so that a segment of
    # ``points`` vectors is at or above the threshold the engine computes back.
    return max(1, points * dim * _FLOAT_BYTES // 1024)


class EdgeStore:
    """A ``Store`` over one Qdrant Edge shard.

    Two layouts, fixed when the shard is created: dense-only (``hybrid`` False: one
    unnamed cosine vector, the layout of every shard made before hybrid search) and
    hybrid (a cosine vector named ``"dense"`` plus a sparse vector ``"bm25"`` with the
    IDF modifier, so the engine applies IDF over the shard at query time to the
    TF-saturated weights the documents carry).

    Vectors are stored L2-normalised (cosine distance), so ``retrieve`` gives back the
    normalised vector. Point ids are returned as canonical lowercase UUID strings.

    HNSW: Edge has no background optimizer; the owner calls ``maybe_build_index``
    (after each write batch, or when idle). It does nothing until the points not yet
    in an HNSW segment reach ``index_threshold``; then ``EdgeShard.optimize()`` seals
    those points into a new HNSW segment. ``optimize()`` holds the GIL for its whole
    run, so keeping each build to about ``index_threshold`` points (segment merges are
    capped at ``max_segment_points``) bounds the pause every Python thread sees.

    Use ``EdgeStore.open``; the shard is single-process (Edge locks its WAL).
    """

    #: Every Edge call holds the GIL of the process that makes it, ``flush`` included.
    flush_holds_gil = True

    def __init__(
        self,
        shard: qe.EdgeShard,
        path: Path,
        dim: int,
        *,
        index_threshold: int,
        page_size: int,
        hybrid: bool = False,
    ) -> None:
        """Wrap an open shard of the given layout; prefer ``EdgeStore.open``."""
        self.dim = dim
        self.hybrid = hybrid
        self.path = path
        self.index_threshold = index_threshold
        self.page_size = page_size
        self._shard: qe.EdgeShard | None = shard
        #: At least the unindexed points this process wrote (for ``backlog``): points
        #: upserted since the last build, capped below the threshold when optimize()
        #: found nothing due (then fewer than the threshold are unindexed).
        self.written_since_build = 0
        self._deleting = False  # closed by drop(), folder not yet (all) deleted
        self._moved = False  # drop() renamed the folder out of the way
        self._dropped = False

    @classmethod
    def open(
        cls,
        path: Path,
        dim: int,
        *,
        hybrid: bool = False,
        index_threshold: int = DEFAULT_INDEX_THRESHOLD,
        max_segment_points: int | None = None,
        hnsw_m: int = 16,
        hnsw_ef_construct: int = 100,
        indexing_threads: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> EdgeStore:
        """Open the shard at ``path``, creating it (cosine, ``dim`` floats) if absent.

        ``hybrid``: the layout (see the class doc); an existing shard must have the
        layout asked for.
        ``index_threshold``: unindexed points that trigger an HNSW build (see class doc).
        ``max_segment_points``: cap on a segment the optimizer builds or merges
        (default 1.5 x ``index_threshold``, which in effect disables merging sealed
        segments, each of which holds at least ``index_threshold`` points).
        ``hnsw_m`` / ``hnsw_ef_construct``: graph parameters, fixed when the shard is
        created (changing them later would make the optimizer rebuild every segment
        in one long GIL-holding call, so they are not applied to an existing shard).
        ``indexing_threads``: 0 = all cores; the GIL is held during a build anyway, so
        using every core makes the pause shortest.

        Raises ``StoreError`` when the shard holds vectors of another size or has the
        other layout, when another process has it open, or on any other engine failure.
        """
        if dim <= 0:
            raise StoreError(f"vector size must be positive, not {dim}")
        if index_threshold <= 0:
            raise StoreError(f"index_threshold must be positive, not {index_threshold}")
        seg_points = max_segment_points or index_threshold + index_threshold // 2
        # Fail before touching the engine: a clear message, and no lock taken.
        on_disk = _layout_on_disk(path)
        if on_disk is not None:
            layout, size = on_disk
            if layout != _layout_name(hybrid):
                raise StoreError(_layout_message(path, layout, hybrid))
            if size is not None and size != dim:
                raise StoreError(_dim_message(path, size, dim))
        optimizers = qe.EdgeOptimizersConfig(
            indexing_threshold=_kb(index_threshold, dim),
            max_segment_size=_kb(seg_points, dim),
            # The indexing optimizer pairs a new segment with the smallest indexed one
            # only when this many segments exist and the pair fits max_segment_size.
            default_segment_number=2,
            # True would hide freshly written points from reads until optimize() runs.
            prevent_unoptimized=False,
        )
        dense = qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)
        vectors: qe.EdgeVectorParams | dict[str, qe.EdgeVectorParams] = dense
        sparse: dict[str, qe.EdgeSparseVectorParams] | None = None
        if hybrid:
            vectors = {DENSE_VECTOR: dense}
            sparse = {SPARSE_VECTOR: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)}
        try:
            if shard_exists(path):
                # vectors are validated against the segments; the optimizer settings
                # given here replace the persisted ones; HNSW settings stay as built.
                config = qe.EdgeConfig(vectors=vectors, sparse_vectors=sparse,
                                       optimizers=optimizers)
                shard = qe.EdgeShard.load(str(path), config)
                # The shard is ours now (its WAL lock) and builds only run in optimize().
                _remove_stale_builds(path)
            else:
                hnsw = qe.HnswIndexConfig(
                    m=hnsw_m,
                    ef_construct=hnsw_ef_construct,
                    # Segments (or filtered subsets) under this size are scanned exactly:
                    # cheap at that size, and always exact.
                    full_scan_threshold=_kb(max(1, index_threshold // 2), dim),
                    max_indexing_threads=indexing_threads,
                )
                config = qe.EdgeConfig(vectors=vectors, sparse_vectors=sparse,
                                       hnsw_config=hnsw, optimizers=optimizers)
                path.mkdir(parents=True, exist_ok=True)
                shard = qe.EdgeShard.create(str(path), config)
        except Exception as exc:
            raise _open_error(path, dim, hybrid, exc) from exc
        store = cls(shard, path, dim, index_threshold=index_threshold, page_size=page_size,
                    hybrid=hybrid)
        try:
            store._ensure_payload_indexes()
        except StoreError:
            store.close()
            raise
        return store

    # -- Store -------------------------------------------------------------------------

    def upsert(self, points: Sequence[PointRecord]) -> None:
        """Insert or overwrite points by id (written to the WAL before returning).

        Hybrid: each point's ``sparse`` vector is written too, an empty one when it is
        None (Edge leaves empty sparse vectors out of the IDF document count). A
        dense-only shard ignores ``sparse``.
        """
        if not points:
            return
        for p in points:
            self._check_dim(p.vector, f"point {p.id}")
        batch = [qe.Point(p.id, self._vectors(p), dict(p.payload)) for p in points]
        shard = self._open_shard()
        try:
            shard.update(qe.UpdateOperation.upsert_points(batch))
        except Exception as exc:
            raise self._error("upsert", exc) from exc
        self.written_since_build += len(batch)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id; unknown ids are ignored.

        Hybrid: the points' sparse vectors are first replaced by empty ones. Edge's
        appendable segment keeps a deleted point's terms in its IDF statistics (and
        in ``indexed_vectors``) for good, since that segment is rebuilt only by an
        optimizer run; an overwrite, unlike a delete, takes them out. Points already
        sealed into an HNSW segment stay counted until that segment is vacuumed or
        merged, so IDF there is approximate after deletes. A crash between the two
        steps leaves the points alive with empty sparse vectors (found by dense
        search only) until the delete is repeated.
        """
        if not ids:
            return
        shard = self._open_shard()
        try:
            if self.hybrid:
                # update_vectors refuses unknown ids, so only the present ones.
                present = shard.retrieve(list(ids), with_payload=False, with_vector=False)
                if present:
                    empty: dict[str, qe.NamedVector] = {SPARSE_VECTOR: qe.SparseVector([], [])}
                    shard.update(qe.UpdateOperation.update_vectors(
                        [qe.PointVectors(r.id, empty) for r in present]))
            shard.update(qe.UpdateOperation.delete_points(list(ids)))
        except Exception as exc:
            raise self._error("delete", exc) from exc

    def flush(self) -> None:
        """Sync the WAL and every segment to disk (survives power loss once it returns).

        Every acknowledged ``upsert``/``delete`` is already in the memory-mapped WAL, so
        it survives the process being killed even without ``flush``; ``flush`` is what
        makes it survive an OS crash or power cut.
        """
        shard = self._open_shard()
        try:
            shard.flush()
        except Exception as exc:
            raise self._error("flush", exc) from exc

    def search(
        self,
        vector: Sequence[float],
        limit: int,
        *,
        root: str | None = None,
        path_prefix: str | None = None,
        exts: Sequence[str] = (),
        sparse: SparseVec | None = None,
        mode: SearchMode = "dense",
        rrf_k: int = DEFAULT_RRF_K,
        weights: tuple[float, float] | None = None,
        prefetch: int | None = None,
    ) -> list[Hit]:
        """The best points by ``mode``, best first; filters run in the engine.

        Semantics as in ``Store.search``. ``path_prefix`` is a plain string prefix
        (``MatchPrefix`` on the keyword index of ``path``), so ``"src"`` also matches
        ``"src2/x"``; ``exts`` is ``MatchAny`` on the keyword index of ``ext``. Hybrid
        runs both prefetches and ``Fusion.Rrf(k=rrf_k, weights=...)`` in one engine
        call; the filter goes into each prefetch (so the candidates are already
        filtered) and onto the fused result.
        """
        plan = check_search(hybrid=self.hybrid, where=f"the index at {self.path}",
                            limit=limit, exts=exts, sparse=sparse, mode=mode, rrf_k=rrf_k,
                            weights=weights, prefetch=prefetch)
        if plan.mode != "lexical":
            self._check_dim(vector, "query vector")
        if limit <= 0:
            return []
        shard = self._open_shard()
        flt = _filter(root, path_prefix, plan.exts)
        if plan.sparse is None:  # dense
            request = qe.QueryRequest(limit=limit, query=self._dense_query(vector), filter=flt,
                                      with_payload=True, with_vector=False)
        else:
            sparse_query = qe.Query.Nearest(
                qe.SparseVector(plan.sparse.indices, plan.sparse.values), using=SPARSE_VECTOR
            )
            if plan.mode == "lexical":
                request = qe.QueryRequest(limit=limit, query=sparse_query, filter=flt,
                                          with_payload=True, with_vector=False)
            else:
                dense_query = self._dense_query(vector)
                prefetches = [
                    qe.Prefetch(limit=plan.prefetch, query=dense_query, filter=flt),
                    qe.Prefetch(limit=plan.prefetch, query=sparse_query, filter=flt),
                ]
                fusion = qe.Fusion.Rrf(
                    k=plan.rrf_k, weights=list(plan.weights) if plan.weights else None
                )
                request = qe.QueryRequest(
                    limit=limit,
                    prefetches=prefetches,
                    # The stub types ``query`` as ``Fusion``, of which ``Fusion.Rrf`` is
                    # not declared a subclass; the engine takes it (its own docs' usage).
                    query=fusion,  # type: ignore[arg-type]
                    filter=flt,
                    with_payload=True,
                    with_vector=False,
                )
        try:
            scored = shard.query(request)
        except Exception as exc:
            raise self._error("search", exc) from exc
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {}))
                for p in scored]

    def retrieve(self, ids: Sequence[str], *, with_vectors: bool = True) -> list[PointRecord]:
        """Points by id, in the order asked (missing ids left out, duplicates once).

        Without ``with_vectors`` the records carry an empty vector and no sparse one.
        """
        if not ids:
            return []
        shard = self._open_shard()
        try:
            records = shard.retrieve(list(ids), with_payload=True, with_vector=with_vectors)
        except Exception as exc:
            raise self._error("retrieve", exc) from exc
        name = DENSE_VECTOR if self.hybrid else ""
        by_id = {
            str(r.id): PointRecord(
                id=str(r.id),
                vector=_dense(r.vector, name) if with_vectors else [],
                payload=dict(r.payload or {}),
                sparse=_sparse(r.vector) if with_vectors and self.hybrid else None,
            )
            for r in records
        }
        return _in_request_order(ids, by_id)

    def iter_ids(self) -> Iterator[str]:
        """Every point id, paging through ``scroll`` (not a snapshot under writes)."""
        offset: qe.PointId | None = None
        while True:
            shard = self._open_shard()
            request = qe.ScrollRequest(
                offset=offset, limit=self.page_size, with_payload=False, with_vector=False
            )
            try:
                records, offset = shard.scroll(request)
            except Exception as exc:
                raise self._error("scroll", exc) from exc
            for r in records:
                yield str(r.id)
            if offset is None or not records:
                return

    def count(self) -> int:
        """Exact number of points."""
        shard = self._open_shard()
        try:
            return int(shard.count(qe.CountRequest(exact=True)))
        except Exception as exc:
            raise self._error("count", exc) from exc

    def info(self) -> dict[str, object]:
        """Points, HNSW-indexed vectors, segments, whether any HNSW is built, layout.

        ``indexed_vectors`` is the engine's figure: it still counts deleted points of
        an HNSW segment until the optimizer vacuums it, so it can exceed ``points``.
        Hybrid: the engine adds every non-empty sparse vector (always "indexed", in its
        inverted index) to that figure, so the points holding a sparse vector are
        subtracted; a few empty sparse vectors make it a slight underestimate.
        """
        shard = self._open_shard()
        try:
            i = shard.info()
            points, indexed = int(i.points_count), int(i.indexed_vectors_count)
            if self.hybrid:
                has_sparse = qe.Filter(must=[qe.HasVectorCondition(SPARSE_VECTOR)])
                with_sparse = int(shard.count(qe.CountRequest(filter=has_sparse, exact=True)))
                indexed = max(0, indexed - with_sparse)
        except Exception as exc:
            raise self._error("info", exc) from exc
        return {
            "backend": "edge",
            "location": str(self.path),
            "points": points,
            "indexed_vectors": indexed,
            "segments": int(i.segments_count),
            "hnsw_built": indexed > 0,
            "index_threshold": self.index_threshold,
            "hybrid": self.hybrid,
        }

    def maybe_build_index(self, *, backlog: int | None = None) -> bool:
        """Seal the unindexed points into an HNSW segment once they reach the threshold.

        Blocks every Python thread (Edge holds the GIL) for about the time needed to
        build HNSW over the unindexed points; call it right after each write batch so
        the unindexed part never grows far past the threshold: a shard that did (say,
        written by a process that never called this, or a daemon that builds only when
        idle and never was during a long first index) gets one long build over all of
        it, in one call (30k points: 137 s on a saturated 2-core machine; the engine
        does not split it by ``max_segment_points``).

        ``backlog``: do nothing until ``written_since_build`` reaches it. A writer that
        prefers to build when idle calls this after each batch with ``backlog``
        (``DEFAULT_BUILD_BACKLOG``) as a backstop: each build then covers at most about
        ``max(backlog, index_threshold)`` points plus one batch. (After a restart the
        count starts at 0; a backlog left by the previous process is built at the next
        idle call, or together with the next ``backlog`` points.)

        The same ``optimize()`` call also runs whatever else the engine has due, each
        job bounded by ``max_segment_points``: vacuuming a segment with over 20 % of
        its points deleted, merging small segments. Does nothing, in microseconds,
        when nothing is due. Returns True if the optimizer changed anything.
        """
        shard = self._open_shard()
        if backlog is not None and self.written_since_build < backlog:
            return False
        try:
            if int(shard.info().points_count) < self.index_threshold:
                return False
            # The engine is the judge of what needs building: its indexing threshold is
            # ours, and it knows the size of the appendable segment, which info() does
            # not tell (indexed_vectors keeps counting deleted points until a vacuum).
            # When nothing is due, optimize() returns False in about 0.05 ms.
            built = bool(shard.optimize())
        except Exception as exc:
            raise self._error("index build", exc) from exc
        # Built: the whole backlog is sealed. Nothing due: fewer than the threshold
        # are unindexed (overwrites and deletes count in the upserts, not in it).
        self.written_since_build = (
            0 if built else min(self.written_since_build, self.index_threshold - 1))
        return built

    def close(self) -> None:
        """Flush and release the shard and its WAL lock; later calls raise StoreError."""
        shard, self._shard = self._shard, None
        if shard is None:
            return
        failure: StoreError | None = None
        try:
            shard.flush()
        except Exception as exc:
            failure = self._error("flush on close", exc)
        try:
            # Always close, even after a failed flush, so the WAL lock is released.
            shard.close()
        except Exception as exc:
            failure = failure or self._error("close", exc)
        if failure is not None:
            raise failure

    def drop(self) -> None:
        """Close the shard and delete its folder from disk; a second call does nothing.

        The folder is first renamed to a sibling ``<name>.dropping`` (one atomic step)
        and then deleted, so ``path`` is either the whole shard or absent, never a
        half-deleted one that a later ``open`` would fail to load. A ``.dropping``
        folder left by a crash is removed by the next ``drop`` of a store at the same
        path. Raises ``StoreError`` when the store was closed with ``close`` (another
        process may hold the shard by now) or when the folder cannot be renamed or
        deleted; calling ``drop`` again then retries the deletion.
        """
        if self._dropped:
            # Never delete again: a new shard may have been created at this path since.
            return
        if self._shard is not None:
            shard, self._shard = self._shard, None
            self._deleting = True
            # No flush: the data is going. Closing releases the WAL lock and the maps.
            # A close failure is ignored: the files go anyway (Linux deletes open and
            # mapped files fine, and the lock goes with them), so the disk is freed.
            with contextlib.suppress(Exception):
                shard.close()
        elif not self._deleting:
            raise StoreError(f"index at {self.path} is closed; open it again to drop it")
        tomb = self.path.with_name(self.path.name + DROPPING_SUFFIX)
        try:
            # On a retry after the rename, whatever is at ``path`` now is someone
            # else's new shard: only the tomb is still ours to delete.
            if not self._moved:
                if tomb.exists():
                    shutil.rmtree(tomb)  # an earlier drop at this path did not finish
                if self.path.exists():
                    self.path.rename(tomb)
                self._moved = True
            if tomb.exists():
                shutil.rmtree(tomb)
        except OSError as exc:
            raise StoreError(f"deleting the index at {self.path} failed: {exc}") from exc
        self._dropped = True

    # -- helpers -----------------------------------------------------------------------

    def _open_shard(self) -> qe.EdgeShard:
        if self._shard is None:
            state = "dropped" if self._deleting else "closed"
            raise StoreError(f"index at {self.path} is {state}")
        return self._shard

    def _check_dim(self, vector: Sequence[float], what: str) -> None:
        check_dim(vector, self.dim, what, f"the index at {self.path}")

    def _error(self, action: str, exc: Exception) -> StoreError:
        return StoreError(f"{action} failed on index at {self.path}: {exc}")

    def _dense_query(self, vector: Sequence[float]) -> qe.Query:
        return qe.Query.Nearest([float(x) for x in vector],
                                using=DENSE_VECTOR if self.hybrid else None)

    def _vectors(self, p: PointRecord) -> qe.Vector:
        dense = [float(x) for x in p.vector]
        if not self.hybrid:
            return dense
        sv = check_sparse(p.sparse, f"sparse vector of point {p.id}") if p.sparse else None
        # An empty sparse vector rather than none, so every point of a hybrid shard
        # has both vectors (the engine scores it 0 and leaves it out of the IDF count).
        sparse = qe.SparseVector(sv.indices, sv.values) if sv else qe.SparseVector([], [])
        return {DENSE_VECTOR: dense, SPARSE_VECTOR: sparse}

    def _ensure_payload_indexes(self) -> None:
        shard = self._open_shard()
        try:
            present = set(shard.info().payload_schema)
            for name in _KEYWORD_FIELDS:
                if name in present:
                    continue
                # No payload-aware HNSW links: per-file values are too small to use
                # them, and they would lengthen every GIL-holding build.
                params = qe.KeywordIndexParams(prefix=name == "path", enable_hnsw=False)
                shard.update(qe.UpdateOperation.create_field_index(name, params))
        except Exception as exc:
            raise self._error("payload index creation", exc) from exc


def _filter(root: str | None, path_prefix: str | None, exts: list[str]) -> qe.Filter | None:
    must: list[qe.ConditionType] = []
    if root is not None:
        must.append(qe.FieldCondition(key="root", match=qe.MatchValue(root)))
    if path_prefix:
        must.append(qe.FieldCondition(key="path", match=qe.MatchPrefix(path_prefix)))
    if exts:
        must.append(qe.FieldCondition(key="ext", match=qe.MatchAny(exts)))
    return qe.Filter(must=must) if must else None


def _dense(vector: Any, name: str) -> list[float]:
    # An unnamed vector comes back as a list (or a dict keyed by ""); a named one, in
    # a dict with the sparse vector.
    if isinstance(vector, dict):
        vector = vector.get(name)
    if not isinstance(vector, list):
        raise StoreError(f"unexpected vector from the engine: {type(vector).__name__}")
    return [float(x) for x in vector]


def _sparse(vector: Any) -> SparseVec | None:
    sv = vector.get(SPARSE_VECTOR) if isinstance(vector, dict) else None
    if sv is None:
        return None
    return SparseVec([int(i) for i in sv.indices], [float(v) for v in sv.values])


def _in_request_order(ids: Sequence[str], by_id: dict[str, PointRecord]) -> list[PointRecord]:
    out: list[PointRecord] = []
    seen: set[str] = set()
    for raw in ids:
        key = _canonical(raw)
        rec = by_id.get(key)
        if rec is not None and key not in seen:
            seen.add(key)
            out.append(rec)
    return out


def _canonical(point_id: str) -> str:
    try:
        return str(uuid.UUID(point_id))
    except ValueError:
        return point_id


def _remove_stale_builds(path: Path) -> None:
    """Delete what a build killed mid-way left in the shard's ``temp_segments``.

    The optimizer assembles a new segment there and only then swaps it in, so the old
    segments stay whole and nothing is lost when the process dies mid-build (kill -9, a
    replica stopped busy): but Edge never removes the half-built segment, neither when
    it loads the shard nor at the next build, and each one holds up to a segment's
    worth of disk (~200 MB at 65,536 points of 384 floats). Called right after the
    load, when this process holds the shard and no build can be running.
    """
    temp = path / TEMP_SEGMENTS
    try:
        stale = list(temp.iterdir()) if temp.is_dir() else []
    except OSError:
        return
    for entry in stale:
        try:
            size = disk_bytes(entry)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:  # left for the next open; never a reason not to serve
            log.warning("store_stale_build_kept", path=str(entry), error=str(exc))
            continue
        log.info("store_stale_build_removed", path=str(entry), bytes=size)


def disk_bytes(path: Path) -> int:
    """Bytes on disk under ``path`` (a folder or a file): allocated blocks, not sizes,
    since Edge preallocates its files sparse (32 MiB pages, mostly holes). 0 when there
    is nothing there (a server collection's location); a file vanishing meanwhile counts
    0."""
    if not path.is_dir():
        try:
            return path.lstat().st_blocks * 512
        except OSError:
            return 0
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).lstat().st_blocks * 512
    return total


def shard_exists(path: Path) -> bool:
    """Whether ``path`` holds an Edge shard (its config file or any segment)."""
    # Edge writes edge_config.json at creation; segments alone are enough to load.
    segments = path / "segments"
    return (path / _EDGE_CONFIG_FILE).exists() or (
        segments.is_dir() and any(segments.iterdir())
    )


def _layout_name(hybrid: bool) -> str:
    return "hybrid" if hybrid else "dense-only"


def _layout_on_disk(path: Path) -> tuple[str, int | None] | None:
    """The layout (``dense-only``, ``hybrid`` or ``foreign``) and dense vector size the
    shard's config file records; None when it cannot be read."""
    # Best effort: the file is Edge's own; when unreadable, load() validates anyway.
    try:
        data = json.loads((path / _EDGE_CONFIG_FILE).read_text(encoding="utf-8"))
        vectors = data["vectors"]
        sparse = data.get("sparse_vectors") or {}
        if set(vectors) == {""} and not sparse:
            return "dense-only", int(vectors[""]["size"])
        if (set(vectors) == {DENSE_VECTOR} and set(sparse) == {SPARSE_VECTOR}
                and str(sparse[SPARSE_VECTOR].get("modifier", "")).lower() == "idf"):
            return "hybrid", int(vectors[DENSE_VECTOR]["size"])
        return "foreign", None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _layout_message(path: Path, on_disk: str, hybrid: bool) -> str:
    if on_disk == "foreign":
        return (f"index at {path} has vectors repd does not lay out (neither dense-only "
                "nor hybrid); it was not made by repd")
    return (f"index at {path} has the {on_disk} layout, but the {_layout_name(hybrid)} "
            "layout was asked for (a generation keeps the layout it was created with; "
            "changing it needs a new index generation)")


def _dim_message(path: Path, on_disk: int, dim: int) -> str:
    return (f"index at {path} holds vectors of size {on_disk}, but {dim} were asked for "
            "(a different model needs a new index generation)")


def _open_error(path: Path, dim: int, hybrid: bool, exc: Exception) -> StoreError:
    text = str(exc)
    # A second opener fails on the WAL's advisory lock: "Can't init WAL: Kind(WouldBlock)".
    if "WouldBlock" in text or "temporarily unavailable" in text:
        return StoreError(
            f"index at {path} is in use by another process (is a repd daemon running?)"
        )
    if "incompatible" in text and "vector size" in text:
        on_disk = _layout_on_disk(path)
        if on_disk is not None and on_disk[1] is not None:
            return StoreError(_dim_message(path, on_disk[1], dim))
        return StoreError(f"index at {path} holds vectors of another size than {dim}: {text}")
    # Without a readable config file the engine is the judge of the layout, as in
    # 'expected vector storage with key "dense" not found' or 'sparse vector modifier'.
    if "ncompatible" in text and ("key" in text or "sparse" in text):
        return StoreError(f"index at {path} does not have the {_layout_name(hybrid)} "
                          f"layout that was asked for: {text}")
    return StoreError(f"cannot open index at {path}: {text}")
