"""The indexing engine: finds what changed, embeds only new chunk texts, writes crash-safely.

Write order for a group of files (the crash-safety invariant, docs/architecture.md):
  0. embed the texts no cached vector covers, in slices, each slice's vectors committed
     to the vector cache as soon as it is done;
  1. one transaction: record an intent per file naming every point id the write may
     touch (old and new);
  2. upsert the new points; delete the points no longer wanted; flush once;
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
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from repd.adapters.manifest import ChunkRow, FileRow, Generation, Manifest
from repd.adapters.store import Store
from repd.core.faults import crashpoint
from repd.core.identity import StatSig, is_racy, stored_path
from repd.core.ignore import IgnoreRules
from repd.core.secrets import SecretPolicy
from repd.core.types import PointRecord
from repd.errors import TransientError, is_transient
from repd.log import get_logger
from repd.pipeline.plan import ZERO_SIG, FilePlan, Planner
from repd.pipeline.scanner import contained, walk

if TYPE_CHECKING:
    from repd.settings import Settings

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
# Chunks embedded per call between two heartbeats and stop checks: a few seconds of work
# on a CPU, so a long file never outlives the systemd watchdog or delays SIGTERM.
EMBED_SLICE_CHUNKS = 256
# A file cut into more chunks than this is skipped (``too_many_chunks``): ~10 MB of text.
MAX_CHUNKS_PER_FILE = 20_000
# A group is closed once its estimated embedding time passes this, whatever its size, so
# progress is committed (and Ctrl-C keeps it) at least this often.
GROUP_SECONDS = 20.0


class Interrupted(Exception):  # noqa: N818 (a signal, not an error)
    """Raised between embedding slices when a stop was asked for; nothing half written."""


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


Progress = Callable[[float, int, RunStats], None]


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
        self.planner = Planner(max_file_bytes, self._tokenizer, follow_symlinks=follow_symlinks)
        self.stage = "idle"  # what the engine is doing right now, for status
        self.group_chunks = GROUP_CHUNKS
        # One-shot runs build HNSW as they go; the daemon does it when idle instead.
        self.build_index_inline = True
        self.group_files = GROUP_FILES
        self.group_seconds = GROUP_SECONDS
        self.embed_slice = EMBED_SLICE_CHUNKS
        self.max_chunks_per_file = MAX_CHUNKS_PER_FILE
        # Hooks the owner sets: a heartbeat with the chunks just embedded (progress and the
        # systemd watchdog), a stop request checked between slices, a free-space check
        # before each write (raises DiskFullError), and the stage for status.
        self.on_embedded: Callable[[int], None] = lambda n: None
        self.should_stop: Callable[[], bool] = lambda: False
        self.check_space: Callable[[], None] = lambda: None
        self.on_stage: Callable[[str], None] = lambda stage: None
        self.before_flush: Callable[[], None] = lambda: None
        self._embed_rate = 0.0  # chunks/s, smoothed: sizes groups by time
        # Files that failed (``index_error``) since one last indexed: many in a row means
        # the model or the store is broken, not the files (the worker then says so).
        self.failed_in_a_row = 0
        self.last_failure: str | None = None
        self._lock = threading.Lock()  # one group is written at a time

    @property
    def follow_symlinks(self) -> bool:
        """Whether scans follow symlinks (``watch.follow_symlinks``)."""
        return self._follow

    @follow_symlinks.setter
    def follow_symlinks(self, value: bool) -> None:
        self._follow = value
        self.planner.follow_symlinks = value  # the planner decides what a read may open

    def configure(self, settings: Settings) -> None:
        """Apply every setting the indexer reads; the same call at start and on reload."""
        self.planner.max_file_bytes = settings.max_file_bytes
        self.planner.secrets = SecretPolicy(tuple(settings.allow_secrets))
        self.max_chunks_per_file = settings.max_chunks_per_file
        self.follow_symlinks = settings.watch.follow_symlinks

    def _set_stage(self, stage: str) -> None:
        self.stage = stage
        self.on_stage(stage)

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

    def allow_roots(self, roots: Iterable[Path]) -> None:
        """Name every configured root: with ``follow_symlinks``, a link may lead into one."""
        self.planner.allowed_roots = tuple(roots)

    def reconcile(self, root: Path, rules: IgnoreRules, subdir: str = "",
                  progress: Progress | None = None,
                  should_stop: Callable[[], bool] = lambda: False) -> RunStats:
        """Bring the index of ``root/subdir`` in line with the disk.

        ``subdir`` is a path as ``os`` gives it (a scan request, a reindex); when it names
        a file rather than a folder, that file is re-read. Only files that are really gone
        are deleted: the rows below a folder that cannot be listed (EACCES) are kept and
        the folder is recorded as ``unreadable``; a transient failure (EMFILE, EIO...)
        raises TransientError before anything is written.
        """
        subdir = subdir.strip("/")
        if subdir and not self._is_folder(root / subdir):
            # `repd reindex FILE` used to scan the file as a folder, fail to list it and
            # delete it from the index ("cannot list folder: Not a directory").
            return self.process_paths(root, rules, [subdir], should_stop)
        t0 = time.perf_counter()
        self._set_stage("scanning")
        try:
            stats = self._reconcile(root, rules, subdir, progress, should_stop)
        finally:
            self._set_stage("idle")
        stats.seconds = time.perf_counter() - t0
        return stats

    def _is_folder(self, path: Path) -> bool:
        """A folder to walk; a symlink to one counts only when links are followed."""
        try:
            st = path.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return True  # gone: walking finds nothing, so whatever was below it goes
        except OSError:
            return True  # the walk reports it (and keeps the rows below it)
        if stat_mod.S_ISLNK(st.st_mode):
            return self._follow and path.is_dir()
        return stat_mod.S_ISDIR(st.st_mode)

    def _reconcile(self, root: Path, rules: IgnoreRules, subdir: str,
                   progress: Progress | None, should_stop: Callable[[], bool]) -> RunStats:
        root_s = str(root)
        known = self.manifest.files_under(root_s, stored_path(subdir))
        stats = RunStats()
        todo: list[str] = []
        skips: list[FilePlan] = []
        seen: set[str] = set()
        unlisted: list[str] = []  # folders that could not be listed: keep what is below
        for entry in walk(root, rules, subdir, self._follow, self.planner.allowed_roots):
            # Names that are not valid UTF-8 are kept in their escaped stored form: SQLite,
            # payloads and point ids refuse lone surrogates (it aborted the whole root).
            rel = stored_path(entry.relpath)
            seen.add(rel)
            stats.seen += 1
            if entry.folder:
                unlisted.append(rel)
            row = known.get(rel)
            if entry.st is None:
                if row is None or row.state != "skipped" or row.reason != entry.skip_reason:
                    skips.append(FilePlan(root_s, rel, ZERO_SIG, time.time_ns(),
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
            todo.append(rel)
        gone = [FilePlan(root_s, p, ZERO_SIG, time.time_ns(), "delete")
                for p in known if p not in seen and not _below_any(p, unlisted)]
        total = len(todo)
        stats.add(self._apply_in_groups(skips + gone))
        if progress:
            progress(0, total, stats)
        self._run_paths(root, todo, known, stats, progress, should_stop)
        return stats

    def process_paths(self, root: Path, rules: IgnoreRules, relpaths: Iterable[str],
                      should_stop: Callable[[], bool] = lambda: False) -> RunStats:
        """Index specific paths that an event named (they may be gone, or folders now).

        ``relpaths`` are paths as ``os`` gives them (the watcher's, a reindex's); the
        manifest is keyed by their stored form. A path whose folder now leads outside the
        root (a folder swapped for a symlink) is never read, and its rows go.
        """
        t0 = time.perf_counter()
        root_s = str(root)
        stats = RunStats()
        todo: list[str] = []
        known: dict[str, FileRow] = {}
        for rel in dict.fromkeys(r.strip("/") for r in relpaths):
            if not rel:
                stats.add(self.reconcile(root, rules, "", should_stop=should_stop))
                continue
            key = stored_path(rel)
            abs_path = root / rel
            if not contained(root, rel, self._follow, self.planner.allowed_roots):
                stats.add(self._delete_under(root_s, key))
                continue
            try:
                st = abs_path.lstat()
            except (FileNotFoundError, NotADirectoryError):
                # Gone: the file itself, or a whole folder whose files the manifest knows.
                stats.add(self._delete_under(root_s, key))
                continue
            except PermissionError:
                # A folder above it cannot be searched (lstat needs no right on the file
                # itself): keep what the index holds; the scan records the folder.
                continue
            except OSError as exc:
                if is_transient(exc):
                    raise TransientError(f"cannot stat {abs_path}: {exc.strerror or exc}"
                                         ) from exc
                st = None  # EACCES and the like: the planner records why
            row = self.manifest.file(root_s, key)
            if st is not None and self._is_folder(abs_path):
                if row is not None:  # a file replaced by a folder
                    stats.add(self._apply([FilePlan(root_s, key, ZERO_SIG, time.time_ns(),
                                                    "delete")]))
                stats.add(self.reconcile(root, rules, rel, should_stop=should_stop))
                continue
            is_link = st is not None and stat_mod.S_ISLNK(st.st_mode)
            if rules.is_ignored(rel, False):
                if row is not None:
                    stats.add(self._apply([FilePlan(root_s, key, ZERO_SIG, time.time_ns(),
                                                    "delete")]))
                continue
            if is_link and not self._follow:  # recorded as the full scan records it
                if row is None or row.reason != "symlink":
                    stats.add(self._apply([FilePlan(
                        root_s, key, ZERO_SIG, time.time_ns(), "skip", reason="symlink",
                        detail="symlinks are not followed")]))
                continue
            if row is not None:
                known[key] = row
                if st is not None and not is_link and self._unchanged(row, StatSig.of(st)):
                    stats.unchanged += 1
                    continue
            todo.append(key)
            stats.seen += 1
        self._run_paths(root, todo, known, stats, None, should_stop)
        stats.seconds = time.perf_counter() - t0
        return stats

    def _delete_under(self, root_s: str, key: str) -> RunStats:
        """Delete the rows of ``key`` and of everything the manifest knows below it."""
        gone = self.manifest.files_under(root_s, key)
        if not gone:
            return RunStats()
        return self._apply_in_groups([FilePlan(root_s, p, ZERO_SIG, time.time_ns(), "delete")
                                      for p in gone])

    def prune_vector_cache(self, keep_unreferenced: int = VECTOR_CACHE_SPARE) -> int:
        """Bound the cache of vectors no chunk uses any more (kept for undo and moves)."""
        return self.manifest.prune_vectors(self.generation.model_id, keep_unreferenced)

    def drop_root(self, root: Path) -> RunStats:
        """Remove every file of a root from the index (the root left the config)."""
        rows = self.manifest.files_under(str(root))
        return self._apply_in_groups(
            [FilePlan(str(root), p, ZERO_SIG, time.time_ns(), "delete") for p in rows])

    def _apply_in_groups(self, plans: list[FilePlan]) -> RunStats:
        """Skips and deletions (nothing to embed), written ``group_files`` at a time, so a
        folder of 100,000 deleted files is many bounded writes, not one huge one."""
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
        total = len(relpaths)

        def flush() -> None:
            nonlocal group, group_chunks, done
            base = done

            def on_slice(embedded: int, to_embed: int) -> None:
                # The bar moves while a long group embeds, not only when it commits.
                if progress and to_embed:
                    view = RunStats()
                    view.add(stats)
                    view.chunks_embedded += embedded
                    progress(base + len(group) * embedded / to_embed, total, view)

            self._apply_isolated(group, stats, on_slice)
            done += len(group)
            group, group_chunks = [], 0
            if progress:
                progress(done, total, stats)

        for rel in relpaths:
            if should_stop() or self.should_stop():
                break
            row = known.get(rel)
            self._set_stage("planning")
            plan = self._capped(self._plan(root, rel, row))
            group.append(plan)
            group_chunks += len(plan.chunks)
            if group_chunks >= self._group_chunk_cap() or len(group) >= self.group_files:
                flush()
        if group:
            flush()

    def _plan(self, root: Path, rel: str, row: FileRow | None) -> FilePlan:
        """Plan one file; an unexpected error about it becomes its ``failed`` row."""
        try:
            return self.planner.plan(root, rel, row.content_hash if row else None,
                                     row.state if row else None)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.exception("file_failed", root=str(root), path=rel)
            return FilePlan(str(root), rel, ZERO_SIG, time.time_ns(), "fail",
                            reason="index_error", detail=self._note_failure(exc))

    def _group_chunk_cap(self) -> int:
        # Size groups by time once the embedding rate is known: a group then commits
        # within about ``group_seconds`` on any machine, GPU or slow CPU.
        if self._embed_rate <= 0:
            return self.group_chunks
        return max(64, min(self.group_chunks, int(self._embed_rate * self.group_seconds)))

    def _capped(self, plan: FilePlan) -> FilePlan:
        if plan.action != "index" or len(plan.chunks) <= self.max_chunks_per_file:
            return plan
        return FilePlan(plan.root, plan.relpath, plan.sig, plan.started_ns, "skip",
                        content_hash=plan.content_hash, reason="too_many_chunks",
                        detail=f"{len(plan.chunks)} chunks, more than max_chunks_per_file "
                        f"({self.max_chunks_per_file})")

    def _apply_isolated(self, plans: list[FilePlan], stats: RunStats,
                        on_slice: Callable[[int, int], None] | None = None) -> None:
        """Apply a group; if it fails for a reason about its files, find them by halving.

        A transient failure (no descriptors, disk full, the store or SQLite failing) and
        a stop request propagate: the caller retries the whole unit later. Anything else
        is taken to be about one file: the group is undone, split in two and retried,
        down to the one file, which is recorded as ``failed`` with the reason.
        """
        try:
            stats.add(self._apply(plans, on_slice))
            return
        except Interrupted:
            raise
        except Exception as exc:
            self.recover()  # undo the half-written group before anything else
            if is_transient(exc):
                raise
            if len(plans) > 1:
                mid = len(plans) // 2
                self._apply_isolated(plans[:mid], stats)
                self._apply_isolated(plans[mid:], stats)
                return
            plan = plans[0]
            log.exception("file_failed", root=plan.root, path=plan.relpath)
            failed = FilePlan(plan.root, plan.relpath, plan.sig, plan.started_ns, "fail",
                              content_hash=None, reason="index_error",
                              detail=self._note_failure(exc))
            stats.add(self._apply([failed]))

    def _note_failure(self, exc: Exception) -> str:
        text = f"{type(exc).__name__}: {exc}"[:500]
        self.failed_in_a_row += 1
        self.last_failure = text
        return text

    # -- writing -------------------------------------------------------------------------

    def _apply(self, plans: list[FilePlan],
               on_slice: Callable[[int, int], None] | None = None) -> RunStats:
        """Embed what is new in a group of plans and write it all crash-safely."""
        with self._lock:
            try:
                return self._apply_locked(plans, on_slice)
            finally:
                self._set_stage("idle")  # whatever happened, status must not say "writing"

    def _embed_missing(self, hashes: dict[str, str], missing: list[str],
                       on_slice: Callable[[int, int], None] | None) -> dict[str, np.ndarray]:
        """Embed ``missing`` in slices, caching each slice's vectors as soon as it is done.

        Between slices: a heartbeat, progress, and a stop check. Vectors go to the cache
        at once, so a stop, a crash or Ctrl-C loses at most the slice in flight: the next
        run finds the rest in the cache and embeds nothing twice.
        """
        out: dict[str, np.ndarray] = {}
        model_id = self.embedder.model_id
        step = max(1, self.embed_slice)
        # Longest first across the whole group, so each slice holds texts of like length
        # and the embedder's batches stay nearly free of padding.
        missing = sorted(missing, key=lambda h: len(hashes[h]), reverse=True)
        for i in range(0, len(missing), step):
            if self.should_stop():
                raise Interrupted
            part = missing[i:i + step]
            self._set_stage("embedding")
            t0 = time.perf_counter()
            embedded = self.embedder.embed([hashes[h] for h in part])
            rate = len(part) / max(time.perf_counter() - t0, 1e-6)
            self._embed_rate = rate if not self._embed_rate else 0.7 * self._embed_rate + 0.3 * rate
            fresh = list(zip(part, embedded, strict=True))
            with self.manifest.transaction() as db:
                Manifest.put_vectors(db, model_id, fresh)
            out.update(fresh)
            self.on_embedded(len(part))
            if on_slice is not None:
                on_slice(i + len(part), len(missing))
        return out

    def _apply_locked(self, plans: list[FilePlan],
                      on_slice: Callable[[int, int], None] | None) -> RunStats:
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
        if indexing:
            model_id = self.embedder.model_id
            hashes = {c.hash: c.text for p in indexing for c in p.chunks}
            vectors = self.manifest.vectors(model_id, hashes)
            missing = [h for h in hashes if h not in vectors]
            n_chunks = sum(len(p.chunks) for p in indexing)
            if missing:
                vectors.update(self._embed_missing(hashes, missing, on_slice))
            stats.chunks_embedded += len(missing)
            stats.chunks_reused += n_chunks - len(missing)
        if self.should_stop():
            raise Interrupted  # nothing written yet: the files stay as they were
        # Short of disk, Qdrant Edge dies of SIGBUS in its memory maps: check first.
        self.check_space()

        self._set_stage("writing")
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
            # The new points already answer queries; the flush's disk syncs hold the GIL
            # (100-200 ms here), freezing every API thread. Readers first: a query in
            # flight gets a moment to finish before the freeze.
            self.before_flush()
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
                        self.failed_in_a_row = 0
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
            self._set_stage("indexing")
            self.store.maybe_build_index()
        return stats


def _below_any(path: str, folders: Sequence[str]) -> bool:
    """True when ``path`` is one of ``folders`` or lies below one ("." is the root)."""
    return any(f == "." or path == f or path.startswith(f + "/") for f in folders)
