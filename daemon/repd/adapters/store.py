"""The store interface every vector backend (Qdrant Edge, Qdrant server) implements."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from repd.core.types import Hit, PointRecord, SearchMode, SparseVec

#: Name of the dense vector in the hybrid layout (the plain layout's is unnamed).
DENSE_VECTOR = "dense"
#: Name of the BM25 sparse vector in the hybrid layout (IDF modifier).
SPARSE_VECTOR = "bm25"
#: Default RRF constant. Qdrant scores rank r (1-based) of a list of weight w as
#: 1 / (k + r / w - 1), so the RRF paper's 1 / (60 + r) is k = 61 here.
DEFAULT_RRF_K = 60
#: Candidates each prefetch of a hybrid search reads when ``prefetch`` is not given
#: (never fewer than ``limit``).
DEFAULT_PREFETCH = 100
#: Sparse indices are u32 in Qdrant.
_MAX_SPARSE_INDEX = 2**32 - 1
_MODES = ("dense", "lexical", "hybrid")


class StoreError(Exception):
    """A backend failure, translated at the adapter edge into repd's own exception."""


class Store(Protocol):
    """One generation's index: a Qdrant Edge shard or a server collection.

    Payload keys written by repd: ``root`` (str), ``path`` (str, relative to root,
    POSIX separators), ``ordinal`` (int), ``start_line`` / ``end_line`` (int),
    ``chunk_hash`` (str), ``file_hash`` (str), ``mtime_ns`` (int), ``text`` (str),
    ``ext`` (str: the path's lower-cased extension with its dot, ``""`` for none;
    missing on points written before it existed). ``root``, ``path`` (prefix-capable
    where the engine allows), ``ext`` and ``chunk_hash`` have keyword indexes.
    Point ids are UUID strings.
    """

    dim: int
    #: The layout: False = one unnamed dense vector; True = a named dense vector
    #: ``"dense"`` plus a sparse vector ``"bm25"`` with the IDF modifier.
    hybrid: bool
    #: Whether ``flush`` holds the daemon's GIL while it syncs (an in-process Edge
    #: shard): the daemon's writer then gives queries in flight a moment first.
    flush_holds_gil: bool

    def upsert(self, points: Sequence[PointRecord]) -> None:
        """Insert or overwrite points by id.

        A hybrid store writes each point's ``sparse`` vector too (an empty one when it
        is None); a dense-only store has no place for it and ignores it. Raises
        ``StoreError`` for a dense vector of the wrong size or an invalid sparse one
        (see ``check_sparse``).
        """

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id; unknown ids are ignored."""

    def flush(self) -> None:
        """Make every acknowledged write durable on disk before returning."""

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
        """The best ``limit`` points with payload, best first (see ``check_search``).

        ``mode``: ``"dense"`` ranks by cosine similarity to ``vector``; ``"lexical"``
        by the dot product of ``sparse`` (query terms, weight 1.0 each) with the
        points' BM25 vectors, IDF applied by the engine over the whole store
        (``vector`` is not used then and may be empty); ``"hybrid"`` reads
        ``prefetch`` candidates by each and fuses them with Reciprocal Rank Fusion in
        the engine: score = sum over both lists of 1 / (rank / w + rrf_k - 1), rank
        1-based, w the list's weight from ``weights`` = (dense, sparse), 1.0 each by
        default. Lexical and hybrid need a hybrid store (else ``StoreError``).

        Filters run in the engine, in every mode and inside each prefetch: ``root``
        keeps only points of that root; ``path_prefix`` keeps only paths starting
        with it, a plain string prefix (the caller applies full globs on top);
        ``exts`` keeps only points whose payload ``ext`` (lower-cased extension with
        its dot, ``""`` for none) is one of them, compared lower-cased. Points
        written before ``ext`` existed have no ``ext`` and never match an ``exts``
        filter: the search layer leaves ``exts`` out for such generations, or falls
        back to filtering paths itself.
        """

    def retrieve(self, ids: Sequence[str], *, with_vectors: bool = True) -> list[PointRecord]:
        """Points by id (missing ids are left out).

        With ``with_vectors`` a record carries the dense vector in ``vector`` and, in a
        hybrid store, the sparse one in ``sparse`` (None when the point has none);
        without, ``vector`` is empty and ``sparse`` None.
        """

    def iter_ids(self) -> Iterator[str]:
        """Every point id in the store (for consistency checks)."""

    def count(self) -> int:
        """Exact number of points."""

    def info(self) -> dict[str, object]:
        """Backend facts for status: points, indexed vectors, segments, index state."""

    def maybe_build_index(self, *, backlog: int | None = None) -> bool:
        """Build or refresh the ANN index when the store is large enough; True if it ran.

        ``backlog``: only once at least this many points were written since the last
        build (a bulk write's backstop, so no single build grows with the write; stores
        that build in the background ignore it).
        """

    def close(self) -> None:
        """Release files and locks."""

    def drop(self) -> None:
        """Delete this generation's data for good: every point, index and file.

        The store is unusable afterwards (every call but ``close`` and ``drop`` raises
        ``StoreError``); a second ``drop`` does nothing. A store already closed with
        ``close`` cannot be dropped (``StoreError``): open it again first, so that no
        other process holds it while its data goes. Raises ``StoreError`` when the
        backend refuses; the data may then be partly gone, and ``drop`` on a freshly
        opened store at the same location finishes the job.
        """


@dataclass(frozen=True, slots=True)
class SearchPlan:
    """A search request checked and normalised by ``check_search``."""

    mode: SearchMode
    #: Sparse query: ascending distinct indices and their weights (lexical/hybrid).
    sparse: SparseVec | None
    #: Candidates per prefetch (hybrid only; at least ``limit``).
    prefetch: int
    rrf_k: int
    weights: tuple[float, float] | None
    #: Distinct lower-cased extensions; empty means any.
    exts: list[str]


def check_search(
    *,
    hybrid: bool,
    where: str,
    limit: int,
    exts: Sequence[str],
    sparse: SparseVec | None,
    mode: str,
    rrf_k: int,
    weights: tuple[float, float] | None,
    prefetch: int | None,
) -> SearchPlan:
    """Validate the search arguments every backend shares, raising ``StoreError``.

    ``where`` names the store in messages. Checked here, not by the engines, so both
    backends refuse the same requests with the same words (Edge would score a
    ``rrf_k`` of 0 as infinity and accepts duplicate sparse indices silently).
    """
    if mode not in _MODES:
        raise StoreError(f"unknown search mode {mode!r} (one of {', '.join(_MODES)})")
    if mode != "dense":
        if not hybrid:
            raise StoreError(
                f"this generation has no sparse vectors ({where} uses the dense-only "
                f"layout), so {mode} search is not possible; reindex into a hybrid "
                "generation"
            )
        if sparse is None:
            raise StoreError(f"{mode} search needs a sparse query vector")
    if rrf_k < 1:
        raise StoreError(f"rrf_k must be at least 1, not {rrf_k}")
    if weights is not None:
        if len(weights) != 2 or not all(math.isfinite(w) and w > 0 for w in weights):
            raise StoreError(f"weights must be two positive numbers (dense, sparse), "
                             f"not {weights!r}")
        weights = (float(weights[0]), float(weights[1]))
    if prefetch is not None and prefetch < 1:
        raise StoreError(f"prefetch must be at least 1, not {prefetch}")
    if isinstance(exts, str):
        # A lone ".py" would otherwise be read as the extensions ".", "p" and "y".
        raise StoreError(f"exts must be a sequence of extensions, not the string {exts!r}")
    return SearchPlan(
        mode=cast(SearchMode, mode),  # checked against _MODES above
        sparse=(check_sparse(sparse, "sparse query")
                if mode != "dense" and sparse is not None else None),
        prefetch=max(prefetch or DEFAULT_PREFETCH, limit),
        rrf_k=rrf_k,
        weights=weights,
        exts=list(dict.fromkeys(e.lower() for e in exts)),
    )


def check_dim(vector: Sequence[float], dim: int, what: str, where: str) -> None:
    """Raise ``StoreError`` unless ``vector`` has ``dim`` floats; ``where`` names the
    store in the message ("the index at PATH", "collection 'NAME'")."""
    if len(vector) != dim:
        raise StoreError(f"{what} has {len(vector)} floats, {where} holds {dim}")


def check_sparse(vec: SparseVec, what: str) -> SparseVec:
    """``vec`` sorted by index, after checking it is a valid Qdrant sparse vector.

    Raises ``StoreError`` for mismatched lengths, a repeated index, an index outside
    0..2**32-1 or a weight that is not finite. The Qdrant server and qdrant-client
    refuse repeated indices while Edge silently stores them, so they are refused
    here for every backend.
    """
    if len(vec.indices) != len(vec.values):
        raise StoreError(f"{what} has {len(vec.indices)} indices but {len(vec.values)} values")
    pairs = sorted(zip(vec.indices, vec.values, strict=True))
    for n, (i, v) in enumerate(pairs):
        if not 0 <= i <= _MAX_SPARSE_INDEX:
            raise StoreError(f"{what} has index {i} outside 0..{_MAX_SPARSE_INDEX}")
        if n and pairs[n - 1][0] == i:
            raise StoreError(f"{what} repeats index {i}")
        if not math.isfinite(v):
            raise StoreError(f"{what} has a weight that is not finite at index {i}")
    return SparseVec([int(i) for i, _ in pairs], [float(v) for _, v in pairs])
