"""The ``repd-tui`` terminal dashboard: a Textual app that shows and drives a running daemon."""

from __future__ import annotations

import argparse
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import (
    DataTable,
    Footer,
    Header,
    Input,
    Sparkline,
    Static,
    TabbedContent,
    TabPane,
)
from textual.worker import Worker, WorkerState

from repd.api.client import ApiClientError, DaemonNotRunning, DaemonUnresponsive
from repd.textsafe import printable
from repd_tui.widgets import (
    ConfirmScreen,
    KeyValueGrid,
    cell,
    fmt_count,
    fmt_duration,
    fmt_rate,
    fmt_when,
    one_line,
    sync_rows,
)

QUERY_K = 20
"""Hits asked for per query: more than a one-liner shows, still one screen of table."""

FILES_LIMIT = 500
"""Skipped/failed files fetched for the files view (one page; the total is shown)."""

HISTORY = 60
"""Status samples kept for the work-in-flight sparkline: a minute at the default rate."""

START_HINT = "start it with `repd run` or `systemctl --user start repd`"


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
    """pause, resume or reindex."""

    action: str = ""


def _call(fn: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any] | None, Exception | None]:
    # Any exception, not only ApiClientError: a worker that raises would take the app down
    # with a traceback, and one odd answer must not end the dashboard.
    try:
        return fn(), None
    except Exception as exc:
        return None, exc


def _error_text(error: BaseException) -> str:
    if isinstance(error, ApiClientError):
        return printable(error)
    return printable(f"{type(error).__name__}: {error}")


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
        Binding("p", "toggle_pause", "Pause/resume"),
        Binding("r", "reindex", "Reindex all"),
        Binding("slash", "focus_query", "Search"),
        Binding("f", "toggle_files", "Files"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "leave_query", "Leave search", show=False),
    ]

    def __init__(self, client: ClientLike, *, poll_interval: float = 1.0) -> None:
        """Use ``client`` for every call; poll status every ``poll_interval`` seconds."""
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
        self._issue_counts: tuple[int, int] | None = None
        self._history: deque[float] = deque(maxlen=HISTORY)

    # -- layout

    def compose(self) -> ComposeResult:
        """Header, banner, the dashboard and files tabs, footer."""
        yield Header()
        yield Static("", id="banner", markup=False)
        with TabbedContent(initial="dashboard", id="tabs"):
            with TabPane("Dashboard", id="dashboard"):
                with Horizontal(id="panels"):
                    with Vertical(id="status-panel", classes="panel"):
                        yield KeyValueGrid(
                            [
                                ("state", "state"),
                                ("paused", "paused"),
                                ("model", "model"),
                                ("generation", "generation"),
                                ("points", "points"),
                                ("uptime", "uptime"),
                                ("error", "last error"),
                            ],
                            id="status",
                        )
                    with Vertical(id="queue-panel", classes="panel"):
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
                yield DataTable[str | Text](id="roots", cursor_type="row", zebra_stripes=True)
                yield Input(placeholder="search the index: type, then Enter", id="query")
                with Horizontal(id="results-row"):
                    yield DataTable[str | Text](id="results", cursor_type="row")
                    with VerticalScroll(id="snippet-box"):
                        yield Static(
                            "select a result to read its chunk", id="snippet", markup=False
                        )
            with TabPane("Files", id="files"):
                yield Static("", id="files-summary", markup=False)
                yield DataTable[str | Text](id="files-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        """Set titles and table columns, then start polling."""
        self.sub_title = self.client.target
        self.query_one("#status-panel").border_title = "Daemon"
        self.query_one("#queue-panel").border_title = "Queue"
        roots = self._table("#roots")
        roots.border_title = "Roots"
        roots.add_column("path", key="path")
        roots.add_column("watch", key="watch")
        for name in ("files", "chunks", "skipped", "failed"):
            roots.add_column(name, key=name)
        results = self._table("#results")
        results.border_title = "Results"
        results.add_column("#", key="rank")
        results.add_column("score", key="score")
        results.add_column("location", key="location")
        results.add_column("snippet", key="snippet")
        self.query_one("#snippet-box").border_title = "Chunk"
        files = self._table("#files-table")
        for name in ("state", "path", "reason", "detail", "tried"):
            files.add_column(name, key=name)
        self._poll_status()
        self.set_interval(self.poll_interval, self._poll_status)

    def _table(self, selector: str) -> DataTable[str | Text]:
        table: DataTable[str | Text] = self.query_one(selector, DataTable)
        return table

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

    def _show_banner(self, text: str | None) -> None:
        banner = self.query_one("#banner", Static)
        banner.update(printable(text) if text else "")
        banner.set_class(text is not None, "-visible")
        self.query_one("#tabs").set_class(text is not None, "-stale")

    def _render_status(self, st: dict[str, Any]) -> None:
        model, store, queue, rates = st["model"], st["store"], st["queue"], st["rates"]
        generation = st.get("generation")
        state, paused = str(st["state"]), bool(st["paused"])

        status = self.query_one("#status", KeyValueGrid)
        status.set("state", state, flag="paused" if paused else state)
        status.set("paused", "yes (p resumes)" if paused else "no (p pauses)")
        device = model.get("device") or "not loaded yet"
        dim = f", {model['dim']} dims" if model.get("dim") else ""
        status.set("model", f"{model['name']} on {device}{dim}")
        status.set(
            "generation",
            f"{generation['id']} ({generation['state']})" if generation else "none yet",
        )
        hnsw = (
            "HNSW built"
            if store["index_built"]
            else f"HNSW not built: brute force ({fmt_count(store['indexed_vectors'])} indexed)"
        )
        status.set("points", f"{fmt_count(store['points'])} in {store['kind']} store · {hnsw}")
        status.set("uptime", f"{fmt_duration(st['uptime_s'])}  (repd {st['version']})")
        last_error = st.get("last_error")
        status.set("error", last_error or "none", flag="error" if last_error else None)

        grid = self.query_one("#queue", KeyValueGrid)
        for stage in ("pending", "scans", "settling", "planning", "embedding", "writing"):
            grid.set(stage, fmt_count(queue[stage]), flag="busy" if queue[stage] else None)
        for rate in ("files_per_s", "chunks_per_s", "embeds_per_s"):
            grid.set(rate, fmt_rate(rates[rate]))
        eta = st.get("eta_s")
        in_flight = sum(
            queue[s] for s in ("pending", "settling", "planning", "embedding", "writing")
        )
        grid.set(
            "eta", fmt_duration(eta) if eta is not None else "idle" if not in_flight else "unknown"
        )
        self._history.append(float(in_flight))
        # The sparkline scales between the window's min and max; a leading 0 anchors the
        # bottom at zero, so a steady backlog of thousands does not draw as an empty line.
        self.query_one("#spark", Sparkline).data = [0.0, *self._history]
        self.query_one("#spark-label", Static).update(
            f"in flight (1 min): now {fmt_count(in_flight)}, "
            f"peak {fmt_count(round(max(self._history)))}"
        )

        sync_rows(
            self._table("#roots"),
            {
                root["path"]: (
                    cell(root["path"]),
                    cell(root["watch"]),
                    cell(fmt_count(root["files"]), right=True),
                    cell(fmt_count(root["chunks"]), right=True),
                    cell(fmt_count(root["skipped"]), right=True),
                    cell(fmt_count(root["failed"]), right=True),
                )
                for root in st["roots"]
            },
        )

        self._paused = paused
        self.sub_title = f"{self.client.target} · {state}{' (paused)' if paused else ''}"
        totals = st["totals"]
        counts = (int(totals["skipped"]), int(totals["failed"]))
        if counts != self._issue_counts:
            # Refresh the files view when it is open and its numbers moved.
            changed = self._issue_counts is not None
            self._issue_counts = counts
            if changed and self._files_open():
                self._fetch_files()

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
        results.clear()
        self._hits = {}
        for hit in hits:
            key = str(hit["rank"])
            self._hits[key] = hit
            results.add_row(
                cell(hit["rank"], right=True),
                cell(f"{hit['score']:.3f}", right=True),
                cell(f"{hit['path']}:{hit['start_line']}"),
                cell(one_line(hit["snippet"], 60)),
                key=key,
            )
        results.border_subtitle = Content(
            f"{len(hits)} hits for {outcome.text!r} in {outcome.data['took_ms']:.0f} ms"
        )
        if hits:
            self._show_hit(str(hits[0]["rank"]))
            results.focus()
        else:
            self.query_one("#snippet", Static).update(f"no hits for {outcome.text!r}")

    @on(DataTable.RowHighlighted, "#results")
    @on(DataTable.RowSelected, "#results")
    def _result_chosen(self, event: DataTable.RowHighlighted | DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self._show_hit(event.row_key.value)

    def _show_hit(self, key: str) -> None:
        hit = self._hits.get(key)
        if hit is None:
            return
        full = str(Path(hit["root"]) / hit["path"])
        where = f"{full}:{hit['start_line']}-{hit['end_line']}"
        # Content, not a str: a border title is read as markup, and a path may hold "[".
        self.query_one("#snippet-box").border_title = Content(
            printable(f"{where}  score {hit['score']:.3f}"))
        self.query_one("#snippet", Static).update(printable(hit["snippet"]))

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
        if not items:
            summary.update("no skipped or failed files: everything that matches is indexed")
        else:
            shown = "" if total <= len(items) else f" (showing the first {len(items)})"
            summary.update(
                f"{fmt_count(total)} files are not in the index{shown}: "
                f"{fmt_count(skipped)} skipped on purpose, {fmt_count(failed)} failed"
            )
        rows: dict[str, tuple[Text, ...]] = {}
        for item in items:
            full = str(Path(item["root"]) / item["path"])
            rows[full] = (
                cell(item["state"]),
                cell(full),
                cell(item["reason"]),
                cell(item.get("detail") or ""),
                cell(fmt_when(item["at"])),
            )
        sync_rows(self._table("#files-table"), rows)

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

    def action_leave_query(self) -> None:
        """``escape`` in the query box: back to the results, where the keys work again."""
        if self.focused is self.query_one("#query", Input):
            self._table("#results").focus()

    def action_toggle_files(self) -> None:
        """``f``: show the skipped and failed files; again to go back."""
        tabs = self.query_one("#tabs", TabbedContent)
        if tabs.active == "files":
            tabs.active = "dashboard"
            self._table("#results").focus()
        else:
            # TabActivated then loads the list.
            tabs.active = "files"

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
        elif event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            if worker.group == "status":
                self._status_in_flight = False
            if worker.group == "query":
                self._table("#results").loading = False
            if event.state == WorkerState.ERROR and worker.error is not None:
                self._notify_error(worker.group, worker.error)


def create_app(client_factory: Callable[[], ClientLike], *, poll_interval: float = 1.0) -> RepdApp:
    """The dashboard, talking to the client ``client_factory`` returns (called once, now)."""
    return RepdApp(client_factory(), poll_interval=poll_interval)


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
