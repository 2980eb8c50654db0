"""Prometheus text exposition (format 0.0.4) of the daemon's status."""

from __future__ import annotations

from repd.api.schema import StatusResponse


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(st: StatusResponse, queries: int, query_seconds: float) -> str:
    """Render gauges and counters; names follow Prometheus conventions."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str,
               samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    metric("repd_up", "gauge", "1 while the daemon runs.", [({}, 1)])
    metric("repd_paused", "gauge", "1 while paused.", [({}, int(st.paused))])
    metric("repd_files", "gauge", "Files per root and state.",
           [({"root": r.path, "state": s}, float(v)) for r in st.roots
            for s, v in (("indexed", r.files), ("skipped", r.skipped), ("failed", r.failed))])
    metric("repd_chunks", "gauge", "Chunks in the index per root.",
           [({"root": r.path}, float(r.chunks)) for r in st.roots])
    metric("repd_queue_depth", "gauge", "Work waiting per pipeline stage.",
           [({"stage": k}, float(v)) for k, v in st.queue.model_dump().items()])
    metric("repd_chunks_embedded_total", "counter", "Chunks embedded since start.",
           [({}, float(st.totals.embedded))])
    metric("repd_chunks_reused_total", "counter", "Chunks whose vector was reused.",
           [({}, float(st.totals.reused))])
    metric("repd_store_points", "gauge", "Points in the active generation.",
           [({}, float(st.store.points))])
    metric("repd_store_index_built", "gauge", "1 when the HNSW index is built.",
           [({}, float(st.store.index_built))])
    metric("repd_queries_total", "counter", "Queries answered.", [({}, float(queries))])
    metric("repd_query_seconds_total", "counter", "Time spent answering queries.",
           [({}, query_seconds)])
    metric("repd_uptime_seconds", "gauge", "Seconds since start.", [({}, st.uptime_s)])
    # Always present (0 without a migration), so an alert on "active for too long" or a
    # progress graph needs no absent() juggling.
    migration = st.migration
    metric("repd_migration_active", "gauge", "1 while a model migration exists (building, "
           "waiting for the switch, or failed).", [({}, float(migration is not None))])
    metric("repd_migration_progress", "gauge", "Share of the migration's backfill done, 0 to 1.",
           [({}, migration.progress if migration is not None else 0.0)])
    return "\n".join(lines) + "\n"
