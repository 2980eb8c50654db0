"""The daemon's answers to the API: status, query, files, reindex, pause, resume, metrics,
and the model-upgrade commands (``/v1/model...``)."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from repd import __version__
from repd.api.backend import ApiError
from repd.api.schema import (
    ActionResponse,
    ComponentStatus,
    CrashInfo,
    FileIssue,
    FilesResponse,
    GateInfo,
    GateLabelFiles,
    GenerationEntry,
    GenerationInfo,
    IssueState,
    MigrationInfo,
    ModelActionResponse,
    ModelInfo,
    ModelStatusResponse,
    QueryHit,
    QueryRequest,
    QueryResponse,
    QueueInfo,
    Rates,
    ReplicasInfo,
    RootStatus,
    StatusResponse,
    StoreInfo,
    Totals,
)
from repd.core.identity import stored_path
from repd.metrics import render_metrics
from repd.pipeline.modelstate import (
    GateLabels,
    GateReport,
    GenerationSummary,
    MigrationRefused,
    MigrationSnapshot,
    ModelCommandResult,
    ModelCommands,
    ModelSnapshot,
)
from repd.pipeline.scanner import contained, real_bases
from repd.pipeline.search import QueryError, check_mode, resolve_scope, search

if TYPE_CHECKING:
    from repd.adapters.store import Store
    from repd.app import Daemon
    from repd.core.types import SparseVec
    from repd.crashlog import Crash
    from repd.pipeline.worker import WorkerSnapshot


class QueryHandle(Protocol):
    """One generation, held for the length of one query (``Daemon.generations.for_query``)."""

    @property
    def id(self) -> int:
        """The generation's id."""
        ...

    @property
    def store(self) -> Store:
        """Its store."""
        ...

    def embed_query(self, text: str) -> list[float]:
        """``text`` embedded with the generation's own model."""
        ...

    def embed_sparse_query(self, text: str) -> SparseVec:
        """``text``'s BM25 vector (generations with sparse vectors only; ``hybrid``, a
        bool, says which, and is read with a default of False)."""
        ...


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _replicas(value: object) -> ReplicasInfo | None:
    """The store's ``replicas`` fact (``store_replicas.ReplicatedStore.info``), if any."""
    if not isinstance(value, dict):
        return None
    building = value.get("building")
    return ReplicasInfo(serving=str(value.get("serving")),
                        building=str(building) if building else None,
                        lag_points=_int(value.get("lag_points")))


def _when(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def gate_info(gate: GateReport) -> GateInfo:
    """The wire form of a gate report."""
    return GateInfo(ok=gate.ok, checks=list(gate.checks), ndcg_active=gate.ndcg_active,
                    ndcg_new=gate.ndcg_new, forced=gate.forced)


def migration_info(m: MigrationSnapshot) -> MigrationInfo:
    """The wire form of a migration snapshot (progress worked out, clamped to 0..1)."""
    if m.files_total > 0:
        progress = m.files_done / m.files_total
    else:  # nothing to backfill: done once past the backfill
        progress = 1.0 if m.state in ("gating", "ready") else 0.0
    return MigrationInfo(
        state=m.state, from_generation=str(m.from_generation),
        to_generation=str(m.to_generation) if m.to_generation is not None else None,
        model=m.model_name, model_id=m.model_id, files_done=max(0, m.files_done),
        files_total=max(0, m.files_total), progress=min(1.0, max(0.0, progress)),
        chunks_embedded=max(0, m.chunks_embedded), files_per_s=max(0.0, m.files_per_s),
        eta_s=max(0.0, m.eta_s) if m.eta_s is not None else None,
        model_memory_bytes=max(0, m.memory_bytes) if m.memory_bytes is not None else None,
        gate=gate_info(m.gate) if m.gate is not None else None, message=m.message,
        started_at=_when(m.started_at))


def generation_entry(g: GenerationSummary) -> GenerationEntry:
    """The wire form of one generation."""
    return GenerationEntry(
        id=str(g.id), model=g.model_name, model_id=g.model_id, dim=g.dim, state=g.state,
        points=max(0, g.points), created_at=_when(g.created_at),
        activated_at=_when(g.activated_at) if g.activated_at is not None else None,
        location=g.location)


def model_status_response(snap: ModelSnapshot) -> ModelStatusResponse:
    """The wire form of the model machinery's snapshot."""
    return ModelStatusResponse(
        active=str(snap.active) if snap.active is not None else None,
        generations=[generation_entry(g) for g in snap.generations],
        migration=migration_info(snap.migration) if snap.migration is not None else None)


def action_response(result: ModelCommandResult) -> ModelActionResponse:
    """The wire form of a model command's result (a gate report in ``extra["gate"]``)."""
    gate = result.extra.get("gate")
    return ModelActionResponse(
        ok=True, message=result.message,
        generation=str(result.generation) if result.generation is not None else None,
        gate=gate_info(gate) if isinstance(gate, GateReport) else None)


def _crash_info(crash: Crash | None) -> CrashInfo | None:
    if crash is None:
        return None
    return CrashInfo(at=crash.at, error=crash.error, log=str(crash.log))


class DaemonService:
    """Implements the API's Backend over a running daemon's parts.

    Status is built from what the parts publish (the worker's frozen snapshot, the
    queue's depth, the watcher's modes, the supervisor's health): it never queries the
    manifest and never waits for the worker, so it answers while the daemon is busy.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._cache: tuple[float, StatusResponse] | None = None
        self._lock = threading.Lock()
        self.queries = 0
        self.query_seconds = 0.0

    # -- status --------------------------------------------------------------------------

    def status(self) -> StatusResponse:
        """A snapshot, cached for a quarter second (the dashboard polls it)."""
        with self._lock:
            now = time.monotonic()
            if self._cache and now - self._cache[0] < 0.25:
                return self._cache[1]
            resp = self._build_status()
            self._cache = (now, resp)
            return resp

    @staticmethod
    def _state(d: Daemon, snap: WorkerSnapshot | None, dead: bool, inflight: int) -> str:
        if d.stopping:
            return "stopping"
        if not d.ready or snap is None:
            return "disk_full" if d.phase.startswith("disk full") else "starting"
        if dead or snap.problem_kind in ("failing", "failing_files"):
            return "degraded"
        if snap.problem_kind == "disk_full":
            return "disk_full"
        if d.worker is not None and d.worker.paused.is_set():  # a live Event: pause shows at once
            return "paused"
        if snap.stage == "scanning":
            return "scanning"
        if snap.busy or inflight or snap.stage != "idle":
            return "indexing"
        return "idle"

    def _build_status(self) -> StatusResponse:
        d = self.d
        worker = d.worker
        snap = worker.snapshot if worker is not None and d.ready else None
        health = d.supervisor.health()
        dead = [c for c in health if c.state == "dead"]
        depth = d.queue.depth()
        state = self._state(d, snap, bool(dead), depth.get("inflight", 0))
        problem = snap.problem if snap is not None else (None if d.ready else d.phase)
        if dead:
            problem = "; ".join(f"{c.name} is dead ({c.last_error})" for c in dead) + (
                f"; {problem}" if problem else "")
        watch = d.watcher.status() if d.watcher else {}
        counts = snap.counts_by_root if snap else {}
        chunk_counts = snap.chunks_by_root if snap else {}
        roots = []
        for root in d.roots:
            c = counts.get(str(root), {})
            roots.append(RootStatus(
                path=str(root), watch=watch.get(root, "stopped" if not d.ready
                                                 else "error: not watched"),
                files=c.get("indexed", 0), chunks=chunk_counts.get(str(root), 0),
                skipped=c.get("skipped", 0), failed=c.get("failed", 0)))
        stage = snap.stage if snap else "idle"
        files_s, chunks_s, embeds_s = snap.rates if snap else (0.0, 0.0, 0.0)
        pending = depth.get("paths", 0)
        eta: float | None = None
        if state in ("indexing", "scanning") and pending:
            eta = pending / files_s if files_s > 0 else None
        info = snap.store if snap else {}
        total = snap.totals if snap else None
        last_scan = snap.last_scan_at if snap else None
        gen = worker.indexer.generation if worker is not None else None
        emb = d.engine.loaded_embedder if d.engine is not None else None
        models = d.models if d.ready else None
        # snapshot() only reads the last published state: status stays cheap.
        model_snap = models.snapshot() if models is not None else None
        migration = model_snap.migration if model_snap is not None else None
        return StatusResponse(
            version=__version__, state=state,  # type: ignore[arg-type]
            paused=bool(worker is not None and worker.paused.is_set()),
            model=ModelInfo(name=gen.model_name if gen else d.settings.model,
                            id=gen.model_id if gen else None, dim=gen.dim if gen else None,
                            device=getattr(emb, "device", None),
                            backend=getattr(emb, "backend", None),
                            precision=getattr(emb, "precision", None),
                            runtime=getattr(emb, "runtime", None)),
            generation=GenerationInfo(id=str(gen.id), state=gen.state,  # type: ignore[arg-type]
                                      points=_int(info.get("points"))) if gen else None,
            queue=QueueInfo(pending=pending, scans=depth.get("scans", 0),
                            settling=depth.get("settling", 0),
                            planning=1 if stage == "planning" else 0,
                            embedding=1 if stage == "embedding" else 0,
                            writing=1 if stage == "writing" else 0),
            rates=Rates(files_per_s=files_s, chunks_per_s=chunks_s, embeds_per_s=embeds_s),
            eta_s=eta, roots=roots,
            totals=Totals(files=sum(r.files for r in roots), chunks=sum(r.chunks for r in roots),
                          skipped=sum(r.skipped for r in roots),
                          failed=sum(r.failed for r in roots),
                          embedded=total.chunks_embedded if total else 0,
                          reused=total.chunks_reused if total else 0),
            store=StoreInfo(kind=d.settings.store.kind, points=_int(info.get("points")),
                            indexed_vectors=_int(info.get("indexed_vectors")),
                            index_built=bool(info.get("hnsw_built", False)),
                            replicas=_replicas(info.get("replicas"))),
            uptime_s=time.monotonic() - d.started_at,
            last_scan_at=datetime.fromtimestamp(last_scan, UTC) if last_scan else None,
            last_error=snap.last_error if snap else None,
            problem=problem,
            components=[ComponentStatus(name=c.name, state=c.state,  # type: ignore[arg-type]
                                        restarts=c.restarts, last_error=c.last_error)
                        for c in health],
            migration=migration_info(migration) if migration is not None else None,
            previous_crash=_crash_info(d.previous_crash))

    def _ready(self) -> tuple[Any, Any]:
        d = self.d
        if not d.ready or d.worker is None or d.engine is None:
            raise ApiError(503, f"the daemon is starting ({d.phase}); try again in a moment",
                           "starting")
        return d.worker, d.engine

    # -- query ---------------------------------------------------------------------------

    def query(self, req: QueryRequest) -> QueryResponse:
        """Search the active generation (or ``req.generation``) with its own model.

        ``root`` may be a folder inside a root, ``path`` a glob or a path as the CLI
        prints it (absolute, or relative to ``req.cwd``); the mode defaults to the
        generation's (hybrid when it has sparse vectors). 400 for an invalid glob or a
        mode the generation lacks, 404 for a folder outside every root.
        """
        self._ready()
        try:
            scope = resolve_scope(req.path, req.root, self.d.roots, cwd=req.cwd)
        except QueryError as exc:
            raise ApiError(exc.status, exc.message, exc.code) from None
        generations = self.d.generations
        if generations is None:  # ready implies open; kept for the type checker's sake
            raise ApiError(503, "the daemon is starting; try again in a moment", "starting")
        try:
            # Taken once: a switch in the middle of this query cannot mix two generations'
            # store and model, and the answer names the one that gave it.
            handle: QueryHandle = generations.for_query(req.generation)
        except LookupError as exc:
            raise ApiError(404, str(exc.args[0]) if exc.args else str(exc),
                           "unknown_generation") from None
        hybrid = bool(getattr(handle, "hybrid", False))
        try:
            mode = check_mode(req.mode, hybrid)
            hits, took = search(handle.store, handle.embed_query, req.text, req.k,
                                scope.glob, scope.root, per_file=req.files, mode=mode,
                                embed_sparse=handle.embed_sparse_query if hybrid else None,
                                path_prefix=scope.prefix)
        except QueryError as exc:
            raise ApiError(exc.status, exc.message, exc.code) from None
        self.queries += 1
        self.query_seconds += took / 1000
        return QueryResponse(
            hits=[QueryHit(rank=h.rank, score=h.score, root=h.root, path=h.path,
                           start_line=max(1, h.start_line), end_line=max(1, h.end_line),
                           snippet=h.snippet) for h in hits],
            took_ms=took, generation=str(handle.id), mode=mode)

    # -- files, actions ------------------------------------------------------------------

    def files(self, state: IssueState | None, limit: int, offset: int) -> FilesResponse:
        """Skipped and failed files with their reasons."""
        _, engine = self._ready()
        rows, total = engine.manifest.file_issues(state, limit, offset)
        return FilesResponse(total=total, items=[FileIssue(
            root=r.root, path=r.path, state=r.state,
            reason=r.reason or "unknown", detail=r.detail or "",
            at=datetime.fromtimestamp(r.indexed_at_ns / 1e9, UTC)) for r in rows])

    def reindex(self, path: str | None) -> ActionResponse:
        """Re-read a file, a folder, or everything, even if stat says unchanged."""
        worker, engine = self._ready()
        manifest = engine.manifest
        queue = self.d.queue

        def forget_then(root: Path, stored: str, rel: str, as_file: bool) -> None:
            # The worker owns every manifest write; the API only asks it to do this one.
            def run() -> None:
                manifest.forget_hashes(str(root), stored)
                if as_file:
                    queue.put_path(root, rel)
                else:
                    queue.put_scan(root, rel)
            worker.submit("reindex", run)

        if path is None:
            for root in self.d.roots:
                forget_then(root, "", "", as_file=False)
            return ActionResponse(ok=True, message="every root queued for re-reading",
                                  queued=len(self.d.roots))
        target = Path(os.path.abspath(path))
        roots = list(self.d.roots)
        follow = self.d.settings.watch.follow_symlinks
        for root in roots:
            if target == root or root in target.parents:
                rel = target.relative_to(root).as_posix() if target != root else ""
                # `repd reindex ROOT/link` with link -> /elsewhere indexed files outside
                # every root: the folder part must really lie inside the root (or, when
                # links are followed, inside a configured root).
                if rel and not (contained(root, rel, follow, roots)
                                and _resolves_within(target, real_bases(root, roots if follow
                                                                        else ()))):
                    raise ApiError(403, f"{path} leads outside the indexed roots",
                                   "outside_roots")
                n = len(manifest.files_under(str(root), stored_path(rel)))
                # A file is re-read as a path: scanning it as a folder failed to list it and
                # deleted it from the index ("cannot list folder: Not a directory").
                forget_then(root, stored_path(rel), rel,
                            as_file=bool(rel) and not _is_dir(target, follow))
                return ActionResponse(ok=True, message=f"{target} queued for re-reading",
                                      queued=max(n, 1))
        raise ApiError(404, f"{path} is not inside any indexed root", "not_in_root")

    def pause(self) -> ActionResponse:
        """Stop taking work off the queue; events keep being collected."""
        worker, _ = self._ready()
        worker.paused.set()
        self._cache = None
        return ActionResponse(ok=True, message="paused; changes keep queueing")

    def resume(self) -> ActionResponse:
        """Take work off the queue again."""
        worker, _ = self._ready()
        worker.paused.clear()
        self._cache = None
        return ActionResponse(ok=True, message="resumed")

    def metrics(self) -> str:
        """Prometheus text exposition."""
        return render_metrics(self.status(), self.queries, self.query_seconds)

    # -- model upgrades ------------------------------------------------------------------

    def _models(self) -> ModelCommands:
        self._ready()
        models = self.d.models
        if models is None:  # ready, but the model machinery not yet published
            raise ApiError(503, f"the daemon is starting ({self.d.phase}); try again in a "
                           "moment", "starting")
        return models

    def _command(self, fn: Callable[[], ModelCommandResult]) -> ModelActionResponse:
        try:
            result = fn()
        except MigrationRefused as exc:
            raise ApiError(409, str(exc), "migration_refused") from None
        # The migration (or the active generation) just changed: status must show it now,
        # not a quarter second later.
        self._cache = None
        return action_response(result)

    def model_status(self) -> ModelStatusResponse:
        """The generations and the migration in progress (the last published snapshot)."""
        return model_status_response(self._models().snapshot())

    def model_use(self, model: str) -> ModelActionResponse:
        """Start migrating to ``model``."""
        models = self._models()
        return self._command(lambda: models.use(model))

    def model_switch(self, force: bool, labels: GateLabelFiles | None) -> ModelActionResponse:
        """Run the gate and switch; blocks while the checks run."""
        models = self._models()
        gate_labels = None
        if labels is not None:
            given = [("queries", labels.queries), ("qrels", labels.qrels)]
            if labels.mapping is not None:
                given.append(("mapping", labels.mapping))
            for name, path in given:
                # Checked here so that a typo is a 422 in a moment, not a gate that fails.
                if not Path(path).is_file():
                    raise ApiError(422, f"{name} file {path} does not exist on the daemon's "
                                   "machine (or is not a file)", "invalid_labels")
            gate_labels = GateLabels(
                queries=Path(labels.queries), qrels=Path(labels.qrels),
                mapping=Path(labels.mapping) if labels.mapping is not None else None)
        return self._command(lambda: models.switch(force=force, labels=gate_labels))

    def model_rollback(self) -> ModelActionResponse:
        """Make the most recently retired generation active again."""
        models = self._models()
        return self._command(models.rollback)

    def model_prune(self) -> ModelActionResponse:
        """Delete the retired generations."""
        models = self._models()
        return self._command(models.prune)

    def model_abort(self) -> ModelActionResponse:
        """Stop the migration in progress and delete its generation."""
        models = self._models()
        return self._command(models.abort)


def _is_dir(path: Path, follow_symlinks: bool) -> bool:
    """A folder to scan (a symlink to one only when links are followed)."""
    try:
        st = path.stat() if follow_symlinks else path.lstat()
    except OSError:
        return False  # gone or unreadable: the path is handled as a file (and deleted if gone)
    return stat.S_ISDIR(st.st_mode)


def _resolves_within(path: Path, bases: list[str]) -> bool:
    """True when ``path``, every symlink resolved, is one of ``bases`` or lies below one."""
    real = os.path.realpath(path)
    return any(real == b or real.startswith(b.rstrip("/") + "/") for b in bases)
