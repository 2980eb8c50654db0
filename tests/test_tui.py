"""The terminal dashboard, driven through Textual's Pilot against a fake daemon client.

Layout snapshots: ``tests/snapshots/tui/*.svg`` hold the expected screens (SVG, as
``App.export_screenshot`` writes them). After a deliberate change to the dashboard, or a
Textual upgrade that redraws it, regenerate them and look at the difference::

    REPD_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_tui.py -q -k snapshot

A failing comparison writes the screen it got next to the expected one, as
``NAME.actual.svg`` under pytest's temporary folder, and names both files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.binding import Binding
from textual.message import Message
from textual.notifications import Notification, Notify
from textual.pilot import Pilot
from textual.widget import Widget
from textual.widgets import DataTable, Input, ProgressBar, Sparkline, Static, TabbedContent

from repd.api.client import ApiRequestError, DaemonNotRunning
from repd.api.schema import (
    ActionResponse,
    FilesResponse,
    ModelActionResponse,
    ModelStatusResponse,
    QueryResponse,
    StatusResponse,
)
from repd_tui.app import KEYS_HELP, RepdApp, create_app
from repd_tui.widgets import (
    ChunkView,
    ConfirmScreen,
    FitTable,
    HelpScreen,
    KeyValueGrid,
    editor_command,
)

ROOT = "/home/ada/notes"
SIZE = (140, 44)
SNAPSHOTS = Path(__file__).parent / "snapshots" / "tui"

RAFT_LINES = [f"line {n} of the raft notes" for n in range(1, 12)] + [
    "## Leader election",
    "A follower becomes a candidate when its",
    "election timeout fires.",
    "It votes for itself and asks the others.",
    *(f"Votes are counted per term; step {n} of the election." for n in range(1, 16)),
    "after the chunk",
]
"""projects/raft.md as the fake reader has it: hit 1 is its lines 12 to 30."""

FAKE_FILES = {
    f"{ROOT}/projects/raft.md": RAFT_LINES,
    f"{ROOT}/papers/paxos-made-simple.txt": [
        "Paxos made simple: the proposer sends prepare(n) to a majority.",
        *(f"Phase {n}: acceptors answer with the highest proposal they saw." for n in range(2, 23)),
    ],
}


def fake_reader(path: str) -> list[str]:
    """Reads FAKE_FILES as if they were on disk; anything else does not exist."""
    if path not in FAKE_FILES:
        raise FileNotFoundError(2, "No such file or directory", path)
    return list(FAKE_FILES[path])


class FakeClient:
    """Answers like a daemon with one root, a built index and a little work queued.

    ``up`` switches the daemon off and on; ``calls`` records every call but status.
    ``state`` picks the picture: ``indexing`` (work queued), ``idle`` (nothing queued, with
    the rates the daemon still remembers) or ``starting`` (loading its model).
    Every answer is validated against the API's pydantic models, so the fake cannot drift
    from the wire contract.
    """

    target = "/run/user/1000/repd/repd.sock"

    def __init__(self, up: bool = True, *, state: str = "indexing", root: str = ROOT,
                 hits: int = 2) -> None:
        self.up = up
        self.state = state
        self.root = root
        self.hits = hits
        self.paused = False
        self.refuse_actions = False
        self.problem: str | None = None  # set: the daemon reports itself degraded
        self.migration: dict[str, Any] | None = None  # set: a model migration is under way
        self.retired = False  # set: generation g0002 is kept, retired (rollback possible)
        self.previous_crash: dict[str, Any] | None = None  # set: the last run died natively
        self.refuse_switch = False
        self.calls: list[tuple[str, Any]] = []
        self.status_calls = 0
        self._lock = threading.Lock()

    def _check(self) -> None:
        if not self.up:
            raise DaemonNotRunning(f"repd daemon is not running (nothing at {self.target})")

    def status(self) -> dict[str, Any]:
        with self._lock:
            self.status_calls += 1
        self._check()
        busy = self.state == "indexing"
        problem = self.problem
        if self.state == "starting" and not problem:
            problem = "loading model and index"
        state = (
            "degraded" if self.problem
            else "paused" if self.paused
            else self.state
        )
        data = {
            "version": "0.1.0",
            "api_version": 1,
            "state": state,
            "paused": self.paused,
            "model": {
                "name": "sentence-transformers/all-MiniLM-L6-v2",
                "id": "sentence-transformers/all-MiniLM-L6-v2@c9745ed1",
                "dim": 384,
                "device": "cuda:0",
            },
            "generation": {"id": "g0003-minilm", "state": "active", "points": 48213},
            "queue": {
                "pending": 120 if busy else 0,
                "scans": 1 if busy else 0,
                "settling": 2 if busy else 0,
                "planning": 4 if busy else 0,
                "embedding": 256 if busy else 0,
                "writing": 3 if busy else 0,
            },
            # Idle, the daemon's averages still remember the last burst of work.
            "rates": {"files_per_s": 37.5, "chunks_per_s": 410.2, "embeds_per_s": 398.0}
            if busy
            else {"files_per_s": 2.3, "chunks_per_s": 11.0, "embeds_per_s": 9.5},
            "eta_s": 95.0 if busy else None,
            "roots": [
                {
                    "path": self.root,
                    "watch": "inotify",
                    "files": 1532,
                    "chunks": 48213,
                    "skipped": 17,
                    "failed": 2,
                }
            ],
            "totals": {
                "files": 1532,
                "chunks": 48213,
                "skipped": 17,
                "failed": 2,
                "embedded": 9000,
                "reused": 39213,
            },
            "store": {
                "kind": "embedded",
                "points": 48213,
                "indexed_vectors": 48213,
                "index_built": True,
            },
            "uptime_s": 3725.0,
            "last_scan_at": "2024-05-01T10:00:00Z",
            "last_error": None,
            "problem": problem,
            "migration": self.migration,
            "previous_crash": self.previous_crash,
        }
        return StatusResponse.model_validate(data).model_dump(mode="json")

    def query(
        self, text: str, k: int = 10, path: str | None = None, root: str | None = None
    ) -> dict[str, Any]:
        self.calls.append(("query", text))
        self._check()
        if text == "boom":
            raise ApiRequestError(503, "no generation is active yet", "not_ready")
        hits = [
            {
                "rank": 1,
                "score": 0.8123,
                "root": self.root,
                "path": "projects/raft.md",
                "start_line": 12,
                "end_line": 30,
                "snippet": "## Leader election A follower becomes a candidate when its "
                "election timeout fires. It votes for itself and asks the others. Votes are "
                "counted per term; step 1 of the election. Votes...",
            },
            {
                "rank": 2,
                "score": 0.7011,
                "root": self.root,
                "path": "papers/paxos-made-simple.txt",
                "start_line": 1,
                "end_line": 22,
                "snippet": "Paxos made simple: the proposer sends prepare(n) to a majority.",
            },
        ]
        for rank in range(3, self.hits + 1):
            hits.append({
                "rank": rank,
                "score": 0.7 - rank / 100,
                "root": self.root,
                "path": f"journal/2024/week-{rank:02d}.md",
                "start_line": rank * 3,
                "end_line": rank * 3 + 4,
                "snippet": f"Week {rank}: notes on consensus, quorum sizes and log replication.",
            })
        data = {"hits": hits[: min(k, self.hits)], "took_ms": 7.4, "generation": "g0003-minilm"}
        return QueryResponse.model_validate(data).model_dump(mode="json")

    def files(self, state: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        self.calls.append(("files", state))
        self._check()
        items = [
            {
                "root": self.root,
                "path": "media/talk.mp4",
                "state": "skipped",
                "reason": "binary",
                "detail": "looks binary (NUL bytes in the first 8 KiB)",
                "at": "2024-05-01T10:02:03Z",
            },
            {
                "root": self.root,
                "path": "scans/contract.pdf",
                "state": "failed",
                "reason": "extract_error",
                "detail": "pypdf: EOF marker not found",
                "at": "2024-05-01T10:02:04Z",
            },
        ]
        data = {"items": items[:limit], "total": len(items)}
        return FilesResponse.model_validate(data).model_dump(mode="json")

    def _action(self, name: str, message: str, queued: int = 0) -> dict[str, Any]:
        self.calls.append((name, None))
        self._check()
        if self.refuse_actions:
            raise ApiRequestError(409, f"cannot {name} while the daemon is stopping", "conflict")
        return ActionResponse(ok=True, message=message, queued=queued).model_dump(mode="json")

    def pause(self) -> dict[str, Any]:
        result = self._action("pause", "indexing paused")
        self.paused = True
        return result

    def resume(self) -> dict[str, Any]:
        result = self._action("resume", "indexing resumed")
        self.paused = False
        return result

    def reindex(self, path: str | None = None) -> dict[str, Any]:
        return self._action("reindex", "queued 1532 paths", queued=1532)

    def model_status(self) -> dict[str, Any]:
        self._check()
        gen = {"model": "sentence-transformers/all-MiniLM-L6-v2", "model_id": "m@c9745ed1",
               "dim": 384, "points": 48213, "created_at": "2024-05-01T10:00:00Z",
               "activated_at": "2024-05-01T10:00:00Z"}
        gens = [{**gen, "id": "g0003-minilm", "state": "active", "location": "g3"}]
        if self.retired:
            gens.insert(0, {**gen, "id": "g0002-e5", "model": "intfloat/e5-small-v2",
                            "state": "retired", "location": "g2"})
        data = {"active": "g0003-minilm", "generations": gens, "migration": self.migration}
        return ModelStatusResponse.model_validate(data).model_dump(mode="json")

    def model_switch(self, force: bool = False) -> dict[str, Any]:
        self.calls.append(("model_switch", force))
        self._check()
        if self.refuse_switch:
            raise ApiRequestError(409, "the gate refused the switch: files differ",
                                  "migration_refused")
        self.migration = None
        self.retired = True
        gate = {"ok": True, "checks": ["files: 1532 of 1532 in the same state in both"],
                "forced": force}
        return ModelActionResponse(message="generation 4 (BAAI/bge-small-en-v1.5) is active",
                                   generation="4", gate=gate).model_dump(mode="json")

    def model_rollback(self) -> dict[str, Any]:
        self.calls.append(("model_rollback", None))
        self._check()
        self.retired = False
        return ModelActionResponse(message="generation g0002-e5 is active again",
                                   generation="g0002-e5").model_dump(mode="json")

    def actions(self) -> list[str]:
        """Names of the calls made, status polls left out."""
        return [name for name, _ in self.calls]


def migration(**kw: Any) -> dict[str, Any]:
    """A migration to bge-small, 40% backfilled (``kw`` changes fields)."""
    m = {"state": "backfilling", "from_generation": "g0003-minilm", "to_generation": "4",
         "model": "BAAI/bge-small-en-v1.5", "model_id": "BAAI/bge-small-en-v1.5@5c38ec7",
         "files_done": 613, "files_total": 1532, "progress": 0.4, "chunks_embedded": 19285,
         "files_per_s": 12.5, "eta_s": 73.0, "model_memory_bytes": 133_169_152, "gate": None,
         "message": None, "started_at": "2024-05-01T10:00:00Z"}
    return {**m, **kw}


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an async test body: pytest-asyncio is not a dependency of this project."""
    asyncio.run(asyncio.wait_for(test(), timeout=60))


def make_app(
    fake: FakeClient,
    *,
    poll_interval: float = 0.25,
    read_lines: Callable[[str], list[str]] = fake_reader,
) -> RepdApp:
    # Faster than the production second, to keep the recovery test short; not much faster,
    # as Pilot waits for the app to go idle after every key.
    return create_app(lambda: fake, poll_interval=poll_interval, read_lines=read_lines)


async def until(pilot: Pilot[Any], condition: Callable[[], bool], what: str) -> None:
    """Let the app run until ``condition`` holds; fail after 10 s naming ``what``."""
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


def text_of(app: RepdApp, selector: str) -> str:
    return str(app.query_one(selector, Static).content)


def table_rows(app: RepdApp, selector: str) -> list[list[str]]:
    table: DataTable[Any] = app.query_one(selector, DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def on_screen(app: RepdApp, widget: Widget) -> bool:
    """True when all of ``widget`` is drawn on the screen, not scrolled away or covered."""
    screen = app.screen
    try:
        geometry = screen.find_widget(widget)
    except Exception:  # not in the screen's map: hidden or not laid out
        return False
    region = geometry.region
    if not region.area or geometry.clip.intersection(region) != region:
        return False
    if not screen.region.contains_region(region):
        return False
    corners = [(region.x, region.y), (region.right - 1, region.bottom - 1)]
    for x, y in corners:
        hit, _ = screen.get_widget_at(x, y)
        if hit is not widget and widget not in hit.ancestors:
            return False
    return True


async def search(pilot: Pilot[Any], app: RepdApp, text: str, rows: int = 2) -> None:
    """Type ``text`` into the query box, run it, and wait for the hits and the first chunk."""
    await pilot.press("slash", *text, "enter")
    await until(pilot, lambda: app.query_one("#results", DataTable).row_count == rows, "results")
    await until(pilot, lambda: app.chunk_shown is not None, "the first hit's chunk")
    await pilot.pause()


def test_status_panels_show_the_daemon_state() -> None:
    fake = FakeClient()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.daemon_up is True, "the first status")
            status = app.query_one("#status", KeyValueGrid)
            assert status.value("state") == "indexing"
            assert status.value("model") == (
                "sentence-transformers/all-MiniLM-L6-v2 on cuda:0, 384 dims"
            )
            assert status.value("generation") == "g0003-minilm (active)"
            assert status.value("points") == "48,213 in embedded store · HNSW built"
            assert status.value("uptime").startswith("1h 02m")
            queue = app.query_one("#queue", KeyValueGrid)
            assert [queue.value(s) for s in ("pending", "embedding", "writing")] == [
                "120",
                "256",
                "3",
            ]
            assert [queue.value(r) for r in ("files_per_s", "chunks_per_s", "embeds_per_s")] == [
                "37.5",
                "410",
                "398",
            ]
            assert queue.value("eta") == "1m 35s"
            assert app.query_one("#spark", Sparkline).data is not None
            assert "now 385" in text_of(app, "#spark-label")
            assert table_rows(app, "#roots") == [[ROOT, "inotify", "1,532", "48,213", "17", "2"]]
            assert not app.query_one("#banner").has_class("-visible")

    run(body)


def test_query_fills_results_and_selecting_shows_the_chunk() -> None:
    fake = FakeClient()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("slash")
            assert app.focused is app.query_one("#query", Input)
            await pilot.press(*"leader election", "enter")
            await until(
                pilot, lambda: app.query_one("#results", DataTable).row_count == 2, "the results"
            )
            assert ("query", "leader election") in fake.calls
            rows = table_rows(app, "#results")
            assert rows[0][:3] == ["1", "0.812", "projects/raft.md:12"]
            # The snippet cut to the column, with an ellipsis; the table keeps it whole.
            assert rows[0][3].startswith("## Leader election A follower")
            assert rows[0][3].endswith("…")
            full = app.query_one("#results", FitTable).row_values("1")[3]
            assert full.endswith("step 1 of the election. Votes...")
            assert rows[1][2] == "papers/paxos-made-simple.txt:1"
            # The first hit is previewed, whole, from its file, with its line numbers.
            await until(pilot, lambda: app.chunk_shown is not None, "the first chunk")
            view = app.query_one("#snippet", ChunkView)
            assert view.first_line == 12 and view.note is None
            assert view.lines == RAFT_LINES[11:30]
            assert text_of(app, "#snippet").startswith("12 │ ## Leader election\n13 │ A follower")
            # Moving to the second shows its chunk.
            await pilot.press("down", "enter")
            await until(pilot, lambda: view.first_line == 1, "the second chunk")
            assert text_of(app, "#snippet").startswith("1 │ Paxos made simple")
            assert len(view.lines) == 22
            box_title = str(app.query_one("#snippet-box").border_title)
            assert box_title.startswith(f"{ROOT}/papers/paxos-made-simple.txt:1-22")

    run(body)


def test_the_query_box_says_how_to_reach_it_and_how_to_leave_it() -> None:
    """Keys act on the dashboard until ``/``: the box must not invite typing before (a
    question typed straight away paused the daemon with its "p")."""
    from repd_tui.app import QUERY_HINT_AWAY, QUERY_HINT_TYPING

    fake = FakeClient()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            box = app.query_one("#query", Input)
            assert app.focused is not box and box.placeholder == QUERY_HINT_AWAY
            assert "/" in QUERY_HINT_AWAY
            await pilot.press("slash")
            assert app.focused is box and box.placeholder == QUERY_HINT_TYPING
            await pilot.press("escape")
            assert app.focused is not box and box.placeholder == QUERY_HINT_AWAY
            assert not [c for c in fake.calls if c[0] in ("pause", "resume")]

    run(body)


def test_errors_from_calls_are_notifications_not_crashes() -> None:
    fake = FakeClient()
    notes: list[Notification] = []

    def hook(message: Message) -> None:
        if isinstance(message, Notify):
            notes.append(message.notification)

    def said(text: str) -> bool:
        return any(text in n.message and n.severity == "error" for n in notes)

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE, message_hook=hook) as pilot:
            await until(pilot, lambda: app.daemon_up is True, "the first status")
            await pilot.press("slash", *"boom", "enter")
            await until(pilot, lambda: said("no generation is active yet"), "the query error")
            assert app.query_one("#results", DataTable).row_count == 0
            await pilot.press("escape")
            assert app.focused is app.query_one("#results", DataTable)
            fake.refuse_actions = True
            await pilot.press("p")
            await until(pilot, lambda: said("cannot pause while the daemon"), "the pause error")
            assert app.is_running

    run(body)


def test_p_pauses_then_resumes() -> None:
    fake = FakeClient()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.daemon_up is True, "the first status")
            await pilot.press("p")
            await until(pilot, lambda: fake.actions() == ["pause"], "pause()")
            status = app.query_one("#status", KeyValueGrid)
            await until(pilot, lambda: status.value("state") == "paused", "paused state")
            await pilot.press("p")
            await until(pilot, lambda: fake.actions() == ["pause", "resume"], "resume()")
            await until(pilot, lambda: status.value("state") == "indexing", "indexing again")

    run(body)


def test_r_reindexes_only_after_confirm() -> None:
    fake = FakeClient()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.daemon_up is True, "the first status")
            await pilot.press("r")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm")
            await pilot.press("n")
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "dismissal")
            assert "reindex" not in fake.actions()
            await pilot.press("r")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm")
            await pilot.press("y")
            await until(pilot, lambda: fake.actions() == ["reindex"], "reindex()")

    run(body)


def test_f_shows_skipped_and_failed_files_with_reasons() -> None:
    fake = FakeClient()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f")
            tabs = app.query_one("#tabs", TabbedContent)
            assert tabs.active == "files"
            await until(
                pilot,
                lambda: app.query_one("#files-table", DataTable).row_count == 2,
                "the files list",
            )
            rows = table_rows(app, "#files-table")
            # One root: paths relative to it, the root named once above.
            assert rows[0][:3] == ["skipped", "media/talk.mp4", "binary"]
            assert rows[1][:4] == [
                "failed",
                "scans/contract.pdf",
                "extract_error",
                "pypdf: EOF marker not found",
            ]
            summary = text_of(app, "#files-summary")
            assert f"2 files under {ROOT} are not in the index" in summary
            assert "1 skipped on purpose, 1 failed" in summary
            # The highlighted file in full below the table.
            detail = text_of(app, "#files-detail")
            assert detail == (
                f"{ROOT}/media/talk.mp4\n"
                "skipped: binary — looks binary (NUL bytes in the first 8 KiB)"
            )
            await pilot.press("f")
            assert tabs.active == "dashboard"

    run(body)


def test_daemon_down_shows_the_banner_and_recovers() -> None:
    fake = FakeClient(up=False)

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            banner = app.query_one("#banner", Static)
            await until(pilot, lambda: banner.has_class("-visible"), "the banner")
            assert str(banner.content).startswith(
                f"no daemon answers on {fake.target} — start it with `repd run` or "
                "`systemctl --user start repd`"
            )
            assert banner.display
            # It keeps retrying, and keys that need the daemon only notify.
            polls = fake.status_calls
            await until(pilot, lambda: fake.status_calls >= polls + 2, "more polls")
            await pilot.press("p")
            assert fake.actions() == []
            assert app.is_running
            fake.up = True
            await until(pilot, lambda: not banner.has_class("-visible"), "the banner to go")
            assert not banner.display
            assert app.query_one("#status", KeyValueGrid).value("state") == "indexing"

    run(body)


def test_screenshot_contains_the_key_labels(tmp_path: Path) -> None:
    fake = FakeClient()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.daemon_up is True, "the first status")
            await search(pilot, app, "raft")
            saved = Path(app.save_screenshot("dashboard.svg", str(tmp_path)))
        # Rich writes spaces in SVG text as &#160;.
        svg = saved.read_text(encoding="utf-8").replace("&#160;", " ")
        for label in (
            "Daemon",
            "Queue",
            "Roots",
            "Results",
            "indexing",
            "g0003-minilm",
            "inotify",
            "projects/raft.md:12",
            "Pause",
            "Files",
            "Keys",
        ):
            assert label in svg, label

    run(body)


def test_a_degraded_daemon_is_shown_in_red_until_it_recovers() -> None:
    fake = FakeClient()
    fake.problem = "indexing is failing (OSError: [Errno 28] No space left on device); retrying"

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            banner = app.query_one("#banner", Static)
            await until(pilot, lambda: banner.has_class("-visible"), "the red banner")
            assert str(banner.content) == f"degraded: {fake.problem}"
            status = app.query_one("#status", KeyValueGrid)
            assert status.value("state") == "degraded"
            fake.problem = None
            await until(pilot, lambda: not banner.has_class("-visible"), "the banner to go")
            assert status.value("state") == "indexing"

    run(body)


def test_a_crash_of_the_previous_run_is_said_in_the_summary_and_the_daemon_panel() -> None:
    fake = FakeClient(state="idle")
    fake.previous_crash = {"at": "2026-12-03T11:30:50Z", "error": "Segmentation fault",
                           "log": "/home/u/.local/share/repd/last-crash.log"}

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            status = app.query_one("#status", KeyValueGrid)
            await until(pilot, lambda: app.query_one("#status-crashed").display, "the row")
            assert "Segmentation fault" in status.value("crashed")
            assert "last-crash.log" in status.value("crashed")
            assert "the previous run crashed" in text_of(app, "#summary")
            assert status.value("state") == "idle"  # history, not a state
            fake.previous_crash = None  # a daemon restarted cleanly since
            await until(pilot, lambda: not app.query_one("#status-crashed").display, "gone")
            assert "crashed" not in text_of(app, "#summary")

    run(body)


# -- 80x24: every panel within reach ---------------------------------------------------------

SMALL = (80, 24)


def test_at_80x24_the_search_fills_the_view_and_d_brings_the_daemon_panel() -> None:
    fake = FakeClient(hits=8)

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SMALL) as pilot:
            await until(pilot, lambda: app.daemon_up is True, "the first status")
            await pilot.pause()
            state = app.query_one("#status-state")
            results = app.query_one("#results", DataTable)
            # The summary line stands in for the panels; the search has the rest.
            assert on_screen(app, app.query_one("#summary-bar"))
            assert text_of(app, "#summary-state") == "indexing"
            assert "ETA 1m 35s" in text_of(app, "#summary")
            assert on_screen(app, results) and on_screen(app, app.query_one("#snippet-box"))
            assert on_screen(app, app.query_one("#query"))
            assert not on_screen(app, state)
            await pilot.press("d")
            assert app.focused is app.query_one("#status-panel")
            assert on_screen(app, state)
            for key in ("model", "generation", "error"):
                assert on_screen(app, app.query_one(f"#status-{key}")), key
            # Tab goes on through the queue and the roots, each scrolled into view.
            await pilot.press("tab")
            assert app.focused is app.query_one("#queue-panel")
            assert on_screen(app, app.query_one("#queue-eta"))
            await pilot.press("tab")
            assert app.focused is app.query_one("#roots")
            assert on_screen(app, app.query_one("#roots"))
            # Escape: back to the results, and the whole search is in view again.
            await pilot.press("escape")
            assert app.focused is results
            assert on_screen(app, results) and on_screen(app, app.query_one("#query"))
            assert not on_screen(app, state)
            # Status that changes the panels' height above does not push the search away.
            fake.problem = "the watcher died (inotify limit reached); rescanning every 60 s"
            await until(pilot, lambda: app.query_one("#status-problem").display, "problem row")
            await pilot.pause()
            assert on_screen(app, results) and on_screen(app, app.query_one("#query"))

    run(body)


def test_at_80x24_results_show_several_rows_with_their_snippet() -> None:
    fake = FakeClient(hits=8)

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SMALL) as pilot:
            await until(pilot, lambda: app.daemon_up is True, "the first status")
            await search(pilot, app, "raft", rows=8)
            table = app.query_one("#results", FitTable)
            assert on_screen(app, table)
            visible_rows = table.scrollable_content_region.height - 1  # less the header
            assert visible_rows >= 6, visible_rows
            widths = [c.width for c in table.columns.values()]
            padding = 2 * table.cell_padding * len(widths)
            assert sum(widths) + padding == table.scrollable_content_region.width  # no waste
            rows = table_rows(app, "#results")
            assert rows[0][2] == "projects/raft.md:12"  # the location whole
            assert len(rows[0][3]) >= 20 and rows[0][3].startswith("## Leader election")
            # The chunk below: whole, numbered, on screen.
            view = app.query_one("#snippet", ChunkView)
            assert on_screen(app, app.query_one("#snippet-box"))
            assert view.first_line == 12 and len(view.lines) == 19
            # Tab reaches the chunk, and the arrows scroll it.
            await pilot.press("tab")
            box = app.query_one("#snippet-box")
            assert app.focused is box
            assert box.max_scroll_y > 0
            await pilot.press("down", "down")
            assert box.scroll_y == 2

    run(body)


def test_files_columns_fit_the_width() -> None:
    fake = FakeClient()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SMALL) as pilot:
            await pilot.press("f")
            table = app.query_one("#files-table", FitTable)
            await until(pilot, lambda: table.row_count == 2, "the files list")
            await pilot.pause()
            widths = {str(k.value): c.width for k, c in table.columns.items()}
            padding = 2 * table.cell_padding * len(widths)
            assert sum(widths.values()) + padding <= table.size.width
            rows = table_rows(app, "#files-table")
            # Short cells whole: no "skipp", "2024-", "/tmp".
            assert [r[0] for r in rows] == ["skipped", "failed"]
            assert [r[1] for r in rows] == ["media/talk.mp4", "scans/contract.pdf"]
            assert [r[2] for r in rows] == ["binary", "extract_error"]
            assert [r[4] for r in rows] == ["2024-05-01 10:02", "2024-05-01 10:02"]
            assert rows[0][3].startswith("looks binary") and rows[0][3].endswith("…")
            assert on_screen(app, app.query_one("#files-detail"))
            assert "(NUL bytes in the first 8 KiB)" in text_of(app, "#files-detail")
            # Wider, the same table shows every cell whole.
            await pilot.resize_terminal(160, 30)
            await pilot.pause()
            rows = table_rows(app, "#files-table")
            assert rows[0][3] == "looks binary (NUL bytes in the first 8 KiB)"

    os.environ["TZ"] = "UTC"
    time.tzset()
    run(body)


# -- the Chunk pane --------------------------------------------------------------------------


def test_the_chunk_is_read_from_its_file_with_line_numbers_and_no_control_characters(
    tmp_path: Path,
) -> None:
    root = tmp_path / "notes"
    (root / "projects").mkdir(parents=True)
    lines = list(RAFT_LINES)
    lines[13] = "election timeout \x1b]0;pwned\x07fires.\tTabbed\r"
    (root / "projects" / "raft.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    fake = FakeClient(root=str(root))

    async def body() -> None:
        # The real reader: the file on disk, as the daemon extracts it.
        app = create_app(lambda: fake, poll_interval=0.25)
        async with app.run_test(size=SIZE) as pilot:
            await search(pilot, app, "raft")
            view = app.query_one("#snippet", ChunkView)
            assert view.first_line == 12 and view.note is None
            assert view.lines[0] == "## Leader election"
            # Escapes shown, the tab as spaces to the next stop of 4 on the line as shown.
            assert view.lines[2] == "election timeout \\x1b]0;pwned\\x07fires. Tabbed"
            assert view.lines[-1] == "Votes are counted per term; step 15 of the election."
            shown = text_of(app, "#snippet")
            assert "14 │ election timeout \\x1b]0;pwned" in shown
            assert not any(ord(c) < 32 and c != "\n" for c in shown)
            # The second hit's file is not there: the indexed snippet, and why.
            await pilot.press("down")
            await until(pilot, lambda: view.note is not None, "the fallback")
            assert view.first_line is None
            assert view.note is not None and view.note.startswith("cannot read the file")
            assert view.lines == ["Paxos made simple: the proposer sends prepare(n) to a majority."]
            # A file edited since it was indexed: not lines that are no longer the hit.
            (root / "projects" / "raft.md").write_text("rewritten\n" * 40, encoding="utf-8")
            await pilot.press("up")
            await until(pilot, lambda: view.note is not None and "changed" in view.note,
                        "the changed-file note")
            assert view.lines[0].startswith("## Leader election A follower")

    run(body)


# -- keys: o, y, ? ---------------------------------------------------------------------------


def test_editor_command_uses_each_editors_line_syntax() -> None:
    path = "/home/ada/notes/a b.md"
    assert editor_command("vim", path, 12).argv == ["vim", "+12", path]
    assert editor_command("/usr/bin/nvim", path, 3).argv == ["/usr/bin/nvim", "+3", path]
    assert editor_command("emacs -nw", path, 7).argv == ["emacs", "-nw", "+7", path]
    for name in ("nano", "micro", "kak", "hx", "emacsclient -t"):
        cmd = editor_command(name, path, 9)
        assert cmd.argv[-2:] == ["+9", path] and cmd.terminal, name
    code = editor_command("code --wait", path, 12)
    assert code.argv == ["code", "--wait", "-g", f"{path}:12"] and not code.terminal
    assert editor_command("subl", path, 5).argv == ["subl", f"{path}:5"]
    assert editor_command("someeditor", path, 5).argv == ["someeditor", path]
    opener = editor_command(None, path, 5)
    assert opener.argv == ["xdg-open", path] and not opener.terminal
    assert editor_command("  ", path, 5).argv == ["xdg-open", path]


def test_o_opens_the_result_in_the_editor_at_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "notes"
    (root / "projects").mkdir(parents=True)
    target = root / "projects" / "raft.md"
    target.write_text("\n".join(RAFT_LINES) + "\n", encoding="utf-8")
    fake = FakeClient(root=str(root))
    ran: list[list[str]] = []
    spawned: list[list[str]] = []
    suspended: list[bool] = []

    def fake_run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[bytes]:
        assert suspended and suspended[-1], "the editor ran without the app suspended"
        ran.append(list(argv))
        return subprocess.CompletedProcess(argv, 0)

    class FakePopen:
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            assert kwargs.get("start_new_session") is True
            spawned.append(list(argv))

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.delenv("VISUAL", raising=False)

    @contextlib.contextmanager
    def fake_suspend() -> Iterator[None]:
        suspended.append(True)
        try:
            yield
        finally:
            suspended.append(False)

    async def body() -> None:
        app = make_app(fake)
        app.suspend = fake_suspend  # type: ignore[method-assign]
        async with app.run_test(size=SMALL) as pilot:
            monkeypatch.setenv("EDITOR", "vim")
            await pilot.press("o")  # nothing selected yet: a warning, no editor
            assert ran == []
            await search(pilot, app, "raft")
            await pilot.press("o")
            assert ran == [["vim", "+12", str(target)]]
            assert suspended == [True, False]
            monkeypatch.setenv("EDITOR", "code")
            await pilot.press("o")
            assert spawned == [["code", "-g", f"{target}:12"]]
            monkeypatch.delenv("EDITOR")
            await pilot.press("o")
            assert spawned[-1] == ["xdg-open", str(target)]
            assert len(ran) == 1 and suspended == [True, False]
            assert app.is_running

    run(body)


def test_y_copies_path_and_line() -> None:
    fake = FakeClient()
    notes: list[Notification] = []

    def hook(message: Message) -> None:
        if isinstance(message, Notify):
            notes.append(message.notification)

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SMALL, message_hook=hook) as pilot:
            await search(pilot, app, "raft")
            await pilot.press("down", "y")
            where = f"{ROOT}/papers/paxos-made-simple.txt:1"
            assert app.clipboard == where
            await until(pilot, lambda: any(n.message == where for n in notes), "the notice")
            await pilot.press("up", "y")
            assert app.clipboard == f"{ROOT}/projects/raft.md:12"

    run(body)


def test_question_mark_lists_every_key() -> None:
    fake = FakeClient()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SMALL) as pilot:
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the list of keys")
            help_screen = app.screen
            assert isinstance(help_screen, HelpScreen)
            listed = {key for key, _ in KEYS_HELP}
            names = {"slash": "/", "question_mark": "?", "escape": "Esc"}
            for binding in RepdApp.BINDINGS:
                assert not isinstance(binding, tuple)
                key = names.get(binding.key, binding.key)
                assert key in listed or key in help_screen.text, key
            # The whole list fits in 80x24.
            assert on_screen(app, app.screen.query_one("#help-keys"))
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "closing")

    run(body)


# -- status that reads right -----------------------------------------------------------------


def test_status_while_paused_idle_and_starting_reads_right() -> None:
    fake = FakeClient()
    fake.paused = True  # the daemon still sends its last ETA

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            status = app.query_one("#status", KeyValueGrid)
            queue = app.query_one("#queue", KeyValueGrid)
            await until(pilot, lambda: status.value("state") == "paused", "paused")
            assert queue.value("eta") == "paused"
            assert [queue.value(r) for r in ("files_per_s", "chunks_per_s")] == ["0", "0"]
            assert app.sub_title.endswith("· paused")
            assert "(paused)" not in app.sub_title
            assert "385 in flight" in text_of(app, "#summary")
            assert "ETA" not in text_of(app, "#summary")
            # Idle: rates the daemon still averages over a past burst show as 0, no ETA.
            fake.paused = False
            fake.state = "idle"
            await until(pilot, lambda: status.value("state") == "idle", "idle")
            assert [queue.value(r) for r in ("files_per_s", "chunks_per_s", "embeds_per_s")] == [
                "0", "0", "0"
            ]
            assert queue.value("eta") == "idle"
            assert "ETA" not in text_of(app, "#summary")
            assert not app.query_one("#status-problem").display
            # Starting: the daemon says what it is doing, in the panel and the summary.
            fake.state = "starting"
            await until(pilot, lambda: status.value("state") == "starting", "starting")
            assert app.query_one("#status-problem").display
            assert status.value("problem") == "loading model and index"
            assert status.label("problem") == "phase"  # a start is no problem
            assert text_of(app, "#summary") == "loading model and index"
            assert not app.query_one("#banner").has_class("-visible")
            # Back to work: the problem row goes again.
            fake.state = "indexing"
            await until(pilot, lambda: status.value("state") == "indexing", "indexing")
            assert not app.query_one("#status-problem").display
            assert status.label("problem") == "problem"

    run(body)


# -- model migration: the panel, switch and rollback ------------------------------------------


def notes_hook() -> tuple[list[Notification], Callable[[Message], None]]:
    notes: list[Notification] = []

    def hook(message: Message) -> None:
        if isinstance(message, Notify):
            notes.append(message.notification)

    return notes, hook


def test_the_migration_panel_follows_the_status() -> None:
    fake = FakeClient(state="idle")
    notes, hook = notes_hook()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SMALL, message_hook=hook) as pilot:
            await until(pilot, lambda: app.daemon_up is True, "the first status")
            panel = app.query_one("#migration-panel")
            assert not panel.display
            # No migration, nothing retired: neither s nor b in the footer.
            assert app.check_action("switch_model", ()) is False
            assert app.check_action("rollback_model", ()) is False
            fake.migration = migration()
            await until(pilot, lambda: panel.display, "the migration panel")
            assert text_of(app, "#migration-title") == (
                "backfilling: sentence-transformers/all-MiniLM-L6-v2 (generation g0003-minilm) "
                "→ BAAI/bge-small-en-v1.5 (generation 4)")
            assert text_of(app, "#migration-counts") == (
                "613 / 1,532 files · 12.5 files/s · ETA 1m 13s")
            assert text_of(app, "#migration-hint") == (
                "the active generation answers meanwhile · the new model takes 127 MiB")
            bar = app.query_one("#migration-bar", ProgressBar)
            assert (bar.progress, bar.total) == (613, 1532)
            assert not app.query_one("#migration-gate").display
            assert "migration 40%" in text_of(app, "#summary")
            assert app.check_action("switch_model", ()) is True
            await until(pilot, lambda: len(app.screen.query("FooterKey")) == footer_keys(app),
                        "the footer")
            assert any(getattr(key, "description", "") == "Switch"
                       for key in app.screen.query("FooterKey"))
            # Not ready yet: s says why, and asks nothing.
            await pilot.press("s")
            await until(pilot, lambda: any("still being built (40%)" in n.message
                                           for n in notes), "the warning")
            assert not isinstance(app.screen, ConfirmScreen)
            fake.migration = migration(state="ready", files_done=1532, progress=1.0, eta_s=None,
                                       message="waiting for `repd model switch`")
            await until(pilot, lambda: text_of(app, "#migration-hint").startswith(
                "backfilled: s switches to it"), "ready")
            assert text_of(app, "#migration-counts") == "1,532 / 1,532 files"
            assert text_of(app, "#migration-gate") == "waiting for `repd model switch`"
            fake.migration = None
            await until(pilot, lambda: not panel.display, "the panel to go")
            assert app.check_action("switch_model", ()) is False

    run(body)


def test_s_switches_after_confirm_then_b_rolls_back() -> None:
    fake = FakeClient(state="idle")
    fake.migration = migration(state="ready", files_done=1532, progress=1.0, eta_s=None)
    notes, hook = notes_hook()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SMALL, message_hook=hook) as pilot:
            await until(pilot, lambda: app.migration is not None, "the migration")
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm")
            question = str(app.screen.query_one("#confirm-question", Static).content)
            assert question.startswith("Switch to BAAI/bge-small-en-v1.5 (generation 4)?")
            # The whole dialog fits 80x24.
            assert on_screen(app, app.screen.query_one("#confirm-dialog"))
            await pilot.press("n")
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "dismissal")
            assert fake.actions() == []
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm")
            await pilot.press("y")
            await until(pilot, lambda: fake.actions() == ["model_switch"], "model_switch()")
            assert fake.calls[-1] == ("model_switch", False)
            await until(pilot, lambda: any(
                n.message.startswith("generation 4 (BAAI/bge-small-en-v1.5) is active\ngate: "
                                     "passed") for n in notes), "the notice")
            await until(pilot, lambda: not app.query_one("#migration-panel").display,
                        "the panel to go")
            # g0002-e5 is kept, retired: b now rolls back to it.
            await until(pilot, lambda: app.check_action("rollback_model", ()) is True,
                        "rollback offered")
            await pilot.press("b")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm")
            question = str(app.screen.query_one("#confirm-question", Static).content)
            assert question.startswith("Roll back to generation g0002-e5 (intfloat/e5-small-v2)?")
            await pilot.press("y")
            await until(pilot, lambda: fake.actions()[-1:] == ["model_rollback"], "rollback()")
            await until(pilot, lambda: app.check_action("rollback_model", ()) is False,
                        "nothing left to roll back to")

    run(body)


def test_a_refused_gate_asks_to_force_and_a_refusal_is_a_notification() -> None:
    fake = FakeClient(state="idle")
    gate = {"ok": False, "checks": ["files: 1530 of 1532 in the same state in both"],
            "ndcg_active": 0.412, "ndcg_new": 0.398, "forced": False}
    fake.migration = migration(state="ready", files_done=1532, progress=1.0, eta_s=None,
                               gate=gate)
    notes, hook = notes_hook()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SMALL, message_hook=hook) as pilot:
            await until(pilot, lambda: app.migration is not None, "the migration")
            gate_box = app.query_one("#migration-gate", Static)
            assert gate_box.display and gate_box.has_class("-refused")
            assert str(gate_box.content) == (
                "gate: REFUSED\n  files: 1530 of 1532 in the same state in both\n"
                "  nDCG@10: active 0.412, new 0.398")
            assert "gate refused" in text_of(app, "#summary")
            fake.refuse_switch = True
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm")
            question = str(app.screen.query_one("#confirm-question", Static).content)
            assert question.startswith("The gate refused the switch to BAAI/bge-small-en-v1.5")
            assert "Switch anyway?" in question
            await pilot.press("y")
            await until(pilot, lambda: any("the gate refused the switch: files differ"
                                           in n.message and n.severity == "error"
                                           for n in notes), "the error")
            assert fake.calls[-1] == ("model_switch", True)
            assert app.is_running and app.query_one("#migration-panel").display

    run(body)


# -- layout snapshots ------------------------------------------------------------------------


def _svg_text_lines(svg: str) -> list[str]:
    """The characters of an SVG screenshot, row by row (for a readable failure)."""
    import html
    import re

    rows: dict[int, list[tuple[float, str]]] = {}
    for x, row, text in re.findall(
        r'<text class="[^"]*" x="([\d.]+)" y="[\d.]+" textLength="[\d.]+" '
        r'clip-path="url\(#[^)]*-line-(\d+)\)">(.*?)</text>',
        svg,
    ):
        rows.setdefault(int(row), []).append((float(x), html.unescape(text)))
    lines = []
    for row in sorted(rows):
        line = ""
        for x, text in sorted(rows[row]):
            column = round(x / 12.2)
            line = line.ljust(column) + text
        lines.append(line.rstrip())
    return lines


def check_snapshot(name: str, svg: str, tmp_path: Path) -> None:
    """Compare ``svg`` with the stored ``name``.svg; REPD_UPDATE_SNAPSHOTS=1 stores it."""
    expected = SNAPSHOTS / f"{name}.svg"
    if os.environ.get("REPD_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(parents=True, exist_ok=True)
        expected.write_text(svg, encoding="utf-8")
        return
    assert expected.exists(), (
        f"no snapshot {expected}: run with REPD_UPDATE_SNAPSHOTS=1 and look at it"
    )
    want = expected.read_text(encoding="utf-8")
    if want == svg:
        return
    actual = tmp_path / f"{name}.actual.svg"
    actual.write_text(svg, encoding="utf-8")
    import difflib

    diff = "\n".join(
        difflib.unified_diff(_svg_text_lines(want), _svg_text_lines(svg), "expected", "actual",
                             lineterm="")
    ) or "(same characters: colours or styles differ)"
    pytest.fail(
        f"{name}: the screen differs from {expected} (got {actual}; "
        f"REPD_UPDATE_SNAPSHOTS=1 accepts it)\n{diff}"
    )


SCENARIOS = ("idle", "indexing", "query", "files", "down", "migration")


def footer_keys(app: RepdApp) -> int:
    """How many keys the footer shows: the bindings that may show and apply now."""
    return sum(1 for b in RepdApp.BINDINGS
               if isinstance(b, Binding) and b.show and app.check_action(b.action, ()))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_snapshot(
    scenario: str, size: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fixed data, frozen clocks: the fake's uptime and times are constants, times print in
    # UTC, and one status poll only (the sparkline draws one sample, whatever the speed).
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    fake = FakeClient(
        up=scenario != "down",
        state="indexing" if scenario == "indexing" else "idle",
        hits=12,
    )
    if scenario == "migration":
        fake.migration = migration()

    async def body() -> None:
        app = make_app(fake, poll_interval=600)
        async with app.run_test(size=size) as pilot:
            if scenario == "down":
                banner = app.query_one("#banner")
                await until(pilot, lambda: banner.has_class("-visible"), "the banner")
            else:
                await until(pilot, lambda: app.daemon_up is True, "the first status")
            if scenario == "query":
                await search(pilot, app, "leader election", rows=12)
                await until(pilot, lambda: not app.query_one("#results").loading, "loaded")
            elif scenario == "files":
                await pilot.press("f")
                table = app.query_one("#files-table", DataTable)
                await until(pilot, lambda: table.row_count == 2, "the files list")
            app.query_one("#query", Input).cursor_blink = False
            if scenario == "migration":
                # At 80x24 the panels sit above the search: bring this one into view.
                panel = app.query_one("#migration-panel")
                await until(pilot, lambda: panel.display, "the migration panel")
                await pilot.pause()  # laid out before it is scrolled to
                panel.focus(scroll_visible=False)
                panel.scroll_visible(top=True, animate=False, immediate=True)
            # The footer draws its keys a moment after the bindings settle.
            shown = footer_keys(app)
            await until(pilot, lambda: len(app.screen.query("FooterKey")) == shown, "the footer")
            # Layout and scroll anchoring may still move for a moment on a loaded machine:
            # take the screen once two exports in a row agree. Scrollbars are repainted
            # first: one whose window changed (the banner came) could otherwise keep
            # drawing its thumb where it was, in both exports.
            svg = ""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if scenario == "migration":
                    # Again each round: a layout pass that lands after the first scroll
                    # (late on a loaded machine) can move the panel out of view.
                    panel.scroll_visible(top=True, animate=False, immediate=True)
                for widget in app.screen.walk_children(with_self=True):
                    if widget.show_vertical_scrollbar:
                        widget.vertical_scrollbar.refresh()
                    if widget.show_horizontal_scrollbar:
                        widget.horizontal_scrollbar.refresh()
                await pilot.pause(0.15)
                again = app.export_screenshot(title=f"repd {scenario}", simplify=True)
                if again == svg:
                    break
                svg = again
        check_snapshot(f"{scenario}-{size[0]}x{size[1]}", svg, tmp_path)

    run(body)
    monkeypatch.undo()
    time.tzset()
