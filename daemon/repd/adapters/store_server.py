"""The server store: a collection on a Qdrant server or cluster, and the generation alias."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from qdrant_client import QdrantClient, models

from repd.adapters.store import (
    DEFAULT_RRF_K,
    DENSE_VECTOR,
    SPARSE_VECTOR,
    SearchPlan,
    StoreError,
    check_dim,
    check_search,
    check_sparse,
)
from repd.core.types import Hit, PointRecord, SearchMode, SparseVec

#: Points per ``iter_ids`` page.
DEFAULT_PAGE_SIZE = 1024
#: Points per upsert request: keeps a request well under the server's 32 MiB body limit.
UPSERT_CHUNK = 512
# Without engine-side prefix matching, search pages through filtered results and keeps
# the paths that match, reading at most this many candidates.
_FALLBACK_SCAN_LIMIT = 20_000

#: Longest name ``collection_for`` gives (Qdrant allows 255).
MAX_COLLECTION_NAME = 200
_MAX_BASE = 100
_MAX_SLUG = 48
_NOT_NAME_CHARS = re.compile(r"[^a-z0-9_-]+")
_HEX8 = re.compile(r"[0-9a-f]{8}")
_LOCAL_INDEX_WARNING = "Payload indexes have no effect in the local Qdrant"


class ServerStore:
    """A ``Store`` over one collection.

    Two layouts, fixed when the collection is created: dense-only (``hybrid`` False:
    one unnamed cosine vector, the layout of every collection made before hybrid
    search) and hybrid (a cosine vector named ``"dense"`` plus a sparse vector
    ``"bm25"`` with the IDF modifier, so the server applies IDF over the collection at
    query time to the TF-saturated weights the documents carry). Hybrid search sends
    ``RrfQuery(rrf=Rrf(k=rrf_k, weights=...))``: ``k`` needs Qdrant 1.16 or later,
    ``weights`` (sent only when given) 1.17 or later; older servers refuse the query
    (``StoreError``). Dense and lexical search need neither.

    Every write waits for the server to apply it (``wait=True``). Vectors are stored
    L2-normalised, so ``retrieve`` gives back the normalised vector.

    ``path_prefix`` is matched in the engine (``MatchPrefix`` on a keyword index with
    the prefix option, Qdrant 1.19+). On an older server, which rejects that index,
    the store notices at start and filters prefixes itself: it pages through the
    ``root``- and ``exts``-filtered results, best first, keeping matching paths, and
    reads at most 20,000 candidates, so a very rare prefix may then come back with
    fewer hits (in hybrid mode the prefetches then also run without the prefix, so
    the fused candidates are those of the whole root).

    ``collection`` must be a collection's own name, not an alias (see ``alias_target``;
    ``collection_for`` names a generation's collection).
    The client belongs to the caller unless ``owns_client`` is set, in which case
    ``close`` closes it.
    """

    #: The server syncs in its own process (local mode has nothing to sync).
    flush_holds_gil = False

    def __init__(
        self,
        client: QdrantClient,
        collection: str,
        dim: int,
        *,
        hybrid: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
        owns_client: bool = False,
    ) -> None:
        """Use ``collection``, creating it (cosine, ``dim`` floats, the layout
        ``hybrid`` asks for) and its payload indexes if absent.

        Raises ``StoreError`` when the collection holds vectors of another size,
        another kind or the other layout, or when the server cannot be reached or
        refuses.
        """
        if dim <= 0:
            raise StoreError(f"vector size must be positive, not {dim}")
        self.dim = dim
        self.hybrid = hybrid
        self.collection = collection
        self.page_size = page_size
        self._client: QdrantClient | None = client
        self._owns_client = owns_client
        self._prefix_in_engine = True
        self._dropped = False
        self._ensure_collection(client)
        self._ensure_payload_indexes(client)

    # -- Store -------------------------------------------------------------------------

    def upsert(self, points: Sequence[PointRecord]) -> None:
        """Insert or overwrite points by id; returns once the server applied them.

        Hybrid: each point's ``sparse`` vector is written too, an empty one when it is
        None. A dense-only collection ignores ``sparse``.
        """
        for p in points:
            self._check_dim(p.vector, f"point {p.id}")
        vectors = [self._vectors(p) for p in points]  # every check before any write
        client = self._open_client()
        for k in range(0, len(points), UPSERT_CHUNK):
            batch = [
                models.PointStruct(id=p.id, vector=v, payload=dict(p.payload))
                for p, v in zip(points[k : k + UPSERT_CHUNK], vectors[k : k + UPSERT_CHUNK],
                                strict=True)
            ]
            try:
                client.upsert(self.collection, points=batch, wait=True)
            except Exception as exc:
                raise self._error("upsert", exc) from exc

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id; unknown ids are ignored."""
        if not ids:
            return
        client = self._open_client()
        selector = models.PointIdsList(points=list(ids))
        try:
            client.delete(self.collection, points_selector=selector, wait=True)
        except Exception as exc:
            raise self._error("delete", exc) from exc

    def flush(self) -> None:
        """Nothing to do: every write already waited for the server (``wait=True``).

        What survives a crash of the server itself is the server's business: it has
        the write in its WAL, and syncs it to disk on its own schedule; a replicated
        cluster keeps it on every replica the write consistency factor asks for.
        """
        self._open_client()

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
        """The best points by ``mode``, best first; filters run on the server.

        Semantics as in ``Store.search``. ``path_prefix`` is a plain string prefix, so
        ``"src"`` also matches ``"src2/x"`` (see the class doc for servers without
        prefix matching); ``exts`` is ``MatchAny`` on ``ext``. Hybrid is one
        ``query_points`` call: two ``Prefetch`` (each filtered) fused by ``RrfQuery``,
        the filter also applied to the fused result.
        """
        plan = check_search(hybrid=self.hybrid, where=f"collection {self.collection!r}",
                            limit=limit, exts=exts, sparse=sparse, mode=mode, rrf_k=rrf_k,
                            weights=weights, prefetch=prefetch)
        if plan.mode != "lexical":
            self._check_dim(vector, "query vector")
        if limit <= 0:
            return []
        if path_prefix and not self._prefix_in_engine:
            return self._search_prefix_in_python(plan, vector, limit, root, path_prefix)
        flt = _filter(root, path_prefix, plan.exts)
        points = self._query(self._request(plan, vector, flt, plan.prefetch), limit, 0, flt)
        return [_hit(p) for p in points]

    def retrieve(self, ids: Sequence[str], *, with_vectors: bool = True) -> list[PointRecord]:
        """Points by id, in the order asked (missing ids left out, duplicates once).

        Without ``with_vectors`` the records carry an empty vector and no sparse one.
        """
        if not ids:
            return []
        client = self._open_client()
        try:
            records = client.retrieve(
                self.collection, ids=list(ids), with_payload=True, with_vectors=with_vectors
            )
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
        out: list[PointRecord] = []
        seen: set[str] = set()
        for raw in ids:
            key = _canonical(raw)
            rec = by_id.get(key)
            if rec is not None and key not in seen:
                seen.add(key)
                out.append(rec)
        return out

    def iter_ids(self) -> Iterator[str]:
        """Every point id, paging through ``scroll`` (not a snapshot under writes)."""
        offset: Any = None
        while True:
            client = self._open_client()
            try:
                records, offset = client.scroll(
                    self.collection,
                    limit=self.page_size,
                    offset=offset,
                    with_payload=False,
                    with_vectors=False,
                )
            except Exception as exc:
                raise self._error("scroll", exc) from exc
            for r in records:
                yield str(r.id)
            if offset is None or not records:
                return

    def count(self) -> int:
        """Exact number of points."""
        client = self._open_client()
        try:
            return int(client.count(self.collection, exact=True).count)
        except Exception as exc:
            raise self._error("count", exc) from exc

    def info(self) -> dict[str, object]:
        """Points, HNSW-indexed vectors, segments, whether any HNSW is built, the
        collection's status (green, yellow while optimizing, grey, red) and layout.

        Hybrid: the server counts every non-empty sparse vector as indexed (its segments
        sum the indexed vectors of every vector name, as Edge's do), so the points
        holding a sparse vector are subtracted; empty ones make it a slight
        underestimate.
        """
        client = self._open_client()
        try:
            c = client.get_collection(self.collection)
            indexed = int(c.indexed_vectors_count or 0)
            if self.hybrid:
                has_sparse = models.Filter(
                    must=[models.HasVectorCondition(has_vector=SPARSE_VECTOR)])
                with_sparse = client.count(self.collection, count_filter=has_sparse,
                                           exact=True).count
                indexed = max(0, indexed - int(with_sparse))
        except Exception as exc:
            raise self._error("info", exc) from exc
        status = c.status.value if hasattr(c.status, "value") else str(c.status)
        return {
            "backend": "server",
            "location": self.collection,
            "points": int(c.points_count or 0),
            "indexed_vectors": indexed,
            "segments": int(c.segments_count or 0),
            "hnsw_built": indexed > 0,
            "status": status,
            "hybrid": self.hybrid,
        }

    def maybe_build_index(self, *, backlog: int | None = None) -> bool:
        """Always False: the server's own optimizers build HNSW in the background."""
        self._open_client()
        return False

    def close(self) -> None:
        """Stop using the collection; close the client only if this store owns it."""
        client, self._client = self._client, None
        if client is None or not self._owns_client:
            return
        try:
            client.close()
        except Exception as exc:
            raise self._error("close", exc) from exc

    def drop(self) -> None:
        """Delete the collection on the server, then close the client if this store
        owns it; a second call does nothing.

        The server also deletes every alias that points at the collection, so move
        the generation alias elsewhere first (``set_alias``) unless it is meant to go.
        A collection that is already gone counts as dropped. Raises ``StoreError`` when
        the store was closed with ``close`` or the server refuses; the store stays open
        then, and ``drop`` may be called again.
        """
        if self._dropped:
            return
        client = self._open_client()
        try:
            client.delete_collection(self.collection)
        except Exception as exc:
            # A timeout may hide a deletion that went through: only then is it fine.
            if _collection_exists(client, self.collection) is not False:
                raise self._error("drop", exc) from exc
        self._dropped = True
        self._client = None
        if self._owns_client:
            try:
                client.close()
            except Exception as exc:
                raise self._error("close after drop", exc) from exc

    # -- helpers -----------------------------------------------------------------------

    def _open_client(self) -> QdrantClient:
        if self._client is None:
            state = "dropped" if self._dropped else "closed"
            raise StoreError(f"collection {self.collection!r} is {state}")
        return self._client

    def _check_dim(self, vector: Sequence[float], what: str) -> None:
        check_dim(vector, self.dim, what, f"collection {self.collection!r}")

    def _error(self, action: str, exc: Exception) -> StoreError:
        return StoreError(f"{action} failed on collection {self.collection!r}: {exc}")

    def _vectors(self, p: PointRecord) -> models.VectorStruct:
        dense = [float(x) for x in p.vector]
        if not self.hybrid:
            return dense
        sv = check_sparse(p.sparse, f"sparse vector of point {p.id}") if p.sparse else None
        # An empty sparse vector rather than none, so every point of a hybrid
        # collection has both vectors.
        sparse = models.SparseVector(indices=sv.indices if sv else [],
                                     values=sv.values if sv else [])
        return {DENSE_VECTOR: dense, SPARSE_VECTOR: sparse}

    def _request(
        self, plan: SearchPlan, vector: Sequence[float], flt: models.Filter | None, depth: int
    ) -> dict[str, Any]:
        """``query_points`` arguments (query, using, prefetch) for ``plan``; each hybrid
        prefetch reads ``depth`` candidates, filtered by ``flt``."""
        if plan.sparse is None:  # dense
            return {"query": [float(x) for x in vector],
                    "using": DENSE_VECTOR if self.hybrid else None}
        sparse = models.SparseVector(indices=plan.sparse.indices, values=plan.sparse.values)
        if plan.mode == "lexical":
            return {"query": sparse, "using": SPARSE_VECTOR}
        weights = list(plan.weights) if plan.weights else None
        return {
            "prefetch": [
                models.Prefetch(query=[float(x) for x in vector], using=DENSE_VECTOR,
                                limit=depth, filter=flt),
                models.Prefetch(query=sparse, using=SPARSE_VECTOR, limit=depth, filter=flt),
            ],
            # Always the parametrized form: the plain Fusion.RRF uses the server's
            # default k (2), which would score differently from Edge's Fusion.Rrf.
            "query": models.RrfQuery(rrf=models.Rrf(k=plan.rrf_k, weights=weights)),
        }

    def _query(
        self, request: dict[str, Any], limit: int, offset: int, flt: models.Filter | None
    ) -> list[models.ScoredPoint]:
        client = self._open_client()
        try:
            return client.query_points(
                self.collection,
                **request,
                limit=limit,
                offset=offset,
                query_filter=flt,
                with_payload=True,
                with_vectors=False,
            ).points
        except Exception as exc:
            raise self._error("search", exc) from exc

    def _search_prefix_in_python(
        self, plan: SearchPlan, vector: Sequence[float], limit: int, root: str | None,
        prefix: str,
    ) -> list[Hit]:
        flt = _filter(root, None, plan.exts)
        page = max(4 * limit, 64)
        hits: list[Hit] = []
        for offset in range(0, _FALLBACK_SCAN_LIMIT, page):
            # Prefetches must reach past the page being read (the offset applies to
            # the fused list only).
            request = self._request(plan, vector, flt, max(plan.prefetch, offset + page))
            points = self._query(request, page, offset, flt)
            hits += [_hit(p) for p in points if _path_of(p).startswith(prefix)]
            if len(hits) >= limit or len(points) < page:
                break
        return hits[:limit]

    def _ensure_collection(self, client: QdrantClient) -> None:
        dense = models.VectorParams(size=self.dim, distance=models.Distance.COSINE)
        try:
            if not client.collection_exists(self.collection):
                try:
                    if self.hybrid:
                        client.create_collection(
                            self.collection,
                            vectors_config={DENSE_VECTOR: dense},
                            sparse_vectors_config={SPARSE_VECTOR: models.SparseVectorParams(
                                modifier=models.Modifier.IDF)},
                        )
                    else:
                        client.create_collection(self.collection, vectors_config=dense)
                except Exception:
                    # Another creator may have won the race; only then is it fine.
                    if not client.collection_exists(self.collection):
                        raise
            config = client.get_collection(self.collection).config.params
        except Exception as exc:
            raise self._error("opening", exc) from exc
        layout, params = _layout_of(config)
        if params is None:
            raise StoreError(f"collection {self.collection!r} has {layout}, which repd does "
                             "not lay out; it was not made by repd")
        if layout != _layout_name(self.hybrid):
            raise StoreError(
                f"collection {self.collection!r} has the {layout} layout, but the "
                f"{_layout_name(self.hybrid)} layout was asked for (a generation keeps the "
                "layout it was created with; changing it needs a new index generation)"
            )
        if params.size != self.dim:
            raise StoreError(
                f"collection {self.collection!r} holds vectors of size {params.size}, but "
                f"{self.dim} were asked for (a different model needs a new index generation)"
            )
        if params.distance != models.Distance.COSINE:
            raise StoreError(f"collection {self.collection!r} uses {params.distance.value} "
                             "distance, repd needs Cosine")

    def _ensure_payload_indexes(self, client: QdrantClient) -> None:
        try:
            schema = client.get_collection(self.collection).payload_schema or {}
        except Exception as exc:
            raise self._error("opening", exc) from exc
        # ``ext`` is indexed on old collections too: points without it are not in it.
        for name in ("root", "chunk_hash", "ext"):
            if name not in schema:
                self._create_index(client, name, models.PayloadSchemaType.KEYWORD)
        params = schema["path"].params if "path" in schema else None
        if isinstance(params, models.KeywordIndexParams) and params.prefix:
            return
        try:
            # Replaces a plain keyword index of an older server, once it knows prefixes.
            self._create_index(client, "path", models.KeywordIndexParams(
                type=models.KeywordIndexType.KEYWORD, prefix=True))
        except StoreError:
            # A server older than 1.19 knows no prefix option: index plain keywords
            # and match prefixes here instead.
            if "path" not in schema:
                self._create_index(client, "path", models.PayloadSchemaType.KEYWORD)
            self._prefix_in_engine = False

    def _create_index(
        self,
        client: QdrantClient,
        name: str,
        schema: models.KeywordIndexParams | models.PayloadSchemaType,
    ) -> None:
        try:
            with warnings.catch_warnings():
                # qdrant-client's local mode (tests) warns that it ignores payload indexes.
                warnings.filterwarnings("ignore", message=_LOCAL_INDEX_WARNING)
                client.create_payload_index(
                    self.collection, field_name=name, field_schema=schema, wait=True
                )
        except Exception as exc:
            raise self._error(f"creating the payload index on {name!r}", exc) from exc


def collection_for(base: str, model_name: str, model_id: str, gen_id: int) -> str:
    """The collection name of generation ``gen_id``: ``{base}-{slug}-{digest8}-g{gen_id}``.

    ``slug`` is the last path component of ``model_name`` in lowercase ASCII
    (``sentence-transformers/all-MiniLM-L6-v2`` gives ``all-minilm-l6-v2``); ``digest8``
    is the first 8 hex digits after the ``@`` of ``model_id`` (``name@0123456789abcdef``),
    or of a BLAKE2b hash of the whole ``model_id`` when it has no hex digest. The
    result is deterministic, holds only ``[a-z0-9_-]`` and has at most
    ``MAX_COLLECTION_NAME`` characters, so it is a valid name on any Qdrant server.
    ``base`` (the alias, usually) is cleaned the same way and cut to 100 characters;
    the name always differs from ``base`` itself, so it never clashes with an alias
    called ``base`` (the server refuses a collection and an alias of one name).
    Raises ``ValueError`` for a negative ``gen_id`` (or one of over 40 digits).
    """
    if gen_id < 0:
        raise ValueError(f"generation id must not be negative, not {gen_id}")
    head = _slug(base, _MAX_BASE) or "repd"
    slug = _slug(model_name.replace("\\", "/").rstrip("/").rpartition("/")[2], _MAX_SLUG)
    name = f"{head}-{slug or 'model'}-{_digest8(model_id)}-g{gen_id}"
    # The parts are cut so that only a gen_id of over 40 digits can pass the bound.
    if len(name) > MAX_COLLECTION_NAME:
        raise ValueError(f"generation id {gen_id} makes a collection name too long")
    return name


def _slug(text: str, limit: int) -> str:
    # NFKD splits accented letters into letter + mark, so "é" keeps its "e"; what is
    # still not ASCII goes, and each run of other characters becomes one dash.
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = _NOT_NAME_CHARS.sub("-", ascii_text.lower()).strip("-_")
    return slug[:limit].rstrip("-_")


def _digest8(model_id: str) -> str:
    tail = model_id.rpartition("@")[2].strip().lower()
    if _HEX8.match(tail):
        return tail[:8]
    return hashlib.blake2b(model_id.encode("utf-8"), digest_size=4).hexdigest()


def set_alias(client: QdrantClient, alias: str, collection: str) -> None:
    """Point ``alias`` at ``collection`` in one atomic ``update_collection_aliases`` call.

    Readers that query the alias see the old collection or the new one, never neither.
    Raises ``StoreError`` if the collection does not exist or the server refuses.
    """
    try:
        if not client.collection_exists(collection):
            raise StoreError(f"cannot point alias {alias!r} at missing collection {collection!r}")
        current = alias_target(client, alias)
        if current == collection:
            return
        ops: list[models.CreateAliasOperation | models.DeleteAliasOperation] = []
        if current is not None:
            # The server refuses to delete an alias that does not exist, so only an
            # existing one is deleted, in the same call as the creation.
            ops.append(models.DeleteAliasOperation(
                delete_alias=models.DeleteAlias(alias_name=alias)))
        ops.append(models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
        client.update_collection_aliases(change_aliases_operations=ops)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"switching alias {alias!r} to {collection!r} failed: {exc}") from exc


def alias_target(client: QdrantClient, alias: str) -> str | None:
    """The collection ``alias`` points at, or None if there is no such alias.

    Raises ``StoreError`` when the server cannot be asked.
    """
    try:
        aliases = client.get_aliases().aliases
    except Exception as exc:
        raise StoreError(f"reading alias {alias!r} failed: {exc}") from exc
    for a in aliases:
        if a.alias_name == alias:
            return a.collection_name
    return None


#: The old name of ``alias_target``.
resolve_alias = alias_target


def _collection_exists(client: QdrantClient, collection: str) -> bool | None:
    # None when the server cannot tell (it is unreachable, say).
    try:
        return bool(client.collection_exists(collection))
    except Exception:
        return None


def _layout_name(hybrid: bool) -> str:
    return "hybrid" if hybrid else "dense-only"


def _layout_of(config: models.CollectionParams) -> tuple[str, models.VectorParams | None]:
    """(layout name, dense vector params) of a collection; for one repd did not lay
    out, (a description of its vectors, None)."""
    vectors, sparse = config.vectors, config.sparse_vectors or {}
    if isinstance(vectors, models.VectorParams) and not sparse:
        return "dense-only", vectors
    if (isinstance(vectors, dict) and set(vectors) == {DENSE_VECTOR}
            and set(sparse) == {SPARSE_VECTOR}
            and sparse[SPARSE_VECTOR].modifier == models.Modifier.IDF):
        return "hybrid", vectors[DENSE_VECTOR]
    named = (f"named vectors {sorted(vectors)}" if isinstance(vectors, dict)
             else "an unnamed vector")
    if sparse:
        named += f" and sparse vectors {sorted(sparse)}"
    return named, None


def _filter(root: str | None, path_prefix: str | None, exts: list[str]) -> models.Filter | None:
    must: list[models.Condition] = []
    if root is not None:
        must.append(models.FieldCondition(key="root", match=models.MatchValue(value=root)))
    if path_prefix:
        must.append(
            models.FieldCondition(key="path", match=models.MatchPrefix(prefix=path_prefix))
        )
    if exts:
        must.append(models.FieldCondition(key="ext", match=models.MatchAny(any=exts)))
    return models.Filter(must=must) if must else None


def _path_of(p: models.ScoredPoint) -> str:
    return str((p.payload or {}).get("path", ""))


def _hit(p: models.ScoredPoint) -> Hit:
    return Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {}))


def _dense(vector: Any, name: str) -> list[float]:
    # An unnamed vector comes back as a list (or a dict keyed by ""); a named one, in
    # a dict with the sparse vector.
    if isinstance(vector, dict):
        vector = vector.get(name)
    if not isinstance(vector, list):
        raise StoreError(f"unexpected vector from the server: {type(vector).__name__}")
    return [float(x) for x in vector]


def _sparse(vector: Any) -> SparseVec | None:
    sv = vector.get(SPARSE_VECTOR) if isinstance(vector, dict) else None
    if not isinstance(sv, models.SparseVector):
        return None
    return SparseVec([int(i) for i in sv.indices], [float(v) for v in sv.values])


def _canonical(point_id: str) -> str:
    try:
        return str(uuid.UUID(point_id))
    except ValueError:
        return point_id
