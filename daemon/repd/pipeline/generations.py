"""Generation handles and the registry that says which one answers queries.

A *generation* is the index built with one model: its manifest row, its store (a Qdrant
Edge shard or a server collection) and its embedder (model identity, tokenizer, vector
size). The registry holds the active generation and, during a migration, the building
one; both are published together as one frozen :class:`GenView`, so switching the
active generation is one reference assignment that every reader sees atomically: a
query takes the view once and is answered from exactly one generation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from repd.adapters.manifest import Generation
from repd.adapters.store import Store
from repd.core.types import SearchMode, SparseVec
from repd.log import get_logger

log = get_logger("generations")

_CHUNKER_TAG = ";chunker="


def current_vectors() -> str:
    """What new generations store per point: a named dense vector and a BM25 sparse vector
    made by today's encoder (its identity names every parameter), over chunks cut by
    today's chunker (``;chunker=N``, :data:`repd.core.chunking.CHUNKER_VERSION`).

    An active generation made otherwise (``dense``, another BM25 setting, an older
    chunker) is migrated to it, same model, at start: unchanged chunks' dense vectors
    come from the cache, so only chunks the new chunker cut differently are embedded."""
    from repd.adapters.lexical import default_encoder
    from repd.core.chunking import CHUNKER_VERSION

    return f"hybrid:{default_encoder().identity}{_CHUNKER_TAG}{CHUNKER_VERSION}"


def chunker_version(vectors: str) -> int:
    """The chunker version a generation's ``vectors`` record names (1 before it was kept)."""
    _, tag, version = vectors.rpartition(_CHUNKER_TAG)
    return int(version) if tag and version.isdigit() else 1


class EmbedderLike(Protocol):
    """What the pipeline needs of an embedder."""

    model_id: str
    max_tokens: int

    def count_tokens(self, texts: list[str]) -> list[int]: ...
    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class GenerationHandle:
    """One generation: its manifest row, its open store, and its model (loaded lazily).

    ``row`` is replaced (never mutated) when the generation's state changes.
    """

    def __init__(self, row: Generation, store: Store,
                 embedder: Callable[[], EmbedderLike]) -> None:
        self.row = row
        self.store = store
        self._factory = embedder
        self._embedder: EmbedderLike | None = None
        self._lock = threading.Lock()

    @property
    def id(self) -> int:
        """The generation's id."""
        return self.row.id

    @property
    def model_id(self) -> str:
        """The identity of the model the generation was built with (``name@digest``)."""
        return self.row.model_id

    @property
    def embedder(self) -> EmbedderLike:
        """The model, loaded on first use (at most once, whichever thread asks first)."""
        emb = self._embedder
        if emb is None:
            with self._lock:
                if self._embedder is None:
                    self._embedder = self._factory()
                emb = self._embedder
        return emb

    @property
    def loaded_embedder(self) -> EmbedderLike | None:
        """The model if loaded, else None (never loads it)."""
        return self._embedder

    def chunking_key(self) -> str:
        """Equal for two generations whose chunks are the same for every text: same
        tokenizer as it counts, same limit (the model's key) and same chunker version
        (recorded in the generation's row, so an index cut by an older chunker is
        re-cut by a migration instead of having its chunks copied)."""
        emb = self.embedder
        key = getattr(emb, "chunking_key", None)
        model_key = str(key) if key is not None else f"{emb.model_id}:{emb.max_tokens}"
        return f"{model_key}|chunker{chunker_version(self.row.vectors)}"

    def embed_query(self, text: str) -> list[float]:
        """The query's vector under this generation's model."""
        return [float(x) for x in self.embedder.embed([text])[0]]

    @property
    def hybrid(self) -> bool:
        """Whether the generation's points carry a BM25 sparse vector beside the dense one."""
        return self.row.hybrid

    def default_mode(self) -> SearchMode:
        """The retrieval mode a query gets unless it names one."""
        return "hybrid" if self.hybrid else "dense"

    def embed_sparse_query(self, text: str) -> SparseVec:
        """The query's BM25 vector (generations with sparse vectors only)."""
        from repd.adapters.lexical import default_encoder

        return default_encoder().embed_query(text)

    def with_row(self, row: Generation) -> None:
        """Take the generation's new manifest row (its state changed)."""
        self.row = row

    def release_model(self) -> None:
        """Drop the model (a retired generation keeps its store, not its memory)."""
        with self._lock:
            self._embedder = None


@dataclass(frozen=True)
class GenView:
    """Which generation answers queries and which one is being built, published as one."""

    active: GenerationHandle | None = None
    building: GenerationHandle | None = None
    #: Retired generations whose store is open (kept for a rollback until pruned).
    retired: tuple[GenerationHandle, ...] = ()

    def writing(self) -> list[GenerationHandle]:
        """The generations every live change is written to: active first."""
        return [h for h in (self.active, self.building) if h is not None]

    def all(self) -> list[GenerationHandle]:
        """Every open generation."""
        return [*self.writing(), *self.retired]


class Generations:
    """The registry. Only the worker thread changes it; any thread reads ``view``."""

    def __init__(self, view: GenView | None = None) -> None:
        self.view = view or GenView()

    @property
    def active(self) -> GenerationHandle | None:
        """The generation that answers queries."""
        return self.view.active

    def publish(self, **changes: Any) -> GenView:
        """Replace the view with one reference assignment (what readers see atomically)."""
        self.view = replace(self.view, **changes)
        return self.view

    def for_query(self, generation: int | None = None) -> GenerationHandle:
        """The generation a query names (None: the active one); LookupError if not open."""
        view = self.view  # once: the whole query uses this one view
        if generation is None:
            if view.active is None:
                raise LookupError("nothing is indexed yet")
            return view.active
        for handle in view.all():
            if handle.id == generation:
                return handle
        raise LookupError(f"generation {generation} is not open in this daemon (open: "
                          f"{', '.join(str(h.id) for h in view.all()) or 'none'})")

    def close(self) -> None:
        """Close every open store (at shutdown)."""
        view, self.view = self.view, GenView()
        for handle in view.all():
            try:
                handle.store.close()
            except Exception as exc:  # closing one must not keep the others open
                log.warning("store_close_failed", generation=handle.id, error=str(exc))
