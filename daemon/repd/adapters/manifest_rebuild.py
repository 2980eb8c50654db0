"""Rebuilds a lost manifest from the store it described: points carry their own payload.

Every point holds ``root``, ``path``, ``ordinal``, ``start_line``/``end_line``,
``chunk_hash``, ``file_hash`` and ``mtime_ns``, and its vector. That is enough to write
back each file's row and chunk rows, and to refill the vector cache, so that the scan
after the rebuild confirms files by their content hash and embeds nothing.

The rebuilt rows are deliberately *unconfirmed* (size -1, no inode): the next scan
hashes every file once and keeps its points only when the content hash still matches.
A file whose points do not form one complete, consistent version (a write cut short by
the crash that also damaged the manifest) gets no rows: its points are then orphans,
which the start-up check deletes, and the scan writes the file again from the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from repd.adapters.manifest import ChunkRow, Generation, Manifest
from repd.adapters.store import Store
from repd.core.identity import StatSig, point_id

PAGE = 512


@dataclass
class RebuildStats:
    """What a rebuild recovered."""

    files: int = 0
    chunks: int = 0
    vectors: int = 0
    dropped_files: int = 0


@dataclass(frozen=True, slots=True)
class _Point:
    ordinal: int
    chunk_hash: str
    id: str
    start_line: int
    end_line: int
    file_hash: str
    mtime_ns: int


def _point(pid: str, p: dict[str, Any]) -> tuple[tuple[str, str], _Point] | None:
    try:
        key = (str(p["root"]), str(p["path"]))
        return key, _Point(int(p["ordinal"]), str(p["chunk_hash"]), pid, int(p["start_line"]),
                           int(p["end_line"]), str(p["file_hash"]), int(p.get("mtime_ns", 0)))
    except (KeyError, TypeError, ValueError):
        return None  # not a point repd wrote: left to the orphan check


def _pages(store: Store) -> Iterator[list[str]]:
    page: list[str] = []
    for pid in store.iter_ids():
        page.append(pid)
        if len(page) == PAGE:
            yield page
            page = []
    if page:
        yield page


def _consistent(root: str, path: str, points: list[_Point]) -> bool:
    # One version of the file: one content hash, ordinals 0..n-1, and ids that are the
    # deterministic ids of exactly these chunks.
    if len({p.file_hash for p in points}) != 1:
        return False
    if [p.ordinal for p in points] != list(range(len(points))):
        return False
    return all(p.id == point_id(root, path, p.ordinal, p.chunk_hash) for p in points)


def rebuild_from_store(manifest: Manifest, store: Store, gen: Generation) -> RebuildStats:
    """Write ``gen`` and the rows of every file whose points ``store`` holds into an empty
    ``manifest``; refill the vector cache under ``gen.model_id``."""
    stats = RebuildStats()
    manifest.restore_generation(gen)
    files: dict[tuple[str, str], list[_Point]] = {}
    # Only the manifest is written meanwhile, so paging through the store is stable.
    for ids in _pages(store):
        vectors: list[tuple[str, np.ndarray]] = []
        for rec in store.retrieve(ids, with_vectors=True):
            found = _point(rec.id, rec.payload)
            if found is None:
                continue
            key, pt = found
            files.setdefault(key, []).append(pt)
            vectors.append((pt.chunk_hash, np.asarray(rec.vector, dtype=np.float32)))
        with manifest.transaction() as db:
            Manifest.put_vectors(db, gen.model_id, vectors)
        stats.vectors += len(vectors)
    with manifest.transaction() as db:
        for (root, path), points in files.items():
            points.sort(key=lambda p: p.ordinal)
            if not _consistent(root, path, points):
                stats.dropped_files += 1
                continue
            sig = StatSig(-1, points[0].mtime_ns, 0, 0)
            fid = Manifest.upsert_file(db, root, path, sig, points[0].file_hash, "indexed",
                                       None, None, 0)
            Manifest.replace_chunks(db, gen.id, fid, [
                ChunkRow(p.ordinal, p.chunk_hash, p.id, p.start_line, p.end_line)
                for p in points])
            Manifest.set_gen_file(db, gen.id, fid, points[0].file_hash, "indexed")
            stats.files += 1
            stats.chunks += len(points)
    return stats
