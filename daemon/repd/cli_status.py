"""Renders the daemon's status (a dict from the API) as text that fits a terminal.

Laid out for 80 columns (wider terminals give long paths and messages more room):
labels in an 11-column gutter, long messages wrapped under their label, root paths
shortened from the left (the end of a path is the part that tells roots apart).
"""

from __future__ import annotations

import textwrap
from datetime import datetime
from typing import Any

from repd.cli_output import ELLIPSIS, text_width
from repd.textsafe import printable

DEFAULT_WIDTH = 80
MIN_WIDTH = 60
GUTTER = 11  # "generation " and every other label fit in it
#: States in which work is under way, so a rate and an ETA mean something.
_WORKING = ("indexing", "scanning")


def duration(seconds: float) -> str:
    """``42s``, ``3m 07s``, ``2h 05m``, ``3d 4h``: short, and exact enough for a person."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _rate(n: float) -> str:
    return f"{n:,.0f}" if n >= 100 else f"{n:.1f}"


def render_status(st: dict[str, Any], width: int | None = None) -> str:
    """The ``repd status`` text (control characters in names and messages made visible)."""
    cols = max(width or DEFAULT_WIDTH, MIN_WIDTH)
    return "\n".join(_lines(st, cols))


def wrap_field(label: str, text: str, cols: int) -> list[str]:
    """``text`` under ``label``, wrapped to ``cols`` with the label's gutter."""
    first = f"{label:<{GUTTER - 1}} "
    lines = textwrap.wrap(printable(text), width=cols, initial_indent=first,
                          subsequent_indent=" " * GUTTER, break_long_words=True,
                          break_on_hyphens=False)
    return lines or [first.rstrip()]


def _left_fit(text: str, cols: int) -> str:
    """``text`` in ``cols`` columns, cut at the start: ``…/notes/project``."""
    if text_width(text) <= cols:
        return text
    out = text
    while out and text_width(out) > cols - 1:
        out = out[1:]
    cut = out.find("/")
    if 0 < cut < len(out) - 1:  # start at a folder boundary: "…/notes/project"
        out = out[cut:]
    return ELLIPSIS + out


def _header(st: dict[str, Any]) -> str:
    state = st["state"]
    # "paused" is said once: as the state, or after a state that outranks it.
    paused = "  (paused)" if st.get("paused") and state != "paused" else ""
    return f"repd {st['version']}  state: {state}{paused}  up {duration(st['uptime_s'])}"


def _rates_line(st: dict[str, Any]) -> str:
    r = st["rates"]
    state = st["state"]
    line = (f"{'rates':<{GUTTER}}{_rate(r['files_per_s'])} files/s  "
            f"{_rate(r['chunks_per_s'])} chunks/s  {_rate(r['embeds_per_s'])} embeds/s")
    eta = st.get("eta_s")
    # No ETA while paused or stopped, and none under a second: "eta 0s" while one large
    # file embeds reads as "done" when it is not.
    if eta is not None and eta >= 1 and state in _WORKING and not st.get("paused"):
        line += f"  eta {duration(eta)}"
    return line


def _lines(st: dict[str, Any], cols: int) -> list[str]:
    m, q, t, s = st["model"], st["queue"], st["totals"], st["store"]
    gen = st.get("generation") or {}
    lines = [printable(_header(st))]
    if st.get("problem"):
        # While starting, the field says what start-up is doing: not a problem.
        label = "phase" if st.get("state") == "starting" else "PROBLEM"
        lines += wrap_field(label, st["problem"], cols)
    if st.get("previous_crash"):
        lines += wrap_field("CRASHED", crash_summary(st["previous_crash"]), cols)
    loaded = m.get("dim") is not None
    # The backend (torch, openvino) and its precision beside the device: the same vectors
    # either way, but they decide the speed, and `auto` picks them.
    # Kept short: the default model's line fits 80 columns ("cpu, openvino bf16").
    runtime = " ".join(str(m[k]) for k in ("backend", "precision") if m.get(k))
    if m.get("runtime") == "full":  # the usual direct runtime goes unsaid
        runtime += " (with torch)"
    where = ", ".join(part for part in (m.get("device") or "-", runtime) if part)
    model = (f"{m['name']}  dim {m['dim']}  {where}" if loaded
             else f"{m['name']}  (not loaded yet)")
    lines += wrap_field("model", model, cols)
    hnsw = "HNSW built" if s["index_built"] else "no HNSW yet (exact search)"
    if s.get("replicas"):
        hnsw += f", {replicas_summary(s['replicas'])}"
    lines += wrap_field("generation", f"{gen.get('id', '-')} ({gen.get('state', '-')}), "
                   f"{s['points']:,} points, {hnsw}", cols)
    if st.get("migration"):
        lines += wrap_field("migration", migration_summary(st["migration"]), cols)
    busy = [f"{name} {q[name]}" for name in ("scans", "settling", "planning", "embedding",
                                             "writing") if q.get(name)]
    lines += wrap_field("queue", "  ".join([f"{q['pending']} pending", *busy]), cols)
    lines.append(_rates_line(st))
    lines += wrap_field("totals", f"{t['files']:,} files  {t['chunks']:,} chunks  "
                   f"{t['skipped']:,} skipped  {t['failed']:,} failed", cols)
    lines += wrap_field("this run", f"{t['embedded']:,} chunks embedded, {t['reused']:,} reused "
                   f"(since the daemon started)", cols)
    lines += ["", *_roots_table(st["roots"], cols)]
    broken = [c for c in st.get("components", []) if c["state"] != "ok" or c["restarts"]]
    for c in broken:
        text = f"{c['name']}: {c['state']}, {c['restarts']} restart(s)"
        if c.get("last_error"):
            text += f"; last error: {c['last_error']}"
        lines += wrap_field("component", text, cols)
    if st.get("last_error"):
        lines += ["", *wrap_field("last error", st["last_error"], cols)]
    return lines


def crash_summary(crash: dict[str, Any]) -> str:
    """One line on the previous run's fatal error (``previous_crash`` in the status)."""
    try:  # shown in local time, as a person reads a clock
        at = datetime.fromisoformat(crash["at"]).astimezone().strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        at = str(crash["at"])
    return (f"the previous run died at {at}: {crash['error']}; its threads' stacks are in "
            f"{crash['log']} (please report it)")


def percent(progress: float) -> str:
    """``42%``; ``99%`` until it is really done (``99.6%`` rounded up reads as finished)."""
    shown = int(progress * 100)
    return f"{100 if progress >= 1 else min(shown, 99)}%"


def migration_summary(m: dict[str, Any]) -> str:
    """One line on a model migration, for ``repd status`` (``repd model status`` has more)."""
    to = f"generation {m['to_generation']}" if m.get("to_generation") else "a new generation"
    head = f"{m['state']}: {m['model']} into {to}"
    state = m["state"]
    if state == "loading":
        return f"{head} (loading the model)"
    if state == "backfilling":
        text = (f"{head}, {percent(m['progress'])} ({m['files_done']:,} of "
                f"{m['files_total']:,} files)")
        eta = m.get("eta_s")
        return text + (f", eta {duration(eta)}" if eta is not None and eta >= 1 else "")
    if state == "gating":
        return f"{head}: backfilled, the checks before the switch run"
    if state == "ready":
        gate = m.get("gate")
        if gate and not gate.get("ok"):
            return f"{head}: the gate refused the switch (see `repd model status`)"
        return f"{head}: backfilled; `repd model switch` makes it active"
    return f"{head}: {m.get('message') or 'see `repd model status`'}"


def _roots_table(roots: list[dict[str, Any]], cols: int) -> list[str]:
    nums = f" {'FILES':>8} {'CHUNKS':>9} {'SKIP':>6} {'FAIL':>6}"
    watch_w = 9
    path_w = max(cols - len(nums) - watch_w - 1, 12)
    out = [f"{'ROOT':<{path_w}} {'WATCH':<{watch_w}}{nums}"]
    notes: list[str] = []
    for root in roots:
        path = _left_fit(printable(root["path"]), path_w)
        watch = printable(root["watch"])
        if len(watch) > watch_w:
            notes += wrap_field("watch", f"{path}: {watch}", cols)
            watch = watch.split(":", 1)[0][:watch_w]
        pad = path_w - text_width(path) + len(path)
        out.append(f"{path:<{pad}} {watch:<{watch_w}} {root['files']:>8,} "
                   f"{root['chunks']:>9,} {root['skipped']:>6,} {root['failed']:>6,}")
    if not roots:
        out.append("(no roots)")
    return out + notes


def replicas_summary(replicas: dict[str, Any]) -> str:
    """The two copies of a replicated index in a few words ("r0 serves, r1 building")."""
    text = f"{replicas['serving']} serves"
    if replicas.get("building"):
        text += f", {replicas['building']} building"
    return text
