"""Model upgrades: a migration builds a new generation while the active one keeps answering.

Life of a migration (docs/architecture.md, "Model upgrades"):

1. **start**: ``repd model use NAME`` or a changed ``model`` in the config loads the new
   model (in the caller's thread, never the worker's); if its identity differs from the
   active generation's, a *building* generation is created with an empty store and
   published in the registry, so from then on every live change is written to both.
2. **backfill**: on the worker thread, whenever no live change is ready, one bounded
   step embeds the next files (by file id, after the saved cursor) with the new model
   and writes them through :mod:`repd.pipeline.writer`; the cursor is committed with
   the rows, so a restart or ``kill -9`` resumes where it was. Live work always goes
   first: a step yields between embedding slices (its vectors stay cached). Passes
   over the whole manifest then catch what the first pass could not see.
3. **gate**: every indexed file in the same state in both generations, the store's
   point count equal to the manifest's, a sample of queries answered, and, given a
   labeled query set, no drop in nDCG@10 (``--force`` overrides the last two).
4. **switch**: one manifest transaction and one registry assignment; the old
   generation is *retired*, kept (store and model) for ``repd model rollback`` until
   ``repd model prune``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from repd.core.faults import crashpoint
from repd.core.identity import fs_path
from repd.errors import EngineError
from repd.log import get_logger
from repd.pipeline.generations import GenerationHandle, current_vectors
from repd.pipeline.modelstate import (
    GateLabels,
    GateReport,
    GenerationSummary,
    MigrationRefused,
    MigrationSnapshot,
    MigrationState,
    ModelCommandResult,
    ModelSnapshot,
)

if TYPE_CHECKING:
    from repd.engine import Engine
    from repd.pipeline.changes import ChangeQueue
    from repd.pipeline.indexer import Indexer
    from repd.settings import Settings

log = get_logger("migration")

T = TypeVar("T")

#: Files and (estimated) chunks per backfill step: a step is a few seconds of CPU at most.
BACKFILL_FILES = 64
BACKFILL_CHUNKS = 256
#: Chunks per embedding call in a backfill: a live change waits for at most one of these
#: (a fraction of a second on a CPU).
BACKFILL_SLICE = 16
SAMPLE_QUERIES = 20
#: How often a finished migration waiting for its switch looks for live edits to copy.
READY_CHECK_S = 5.0
PUBLISH_EVERY_S = 1.0
COUNT_EVERY_S = 5.0
RATE_WINDOW_S = 60.0
#: How long a model command waits for the worker to take it (it may be mid-group).
COMMAND_TIMEOUT_S = 600.0
#: meta key: the ``model`` setting the last migration from the config was started for,
#: so a restart with an unchanged config never undoes `repd model use` or a rollback.
CONFIG_MODEL_KEY = "config_model"


@dataclass
class _Migration:
    """The migration in progress; changed only on the worker thread."""

    state: MigrationState
    from_gen: int
    model_name: str
    handle: GenerationHandle | None = None
    cursor: int = 0
    passes: int = 0
    #: Files written in the current catch-up pass (a pass that writes none ends them).
    pass_wrote: int = 0
    files_total: int = 0
    files_done: int = 0
    chunks_embedded: int = 0
    started_at: float = field(default_factory=time.time)
    gate: GateReport | None = None
    message: str | None = None
    memory_bytes: int | None = None
    counted_at: float = 0.0
    checked_at: float = 0.0
    window: deque[tuple[float, int]] = field(default_factory=deque)


class Migrations:
    """Generations and migrations of one daemon: implements ``ModelCommands``.

    Commands may come from any thread; each runs on the worker thread (through
    ``call``), between two units of live work, so the worker stays the only writer.
    """

    def __init__(self, engine: Engine, indexer: Indexer, queue: ChangeQueue,
                 call: Callable[[str, Callable[[], Any], float], Any],
                 settings: Callable[[], Settings]) -> None:
        self.engine = engine
        self.indexer = indexer
        self.queue = queue
        self.generations = engine.generations
        self._call_on_worker = call
        self._settings = settings
        self._mig: _Migration | None = None
        self._loading: tuple[str, float] | None = None  # (model, since) while a model loads
        self._load_lock = threading.Lock()
        self._failed: tuple[str, str] | None = None  # (model, why) of the last failed start
        self._snap = ModelSnapshot()
        self._published_at = 0.0
        self._points: dict[int, int] = {}
        self._gens_at = 0.0
        building = self.generations.view.building
        active = self.generations.active
        if building is not None and active is not None:
            # A migration a restart (or kill -9) interrupted: resume from its cursor.
            row = building.row
            self._mig = _Migration("backfilling", active.id, row.model_name, building,
                                   cursor=int(row.cursor or 0), started_at=row.created_at)
            log.info("migration_resumed", generation=building.id, model=row.model_name,
                     cursor=self._mig.cursor)

    # -- ModelCommands (any thread) ------------------------------------------------------

    def snapshot(self) -> ModelSnapshot:
        """The latest published state."""
        return self._snap

    def use(self, model: str, *, from_config: bool = False) -> ModelCommandResult:
        """Load ``model`` here (this thread), then start migrating to it on the worker.

        ``from_config``: the ``model`` setting asked for it; once the migration starts
        (or proves unneeded), the setting is recorded as acted upon.
        """
        model = model.strip()
        if not model:
            raise MigrationRefused("name a model: a Hugging Face name or a local folder")
        if not self._load_lock.acquire(blocking=False):
            raise MigrationRefused(f"a model is already loading ({self._loading_name()}); "
                                   "wait for it, then try again")
        try:
            self._refuse_if_migrating()
            self._loading = (model, time.time())
            self._failed = None
            self._publish(force=True)
            try:
                emb = self.engine.load_model(model)
            except EngineError as exc:
                self._failed = (model, str(exc))
                raise MigrationRefused(str(exc)) from None
            finally:
                self._loading = None
            result: ModelCommandResult = self._call(
                "start migration", lambda: self._begin(emb, from_config))
            return result
        finally:
            self._load_lock.release()
            self._publish(force=True)

    def switch(self, *, force: bool = False,
               labels: GateLabels | None = None) -> ModelCommandResult:
        """Gate, then switch (on the worker thread)."""
        result: ModelCommandResult = self._call("switch", lambda: self._switch(force, labels))
        return result

    def rollback(self) -> ModelCommandResult:
        """Make the most recently retired generation active again."""
        result: ModelCommandResult = self._call("rollback", self._rollback)
        return result

    def prune(self) -> ModelCommandResult:
        """Delete every retired generation."""
        result: ModelCommandResult = self._call("prune", self._prune)
        return result

    def abort(self) -> ModelCommandResult:
        """Stop the migration in progress and delete its generation."""
        result: ModelCommandResult = self._call("abort", self._abort)
        return result

    def follow_config(self) -> None:
        """Start a migration when the ``model`` setting changed since the last one
        (daemon start, SIGHUP); the model loads on a thread of its own."""
        settings = self._settings()
        manifest = self.engine.manifest
        active = self.generations.active
        if active is None:
            return
        wanted = settings.model
        last = manifest.get_meta(CONFIG_MODEL_KEY)
        if last is None:
            manifest.set_meta(CONFIG_MODEL_KEY, active.row.model_name)
            last = active.row.model_name
        # An index made before sparse vectors, or cut by an older chunker, moves to today's
        # layout with its own model: dense vectors of unchanged chunks are cached, so only
        # BM25 vectors and re-cut chunks are computed, and the points rewritten.
        outdated = active.row.vectors != current_vectors()
        if outdated and self._mig is None:
            log.warning("index_layout_outdated", generation=active.id, vectors=active.row.vectors,
                        wanted=current_vectors(),
                        message="the index was built by an older repd (no sparse vectors, "
                        "another BM25 setting or an older chunker): rebuilding it with the "
                        "same model while it keeps answering")
            wanted = active.row.model_name if wanted == last else wanted
        elif wanted == last and not self.engine.model_changed:
            return
        mig = self._mig
        if mig is not None:
            if mig.model_name != wanted:
                self._failed = (wanted, f"the config names {wanted} but a migration to "
                                f"{mig.model_name} is in progress: `repd model abort` first")
                log.error("migration_refused", model=wanted, why=self._failed[1])
                self._publish(force=True)
            return

        def run() -> None:
            try:
                result = self.use(wanted, from_config=True)
            except MigrationRefused as exc:
                log.error("migration_not_started", model=wanted, why=str(exc))
                return
            except Exception as exc:  # a bug here must not take the daemon down
                log.exception("migration_not_started", model=wanted, why=str(exc))
                self._failed = (wanted, f"{type(exc).__name__}: {exc}")
                return
            log.info("migration_from_config", model=wanted, result=result.message)

        threading.Thread(target=run, name="repd-model-load", daemon=True).start()

    # -- worker thread --------------------------------------------------------------------

    def background(self, should_yield: Callable[[], bool]) -> bool:
        """One bounded step of backfill (or the gate once it is done); True while there
        is more to do. Raises ``Yielded`` when live work arrived mid-step.

        A finished migration waiting for `repd model switch` (state ``ready``) keeps its
        generation in step with live edits, looking every few seconds.
        """
        mig = self._mig
        if mig is None or mig.handle is None or mig.state not in ("backfilling", "ready"):
            self._publish()
            return False
        if mig.state == "ready":
            now = time.monotonic()
            if now - mig.checked_at < READY_CHECK_S:
                self._publish()
                return False
            mig.checked_at = now
            did = self._step(mig, 0, should_yield, save_cursor=False)
            self._publish()
            return did
        if not self._step(mig, mig.cursor, should_yield, save_cursor=not mig.passes):
            return self._end_of_pass(mig)
        self._publish()
        return True

    def _step(self, mig: _Migration, after: int, should_yield: Callable[[], bool], *,
              save_cursor: bool) -> bool:
        """Write the next files the building generation lacks (by id after ``after``), or
        clear what it holds of files no longer indexed; False when there was nothing."""
        handle = mig.handle
        assert handle is not None
        manifest = self.engine.manifest
        rows = manifest.files_to_backfill(handle.id, after, BACKFILL_FILES)
        if rows:
            active = self.generations.active
            counts = manifest.chunk_counts(active.id if active else handle.id,
                                           [r.id for r in rows])
            budget, keep = 0, 0
            for r in rows:
                budget += max(1, counts.get(r.id, 1))
                keep += 1
                if budget >= BACKFILL_CHUNKS:
                    break
            rows = rows[:keep]
        clear = [] if rows else manifest.files_to_clear(handle.id, BACKFILL_FILES)
        if not rows and not clear:
            return False
        changed: list[tuple[str, str]] = []
        saved = self.indexer.embed_slice
        self.indexer.embed_slice = BACKFILL_SLICE
        before = self._embedded(handle)
        try:
            self.indexer.backfill(
                handle, rows, clear, str(rows[-1].id) if rows and save_cursor else None,
                should_yield, changed)
        finally:
            self.indexer.embed_slice = saved
            # Counted from the model, not the step's figures: a step that yields to live
            # work keeps the slices it embedded (cached) but returns no figures.
            mig.chunks_embedded += self._embedded(handle) - before
        crashpoint("backfill")  # after a step's commit: the resume test's kill -9
        for root, path in changed:
            self.queue.put_path(Path(root), fs_path(path))
        wrote = len(rows) - len(changed)
        if rows:
            mig.cursor = rows[-1].id
            mig.pass_wrote += wrote
        now = time.monotonic()
        mig.files_done += wrote
        mig.window.append((now, wrote))
        while mig.window and mig.window[0][0] < now - RATE_WINDOW_S:
            mig.window.popleft()
        return wrote > 0 or bool(clear)

    @staticmethod
    def _embedded(handle: GenerationHandle) -> int:
        """Texts the generation's model embedded since it loaded (0 before it loads)."""
        emb = handle.loaded_embedder
        return int(getattr(emb, "embedded_count", 0)) if emb is not None else 0

    def _end_of_pass(self, mig: _Migration) -> bool:
        """The cursor reached the end: pass again from the start (live edits, which only
        the active generation receives at once, and files changed while the model
        loaded) as long as a pass finds work, then go to the gate. The gate runs on this
        thread right after a pass that found nothing, so no edit slips in between."""
        if mig.passes == 0 or mig.pass_wrote:
            mig.passes += 1
            mig.cursor = 0
            mig.pass_wrote = 0
            return True
        mig.state = "gating"
        self._publish(force=True)
        settings = self._settings().migration
        report = self._gate(mig, force=False, labels=self._config_labels())
        mig.gate = report
        mig.state = "ready"
        if report.ok and settings.auto_switch:
            self._do_switch(mig)
        else:
            why = "waiting for `repd model switch`" if report.ok else "the gate refused"
            log.warning("migration_ready", generation=mig.handle.id if mig.handle else None,
                        why=why, checks=list(report.checks))
            self._publish(force=True)
        return False

    def _begin(self, emb: Any, from_config: bool) -> ModelCommandResult:
        self._refuse_if_migrating()
        active = self.generations.active
        if active is None:
            raise MigrationRefused("nothing is indexed yet")
        if from_config:
            self.engine.manifest.set_meta(CONFIG_MODEL_KEY, emb.model_name)
        if emb.model_id == active.model_id and active.row.vectors == current_vectors():
            return ModelCommandResult(f"{emb.model_name} is the model generation {active.id} "
                                      "was built with: nothing to do", active.id)
        try:
            handle = self.engine.create_generation(emb)
        except EngineError as exc:
            raise MigrationRefused(str(exc)) from None
        counts = self.engine.manifest.sync_counts(handle.id)
        self._mig = _Migration("backfilling", active.id, emb.model_name, handle,
                               files_total=counts["indexed"],
                               memory_bytes=getattr(emb, "memory_bytes", None))
        self.generations.publish(building=handle)
        log.info("migration_started", generation=handle.id, model=emb.model_name,
                 model_id=emb.model_id, files=counts["indexed"], from_generation=active.id)
        self._publish(force=True)
        return ModelCommandResult(
            f"migrating to {emb.model_name} as generation {handle.id}: {counts['indexed']} "
            f"files to embed again while generation {active.id} keeps answering; "
            "`repd model status` shows progress", handle.id)

    def _refuse_if_migrating(self) -> None:
        mig = self._mig
        if mig is not None:
            raise MigrationRefused(
                f"a migration to {mig.model_name} is in progress ({mig.state}): wait for it, "
                "or `repd model abort` it first")

    def _switch(self, force: bool, labels: GateLabels | None) -> ModelCommandResult:
        mig = self._mig
        if mig is None or mig.handle is None:
            raise MigrationRefused("no migration to switch to: `repd model use NAME` starts one")
        if mig.state != "ready":
            done = self._progress(mig)
            raise MigrationRefused(
                f"the backfill of generation {mig.handle.id} is not finished ({done:.0%}); "
                "the switch waits for every file to be in the new generation")
        # Live edits since the backfill finished reached the active generation only:
        # bring the new one up to date first (usually a few files).
        while self._step(mig, 0, lambda: False, save_cursor=False):
            pass
        report = self._gate(mig, force=force, labels=labels or self._config_labels())
        mig.gate = report
        if not report.ok:
            self._publish(force=True)
            failing = "; ".join(report.checks)
            raise MigrationRefused(f"the gate refused the switch: {failing}; "
                                   "`repd model switch --force` switches anyway")
        return self._do_switch(mig)

    def _config_labels(self) -> GateLabels | None:
        """The labeled queries the config names for the gate, if any."""
        s = self._settings().migration
        if s.gate_queries is None or s.gate_qrels is None:
            return None
        return GateLabels(s.gate_queries, s.gate_qrels, s.gate_mapping)

    def _do_switch(self, mig: _Migration) -> ModelCommandResult:
        new = mig.handle
        old = self.generations.active
        assert new is not None and old is not None
        manifest = self.engine.manifest
        manifest.switch_generations(new.id, old.id)
        self.engine.point_alias(new)
        self._refresh_rows(new, old)
        view = self.generations.view
        self.generations.publish(active=new, building=None, retired=(old, *view.retired))
        self._mig = None
        log.info("generation_switched", active=new.id, model=new.row.model_name,
                 retired=old.id, forced=bool(mig.gate and mig.gate.forced),
                 embedded=mig.chunks_embedded)
        self._publish(force=True)
        return ModelCommandResult(
            f"generation {new.id} ({new.row.model_name}) answers queries now; generation "
            f"{old.id} is retired (`repd model rollback` returns to it, `repd model prune` "
            "deletes it)", new.id, {"gate": mig.gate} if mig.gate is not None else {})

    def _refresh_rows(self, *handles: GenerationHandle) -> None:
        for h in handles:
            row = self.engine.manifest.generation(h.id)
            if row is not None:
                h.with_row(row)

    def _rollback(self) -> ModelCommandResult:
        if self._mig is not None:
            raise MigrationRefused(f"a migration to {self._mig.model_name} is in progress: "
                                   "`repd model abort` it before rolling back")
        manifest = self.engine.manifest
        retired = [g for g in manifest.generations() if g.state == "retired"]
        if not retired:
            raise MigrationRefused("no retired generation to roll back to")
        target = max(retired, key=lambda g: (g.activated_at or 0.0, g.id))
        view = self.generations.view
        handle = next((h for h in view.retired if h.id == target.id), None)
        if handle is None:
            try:
                handle = self.engine.open_generation(target)
            except EngineError as exc:
                raise MigrationRefused(f"cannot open generation {target.id}: {exc}") from None
        try:
            handle.embedder  # noqa: B018 - loaded before the swap: no query waits for it
        except EngineError as exc:
            raise MigrationRefused(f"cannot load {target.model_name}: {exc}") from None
        current = self.generations.active
        assert current is not None
        manifest.switch_generations(handle.id, current.id)
        self.engine.point_alias(handle)
        self._refresh_rows(handle, current)
        others = tuple(h for h in view.retired if h.id != handle.id)
        self.generations.publish(active=handle, retired=(current, *others))
        stale = self._catch_up(handle)
        log.info("generation_rolled_back", active=handle.id, retired=current.id,
                 files_to_update=stale)
        self._publish(force=True)
        more = (f"; {stale} files changed since it was retired are being indexed into it"
                if stale else "")
        return ModelCommandResult(
            f"generation {handle.id} ({handle.row.model_name}) answers queries again; "
            f"generation {current.id} is retired{more}", handle.id)

    def _catch_up(self, handle: GenerationHandle) -> int:
        """Bring a generation made active again up to date: points of files gone since
        are deleted now; files changed since are marked and rescanned (live path)."""
        manifest = self.engine.manifest
        while True:
            clear = manifest.files_to_clear(handle.id, BACKFILL_FILES)
            if not clear:
                break
            self.indexer.backfill(handle, [], clear, None, lambda: False)
        stale = [r.id for r in manifest.files_to_backfill(handle.id, 0, 10**9)]
        if stale:
            manifest.mark_for_reindex(stale)
            for root in manifest.roots():
                self.queue.put_scan(Path(root), "")
        return len(stale)

    def _prune(self) -> ModelCommandResult:
        from repd.adapters.store_edge import disk_bytes

        manifest = self.engine.manifest
        retired = [g for g in manifest.generations() if g.state == "retired"]
        if not retired:
            raise MigrationRefused("no retired generation to prune")
        view = self.generations.view
        freed = 0
        for row in retired:
            handle = next((h for h in view.retired if h.id == row.id), None)
            if handle is None:
                try:
                    handle = self.engine.open_generation(row)
                except EngineError as exc:
                    raise MigrationRefused(f"cannot open generation {row.id} to delete it: "
                                           f"{exc}") from None
            freed += disk_bytes(self.engine.data_dir / row.location.replace("{id}", str(row.id)))
            self.engine.drop_generation(handle)
            log.info("generation_pruned", generation=row.id, model=row.model_name)
        self.generations.publish(retired=())
        self._publish(force=True)
        names = ", ".join(str(g.id) for g in retired)
        size = f", {freed / 2**20:.1f} MiB freed" if freed else ""
        return ModelCommandResult(f"deleted retired generation(s) {names}{size}")

    def _abort(self) -> ModelCommandResult:
        mig = self._mig
        if mig is None:
            if self._loading is not None:
                raise MigrationRefused(f"{self._loading[0]} is still loading; abort once it "
                                       "has loaded")
            raise MigrationRefused("no migration in progress")
        if mig.handle is not None:
            self.engine.drop_generation(mig.handle)
        self._mig = None
        self.generations.publish(building=None)
        log.info("migration_aborted", model=mig.model_name,
                 generation=mig.handle.id if mig.handle else None)
        self._publish(force=True)
        return ModelCommandResult(f"migration to {mig.model_name} aborted; its generation "
                                  "is deleted")

    # -- the gate --------------------------------------------------------------------------

    def _gate(self, mig: _Migration, *, force: bool, labels: GateLabels | None) -> GateReport:
        """Check the building generation before it may answer queries."""
        new, old = mig.handle, self.generations.active
        assert new is not None and old is not None
        manifest = self.engine.manifest
        checks: list[str] = []
        hard_ok = True   # what --force cannot override: an incomplete generation
        soft_ok = True
        c = manifest.sync_counts(new.id)
        same = c["indexed"] - c["missing"] - c["failed"]
        checks.append(f"files: {same} of {c['indexed']} indexed files in the same state in "
                      f"generations {old.id} and {new.id}")
        if c["missing"] or c["extra"] or c["dirty"]:
            hard_ok = False
            checks.append(f"not finished: {c['missing']} files missing, {c['extra']} to "
                          f"remove, {c['dirty']} waiting to be indexed again")
        if c["failed"]:
            soft_ok = False
            checks.append(f"{c['failed']} files failed or were skipped with the new model")
        points, want = new.store.count(), manifest.chunk_count(new.id)
        if points != want:
            hard_ok = False
            checks.append(f"points: the new store holds {points}, the manifest {want}")
        else:
            checks.append(f"points: {points} in the new store, as the manifest records")
        answered, own, asked = self._sample_queries(new)
        checks.append(f"sample queries: {answered} of {asked} answered, {own} found their "
                      "own file in the top 10")
        if answered < asked:
            soft_ok = False
        ndcg_old = ndcg_new = None
        if labels is not None:
            try:
                ndcg_old, ndcg_new, n = self._score(old, new, labels)
            except Exception as exc:
                soft_ok = False
                checks.append(f"labeled queries could not be scored: {exc}")
            else:
                drop = self._settings().migration.max_ndcg_drop
                verdict = "ok" if ndcg_new >= ndcg_old - drop else "worse"
                checks.append(f"nDCG@10 on {n} labeled queries: {ndcg_old:.4f} with "
                              f"generation {old.id}, {ndcg_new:.4f} with {new.id} ({verdict})")
                if verdict != "ok":
                    soft_ok = False
        ok = hard_ok and (soft_ok or force)
        forced = force and hard_ok and not soft_ok
        if forced:
            checks.append("forced: switching despite the checks above")
        return GateReport(ok, tuple(checks), ndcg_old, ndcg_new, forced)

    def _sample_queries(self, handle: GenerationHandle) -> tuple[int, int, int]:
        from repd.pipeline.search import search

        ids = self.engine.manifest.sample_points(handle.id, SAMPLE_QUERIES)
        records = handle.store.retrieve(ids, with_vectors=False) if ids else []
        answered = own = 0
        for rec in records:
            text = str(rec.payload.get("text", ""))[:300]
            try:
                hits, _ = search(handle.store, handle.embed_query, text, 10, per_file=True,
                                 mode=handle.default_mode(),
                                 embed_sparse=handle.embed_sparse_query)
            except Exception as exc:
                log.warning("gate_query_failed", generation=handle.id, error=str(exc))
                continue
            if hits:
                answered += 1
            if any((h.root, h.path) == (rec.payload.get("root"), rec.payload.get("path"))
                   for h in hits):
                own += 1
        return answered, own, len(records)

    def _score(self, old: GenerationHandle, new: GenerationHandle,
               labels: GateLabels) -> tuple[float, float, int]:
        from repd.evaluation import (
            DocResolver,
            load_mapping,
            load_qrels,
            load_queries,
            score_search,
        )
        from repd.pipeline.search import search

        queries = load_queries(labels.queries)
        qrels = load_qrels(labels.qrels)
        resolver = DocResolver(load_mapping(labels.mapping) if labels.mapping else None)
        out: list[float] = []
        n = 0
        for handle in (old, new):
            def files(text: str, k: int, h: GenerationHandle = handle) -> list[tuple[str, str]]:
                hits, _ = search(h.store, h.embed_query, text, k, per_file=True,
                                 mode=h.default_mode(),
                                 embed_sparse=h.embed_sparse_query)
                return [(x.root, x.path) for x in hits]
            result = score_search(files, queries, qrels, resolver, k=10)
            out.append(result.means["ndcg@10"])
            n = result.queries
        return out[0], out[1], n

    # -- commands and status ---------------------------------------------------------------

    def _call(self, name: str, fn: Callable[[], T]) -> T:
        try:
            return self._call_on_worker(name, fn, COMMAND_TIMEOUT_S)  # type: ignore[no-any-return]
        except FutureTimeout:
            raise MigrationRefused(f"the indexer did not take `{name}` within "
                                   f"{COMMAND_TIMEOUT_S:.0f} s; see `repd status`") from None

    def _loading_name(self) -> str:
        loading = self._loading
        return loading[0] if loading else "another model"

    @staticmethod
    def _progress(mig: _Migration) -> float:
        return min(1.0, mig.files_done / mig.files_total) if mig.files_total else 1.0

    def _publish(self, *, force: bool = False) -> None:
        """Refresh the snapshot (at most once a second unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._published_at < PUBLISH_EVERY_S:
            return
        self._published_at = now
        try:
            self._snap = self._build_snapshot(now, force)
        except Exception as exc:  # status must never take the worker down
            log.warning("model_status_failed", error=f"{type(exc).__name__}: {exc}")

    def _build_snapshot(self, now: float, force: bool) -> ModelSnapshot:
        manifest = self.engine.manifest
        mig = self._mig
        if mig is not None and mig.handle is not None and now - mig.counted_at > COUNT_EVERY_S:
            c = manifest.sync_counts(mig.handle.id)
            mig.files_total = c["indexed"]
            mig.files_done = c["indexed"] - c["missing"]
            mig.counted_at = now
        rows = manifest.generations()
        if force or now - self._gens_at > COUNT_EVERY_S or len(rows) != len(self._points):
            # COUNTs over a million chunk rows take a while: not on every step.
            self._points = {g.id: manifest.chunk_count(g.id) for g in rows}
            self._gens_at = now
        gens = tuple(GenerationSummary(
            g.id, g.model_name, g.model_id, g.dim, g.state,  # type: ignore[arg-type]
            self._points.get(g.id, 0), g.created_at, g.activated_at,
            g.location.replace("{id}", str(g.id))) for g in rows)
        active = self.generations.active
        return ModelSnapshot(gens, self._migration_snapshot(mig, now),
                             active.id if active is not None else None)

    def _migration_snapshot(self, mig: _Migration | None, now: float) -> MigrationSnapshot | None:
        active = self.generations.active
        from_gen = active.id if active is not None else 0
        if mig is None:
            loading, failed = self._loading, self._failed
            if loading is not None:
                return MigrationSnapshot("loading", from_gen, None, loading[0], None, 0, 0, 0,
                                         0.0, None, None, None, _loading_message(loading[0]),
                                         loading[1])
            if failed is not None:
                return MigrationSnapshot("failed", from_gen, None, failed[0], None, 0, 0, 0,
                                         0.0, None, None, None, failed[1], time.time())
            return None
        span = (now - mig.window[0][0]) if len(mig.window) > 1 else 0.0
        rate = sum(n for _, n in mig.window) / span if span > 0 else 0.0
        left = max(0, mig.files_total - mig.files_done)
        eta = left / rate if rate > 0 else None
        handle = mig.handle
        emb = handle.loaded_embedder if handle is not None else None
        memory = mig.memory_bytes if mig.memory_bytes is not None else (
            getattr(emb, "memory_bytes", None) if emb is not None else None)
        return MigrationSnapshot(
            mig.state, mig.from_gen, handle.id if handle else None, mig.model_name,
            handle.model_id if handle else None, mig.files_done, mig.files_total,
            mig.chunks_embedded, rate, eta if mig.state == "backfilling" else None, memory,
            mig.gate, mig.message, mig.started_at)


def _loading_message(model: str) -> str:
    """What a loading migration says; an int8 variant may first be made (about a minute)."""
    from repd.adapters.openvino_int8 import making_note

    note = making_note(model)
    return f"loading {model}: the first time, {note}" if note else f"loading {model}"
