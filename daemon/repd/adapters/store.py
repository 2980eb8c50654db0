"""The store interface every vector backend (Qdrant Edge, Qdrant server) implements."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from repd.core.types import Hit, PointRecord


class StoreError(Exception):
    """A backend failure, translated at the adapter edge into repd's own exception."""


class Store(Protocol):
    """One generation's index: a Qdrant Edge shard or a server collection.

    Payload keys written by repd: ``root`` (str), ``path`` (str, relative to root,
    POSIX separators), ``ordinal`` (int), ``start_line`` / ``end_line`` (int),
    ``chunk_hash`` (str), ``file_hash`` (str), ``mtime_ns`` (int), ``text`` (str).
    Point ids are UUID strings.
    """

    dim: int

    def upsert(self, points: Sequence[PointRecord]) -> None:
        """Insert or overwrite points by id."""

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
    ) -> list[Hit]:
        """Nearest points by cosine similarity, with payload, best first.

        ``root`` keeps only points of that root; ``path_prefix`` keeps only paths
        starting with it (the caller applies full globs on top).
        """

    def retrieve(self, ids: Sequence[str], *, with_vectors: bool = True) -> list[PointRecord]:
        """Points by id (missing ids are left out)."""

    def iter_ids(self) -> Iterator[str]:
        """Every point id in the store (for consistency checks)."""

    def count(self) -> int:
        """Exact number of points."""

    def info(self) -> dict[str, object]:
        """Backend facts for status: points, indexed vectors, segments, index state."""

    def maybe_build_index(self) -> bool:
        """Build or refresh the ANN index when the store is large enough; True if it ran."""

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
