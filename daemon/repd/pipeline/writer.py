"""The write protocol: the one place points reach a store, for live indexing and backfill alike.

Order for a group of files written to one or more generations (the crash-safety
invariant, docs/architecture.md):

  1. one transaction: an intent per (generation, file) naming every point id the write
     may touch (old and new);
  2. upsert the new points, delete the points no longer wanted, flush each store once;
  3. one transaction: the files' rows (when the active generation is written), each
     generation's chunk rows and file state, the backfill cursor, and the intents cleared.

A crash anywhere leaves intents; :func:`recover` deletes every point they name, forgets
those files' chunks in that generation and marks them dirty, and the next scan (or the
backfill) rebuilds them from the vector cache, so each store ends up exactly as a fresh
index would. Writing both generations of a migration in one group keeps them in step:
a file is committed in both or in neither.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from repd.adapters.manifest import ChunkRow, FileRow, Manifest
from repd.core.faults import crashpoint
from repd.core.identity import StatSig
from repd.core.types import PointRecord, SparseVec
from repd.log import get_logger
from repd.pipeline.generations import GenerationHandle
from repd.pipeline.plan import FilePlan
from repd.pipeline.stats import RunStats

log = get_logger("writer")

_STATES = {"index": "indexed", "skip": "skipped", "fail": "failed"}


@dataclass(frozen=True)
class GenWrite:
    """What one generation receives from a group: its plans and their vectors (and, for
    a generation with sparse vectors, the chunks' BM25 vectors)."""

    handle: GenerationHandle
    plans: Sequence[FilePlan]
    vectors: Mapping[str, np.ndarray]
    sparse: Mapping[str, SparseVec] | None = None


def write_group(manifest: Manifest, writes: Sequence[GenWrite], *, primary: bool,
                rows: Mapping[tuple[str, str], FileRow | None],
                before_flush: Callable[[], None] = lambda: None,
                cursor: tuple[int, str] | None = None) -> RunStats:
    """Write a group crash-safely into every generation of ``writes``.

    ``primary``: ``writes[0]`` is the active generation, whose plans also decide the
    files' rows; otherwise (a backfill) only the generations' own rows change. ``rows``
    are the files' rows as read before the group was planned. ``cursor`` (generation
    id, position) is saved in the same transaction as the rows it covers.
    """
    stats = RunStats()
    staged: list[tuple[GenWrite, list[PointRecord], list[str]]] = []
    intents: list[tuple[int, FilePlan, list[str]]] = []
    for w in writes:
        points: list[PointRecord] = []
        stale: list[str] = []
        for p in w.plans:
            if p.action == "touch":
                continue
            row = rows.get((p.root, p.relpath))
            old_ids = [c.point_id for c in manifest.chunks(w.handle.id, row.id)] if row else []
            new_ids = p.point_ids if p.action == "index" else []
            if old_ids or new_ids:
                intents.append((w.handle.id, p, old_ids + new_ids))
            stale.extend(set(old_ids) - set(new_ids))
            ext = file_ext(p.relpath)
            for c, pid in zip(p.chunks, new_ids, strict=True):
                points.append(PointRecord(pid, w.vectors[c.hash].tolist(), {
                    "root": p.root, "path": p.relpath, "ext": ext, "ordinal": c.ordinal,
                    "start_line": c.start_line, "end_line": c.end_line,
                    "chunk_hash": c.hash, "file_hash": p.content_hash,
                    "mtime_ns": p.sig.mtime_ns, "text": c.text},
                    w.sparse.get(c.hash) if w.sparse is not None else None))
        staged.append((w, points, stale))

    intent_ids: list[int] = []
    with manifest.transaction() as db:
        for gen_id, p, ids in intents:
            intent_ids.append(Manifest.add_intent(db, gen_id, p.root, p.relpath, ids))
    crashpoint("intent")
    for w, points, _ in staged:
        if points:
            w.handle.store.upsert(points)
    crashpoint("upsert")
    for w, _, stale in staged:
        if stale:
            w.handle.store.delete(stale)
    crashpoint("delete")
    changed = [w for w, points, stale in staged if points or stale]
    if changed:
        # The new points already answer queries; an in-process Edge shard's flush holds
        # the GIL for its disk syncs (100-200 ms), freezing every API thread. Readers
        # first (a store process or a server holds no GIL of ours).
        if any(w.handle.store.flush_holds_gil for w in changed):
            before_flush()
        # One flush per store for the group: the intents cover upserts and deletes alike,
        # and nothing is marked done before this returns.
        for w in changed:
            w.handle.store.flush()
    for _, points, stale in staged:
        stats.points_written += len(points)
        stats.points_deleted += len(stale)

    with manifest.transaction() as db:
        file_ids: dict[tuple[str, str], int] = {
            key: row.id for key, row in rows.items() if row is not None}
        if primary and writes:
            _commit_files(db, writes[0].plans, rows, file_ids, stats)
        for i, w in enumerate(writes):
            counted = not primary  # a backfill reports its own files
            for p in w.plans:
                fid = file_ids.get((p.root, p.relpath))
                if fid is None or p.action == "touch":
                    continue
                if p.action == "delete":
                    Manifest.drop_gen_file(db, w.handle.id, fid)
                    continue
                Manifest.replace_chunks(db, w.handle.id, fid, [
                    ChunkRow(c.ordinal, c.hash, pid, c.start_line, c.end_line)
                    for c, pid in zip(p.chunks, p.point_ids, strict=True)])
                Manifest.set_gen_file(db, w.handle.id, fid, p.content_hash, _STATES[p.action])
                if counted and i == 0:
                    _count(stats, p)
        if cursor is not None:
            Manifest.set_cursor(db, cursor[0], cursor[1])
        Manifest.clear_intents(db, intent_ids)
    crashpoint("commit")
    return stats


def _commit_files(db: sqlite3.Connection, plans: Sequence[FilePlan],
                  rows: Mapping[tuple[str, str], FileRow | None],
                  file_ids: dict[tuple[str, str], int], stats: RunStats) -> None:
    """The files' rows, as the active generation's plans decide them."""
    touched: list[tuple[int, StatSig, int]] = []
    for p in plans:
        key = (p.root, p.relpath)
        row = rows.get(key)
        if p.action == "touch":
            if row is not None:
                touched.append((row.id, p.sig, p.started_ns))
                stats.unchanged += 1
        elif p.action == "delete":
            if row is not None:
                Manifest.delete_file(db, row.id)
                stats.deleted += 1
        else:
            file_ids[key] = Manifest.upsert_file(
                db, p.root, p.relpath, p.sig, p.content_hash, _STATES[p.action], p.reason,
                p.detail, p.started_ns)
            _count(stats, p)
    db.executemany(
        "UPDATE files SET size=?, mtime_ns=?, inode=?, ctime_ns=?, indexed_at_ns=? WHERE id=?",
        [(s.size, s.mtime_ns, s.inode, s.ctime_ns, at, fid) for fid, s, at in touched])


def file_ext(relpath: str) -> str:
    """The payload's ``ext``: the lower-cased extension with its dot, "" for none
    (``--path '**/*.py'`` is filtered on it inside the store)."""
    name = relpath.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _count(stats: RunStats, p: FilePlan) -> None:
    if p.action == "index":
        stats.indexed += 1
    elif p.action == "skip":
        stats.skipped[p.reason or "unknown"] += 1
    elif p.action == "fail":
        stats.failed += 1


# -- recovery ---------------------------------------------------------------------------

def recover(manifest: Manifest, handle: GenerationHandle, *, primary: bool) -> int:
    """Undo every write a crash left half done in one generation; returns files affected.

    Also checks that the store holds exactly the manifest's points, and repairs it when
    it does not (deleting orphans, marking files whose points went missing).
    """
    intents = [i for i in manifest.intents() if i.gen_id == handle.id]
    if intents:
        ids = sorted({pid for i in intents for pid in i.point_ids})
        handle.store.delete(ids)
        handle.store.flush()
        with manifest.transaction() as db:
            for it in intents:
                row = db.execute("SELECT id FROM files WHERE root=? AND path=?",
                                 (it.root, it.path)).fetchone()
                if row is not None:
                    Manifest.mark_dirty(db, handle.id, int(row[0]), primary=primary)
            Manifest.clear_intents(db, [i.id for i in intents])
        log.warning("recovered_interrupted_writes", generation=handle.id, files=len(intents),
                    points=len(ids))
    if intents or handle.store.count() != manifest.chunk_count(handle.id):
        verify(manifest, handle, primary=primary)
    return len(intents)


def verify(manifest: Manifest, handle: GenerationHandle, *, primary: bool) -> tuple[int, int]:
    """Make a store's point ids equal the manifest's: (orphans deleted, files marked)."""
    wanted = manifest.point_ids(handle.id)
    present = set(handle.store.iter_ids())
    orphans = sorted(present - wanted)
    if orphans:
        handle.store.delete(orphans)
        handle.store.flush()
    missing = wanted - present
    files = manifest.files_with_points(handle.id, missing) if missing else set()
    if files:
        with manifest.transaction() as db:
            for fid in files:
                Manifest.mark_dirty(db, handle.id, fid, primary=primary)
    if orphans or files:
        log.warning("store_repaired", generation=handle.id, orphans_deleted=len(orphans),
                    files_marked=len(files))
    return len(orphans), len(files)
