"""Renders the daemon's status (a dict from the API) as a readable table."""

from __future__ import annotations

from typing import Any

from repd.textsafe import printable


def _num(n: float) -> str:
    return f"{n:,.0f}" if n >= 100 else f"{n:.1f}" if isinstance(n, float) else str(n)


def render_status(st: dict[str, Any]) -> str:
    """The ``repd status`` text (control characters in names and messages made visible)."""
    return "\n".join(printable(line) for line in _lines(st))


def _lines(st: dict[str, Any]) -> list[str]:
    m, q, t, r, s = st["model"], st["queue"], st["totals"], st["rates"], st["store"]
    gen = st.get("generation") or {}
    eta = st.get("eta_s")
    lines = [
        f"repd {st['version']}  state: {st['state']}"
        f"{'  (paused)' if st['paused'] and st['state'] != 'paused' else ''}"
        f"  up {st['uptime_s']:.0f}s",
        *([f"PROBLEM    {st['problem']}"] if st.get("problem") else []),
        f"model      {m['name']}  dim {m.get('dim')}  on {m.get('device')}",
        f"generation {gen.get('id', '-')} ({gen.get('state', '-')}), {s['points']} points, "
        f"HNSW {'built' if s['index_built'] else 'not built (brute force)'}",
        f"queue      pending {q['pending']}  scans {q['scans']}  settling {q['settling']}  "
        f"planning {q['planning']}  embedding {q['embedding']}  writing {q['writing']}",
        f"rates      {r['files_per_s']:.1f} files/s  {r['chunks_per_s']:.1f} chunks/s  "
        f"{r['embeds_per_s']:.1f} embeds/s" + (f"  eta {eta:.0f}s" if eta else ""),
        f"totals     {t['files']} files  {t['chunks']} chunks  {t['skipped']} skipped  "
        f"{t['failed']} failed  ({t['embedded']} embedded, {t['reused']} reused since start)",
        "",
        f"{'ROOT':<50} {'WATCH':<9} {'FILES':>7} {'CHUNKS':>7} {'SKIP':>5} {'FAIL':>5}",
    ]
    for root in st["roots"]:
        lines.append(f"{root['path']:<50} {root['watch']:<9} {root['files']:>7} "
                     f"{root['chunks']:>7} {root['skipped']:>5} {root['failed']:>5}")
    broken = [c for c in st.get("components", []) if c["state"] != "ok" or c["restarts"]]
    for c in broken:
        lines.append(f"component  {c['name']}: {c['state']}, {c['restarts']} restart(s)"
                     + (f", last error: {c['last_error']}" if c.get("last_error") else ""))
    if st.get("last_error"):
        lines += ["", f"last error: {st['last_error']}"]
    return lines
