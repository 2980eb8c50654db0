"""The indexing engine: finds what changed, embeds only new chunk texts, hands them to the writer.

For a group of changed files: plan each (read, hash, extract, chunk), then for every
generation being written (the active one and, during a migration, the building one)
embed the texts no cached vector covers, in slices, each slice's vectors committed to
the vector cache as soon as it is done; then :mod:`repd.pipeline.writer` writes the
group into every generation crash-safely (intents, upsert, delete, flush, commit). The
backfill of a migration uses the same steps for one generation (:meth:`Indexer.backfill`).
"""

from __future__ import annotations

import contextlib
import os
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from repd.adapters.manifest import FileRow, Generation, Manifest
from repd.adapters.store import Store
from repd.core.identity import RACY_WINDOW_NS, stored_path
from repd.core.ignore import IgnoreRules
from repd.core.secrets import SecretPolicy
from repd.core.types import Chunk, SparseVec
from repd.errors import TransientError, is_transient
from repd.log import get_logger
from repd.pipeline import writer
from repd.pipeline.generations import EmbedderLike, GenerationHandle, Generations
from repd.pipeline.plan import ZERO_SIG, FilePlan, Planner
from repd.pipeline.scanner import contained, walk_folders
from repd.pipeline.stats import RunStats

__all__ = ["Indexer", "Interrupted", "RunStats", "Yielded"]

if TYPE_CHECKING:
    from repd.settings import Settings

log = get_logger("indexer")

# How much work one group holds before it is embedded and written: large enough that
# batches span many files (padding and per-call overhead stay low), small enough that
# memory stays bounded and progress is committed often.
GROUP_CHUNKS = 2048
GROUP_FILES = 512
# Bytes of cached vectors of chunk texts no file holds any more (the ``vector_cache_bytes``
# setting's default): kept so undoing an edit or restoring a deleted file costs no
# embedding; past it the least recently used are dropped (Manifest.prune_vectors).
VECTOR_CACHE_BYTES = 256 * 2**20
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


class Yielded(Interrupted):
    """Raised between a backfill's embedding slices when live work waits: it goes first."""


Progress = Callable[[float, int, RunStats], None]


class Indexer:
    """Owns the path from changed files to durable points for one generation."""

    def __init__(self, manifest: Manifest, generations: Generations, max_file_bytes: int,
                 follow_symlinks: bool = False) -> None:
        self.manifest = manifest
        self.generations = generations
        self._follow = follow_symlinks
        self.planner = Planner(max_file_bytes, self._tokenizer, follow_symlinks=follow_symlinks)
        # Planners of generations whose model cuts text differently (keyed by generation).
        self._planners: dict[int, Planner] = {}
        self.stage = "idle"  # what the engine is doing right now, for status
        self.group_chunks = GROUP_CHUNKS
        # One-shot runs build HNSW as they go; the daemon does it when idle instead, but
        # also here once ``build_backlog`` points were written since the last build (a
        # long first index is never idle, and one build over all of it would hold the
        # GIL for minutes). ``build_guard`` wraps each such build (the watchdog's grace).
        self.build_index_inline = True
        self.build_backlog: int | None = None
        self.build_guard: Callable[[], contextlib.AbstractContextManager[object]] = (
            contextlib.nullcontext)
        self.group_files = GROUP_FILES
        self.group_seconds = GROUP_SECONDS
        self.embed_slice = EMBED_SLICE_CHUNKS
        self.max_chunks_per_file = MAX_CHUNKS_PER_FILE
        self.vector_cache_bytes = VECTOR_CACHE_BYTES
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

    # -- the active generation (what one-shot commands and status read) ------------------

    @property
    def active(self) -> GenerationHandle:
        """The generation that answers queries."""
        handle = self.generations.active
        if handle is None:
            raise RuntimeError("the indexer has no active generation")
        return handle

    @property
    def generation(self) -> Generation:
        """The active generation's manifest row."""
        return self.active.row

    @property
    def store(self) -> Store:
        """The active generation's store."""
        return self.active.store

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
        self.vector_cache_bytes = settings.vector_cache_bytes
        self.follow_symlinks = settings.watch.follow_symlinks

    def _set_stage(self, stage: str) -> None:
        self.stage = stage
        self.on_stage(stage)

    # -- model, loaded only once something really needs embedding -----------------------

    @property
    def embedder(self) -> EmbedderLike:
        """The active generation's embedder, loaded on first use."""
        return self.active.embedder

    def _tokenizer(self) -> tuple[Callable[[list[str]], list[int]], int]:
        emb = self.embedder
        return emb.count_tokens, emb.max_tokens

    def _planner_for(self, handle: GenerationHandle) -> Planner:
        """A planner that chunks with ``handle``'s model, set up like the main one."""
        planner = self._planners.get(handle.id)
        if planner is None:
            def tokenizer() -> tuple[Callable[[list[str]], list[int]], int]:
                return handle.embedder.count_tokens, handle.embedder.max_tokens
            planner = self._planners[handle.id] = Planner(self.planner.max_file_bytes, tokenizer)
        planner.max_file_bytes = self.planner.max_file_bytes
        planner.secrets = self.planner.secrets
        planner.follow_symlinks = self.planner.follow_symlinks
        planner.allowed_roots = self.planner.allowed_roots
        return planner

    # -- recovery ------------------------------------------------------------------------

    def recover(self) -> int:
        """Undo every write a crash left half done, in every generation being written;
        returns the number of (generation, file) writes undone. Also checks that each
        store holds exactly the manifest's points, and repairs it when it does not."""
        active = self.generations.active
        return sum(writer.recover(self.manifest, h, primary=h is active)
                   for h in self.generations.view.writing())

    def verify_store(self) -> tuple[int, int]:
        """Make each store's point ids equal the manifest's: (orphans deleted, files marked)."""
        active = self.generations.active
        orphans = files = 0
        for h in self.generations.view.writing():
            o, f = writer.verify(self.manifest, h, primary=h is active)
            orphans, files = orphans + o, files + f
        return orphans, files

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
        # The manifest's view of the folder, read in one query; each file found is popped
        # from it, so what is left at the end is what the walk did not find.
        known = self.manifest.scan_view(root_s, stored_path(subdir))
        stats = RunStats()
        todo: list[str] = []
        skips: list[FilePlan] = []
        unlisted: list[str] = []  # folders that could not be listed: keep what is below
        unchanged = 0
        skipped = stats.skipped
        for folder in walk_folders(root, rules, subdir, self._follow,
                                   self.planner.allowed_roots):
            for entry in folder.others:
                # Names that are not valid UTF-8 are kept in their escaped stored form:
                # SQLite, payloads and point ids refuse lone surrogates.
                rel = stored_path(entry.relpath)
                if entry.folder:
                    unlisted.append(rel)
                row = known.pop(rel, None)
                if row is None or row[4] != "skipped" or row[6] != entry.skip_reason:
                    skips.append(FilePlan(root_s, rel, ZERO_SIG, time.time_ns(), "skip",
                                          reason=entry.skip_reason, detail=entry.skip_detail))
                else:
                    skipped[entry.skip_reason or "unknown"] += 1
            # The hot loop of a no-op scan: one dict pop and one stat compare per file.
            for rel, st in folder.files:
                key = rel if rel.isascii() and "\\" not in rel else stored_path(rel)
                row = known.pop(key, None)
                if row is not None and unchanged_since(row, st):
                    unchanged += 1
                    if row[4] == "skipped":
                        skipped[row[6] or "unknown"] += 1
                    continue
                todo.append(key)
            stats.seen += len(folder.files) + len(folder.others)
        stats.unchanged += unchanged
        gone = [FilePlan(root_s, p, ZERO_SIG, time.time_ns(), "delete")
                for p in known if not _below_any(p, unlisted)]
        total = len(todo)
        stats.add(self._apply_in_groups(skips + gone))
        if progress:
            progress(0, total, stats)
        rows = self.manifest.files_at(root_s, todo)
        self._run_paths(root, todo, rows, stats, progress, should_stop)
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
                if st is not None and not is_link and unchanged_since(scan_row(row), st):
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

    def prune_vector_cache(self, budget_bytes: int | None = None) -> int:
        """Bound the cache of vectors no chunk uses any more (kept for undo and moves) to
        ``budget_bytes`` (default: the ``vector_cache_bytes`` setting), least recently
        used first; the dense vectors of every generation being written and the BM25
        vectors of the hybrid ones share the budget. Returns the entries dropped."""
        caches = [h.model_id for h in self.generations.view.writing()]
        if any(h.hybrid for h in self.generations.view.writing()):
            from repd.adapters.lexical import default_encoder

            caches.append(default_encoder().identity)
        budget = self.vector_cache_bytes if budget_bytes is None else budget_bytes
        return self.manifest.prune_vectors(caches, budget)

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

    def _embed_missing(self, handle: GenerationHandle, hashes: dict[str, str],
                       missing: list[str], on_slice: Callable[[int, int], None] | None,
                       should_yield: Callable[[], bool] | None = None,
                       ) -> dict[str, np.ndarray]:
        """Embed ``missing`` in slices, caching each slice's vectors as soon as it is done.

        Between slices: a heartbeat, progress, and a stop check (and, for a backfill, a
        check for live work waiting, which raises :class:`Yielded`). Vectors go to the
        cache at once, so a stop, a crash or Ctrl-C loses at most the slice in flight:
        the next run finds the rest in the cache and embeds nothing twice.
        """
        out: dict[str, np.ndarray] = {}
        emb = handle.embedder
        step = max(1, self.embed_slice)
        # Longest first by tokens (what the model pays for) across the whole group, so
        # each slice holds texts of like length and the embedder's batches stay nearly
        # free of padding. Characters are a poor proxy: on SciFact a slice then spanned
        # 140-256 tokens and batches padded 12 % instead of 4 % (bench/bench_padding.py);
        # the extra tokenizer pass costs well under 1 % of the embedding's CPU time.
        tokens = dict(zip(missing, emb.count_tokens([hashes[h] for h in missing]), strict=True))
        missing = sorted(missing, key=tokens.__getitem__, reverse=True)
        for i in range(0, len(missing), step):
            if self.should_stop():
                raise Interrupted
            if should_yield is not None and should_yield():
                raise Yielded
            part = missing[i:i + step]
            self._set_stage("embedding")
            t0 = time.perf_counter()
            embedded = emb.embed([hashes[h] for h in part])
            rate = len(part) / max(time.perf_counter() - t0, 1e-6)
            self._embed_rate = rate if not self._embed_rate else 0.7 * self._embed_rate + 0.3 * rate
            fresh = list(zip(part, embedded, strict=True))
            with self.manifest.transaction() as db:
                Manifest.put_vectors(db, emb.model_id, fresh)
            out.update(fresh)
            self.on_embedded(len(part))
            if on_slice is not None:
                on_slice(i + len(part), len(missing))
        return out

    def _vectors(self, handle: GenerationHandle, plans: Sequence[FilePlan], stats: RunStats,
                 on_slice: Callable[[int, int], None] | None,
                 should_yield: Callable[[], bool] | None = None) -> dict[str, np.ndarray]:
        """Every chunk's vector under ``handle``'s model: from the cache, else embedded once."""
        indexing = [p for p in plans if p.action == "index"]
        if not indexing:
            return {}
        hashes = {c.hash: c.text for p in indexing for c in p.chunks}
        vectors = self.manifest.vectors(handle.embedder.model_id, hashes)
        missing = [h for h in hashes if h not in vectors]
        if missing:
            vectors.update(self._embed_missing(handle, hashes, missing, on_slice, should_yield))
        n_chunks = sum(len(p.chunks) for p in indexing)
        stats.chunks_embedded += len(missing)
        stats.chunks_reused += n_chunks - len(missing)
        return vectors

    def _sparse(self, handle: GenerationHandle,
                plans: Sequence[FilePlan]) -> dict[str, SparseVec] | None:
        """BM25 vectors of the chunks, for a generation that has them: from the cache
        (keyed by the encoder's identity and the chunk hash), else encoded (cheap)."""
        if not handle.hybrid:
            return None
        from repd.adapters.lexical import default_encoder

        enc = default_encoder()
        texts = {c.hash: c.text for p in plans if p.action == "index" for c in p.chunks}
        if not texts:
            return {}
        out = self.manifest.sparse_vectors(enc.identity, texts)
        missing = [h for h in texts if h not in out]
        if missing:
            fresh = list(zip(missing, enc.embed_documents([texts[h] for h in missing]),
                             strict=True))
            with self.manifest.transaction() as db:
                Manifest.put_sparse_vectors(db, enc.identity, fresh)
            out.update(fresh)
        return out

    def _apply_locked(self, plans: list[FilePlan],
                      on_slice: Callable[[int, int], None] | None) -> RunStats:
        stats = RunStats()
        rows: dict[tuple[str, str], FileRow | None] = {
            (p.root, p.relpath): self.manifest.file(p.root, p.relpath) for p in plans}
        # Live changes go to the active generation only: an edit is searchable as soon as
        # one model has embedded it. A building generation lacks the file until its
        # backfill's next pass (which finds it by content hash): the new model's work
        # never delays save -> searchable, and the gate waits until it is done.
        handle = self.active
        vectors = self._vectors(handle, plans, stats, on_slice)
        writes = [writer.GenWrite(handle, plans, vectors, self._sparse(handle, plans))]
        if self.should_stop():
            raise Interrupted  # nothing written yet: the files stay as they were
        # Short of disk, Qdrant Edge dies of SIGBUS in its memory maps: check first.
        self.check_space()
        self._set_stage("writing")
        written = writer.write_group(self.manifest, writes, primary=True, rows=rows,
                                     before_flush=self.before_flush)
        stats.add(written)
        if written.indexed:
            self.failed_in_a_row = 0
        if written.points_written and self.build_index_inline:
            # Each build covers at most the store's threshold of new points, so the pause
            # (Edge holds the GIL while it builds HNSW) stays bounded.
            self._set_stage("indexing")
            for w in writes:
                w.handle.store.maybe_build_index()
        elif written.points_written:
            self._build_backstop([w.handle for w in writes])
        return stats

    def _build_backstop(self, handles: Sequence[GenerationHandle]) -> None:
        """Build HNSW now if ``build_backlog`` points piled up unbuilt (see __init__)."""
        if self.build_backlog is None:
            return
        for h in handles:
            # Only a store that counts its backlog (Edge) can be due; asking first keeps
            # the guard (a watchdog notification) off every other group.
            if getattr(h.store, "written_since_build", 0) >= self.build_backlog:
                self._set_stage("indexing")
                with self.build_guard():
                    h.store.maybe_build_index(backlog=self.build_backlog)

    # -- backfill (a migration's new generation) -----------------------------------------

    def backfill(self, handle: GenerationHandle, files: Sequence[FileRow],
                 clear: Sequence[int], cursor: str | None,
                 should_yield: Callable[[], bool],
                 changed: list[tuple[str, str]] | None = None) -> RunStats:
        """Write ``files`` (indexed files it lacks) into the building generation ``handle``,
        and remove what it holds of the files in ``clear`` (no longer indexed).

        Files are read and cut with the generation's own model; texts whose vector is
        cached cost nothing. A file whose content is no longer the one the manifest
        records is left out and named in ``changed`` (root, path): the live path must
        index it into both generations. Raises :class:`Yielded` (nothing written,
        vectors kept) when ``should_yield`` says live work waits. ``cursor`` is saved
        with the rows.
        """
        with self._lock:
            try:
                return self._backfill_locked(handle, files, clear, cursor, should_yield,
                                             changed if changed is not None else [])
            finally:
                self._set_stage("idle")

    def _isolated_vectors(self, handle: GenerationHandle, plans: list[FilePlan],
                          stats: RunStats, should_yield: Callable[[], bool],
                          ) -> tuple[list[FilePlan], dict[str, np.ndarray]]:
        """Vectors for a backfill step; when the model fails on the group, file by file,
        and a file it fails on is recorded as failed in that generation (the gate says
        so) instead of stopping the backfill for good."""
        try:
            return plans, self._vectors(handle, plans, stats, None, should_yield)
        except Interrupted:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
        kept: list[FilePlan] = []
        vectors: dict[str, np.ndarray] = {}
        for p in plans:
            try:
                vectors.update(self._vectors(handle, [p], stats, None, should_yield))
                kept.append(p)
            except Interrupted:
                raise
            except Exception as exc:
                if is_transient(exc):
                    raise
                log.warning("backfill_file_failed", generation=handle.id, root=p.root,
                            path=p.relpath, error=f"{type(exc).__name__}: {exc}"[:300])
                kept.append(FilePlan(p.root, p.relpath, p.sig, p.started_ns, "fail",
                                     content_hash=p.content_hash, reason="index_error",
                                     detail=f"{type(exc).__name__}: {exc}"[:500]))
        return kept, vectors

    def _plans_from_active(self, files: Sequence[FileRow],
                           missing: list[tuple[str, str]]) -> list[FilePlan]:
        """Plans that copy the active generation's chunks of ``files``; a file whose
        chunks the active store does not fully hold is named in ``missing`` instead."""
        active = self.active
        by_file = {r.id: self.manifest.chunks(active.id, r.id) for r in files}
        ids = [c.point_id for rows in by_file.values() for c in rows]
        texts: dict[str, str] = {}
        for i in range(0, len(ids), 512):
            for rec in active.store.retrieve(ids[i:i + 512], with_vectors=False):
                texts[rec.id] = str(rec.payload.get("text", ""))
        plans: list[FilePlan] = []
        for row in files:
            chunks = by_file[row.id]
            if not chunks or any(c.point_id not in texts for c in chunks):
                missing.append((row.root, row.path))
                continue
            plans.append(FilePlan(
                row.root, row.path, row.sig, time.time_ns(), "index",
                content_hash=row.content_hash,
                chunks=[Chunk(c.ordinal, texts[c.point_id], c.start_line, c.end_line, c.hash)
                        for c in chunks],
                point_ids=[c.point_id for c in chunks]))
        return plans

    def _backfill_locked(self, handle: GenerationHandle, files: Sequence[FileRow],
                         clear: Sequence[int], cursor: str | None,
                         should_yield: Callable[[], bool],
                         changed: list[tuple[str, str]]) -> RunStats:
        stats = RunStats()
        rows: dict[tuple[str, str], FileRow | None] = {}
        plans: list[FilePlan] = []
        for fid in clear:
            row = self.manifest.file_by_id(fid)
            key = (row.root, row.path) if row is not None else ("", f"(deleted file {fid})")
            rows[key] = row or FileRow(fid, key[0], key[1], ZERO_SIG, None, "dirty", None,
                                       None, 0)
            plans.append(FilePlan(key[0], key[1], ZERO_SIG, time.time_ns(), "delete"))
        self._set_stage("planning")
        todo = list(files)
        for row in todo:
            rows[(row.root, row.path)] = row
        if handle.chunking_key() == self.active.chunking_key():
            # Same tokenizer and limit: the active generation's chunks are the new one's,
            # texts and all; they come from its store, the disk is not read again.
            lacking: list[tuple[str, str]] = []  # not fully in the active store: read them
            plans.extend(self._plans_from_active(todo, lacking))
            todo = [r for r in todo if (r.root, r.path) in lacking]
        planner = self._planner_for(handle)
        for row in todo:
            try:
                plan = planner.plan(Path(row.root), row.path, None, None)
            except Exception as exc:
                if is_transient(exc):
                    raise
                plan = FilePlan(row.root, row.path, row.sig, time.time_ns(), "fail",
                                content_hash=row.content_hash, reason="index_error",
                                detail=f"{type(exc).__name__}: {exc}"[:500])
            if plan.action in ("delete", "touch") or plan.content_hash != row.content_hash:
                # Gone, unreadable or edited since the manifest recorded it: the live path
                # indexes it into both generations (a lost event would loop here forever).
                changed.append((row.root, row.path))
                continue
            plans.append(self._capped(plan))
        plans, vectors = self._isolated_vectors(handle, plans, stats, should_yield)
        if should_yield():
            raise Yielded
        self.check_space()
        self._set_stage("writing")
        gen_cursor = (handle.id, cursor) if cursor is not None else None
        write = writer.GenWrite(handle, plans, vectors, self._sparse(handle, plans))
        stats.add(writer.write_group(self.manifest, [write], primary=False, rows=rows,
                                     before_flush=self.before_flush, cursor=gen_cursor))
        # A migration's backfill of a large index is one long write too.
        self._build_backstop([handle])
        return stats


def _below_any(path: str, folders: Sequence[str]) -> bool:
    """True when ``path`` is one of ``folders`` or lies below one ("." is the root)."""
    return any(f == "." or path == f or path.startswith(f + "/") for f in folders)


#: A file as :meth:`Manifest.scan_view` gives it: (size, mtime_ns, inode, ctime_ns, state,
#: indexed_at_ns, reason).
ScanRow = tuple[int, int, int, int, str, int, "str | None"]


def scan_row(row: FileRow) -> ScanRow:
    """A full manifest row in the form :meth:`Manifest.scan_view` gives: (size, mtime_ns,
    inode, ctime_ns, state, indexed_at_ns, reason)."""
    sig = row.sig
    return (sig.size, sig.mtime_ns, sig.inode, sig.ctime_ns, row.state, row.indexed_at_ns,
            row.reason)


def unchanged_since(row: ScanRow, st: os.stat_result) -> bool:
    """git's index rule: trust a file whose stat equals the recorded one (size, mtime_ns,
    inode, ctime_ns) unless the row is ``dirty`` or the file is "racy": its times fall
    within RACY_WINDOW_NS of the moment it was read, where one timestamp tick could hide a
    second write (``core.identity.is_racy``; with the stat equal, the row's times are the
    file's). ``row`` is in :meth:`Manifest.scan_view`'s form (see :func:`scan_row`).

    The one stat rule of both the scan and single-path events; on plain values, since
    the scan calls it once per file.
    """
    return (row[0] == st.st_size and row[1] == st.st_mtime_ns and row[2] == st.st_ino
            and row[3] == st.st_ctime_ns and row[4] != "dirty"
            and max(row[1], row[3]) < row[5] - RACY_WINDOW_NS)
