"""The daemon's answers to the API: status, query, files, reindex, pause, resume, metrics."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from repd import __version__
from repd.api.backend import ApiError
from repd.api.schema import (
    ActionResponse,
    FileIssue,
    FilesResponse,
    GenerationInfo,
    IssueState,
    ModelInfo,
    QueryHit,
    QueryRequest,
    QueryResponse,
    QueueInfo,
    Rates,
    RootStatus,
    StatusResponse,
    StoreInfo,
    Totals,
)
from repd.metrics import render_metrics
from repd.pipeline.search import search

if TYPE_CHECKING:
    from repd.app import Daemon


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


class DaemonService:
    """Implements the API's Backend over a running daemon's parts."""

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

    def _state(self) -> str:
        d = self.d
        if d.stopping:
            return "stopping"
        if not d.ready:
            return "starting"
        if d.worker.paused.is_set():
            return "paused"
        stage = d.indexer.stage
        if stage == "scanning":
            return "scanning"
        if d.worker.busy or stage != "idle":
            return "indexing"
        return "idle"

    def _build_status(self) -> StatusResponse:
        d = self.d
        gen = d.indexer.generation
        emb = d.engine._embedder
        by_root = d.engine.manifest.counts_by_root()
        chunks_by_root = d.engine.manifest.chunk_counts_by_root(gen.id)
        watch = d.watcher.status() if d.watcher else {}
        roots = []
        for root in d.roots:
            counts = by_root.get(str(root), {})
            roots.append(RootStatus(
                path=str(root), watch=watch.get(root, "error: not watched"),
                files=counts.get("indexed", 0), chunks=chunks_by_root.get(str(root), 0),
                skipped=counts.get("skipped", 0), failed=counts.get("failed", 0)))
        depth = d.queue.depth()
        stage = d.indexer.stage
        files_s, chunks_s, embeds_s = d.worker.counters.rates()
        pending = depth.get("paths", 0)
        eta = pending / files_s if files_s > 0 and pending else (0.0 if not pending else None)
        info = d.store_info()
        total = d.worker.counters.total
        last_scan = d.worker.counters.last_scan_at
        return StatusResponse(
            version=__version__, state=self._state(),  # type: ignore[arg-type]
            paused=d.worker.paused.is_set(),
            model=ModelInfo(name=gen.model_name, id=gen.model_id, dim=gen.dim,
                            device=getattr(emb, "device", None)),
            generation=GenerationInfo(id=str(gen.id), state=gen.state,  # type: ignore[arg-type]
                                      points=_int(info.get("points"))),
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
                          embedded=total.chunks_embedded, reused=total.chunks_reused),
            store=StoreInfo(kind=d.settings.store.kind, points=_int(info.get("points")),
                            indexed_vectors=_int(info.get("indexed_vectors")),
                            index_built=bool(info.get("hnsw_built", False))),
            uptime_s=time.monotonic() - d.started_at,
            last_scan_at=datetime.fromtimestamp(last_scan, UTC) if last_scan else None,
            last_error=d.worker.counters.last_error)

    # -- query ---------------------------------------------------------------------------

    def query(self, req: QueryRequest) -> QueryResponse:
        """Search the active generation with the loaded model."""
        root = None
        if req.root is not None:
            root = os.path.abspath(req.root)
            if Path(root) not in self.d.roots:
                raise ApiError(404, f"{req.root} is not an indexed root", "unknown_root")
        hits, took = search(self.d.store, self.d.engine.embed_query, req.text, req.k,
                            req.path, root, per_file=req.files)
        self.queries += 1
        self.query_seconds += took / 1000
        return QueryResponse(
            hits=[QueryHit(rank=h.rank, score=h.score, root=h.root, path=h.path,
                           start_line=max(1, h.start_line), end_line=max(1, h.end_line),
                           snippet=h.snippet) for h in hits],
            took_ms=took, generation=str(self.d.indexer.generation.id))

    # -- files, actions ------------------------------------------------------------------

    def files(self, state: IssueState | None, limit: int, offset: int) -> FilesResponse:
        """Skipped and failed files with their reasons."""
        rows, total = self.d.engine.manifest.file_issues(state, limit, offset)
        return FilesResponse(total=total, items=[FileIssue(
            root=r.root, path=r.path, state=r.state,  # type: ignore[arg-type]
            reason=r.reason or "unknown", detail=r.detail or "",
            at=datetime.fromtimestamp(r.indexed_at_ns / 1e9, UTC)) for r in rows])

    def reindex(self, path: str | None) -> ActionResponse:
        """Re-read a file, a folder, or everything, even if stat says unchanged."""
        manifest = self.d.engine.manifest
        if path is None:
            for root in self.d.roots:
                manifest.forget_hashes(str(root))
                self.d.queue.put_scan(root, "")
            return ActionResponse(ok=True, message="every root queued for re-reading",
                                  queued=len(self.d.roots))
        target = Path(os.path.abspath(path))
        for root in self.d.roots:
            if target == root or root in target.parents:
                rel = target.relative_to(root).as_posix() if target != root else ""
                n = manifest.forget_hashes(str(root), rel)
                self.d.queue.put_scan(root, rel)
                return ActionResponse(ok=True, message=f"{target} queued for re-reading",
                                      queued=max(n, 1))
        raise ApiError(404, f"{path} is not inside any indexed root", "not_in_root")

    def pause(self) -> ActionResponse:
        """Stop taking work off the queue; events keep being collected."""
        self.d.worker.paused.set()
        self._cache = None
        return ActionResponse(ok=True, message="paused; changes keep queueing")

    def resume(self) -> ActionResponse:
        """Take work off the queue again."""
        self.d.worker.paused.clear()
        self._cache = None
        return ActionResponse(ok=True, message="resumed")

    def metrics(self) -> str:
        """Prometheus text exposition."""
        return render_metrics(self.status(), self.queries, self.query_seconds)
