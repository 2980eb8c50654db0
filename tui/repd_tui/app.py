"""The ``repd-tui`` terminal dashboard: a Textual app that shows and drives a running daemon."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from textual import events, on, work
from textual.app import App, ComposeResult, SuspendNotSupported
from textual.binding import Binding, BindingType
from textual.containers import Container, Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import (
    DataTable,
    Footer,
    Header,
    Input,
    ProgressBar,
    Sparkline,
    Static,
    TabbedContent,
    TabPane,
)
from textual.worker import Worker, WorkerState

from repd.api.client import ApiClientError, DaemonNotRunning, DaemonUnresponsive
from repd.cli_status import crash_summary, replicas_summary
from repd.textsafe import printable
from repd_tui.widgets import (
    ChunkView,
    Col,
    ConfirmScreen,
    FitTable,
    HelpScreen,
    KeyValueGrid,
    Panel,
    editor_command,
    fmt_count,
    fmt_duration,
    fmt_rate,
    fmt_when,
    one_line,
)

QUERY_K = 20
"""Hits asked for per query: more than a one-liner shows, still one screen of table."""

FILES_LIMIT = 500
"""Skipped/failed files fetched for the files view (one page; the total is shown)."""

HISTORY = 60
"""Status samples kept for the work-in-flight sparkline: a minute at the default rate."""

MAX_READ_BYTES = 32 * 1024 * 1024
"""Largest file the Chunk pane reads to show a hit's lines; bigger ones show the snippet."""

MAX_CHUNK_LINES = 400
"""Most lines the Chunk pane shows of one hit."""

MODEL_REFRESH_S = 30.0
"""Longest the dashboard goes without asking which generations exist (for rollback)."""

START_HINT = "start it with `repd run` or `systemctl --user start repd`"

ROOT_COLUMNS = (
    Col("path", "path", min=12, share=0.6, shrink=2, keep_end=True),
    Col("watch", "watch", min=5, shrink=1),
    Col("files", "files", right=True),
    Col("chunks", "chunks", right=True),
    Col("skipped", "skipped", right=True),
    Col("failed", "failed", right=True),
)
RESULT_COLUMNS = (
    Col("rank", "#", right=True),
    Col("score", "score", right=True),
    # The location matters most (the chunk pane shows the snippet whole): it may take most
    # of the width, and gives way only once the snippet is down to its minimum.
    Col("location", "location", min=14, share=0.7, shrink=1, keep_end=True),
    Col("snippet", "snippet", min=16, shrink=2, fill=True),
)
FILE_COLUMNS = (
    Col("state", "state"),
    Col("path", "path", min=14, share=0.45, shrink=2, keep_end=True),
    Col("reason", "reason", min=6, share=0.2, shrink=1),
    Col("detail", "detail", min=12, shrink=3, fill=True),
    Col("tried", "tried", min=16),
)

# What ``?`` lists; every key binding of the app is here (a test checks).
KEYS_HELP: tuple[tuple[str, str], ...] = (
    ("/", "search: type words, Enter runs the query, Esc goes back to the results"),
    ("↑ ↓", "move through the results; the Chunk pane shows the whole chunk"),
    ("o", "open the result (or file) in $VISUAL/$EDITOR at its line; xdg-open without one"),
    ("y", "copy path:line of the result (or the file's path) to the clipboard"),
    ("d", "the Daemon panel: state, model, generation, problem, last error"),
    ("f", "the files that are skipped or failed, with why; f again goes back"),
    ("p", "pause indexing, or resume it"),
    ("r", "re-index every root (asks first)"),
    ("s", "switch to the new model's generation, while a migration runs (asks first; "
     "after a refused gate, asks to force it)"),
    ("b", "roll back to the previous model's generation, when one is kept (asks first)"),
    ("Tab", "the next panel (Shift+Tab: the previous); arrows scroll it"),
    ("?", "this list"),
    ("q", "quit"),
)


class ClientLike(Protocol):
    """What the dashboard needs from ``repd.api.client.ApiClient``; tests pass a fake.

    Calls come from worker threads, several at once, so an implementation must be
    thread-safe (ApiClient is: each call opens its own connection).
    """

    @property
    def target(self) -> str:
        """Where the client connects (socket path or URL), for messages."""
        ...

    def status(self) -> dict[str, Any]:
        """``StatusResponse`` as a dict."""
        ...

    def query(
        self, text: str, k: int = 10, path: str | None = None, root: str | None = None
    ) -> dict[str, Any]:
        """``QueryResponse`` as a dict."""
        ...

    def files(self, state: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """``FilesResponse`` as a dict."""
        ...

    def reindex(self, path: str | None = None) -> dict[str, Any]:
        """``ActionResponse`` as a dict."""
        ...

    def pause(self) -> dict[str, Any]:
        """``ActionResponse`` as a dict."""
        ...

    def resume(self) -> dict[str, Any]:
        """``ActionResponse`` as a dict."""
        ...

    def model_status(self) -> dict[str, Any]:
        """``ModelStatusResponse`` as a dict."""
        ...

    def model_switch(self, force: bool = False) -> dict[str, Any]:
        """``ModelActionResponse`` as a dict; may take minutes (the gate runs)."""
        ...

    def model_rollback(self) -> dict[str, Any]:
        """``ModelActionResponse`` as a dict."""
        ...


LineReader = Callable[[str], list[str]]
"""Reads a file's text lines as the daemon indexed them; raises when it cannot."""


def read_document_lines(path: str) -> list[str]:
    """The lines of the file at ``path`` as the daemon sees them: decoded, newlines unified,
    a PDF's text or an HTML page's visible text, so that a hit's line numbers point into it.

    Raises ``SkipFile`` (binary, too large, unreadable...) or ``OSError``. The dashboard
    runs on the daemon's machine, so the file is right there.
    """
    from repd.adapters.extract import extract_bytes, read_file

    data = read_file(Path(path), MAX_READ_BYTES)
    return extract_bytes(data, Path(path).name).text.split("\n")


class _DocumentCache:
    """The last few files read for the Chunk pane, by path, size and mtime (thread-safe)."""

    def __init__(self, reader: LineReader, size: int = 16) -> None:
        self._reader = reader
        self._size = size
        self._docs: OrderedDict[str, tuple[tuple[int, int], list[str]]] = OrderedDict()
        self._lock = threading.Lock()

    def lines(self, path: str) -> list[str]:
        try:
            st = Path(path).stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None  # let the reader say why (or a test's reader answer)
        with self._lock:
            cached = self._docs.get(path)
            if cached is not None and stamp is not None and cached[0] == stamp:
                self._docs.move_to_end(path)
                return cached[1]
        lines = self._reader(path)
        if stamp is not None:
            with self._lock:
                self._docs[path] = (stamp, lines)
                while len(self._docs) > self._size:
                    self._docs.popitem(last=False)
        return lines


def _flat(text: str) -> str:
    return " ".join(text.split())


def chunk_lines(hit: dict[str, Any], lines: Sequence[str]) -> tuple[int | None, list[str], str]:
    """What the Chunk pane shows for ``hit`` given its file's ``lines``: (first line number
    or None, lines, note). The note is empty when the lines are the chunk as indexed;
    otherwise it says why the snippet is shown instead."""
    start, end = int(hit["start_line"]), int(hit["end_line"])
    snippet = str(hit["snippet"])
    fallback = snippet.splitlines() or [snippet]
    if start < 1 or end < start or end > len(lines):
        return None, fallback, "the file is shorter than it was when indexed; the indexed snippet:"
    part = list(lines[start - 1 : end])
    # The snippet is the chunk's text flattened and cut (after a heading breadcrumb); its
    # tail must be in these lines, or the file has changed since it was indexed.
    tail = _flat(snippet).removesuffix("...").removesuffix("…")[-32:]
    if tail and tail not in _flat("\n".join(part)):
        return None, fallback, "the file has changed since it was indexed; the indexed snippet:"
    if len(part) > MAX_CHUNK_LINES:
        return start, part[:MAX_CHUNK_LINES], (
            f"the first {MAX_CHUNK_LINES} of the chunk's {len(part)} lines")
    return start, part, ""


# -- what workers hand back to the UI thread -----------------------------------------------
# Workers return these instead of touching widgets: the UI thread applies them when the
# worker's SUCCESS event arrives, so no thread ever blocks on (or races with) the UI.


@dataclass(frozen=True)
class Outcome:
    """One API call's answer, or the exception it raised."""

    data: dict[str, Any] | None
    error: Exception | None


@dataclass(frozen=True)
class StatusOutcome(Outcome):
    """A status poll."""


@dataclass(frozen=True)
class QueryOutcome(Outcome):
    """A query; ``seq`` tells a stale answer (the user has asked again since) from the latest."""

    seq: int = 0
    text: str = ""


@dataclass(frozen=True)
class FilesOutcome(Outcome):
    """A page of skipped/failed files."""


@dataclass(frozen=True)
class ActionOutcome(Outcome):
    """pause, resume, reindex, switch or rollback."""

    action: str = ""


@dataclass(frozen=True)
class ModelOutcome(Outcome):
    """The generations (``/v1/model``): which one a rollback would return to."""


@dataclass(frozen=True)
class ChunkOutcome:
    """The lines of one hit, read from its file (or the snippet, and why)."""

    token: tuple[int, str]
    first: int | None
    lines: list[str]
    note: str


def _call(fn: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any] | None, Exception | None]:
    # Any exception, not only ApiClientError: a worker that raises would take the app down
    # with a traceback, and one odd answer must not end the dashboard.
    try:
        return fn(), None
    except Exception as exc:
        return None, exc


def printable_lines(text: str) -> str:
    """``text`` with control characters made visible, its line breaks kept."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _error_text(error: BaseException) -> str:
    if isinstance(error, ApiClientError):
        return printable(error)
    return printable(f"{type(error).__name__}: {error}")


def migration_brief(m: dict[str, Any]) -> str:
    """A migration in a few words, for the one-line summary."""
    state = m["state"]
    if state == "backfilling":
        return f"migration {percent(m['progress'])}"
    if state == "ready":
        gate = m.get("gate")
        return "migration: gate refused" if gate and not gate.get("ok") else "migration ready"
    return f"migration {state}"


def percent(progress: float) -> str:
    """``42%``; never ``100%`` before it is done."""
    return f"{100 if progress >= 1 else min(int(progress * 100), 99)}%"


def gate_text(gate: dict[str, Any]) -> str:
    """The gate's verdict and its checks, one a line."""
    if gate.get("forced"):
        verdict = "gate: forced past a failed check"
    else:
        verdict = "gate: passed" if gate.get("ok") else "gate: REFUSED"
    lines = [verdict, *(f"  {check}" for check in gate.get("checks", []))]
    active, new = gate.get("ndcg_active"), gate.get("ndcg_new")
    if active is not None and new is not None:
        lines.append(f"  nDCG@10: active {active:.3f}, new {new:.3f}")
    return "\n".join(lines)


#: What the query box says while the keys act on the dashboard: typing a question there
#: straight away ran the keys instead (its "p" paused the daemon).
QUERY_HINT_AWAY = "press / to search"
#: What it says once focused, where letters are typed.
QUERY_HINT_TYPING = "type a question, then Enter (Esc: back to the results and the keys)"


class RepdApp(App[int]):
    """The dashboard. Build it with :func:`create_app`."""

    TITLE = "repd"
    CSS_PATH = "app.tcss"
    # The results table, not the query box: with the box focused, p/r/f/q would be typed.
    AUTO_FOCUS = "#results"
    # Classes on the screen that app.tcss uses to fit the panels into small terminals.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]  # noqa: RUF012 - Textual's API
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]  # noqa: RUF012 - Textual's API

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_query", "Search"),
        Binding("o", "open_result", "Open"),
        Binding("y", "copy_location", "Copy"),
        Binding("d", "show_daemon", "Daemon"),
        Binding("f", "toggle_files", "Files"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("r", "reindex", "Reindex"),
        # Shown only when they can apply (check_action): during a migration, and with a
        # retired generation to go back to.
        Binding("s", "switch_model", "Switch"),
        Binding("b", "rollback_model", "Rollback"),
        Binding("question_mark", "show_keys", "Keys"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "to_results", "Back to the results", show=False),
    ]

    def __init__(
        self,
        client: ClientLike,
        *,
        poll_interval: float = 1.0,
        read_lines: LineReader = read_document_lines,
    ) -> None:
        """Use ``client`` for every call; poll status every ``poll_interval`` seconds; read
        files for the Chunk pane with ``read_lines``."""
        super().__init__()
        self.client = client
        self.poll_interval = poll_interval
        self.daemon_up: bool | None = None
        """None until the first poll answers or fails."""
        self.last_status: dict[str, Any] | None = None
        self._paused: bool | None = None
        self._status_in_flight = False
        self._query_seq = 0
        self._hits: dict[str, dict[str, Any]] = {}
        self._chunk_token: tuple[int, str] | None = None
        self.chunk_shown: tuple[int, str] | None = None
        """(query number, rank) of the hit whose lines the Chunk pane shows, once read."""
        self._documents = _DocumentCache(read_lines)
        self._files: dict[str, dict[str, Any]] = {}
        self._issue_counts: tuple[int, int] | None = None
        self._history: deque[float] = deque(maxlen=HISTORY)
        self.migration: dict[str, Any] | None = None
        """The migration in the last status, if any."""
        self.retired: dict[str, Any] | None = None
        """The newest retired generation (what a rollback returns to), from ``/v1/model``."""
        self._model_key: object = None
        self._model_asked_at = 0.0
        self._model_in_flight = False

    # -- layout

    def compose(self) -> ComposeResult:
        """Header, banner, summary line, the dashboard and files tabs, footer."""
        yield Header()
        yield Static("", id="banner", markup=False)
        # Short terminals: the daemon in one line, in place of the header (d shows the rest).
        with Horizontal(id="summary-bar"):
            yield Static("…", id="summary-state", markup=False)
            yield Static(f"connecting to {self.client.target}", id="summary", markup=False)
        with TabbedContent(initial="dashboard", id="tabs"):
            with TabPane("Dashboard", id="dashboard"):
                with Horizontal(id="panels"):
                    with Panel(id="status-panel", classes="panel"):
                        yield KeyValueGrid(
                            [
                                ("state", "state"),
                                ("problem", "problem"),
                                ("crashed", "crashed"),
                                ("model", "model"),
                                ("generation", "generation"),
                                ("points", "points"),
                                ("uptime", "uptime"),
                                ("error", "last error"),
                            ],
                            id="status",
                            hidden=["problem", "crashed"],
                        )
                    with Panel(id="queue-panel", classes="panel"):
                        yield KeyValueGrid(
                            [
                                ("pending", "pending"),
                                ("scans", "scans"),
                                ("settling", "settling"),
                                ("planning", "planning"),
                                ("embedding", "embedding"),
                                ("writing", "writing"),
                                ("files_per_s", "files/s"),
                                ("chunks_per_s", "chunks/s"),
                                ("embeds_per_s", "embeds/s"),
                                ("eta", "ETA"),
                            ],
                            id="queue",
                            classes="two-up",
                        )
                        yield Static("in flight (1 min)", id="spark-label", markup=False)
                        yield Sparkline([], id="spark")
                # Only while a migration exists (see _render_migration).
                with Panel(id="migration-panel", classes="panel"):
                    yield Static("", id="migration-title", markup=False)
                    with Horizontal(id="migration-progress"):
                        yield ProgressBar(total=1, show_eta=False, id="migration-bar")
                        yield Static("", id="migration-counts", markup=False)
                    yield Static("", id="migration-gate", markup=False)
                    yield Static("", id="migration-hint", markup=False)
                yield FitTable(ROOT_COLUMNS, id="roots", cursor_type="row", zebra_stripes=True)
                with Vertical(id="search"):
                    yield Input(placeholder=QUERY_HINT_AWAY, id="query")
                    with Container(id="results-row"):
                        yield FitTable(RESULT_COLUMNS, id="results", cursor_type="row")
                        with VerticalScroll(id="snippet-box"):
                            yield ChunkView("select a result to read its chunk", id="snippet")
            with TabPane("Files", id="files"):
                yield Static("", id="files-summary", markup=False)
                yield FitTable(
                    FILE_COLUMNS, id="files-table", cursor_type="row", zebra_stripes=True
                )
                yield Static("", id="files-detail", markup=False)
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        """Set titles, then start polling."""
        self.sub_title = self.client.target
        self.query_one("#status-panel").border_title = "Daemon"
        self.query_one("#queue-panel").border_title = "Queue"
        self.query_one("#migration-panel").border_title = "Model migration"
        self.query_one("#migration-panel").display = False
        self._table("#roots").border_title = "Roots"
        self._table("#results").border_title = "Results"
        self.query_one("#snippet-box").border_title = "Chunk"
        # Where the dashboard is taller than the terminal, the search (query, results,
        # chunk) fills the view, and stays there as the panels above grow or shrink; the
        # panels are a key (d), Tab or a scroll away.
        self.query_one("#dashboard").anchor()
        self._poll_status()
        self.set_interval(self.poll_interval, self._poll_status)

    def _table(self, selector: str) -> FitTable:
        return self.query_one(selector, FitTable)

    def _reveal_search(self) -> None:
        # The search is the last part of the dashboard: its end, anchored there again.
        self.query_one("#dashboard").scroll_end(animate=False)

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        """Focus in the search (Tab, a click, a key): show all of it, not just that widget."""
        if self.query_one("#search") in event.widget.ancestors_with_self:
            self._reveal_search()
        if event.widget.id == "query":
            self.query_one("#query", Input).placeholder = QUERY_HINT_TYPING

    def on_descendant_blur(self, event: events.DescendantBlur) -> None:
        """The query box left: it says again how to come back to it."""
        if event.widget.id == "query":
            self.query_one("#query", Input).placeholder = QUERY_HINT_AWAY

    # -- status polling

    def _poll_status(self) -> None:
        # One poll at a time: a hung daemon makes each call wait for the client timeout,
        # and stacking a thread per second behind it helps nobody.
        if self._status_in_flight:
            return
        self._status_in_flight = True
        self._fetch_status()

    @work(thread=True, group="status", exit_on_error=False)
    def _fetch_status(self) -> StatusOutcome:
        return StatusOutcome(*_call(self.client.status))

    def _apply_status(self, outcome: StatusOutcome) -> None:
        self._status_in_flight = False
        if outcome.data is None:
            assert outcome.error is not None
            self._set_down(outcome.error)
            return
        try:
            self._render_status(outcome.data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A daemon speaking another API version: say so instead of crashing.
            self._set_down(ApiClientError(f"unexpected status from the daemon ({exc!r})"))
            return
        was_down = self.daemon_up is False
        self.daemon_up = True
        self.last_status = outcome.data
        self._refresh_model(outcome.data)
        self._fit_footer()
        # A daemon that cannot make progress says so in red, in one line, on every tab.
        problem = outcome.data.get("problem")
        loud = outcome.data.get("state") in ("degraded", "disk_full")
        self._show_banner(f"{outcome.data['state']}: {problem}" if loud and problem else None)
        if was_down:
            self.notify(f"daemon answers again on {self.client.target}", markup=False)

    def _set_down(self, error: Exception) -> None:
        self.daemon_up = False
        self._paused = None
        if isinstance(error, DaemonNotRunning):
            text = f"no daemon answers on {self.client.target} — {START_HINT}"
        elif isinstance(error, DaemonUnresponsive):
            text = str(error)  # names the socket and the timeout
        else:
            text = f"cannot read the daemon's status: {_error_text(error)}"
        self._show_banner(text)
        self.sub_title = (
            f"{self.client.target} · no answer, retrying every {self.poll_interval:g} s"
        )
        self._set_summary("down", "down", f"no answer on {self.client.target}")
        self._model_key = None  # the daemon may come back another: ask again then
        if self.migration is not None or self.retired is not None:
            self.refresh_bindings()  # s and b need a daemon that answers
            self._fit_footer()

    def _show_banner(self, text: str | None) -> None:
        banner = self.query_one("#banner", Static)
        banner.update(printable(text) if text else "")
        banner.set_class(text is not None, "-visible")
        self.query_one("#tabs").set_class(text is not None, "-stale")

    def _set_summary(self, state: str, flag: str, text: str) -> None:
        word = self.query_one("#summary-state", Static)
        word.update(printable(state))
        for old in [c for c in word.classes if c.startswith("-flag-")]:
            word.remove_class(old)
        word.add_class(f"-flag-{flag}")
        self.query_one("#summary", Static).update(printable(text))

    def _render_status(self, st: dict[str, Any]) -> None:
        model, store, queue, rates = st["model"], st["store"], st["queue"], st["rates"]
        generation = st.get("generation")
        state, paused = str(st["state"]), bool(st["paused"])
        # "paused" says it all; another state while paused (starting, stopping) says both.
        state_text = f"{state} (paused)" if paused and state != "paused" else state
        flag = "paused" if paused else state

        status = self.query_one("#status", KeyValueGrid)
        status.set("state", state_text, flag=flag)
        problem = st.get("problem")
        status.show_row("problem", bool(problem))
        # While starting it says what the start is doing, which is no problem.
        status.relabel("problem", "phase" if state == "starting" else "problem")
        status.set("problem", problem or "", flag="error" if state in (
            "degraded", "disk_full") else "busy")
        crash = st.get("previous_crash")
        status.show_row("crashed", bool(crash))
        status.set("crashed", crash_summary(crash) if crash else "", flag="error")
        dim = f", {model['dim']} dims" if model.get("dim") else ""
        where = f" on {model['device']}" if model.get("device") else " (not loaded yet)"
        status.set("model", f"{model['name']}{where}{dim}")
        gen_text = f"{generation['id']} ({generation['state']})" if generation else "none yet"
        status.set("generation", gen_text)
        hnsw = (
            "HNSW built"
            if store["index_built"]
            else f"HNSW not built: brute force ({fmt_count(store['indexed_vectors'])} indexed)"
        )
        if store.get("replicas"):
            hnsw += f" · {replicas_summary(store['replicas'])}"
        status.set("points", f"{fmt_count(store['points'])} in {store['kind']} store · {hnsw}")
        status.set("uptime", f"{fmt_duration(st['uptime_s'])}  (repd {st['version']})")
        last_error = st.get("last_error")
        status.set("error", last_error or "none", flag="error" if last_error else None)

        grid = self.query_one("#queue", KeyValueGrid)
        for stage in ("pending", "scans", "settling", "planning", "embedding", "writing"):
            grid.set(stage, fmt_count(queue[stage]), flag="busy" if queue[stage] else None)
        in_flight = sum(
            queue[s] for s in ("pending", "settling", "planning", "embedding", "writing")
        )
        # Nothing moves while paused or with nothing to do, whatever the averages remember.
        busy = bool(in_flight or queue["scans"])
        moving = busy and not paused and state not in ("idle", "paused")
        for rate in ("files_per_s", "chunks_per_s", "embeds_per_s"):
            grid.set(rate, fmt_rate(rates[rate] if moving else 0.0))
        eta_text = self._eta_text(st.get("eta_s"), paused, in_flight)
        grid.set("eta", eta_text, flag="paused" if paused and in_flight else None)
        self._history.append(float(in_flight))
        # The sparkline scales between the window's min and max; a leading 0 anchors the
        # bottom at zero, so a steady backlog of thousands does not draw as an empty line.
        self.query_one("#spark", Sparkline).data = [0.0, *self._history]
        self.query_one("#spark-label", Static).update(
            f"in flight (1 min): now {fmt_count(in_flight)}, "
            f"peak {fmt_count(round(max(self._history)))}"
        )

        self._table("#roots").set_rows(
            {
                root["path"]: (
                    root["path"],
                    root["watch"],
                    fmt_count(root["files"]),
                    fmt_count(root["chunks"]),
                    fmt_count(root["skipped"]),
                    fmt_count(root["failed"]),
                )
                for root in st["roots"]
            }
        )

        self._paused = paused
        self.sub_title = f"{self.client.target} · {state_text}"
        parts = [problem] if problem else []
        if crash:  # said where it is always seen; the Daemon panel has the details
            parts.append("the previous run crashed (d: details)")
        if in_flight:
            parts.append(f"{fmt_count(in_flight)} in flight")
        if moving:
            parts.append(f"{fmt_rate(rates['files_per_s'])} files/s")
        if in_flight and not paused:
            parts.append(f"ETA {eta_text}")
        if state != "starting":  # nothing is loaded yet: no numbers that only look like news
            parts.append(f"{fmt_count(store['points'])} points")
            parts.append(f"generation {generation['id']}" if generation else "no generation yet")
        migration = st.get("migration")
        self._render_migration(migration, model["name"])
        if migration:
            parts.append(migration_brief(migration))
        self._set_summary(state_text, flag, " · ".join(parts))

        totals = st["totals"]
        counts = (int(totals["skipped"]), int(totals["failed"]))
        if counts != self._issue_counts:
            # Refresh the files view when it is open and its numbers moved.
            changed = self._issue_counts is not None
            self._issue_counts = counts
            if changed and self._files_open():
                self._fetch_files()

    def _render_migration(self, m: dict[str, Any] | None, model: str) -> None:
        panel = self.query_one("#migration-panel", Panel)
        had = self.migration is not None
        self.migration = m
        if (m is not None) != had:
            self.refresh_bindings()  # s appears or goes; b goes or comes back
        panel.display = m is not None
        if m is None:
            return
        state = m["state"]
        to = f"generation {m['to_generation']}" if m.get("to_generation") else "a new generation"
        self.query_one("#migration-title", Static).update(printable(
            f"{state}: {model} (generation {m['from_generation']}) → {m['model']} ({to})"))
        self.query_one("#migration-progress").display = state != "loading"
        bar = self.query_one("#migration-bar", ProgressBar)
        bar.update(total=max(1, int(m["files_total"])), progress=int(m["files_done"]))
        counts = f"{fmt_count(m['files_done'])} / {fmt_count(m['files_total'])} files"
        if state == "backfilling":
            eta = m.get("eta_s")
            counts += f" · {fmt_rate(m['files_per_s'])} files/s · ETA " + (
                (fmt_duration(eta) if eta >= 1 else "< 1s") if eta is not None else "unknown")
        self.query_one("#migration-counts", Static).update(counts)
        detail = []
        if m.get("gate"):
            detail.append(gate_text(m["gate"]))
        if m.get("message"):
            detail.append(str(m["message"]))
        gate_box = self.query_one("#migration-gate", Static)
        gate_box.display = bool(detail)
        # Daemon messages may hold anything: printable, line by line.
        gate_box.update(printable_lines("\n".join(detail)))
        gate_box.set_class(bool(m.get("gate")) and not m["gate"].get("ok"), "-refused")
        hint = {
            "loading": "loading the new model; the active generation answers meanwhile",
            "backfilling": "the active generation answers meanwhile",
            "gating": "the checks before the switch run",
            "ready": "backfilled: s switches to it",
            "failed": "failed: `repd model abort` removes it",
        }.get(state, "")
        if state == "ready" and m.get("gate") and not m["gate"].get("ok"):
            hint = "the gate refused the switch: s asks whether to force it"
        memory = m.get("model_memory_bytes")
        if memory is not None:
            hint += f" · the new model takes {memory / (1024 * 1024):,.0f} MiB"
        self.query_one("#migration-hint", Static).update(hint)

    # -- model: generations, switch, rollback

    def _refresh_model(self, st: dict[str, Any]) -> None:
        # /v1/model only when something it shows may have changed: another generation
        # became active, or a migration came, went or moved on to another state.
        migration = st.get("migration") or {}
        key = ((st.get("generation") or {}).get("id"), migration.get("state"),
               migration.get("to_generation"))
        if self._model_in_flight:
            return
        # Also every MODEL_REFRESH_S: a prune from the command line changes no status field.
        fresh = time.monotonic() - self._model_asked_at < MODEL_REFRESH_S
        if key == self._model_key and fresh:
            return
        self._model_key = key
        self._model_asked_at = time.monotonic()
        self._model_in_flight = True
        self._fetch_model()

    @work(thread=True, group="model", exit_on_error=False)
    def _fetch_model(self) -> ModelOutcome:
        return ModelOutcome(*_call(self.client.model_status))

    def _apply_model(self, outcome: ModelOutcome) -> None:
        self._model_in_flight = False
        if outcome.data is None:
            # An older daemon, or one still starting: no rollback offered; asked again at
            # the next change.
            self._model_key = None
            self.retired = None
        else:
            retired = [g for g in outcome.data.get("generations", [])
                       if g.get("state") == "retired"]
            # The most recently retired is the one most recently active (ISO times sort).
            self.retired = max(retired, key=lambda g: str(g.get("activated_at") or "")
                               ) if retired else None
        self.refresh_bindings()
        self._fit_footer()

    def _fit_footer(self) -> None:
        # 80 columns hold the usual keys and no more: while s or b shows, the footer packs
        # its keys closer, so that ? and q stay in view.
        extra = self.check_action("switch_model", ()) or self.check_action("rollback_model", ())
        self.query_one(Footer).compact = bool(extra) and self.size.width < 110

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide s without a migration, and b without a generation to roll back to."""
        if action == "switch_model":
            return self.migration is not None and self.daemon_up is True
        if action == "rollback_model":
            return (self.retired is not None and self.migration is None
                    and self.daemon_up is True)
        return True

    def action_switch_model(self) -> None:
        """``s``: after a confirm, run the gate and switch to the new generation (after a
        refused gate: ask whether to force it)."""
        m = self.migration
        if m is None:
            return
        if m["state"] != "ready":
            why = {
                "loading": "the new model is still loading",
                "gating": "the checks before the switch are running",
                "failed": f"the migration failed: {m.get('message') or 'see repd model status'}",
            }.get(m["state"], f"the new generation is still being built "
                              f"({percent(m['progress'])})")
            self.notify(printable(why), title="switch", severity="warning", markup=False)
            return
        gate: dict[str, Any] | None = m.get("gate")
        force = gate is not None and not gate.get("ok")
        to = f"generation {m['to_generation']}"
        kept = "The current generation is kept, retired: b rolls back to it."
        if gate is not None and force:
            question = (f"The gate refused the switch to {m['model']} ({to}):\n"
                        f"{gate_text(gate)}\n\nSwitch anyway? {kept}")
        else:
            question = (f"Switch to {m['model']} ({to})? The gate's checks run first; it "
                        f"answers queries once they pass. {kept}")

        def answered(yes: bool | None) -> None:
            if yes:
                self._act("switch", lambda: self.client.model_switch(force=force))

        self.push_screen(ConfirmScreen(printable_lines(question),
                                       yes_label="Force switch" if force else "Switch"),
                         answered)

    def action_rollback_model(self) -> None:
        """``b``: after a confirm, make the previous generation active again."""
        back = self.retired
        if back is None:
            return
        current = (self.last_status or {}).get("generation") or {}
        question = (f"Roll back to generation {back['id']} ({back['model']})? It answers "
                    "queries again at once; nothing is embedded"
                    + (f", and generation {current['id']} is kept, retired." if current
                       else "."))

        def answered(yes: bool | None) -> None:
            if yes:
                self._act("rollback", self.client.model_rollback)

        self.push_screen(ConfirmScreen(printable(question), yes_label="Roll back"), answered)

    @staticmethod
    def _eta_text(eta: float | None, paused: bool, in_flight: int) -> str:
        if paused:
            return "paused" if in_flight else "idle"
        if not in_flight:
            return "idle"
        if eta is None:
            return "unknown"
        return fmt_duration(eta) if eta >= 1 else "< 1s"

    # -- query

    @on(Input.Submitted, "#query")
    def _submit_query(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            self.notify("type something to search for", severity="warning")
            return
        self._query_seq += 1
        self.query_one("#results").loading = True
        self._run_query(self._query_seq, text)

    @work(thread=True, group="query", exit_on_error=False)
    def _run_query(self, seq: int, text: str) -> QueryOutcome:
        data, error = _call(lambda: self.client.query(text, k=QUERY_K))
        return QueryOutcome(data, error, seq=seq, text=text)

    def _apply_query(self, outcome: QueryOutcome) -> None:
        if outcome.seq != self._query_seq:
            return  # the user has asked something newer; that answer wins
        results = self._table("#results")
        results.loading = False
        if outcome.data is None:
            assert outcome.error is not None
            self._notify_error("query failed", outcome.error)
            return
        hits: list[dict[str, Any]] = outcome.data["hits"]
        self._hits = {str(hit["rank"]): hit for hit in hits}
        self._chunk_token = None
        results.set_rows(
            {
                str(hit["rank"]): (
                    hit["rank"],
                    f"{hit['score']:.3f}",
                    f"{hit['path']}:{hit['start_line']}",
                    one_line(hit["snippet"], 200),
                )
                for hit in hits
            }
        )
        results.border_subtitle = Content(
            printable(f"{len(hits)} hits for {outcome.text!r} in {outcome.data['took_ms']:.0f} ms")
        )
        if hits:
            results.move_cursor(row=0, animate=False)
            self._show_hit(str(hits[0]["rank"]))
            results.focus()
            self._reveal_search()
        else:
            self.query_one("#snippet-box").border_title = "Chunk"
            self.query_one("#snippet", ChunkView).show_text(f"no hits for {outcome.text!r}")

    @on(DataTable.RowHighlighted, "#results")
    @on(DataTable.RowSelected, "#results")
    def _result_chosen(self, event: DataTable.RowHighlighted | DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self._show_hit(str(event.row_key.value))

    def _show_hit(self, key: str) -> None:
        hit = self._hits.get(key)
        token = (self._query_seq, key)
        if hit is None or token == self._chunk_token:
            return
        self._chunk_token = token
        full = str(Path(hit["root"]) / hit["path"])
        where = f"{full}:{hit['start_line']}-{hit['end_line']}"
        # Content, not a str: a border title is read as markup, and a path may hold "[".
        self.query_one("#snippet-box").border_title = Content(
            printable(f"{where}  score {hit['score']:.3f}")
        )
        self._read_chunk(token, full, hit)

    @work(thread=True, group="chunk", exclusive=True, exit_on_error=False)
    def _read_chunk(self, token: tuple[int, str], full: str, hit: dict[str, Any]) -> ChunkOutcome:
        try:
            lines = self._documents.lines(full)
        except Exception as exc:  # SkipFile, OSError, a PDF that no longer parses...
            reason = (exc.strerror if isinstance(exc, OSError) else None) or exc
            snippet = str(hit["snippet"])
            return ChunkOutcome(
                token, None, snippet.splitlines() or [snippet],
                f"cannot read the file ({reason}); the indexed snippet:",
            )
        return ChunkOutcome(token, *chunk_lines(hit, lines))

    def _apply_chunk(self, outcome: ChunkOutcome) -> None:
        if outcome.token != self._chunk_token:
            return  # the cursor has moved on
        view = self.query_one("#snippet", ChunkView)
        view.show_lines(outcome.first, outcome.lines, outcome.note or None)
        self.query_one("#snippet-box", VerticalScroll).scroll_home(animate=False)
        self.chunk_shown = outcome.token

    # -- files view

    def _files_open(self) -> bool:
        return self.query_one("#tabs", TabbedContent).active == "files"

    @on(TabbedContent.TabActivated, "#tabs")
    def _tab_changed(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id == "files":
            self._fetch_files()
            self._table("#files-table").focus()

    @work(thread=True, group="files", exclusive=True, exit_on_error=False)
    def _fetch_files(self) -> FilesOutcome:
        return FilesOutcome(*_call(lambda: self.client.files(limit=FILES_LIMIT)))

    def _apply_files(self, outcome: FilesOutcome) -> None:
        summary = self.query_one("#files-summary", Static)
        if outcome.data is None:
            assert outcome.error is not None
            summary.update(f"cannot list files: {_error_text(outcome.error)}")
            return
        items: list[dict[str, Any]] = outcome.data["items"]
        total = int(outcome.data["total"])
        skipped = sum(1 for i in items if i["state"] == "skipped")
        failed = len(items) - skipped
        # One root (the usual case): paths relative to it, which leaves room for the rest.
        roots = {item["root"] for item in items}
        under = f" under {printable(next(iter(roots)))}" if len(roots) == 1 else ""
        if not items:
            summary.update("no skipped or failed files: everything that matches is indexed")
        else:
            shown = "" if total <= len(items) else f" (showing the first {len(items)})"
            files = "1 file" if total == 1 else f"{fmt_count(total)} files"
            verb = "is" if total == 1 else "are"
            summary.update(
                f"{files}{under} {verb} not in the index{shown}: "
                f"{fmt_count(skipped)} skipped on purpose, {fmt_count(failed)} failed"
            )
        self._files = {str(Path(item["root"]) / item["path"]): item for item in items}
        table = self._table("#files-table")
        table.set_rows(
            {
                full: (
                    item["state"],
                    item["path"] if under else full,
                    item["reason"],
                    item.get("detail") or "",
                    fmt_when(item["at"]),
                )
                for full, item in self._files.items()
            }
        )
        self._show_file(table.highlighted_key)

    @on(DataTable.RowHighlighted, "#files-table")
    def _file_chosen(self, event: DataTable.RowHighlighted) -> None:
        self._show_file(None if event.row_key.value is None else str(event.row_key.value))

    def _show_file(self, key: str | None) -> None:
        # The whole of the highlighted row, which the table's columns may have cut.
        item = self._files.get(key) if key is not None else None
        detail = self.query_one("#files-detail", Static)
        detail.display = item is not None
        if item is not None:
            why = f"{item['state']}: {item['reason']}"
            if item.get("detail"):
                why += f" — {item['detail']}"
            detail.update(f"{printable(key)}\n{printable(why)}")

    # -- actions (key bindings)

    def action_toggle_pause(self) -> None:
        """``p``: pause indexing, or resume it when paused."""
        if self._paused is None:
            # Unknown until a status arrives; guessing could pause a daemon meant to resume.
            waiting = self.daemon_up is None
            text = (
                "waiting for the daemon's first status"
                if waiting
                else f"no daemon answers on {self.client.target}"
            )
            self.notify(text, severity="warning" if waiting else "error", markup=False)
            return
        self._run_action("resume" if self._paused else "pause")

    def action_reindex(self) -> None:
        """``r``: after a confirm, re-read every file under every root."""

        def answered(yes: bool | None) -> None:
            if yes:
                self._run_action("reindex")

        self.push_screen(
            ConfirmScreen(
                "Re-index every root? Every file is read again, even if it looks unchanged; "
                "the daemon works through them in the background.",
                yes_label="Reindex",
            ),
            answered,
        )

    def action_focus_query(self) -> None:
        """``/``: jump to the query box."""
        self.query_one("#tabs", TabbedContent).active = "dashboard"
        self.query_one("#query", Input).focus()
        self._reveal_search()

    def action_to_results(self) -> None:
        """``escape``: from the query box or a panel back to the results, keys work there."""
        if self._files_open():
            return
        results = self._table("#results")
        if self.focused is not results:
            results.focus()
        self._reveal_search()

    def action_show_daemon(self) -> None:
        """``d``: the Daemon panel, in view and focused (Tab goes on to Queue and Roots)."""
        self.query_one("#tabs", TabbedContent).active = "dashboard"
        panel = self.query_one("#status-panel", Panel)
        panel.focus(scroll_visible=False)
        panel.scroll_visible(top=True, animate=False, immediate=True)

    def action_toggle_files(self) -> None:
        """``f``: show the skipped and failed files; again to go back."""
        tabs = self.query_one("#tabs", TabbedContent)
        if tabs.active == "files":
            tabs.active = "dashboard"
            self._table("#results").focus()
        else:
            # TabActivated then loads the list.
            tabs.active = "files"

    def action_show_keys(self) -> None:
        """``?``: the list of keys."""
        self.push_screen(HelpScreen(KEYS_HELP))

    def _chosen_location(self) -> tuple[str, int] | None:
        """The file and line that o and y act on: the highlighted file on the files tab,
        else the highlighted result."""
        if self._files_open():
            key = self._table("#files-table").highlighted_key
            return (key, 1) if key in self._files else None
        key = self._table("#results").highlighted_key
        hit = self._hits.get(key) if key is not None else None
        if hit is None:
            return None
        return str(Path(hit["root"]) / hit["path"]), int(hit["start_line"])

    def _nothing_chosen(self) -> None:
        what = "no file selected" if self._files_open() else "no result selected: search first (/)"
        self.notify(what, severity="warning", markup=False)

    def action_copy_location(self) -> None:
        """``y``: copy ``path:line`` (OSC 52: the terminal, and tmux, must allow it)."""
        chosen = self._chosen_location()
        if chosen is None:
            self._nothing_chosen()
            return
        path, line = chosen
        text = path if self._files_open() else f"{path}:{line}"
        self.copy_to_clipboard(text)
        self.notify(printable(text), title="copied", markup=False)

    def action_open_result(self) -> None:
        """``o``: open the result in ``$VISUAL``/``$EDITOR`` at its line (the dashboard gives
        the terminal to a terminal editor until it exits), or ``xdg-open`` without one."""
        chosen = self._chosen_location()
        if chosen is None:
            self._nothing_chosen()
            return
        path, line = chosen
        if not Path(path).exists():
            self.notify(f"cannot open {printable(path)}: it no longer exists",
                        severity="error", markup=False)
            return
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
        try:
            command = editor_command(editor, path, line)
        except ValueError as exc:  # shlex: unbalanced quotes in $EDITOR
            self.notify(f"cannot read $EDITOR: {exc}", severity="error", markup=False)
            return
        program = command.argv[0]
        try:
            if command.terminal:
                with self.suspend():
                    code = subprocess.run(command.argv, check=False).returncode
                if code:
                    self.notify(f"{printable(program)} exited with status {code}",
                                severity="warning", markup=False)
            else:
                # A window of its own: no need to give up the terminal, nor to wait.
                subprocess.Popen(
                    command.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                self.notify(f"opening {printable(path)} with {printable(program)}",
                            markup=False)
        except SuspendNotSupported:
            self.notify(f"cannot hand this terminal to {printable(program)}",
                        severity="error", markup=False)
        except OSError as exc:
            hint = "" if editor else " (set $EDITOR)"
            self.notify(f"cannot run {printable(program)}: {exc.strerror or exc}{hint}",
                        severity="error", markup=False)

    def _run_action(self, action: str) -> None:
        calls: dict[str, Callable[[], dict[str, Any]]] = {
            "pause": self.client.pause,
            "resume": self.client.resume,
            "reindex": self.client.reindex,
        }
        self._act(action, calls[action])

    @work(thread=True, group="actions", exit_on_error=False)
    def _act(self, action: str, fn: Callable[[], dict[str, Any]]) -> ActionOutcome:
        return ActionOutcome(*_call(fn), action=action)

    def _apply_action(self, outcome: ActionOutcome) -> None:
        if outcome.data is None:
            assert outcome.error is not None
            self._notify_error(f"{outcome.action} failed", outcome.error)
            return
        message = printable(outcome.data.get("message") or f"{outcome.action}: done")
        if not outcome.data.get("ok", True):
            self.notify(message, title=outcome.action, severity="warning", markup=False)
            return
        if outcome.action in ("pause", "resume"):
            # Known now, not at the next poll: a quick second p must do the opposite.
            self._paused = outcome.action == "pause"
        if outcome.action in ("switch", "rollback"):
            self._model_key = None  # the generations changed: ask /v1/model again
            gate = outcome.data.get("gate")
            if gate:
                message += "\n" + printable_lines(gate_text(gate))
        self.notify(message, title=outcome.action, markup=False)
        self._poll_status()

    def _notify_error(self, what: str, error: BaseException) -> None:
        self.notify(_error_text(error), title=what, severity="error", markup=False, timeout=8)

    # -- worker results

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Apply a finished worker's outcome on the UI thread."""
        if not self.is_running or not self.screen_stack:
            return  # shutting down: a call finished after its widgets were taken away
        worker = event.worker
        if event.state == WorkerState.SUCCESS:
            result = worker.result
            if isinstance(result, StatusOutcome):
                self._apply_status(result)
            elif isinstance(result, QueryOutcome):
                self._apply_query(result)
            elif isinstance(result, FilesOutcome):
                self._apply_files(result)
            elif isinstance(result, ActionOutcome):
                self._apply_action(result)
            elif isinstance(result, ModelOutcome):
                self._apply_model(result)
            elif isinstance(result, ChunkOutcome):
                self._apply_chunk(result)
        elif event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            if worker.group == "status":
                self._status_in_flight = False
            if worker.group == "model":
                self._model_in_flight = False
            if worker.group == "query":
                self._table("#results").loading = False
            if event.state == WorkerState.ERROR and worker.error is not None:
                self._notify_error(worker.group, worker.error)


def create_app(
    client_factory: Callable[[], ClientLike],
    *,
    poll_interval: float = 1.0,
    read_lines: LineReader = read_document_lines,
) -> RepdApp:
    """The dashboard, talking to the client ``client_factory`` returns (called once, now)."""
    return RepdApp(client_factory(), poll_interval=poll_interval, read_lines=read_lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``repd-tui`` (and ``repd dashboard``): run the dashboard until quit."""
    parser = argparse.ArgumentParser(
        prog="repd-tui", description="Terminal dashboard of the repd daemon."
    )
    parser.add_argument(
        "--config", type=Path, help="config file (default: $REPD_CONFIG or the XDG default)"
    )
    parser.add_argument("--socket", type=Path, help="the daemon's API socket")
    args = parser.parse_args(argv)

    from repd.api.client import ApiClient
    from repd.errors import ConfigError
    from repd.settings import load_settings

    overrides = {"api": {"socket": str(args.socket)}} if args.socket else {}
    try:
        loaded = load_settings(args.config, overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"repd-tui: config error: {problem}", file=sys.stderr)
        return 2
    socket_path = loaded.settings.api.socket
    app = create_app(lambda: ApiClient(socket_path))
    app.run()
    return app.return_code or 0
