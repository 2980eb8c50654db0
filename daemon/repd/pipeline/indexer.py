"""The indexing engine: finds what changed, embeds only new chunk texts, writes crash-safely.

Write order for a group of files (the invariant of the design notes):
  1. one transaction: cache the new vectors and record an intent per file naming every
     point id the write may touch (old and new);
  2. upsert the new points and flush; delete the points no longer wanted and flush;
  3. one transaction: commit the files' rows and chunk rows and clear their intents.
A crash anywhere leaves intents; ``recover`` deletes every point they name, forgets the
files' chunks and marks them dirty, and the next scan rebuilds them from the vector
cache (no embedding), so the store ends up exactly as a fresh index would.
"""

from __future__ import annotations

import stat as stat_mod
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from repd.adapters.manifest import ChunkRow, FileRow, Generation, Manifest
from repd.adapters.store import Store
from repd.core.faults import crashpoint
from repd.core.identity import StatSig, is_racy
from repd.core.ignore import IgnoreRules
from repd.core.types import PointRecord
from repd.log import get_logger
from repd.pipeline.plan import ZERO_SIG, FilePlan, Planner
from repd.pipeline.scanner import walk

log = get_logger("indexer")

# How much work one group holds before it is embedded and written: large enough that
# batches span many files (padding and per-call overhead stay low), small enough that
# memory stays bounded and progress is committed often.
GROUP_CHUNKS = 2048
GROUP_FILES = 512
# Vectors of chunk texts no file holds any more are kept up to this many, so undoing an
# edit or restoring a deleted file costs no embedding; past that, the surplus is dropped
# (in no particular order: SQLite keeps no last-use time for them).
VECTOR_CACHE_SPARE = 50_000


class EmbedderLike(Protocol):
    """What the engine needs of the embedder."""

    model_id: str
    max_tokens: int

    def count_tokens(self, texts: list[str]) -> list[int]: ...
    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class RunStats:
    """What one scan or batch did, for the CLI summary and the daemon's status."""

    seen: int = 0
    indexed: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    chunks_embedded: int = 0
    chunks_reused: int = 0
    points_written: int = 0
    points_deleted: int = 0
    seconds: float = 0.0

    def add(self, other: RunStats) -> None:
        """Accumulate another run's figures."""
        for name in ("seen", "indexed", "unchanged", "deleted", "failed", "chunks_embedded",
                     "chunks_reused", "points_written", "points_deleted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)
        self.seconds += other.seconds

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = {k: v for k, v in self.__dict__.items() if k != "skipped"}
        d["skipped"] = dict(self.skipped)
        return d


Progress = Callable[[int, int, RunStats], None]


class Indexer:
    """Owns the path from changed files to durable points for one generation."""

    def __init__(self, manifest: Manifest, store: Store, generation: Generation,
                 embedder: Callable[[], EmbedderLike], max_file_bytes: int,
                 follow_symlinks: bool = False) -> None:
        self.manifest = manifest
        self.store = store
        self.generation = generation
        self._embedder_factory = embedder
        self._embedder: EmbedderLike | None = None
        self._follow = follow_symlinks
        self.planner = Planner(max_file_bytes, self._tokenizer)
        self.stage = "idle"  # what the engine is doing right now, for status
        self.group_chunks = GROUP_CHUNKS
        # One-shot runs build HNSW as they go; the daemon does it when idle instead.
        self.build_index_inline = True
        self.group_files = GROUP_FILES
        self._lock = threading.Lock()  # one group is written at a time

    # -- model, loaded only once something really needs embedding -----------------------

    @property
    def embedder(self) -> EmbedderLike:
        """The embedder, loaded on first use."""
        if self._embedder is None:
            self._embedder = self._embedder_factory()
        return self._embedder

    def _tokenizer(self) -> tuple[Callable[[list[str]], list[int]], int]:
        emb = self.embedder
        return emb.count_tokens, emb.max_tokens

    # -- recovery ------------------------------------------------------------------------

    def recover(self) -> int:
        """Undo every write a crash left half done; returns the number of files affected.

        Also checks that the store holds exactly the manifest's points, and repairs it
        when it does not (deleting orphans, marking files whose points went missing).
        """
        intents = [i for i in self.manifest.intents() if i.gen_id == self.generation.id]
        if intents:
            ids = sorted({pid for i in intents for pid in i.point_ids})
            self.store.delete(ids)
            self.store.flush()
            with self.manifest.transaction() as db:
                for it in intents:
                    row = db.execute("SELECT id FROM files WHERE root=? AND path=?",
                                     (it.root, it.path)).fetchone()
                    if row is not None:
                        Manifest.mark_dirty(db, int(row[0]))
                Manifest.clear_intents(db, [i.id for i in intents])
            log.warning("recovered_interrupted_writes", files=len(intents), points=len(ids))
        if intents or self.store.count() != self.manifest.chunk_count(self.generation.id):
            self.verify_store()
        return len(intents)

    def verify_store(self) -> tuple[int, int]:
        """Make the store's point ids equal the manifest's: (orphans deleted, files marked)."""
        wanted = self.manifest.point_ids(self.generation.id)
        present = set(self.store.iter_ids())
        orphans = sorted(present - wanted)
        if orphans:
            self.store.delete(orphans)
            self.store.flush()
        missing = wanted - present
        files = self.manifest.files_with_points(self.generation.id, missing) if missing else set()
        if files:
            with self.manifest.transaction() as db:
                for fid in files:
                    Manifest.mark_dirty(db, fid)
        if orphans or files:
            log.warning("store_repaired", orphans_deleted=len(orphans), files_marked=len(files))
        return len(orphans), len(files)

    # -- scanning ------------------------------------------------------------------------

    def reconcile(self, root: Path, rules: IgnoreRules, subdir: str = "",
                  progress: Progress | None = None,
                  should_stop: Callable[[], bool] = lambda: False) -> RunStats:
        """Bring the index of ``root/subdir`` in line with the disk."""
        t0 = time.perf_counter()
        self.stage = "scanning"
        root_s = str(root)
        known = self.manifest.files_under(root_s, subdir)
        stats = RunStats()
        todo: list[str] = []
        skips: list[FilePlan] = []
        seen: set[str] = set()
        for entry in walk(root, rules, subdir, self._follow):
            seen.add(entry.relpath)
            stats.seen += 1
            row = known.get(entry.relpath)
            if entry.st is None:
                if row is None or row.state != "skipped" or row.reason != entry.skip_reason:
                    skips.append(FilePlan(root_s, entry.relpath, ZERO_SIG, time.time_ns(),
                                          "skip", reason=entry.skip_reason,
                                          detail=entry.skip_detail))
                else:
                    stats.skipped[entry.skip_reason or "unknown"] += 1
                continue
            if row is not None and self._unchanged(row, StatSig.of(entry.st)):
                stats.unchanged += 1
                if row.state == "skipped":
                    stats.skipped[row.reason or "unknown"] += 1
                continue
            todo.append(entry.relpath)
        gone = [FilePlan(root_s, p, ZERO_SIG, time.time_ns(), "delete")
                for p in known if p not in seen]
        total = len(todo)
        if skips or gone:
            stats.add(self._apply(skips + gone))
        if progress:
            progress(0, total, stats)
        self._run_paths(root, todo, known, stats, progress, should_stop)
        stats.seconds = time.perf_counter() - t0
        self.stage = "idle"
        return stats

    def process_paths(self, root: Path, rules: IgnoreRules, relpaths: Iterable[str],
                      should_stop: Callable[[], bool] = lambda: False) -> RunStats:
        """Index specific paths that an event named (they may be gone, or folders now)."""
        t0 = time.perf_counter()
        root_s = str(root)
        stats = RunStats()
        todo: list[str] = []
        known: dict[str, FileRow] = {}
        for rel in dict.fromkeys(relpaths):
            abs_path = root / rel
            try:
                st = abs_path.lstat()
            except FileNotFoundError:
                # Gone: the file itself, or a whole folder whose files the manifest knows.
                gone = self.manifest.files_under(root_s, rel)
                if gone:
                    stats.add(self._apply([FilePlan(root_s, p, ZERO_SIG, time.time_ns(),
                                                    "delete") for p in gone]))
                continue
            except OSError:
                st = None
            row = self.manifest.file(root_s, rel)
            if st is not None and stat_mod.S_ISDIR(st.st_mode):
                if row is not None:  # a file replaced by a folder
                    stats.add(self._apply([FilePlan(root_s, rel, ZERO_SIG, time.time_ns(),
                                                    "delete")]))
                stats.add(self.reconcile(root, rules, rel, should_stop=should_stop))
                continue
            is_link = st is not None and stat_mod.S_ISLNK(st.st_mode)
            if rules.is_ignored(rel, False):
                if row is not None:
                    stats.add(self._apply([FilePlan(root_s, rel, ZERO_SIG, time.time_ns(),
                                                    "delete")]))
                continue
            if is_link and not self._follow:  # recorded as the full scan records it
                if row is None or row.reason != "symlink":
                    stats.add(self._apply([FilePlan(
                        root_s, rel, ZERO_SIG, time.time_ns(), "skip", reason="symlink",
                        detail="symlinks are not followed")]))
                continue
            if row is not None:
                known[rel] = row
                if st is not None and not is_link and self._unchanged(row, StatSig.of(st)):
                    stats.unchanged += 1
                    continue
            todo.append(rel)
            stats.seen += 1
        self._run_paths(root, todo, known, stats, None, should_stop)
        stats.seconds = time.perf_counter() - t0
        return stats

    def prune_vector_cache(self, keep_unreferenced: int = VECTOR_CACHE_SPARE) -> int:
        """Bound the cache of vectors no chunk uses any more (kept for undo and moves)."""
        return self.manifest.prune_vectors(self.generation.model_id, keep_unreferenced)

    def drop_root(self, root: Path) -> RunStats:
        """Remove every file of a root from the index (the root left the config)."""
        rows = self.manifest.files_under(str(root))
        plans = [FilePlan(str(root), p, ZERO_SIG, time.time_ns(), "delete") for p in rows]
        stats = RunStats()
        for i in range(0, len(plans), self.group_files):
            stats.add(self._apply(plans[i:i + self.group_files]))
        return stats

    @staticmethod
    def _unchanged(row: FileRow, sig: StatSig) -> bool:
        if row.state == "dirty" or row.sig != sig:
            return False
        # Stat matches; trust it unless the file may have changed within the same tick.
        return not is_racy(sig, row.indexed_at_ns)

    def _run_paths(self, root: Path, relpaths: list[str], known: dict[str, FileRow],
                   stats: RunStats, progress: Progress | None,
                   should_stop: Callable[[], bool]) -> None:
        group: list[FilePlan] = []
        group_chunks = 0
        done = 0
        for rel in relpaths:
            if should_stop():
                break
            row = known.get(rel)
            self.stage = "planning"
            plan = self.planner.plan(root, rel, row.content_hash if row else None,
                                     row.state if row else None)
            group.append(plan)
            group_chunks += len(plan.chunks)
            if group_chunks >= self.group_chunks or len(group) >= self.group_files:
                stats.add(self._apply(group))
                done += len(group)
                group, group_chunks = [], 0
                if progress:
                    progress(done, len(relpaths), stats)
        if group:
            stats.add(self._apply(group))
            done += len(group)
            if progress:
                progress(done, len(relpaths), stats)

    # -- writing -------------------------------------------------------------------------

    def _apply(self, plans: list[FilePlan]) -> RunStats:
        """Embed what is new in a group of plans and write it all crash-safely."""
        with self._lock:
            return self._apply_locked(plans)

    def _apply_locked(self, plans: list[FilePlan]) -> RunStats:
        stats = RunStats()
        gen = self.generation
        root_rows: dict[tuple[str, str], FileRow | None] = {
            (p.root, p.relpath): self.manifest.file(p.root, p.relpath) for p in plans}
        old_chunks: dict[tuple[str, str], list[ChunkRow]] = {}
        for key, row in root_rows.items():
            old_chunks[key] = self.manifest.chunks(gen.id, row.id) if row else []

        # Vectors: reuse any known for the same text under this model, embed the rest once.
        indexing = [p for p in plans if p.action == "index"]
        vectors: dict[str, np.ndarray] = {}
        new_vectors: list[tuple[str, np.ndarray]] = []
        if indexing:
            model_id = self.embedder.model_id
            hashes = {c.hash: c.text for p in indexing for c in p.chunks}
            vectors = self.manifest.vectors(model_id, hashes)
            missing = [h for h in hashes if h not in vectors]
            n_chunks = sum(len(p.chunks) for p in indexing)
            if missing:
                self.stage = "embedding"
                embedded = self.embedder.embed([hashes[h] for h in missing])
                for h, vec in zip(missing, embedded, strict=True):
                    vectors[h] = vec
                    new_vectors.append((h, vec))
            stats.chunks_embedded += len(missing)
            stats.chunks_reused += n_chunks - len(missing)

        self.stage = "writing"
        points: list[PointRecord] = []
        stale: list[str] = []
        intents: list[tuple[FilePlan, list[str]]] = []
        for p in plans:
            if p.action == "touch":
                continue
            old_ids = [c.point_id for c in old_chunks[(p.root, p.relpath)]]
            new_ids = p.point_ids if p.action == "index" else []
            if old_ids or new_ids:
                intents.append((p, old_ids + new_ids))
            stale.extend(set(old_ids) - set(new_ids))
            for c, pid in zip(p.chunks, new_ids, strict=True):
                points.append(PointRecord(pid, vectors[c.hash].tolist(), {
                    "root": p.root, "path": p.relpath, "ordinal": c.ordinal,
                    "start_line": c.start_line, "end_line": c.end_line,
                    "chunk_hash": c.hash, "file_hash": p.content_hash,
                    "mtime_ns": p.sig.mtime_ns, "text": c.text}))

        intent_ids: list[int] = []
        with self.manifest.transaction() as db:
            if new_vectors:
                Manifest.put_vectors(db, self.embedder.model_id, new_vectors)
            for p, ids in intents:
                intent_ids.append(Manifest.add_intent(db, gen.id, p.root, p.relpath, ids))
        crashpoint("intent")
        if points:
            self.store.upsert(points)
        crashpoint("upsert")
        if stale:
            self.store.delete(stale)
        crashpoint("delete")
        if points or stale:
            # One flush for the group: the intents cover upserts and deletes alike, and
            # nothing is marked done before this returns.
            self.store.flush()
        stats.points_written += len(points)
        stats.points_deleted += len(stale)

        with self.manifest.transaction() as db:
            touched: list[tuple[int, StatSig, int]] = []
            for p in plans:
                row = root_rows[(p.root, p.relpath)]
                if p.action == "touch" and row is not None:
                    touched.append((row.id, p.sig, p.started_ns))
                    stats.unchanged += 1
                elif p.action == "delete":
                    if row is not None:
                        Manifest.delete_file(db, row.id)
                        stats.deleted += 1
                else:
                    state = {"index": "indexed", "skip": "skipped", "fail": "failed"}[p.action]
                    fid = Manifest.upsert_file(db, p.root, p.relpath, p.sig, p.content_hash,
                                               state, p.reason, p.detail, p.started_ns)
                    Manifest.replace_chunks(db, gen.id, fid, [
                        ChunkRow(c.ordinal, c.hash, pid, c.start_line, c.end_line)
                        for c, pid in zip(p.chunks, p.point_ids, strict=True)])
                    if p.action == "index":
                        stats.indexed += 1
                    elif p.action == "skip":
                        stats.skipped[p.reason or "unknown"] += 1
                    else:
                        stats.failed += 1
            db.executemany(
                "UPDATE files SET size=?, mtime_ns=?, inode=?, ctime_ns=?, indexed_at_ns=?"
                " WHERE id=?",
                [(s.size, s.mtime_ns, s.inode, s.ctime_ns, at, fid) for fid, s, at in touched])
            Manifest.clear_intents(db, intent_ids)
        crashpoint("commit")
        if points and self.build_index_inline:
            # Each build covers at most the store's threshold of new points, so the pause
            # (Edge holds the GIL while it builds HNSW) stays bounded.
            self.stage = "indexing"
            self.store.maybe_build_index()
        self.stage = "idle"
        return stats
