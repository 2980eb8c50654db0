"""The terminal dashboard, driven through Textual's Pilot against a fake daemon client."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from textual.message import Message
from textual.notifications import Notification, Notify
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Sparkline, Static, TabbedContent

from repd.api.client import ApiRequestError, DaemonNotRunning
from repd.api.schema import ActionResponse, FilesResponse, QueryResponse, StatusResponse
from repd_tui.app import RepdApp, create_app
from repd_tui.widgets import ConfirmScreen, KeyValueGrid

ROOT = "/home/ada/notes"
SIZE = (140, 44)


class FakeClient:
    """Answers like a daemon with one root, a built index and a little work queued.

    ``up`` switches the daemon off and on; ``calls`` records every call but status.
    Every answer is validated against the API's pydantic models, so the fake cannot drift
    from the wire contract.
    """

    target = "/run/user/1000/repd/repd.sock"

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.paused = False
        self.refuse_actions = False
        self.problem: str | None = None  # set: the daemon reports itself degraded
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
        data = {
            "version": "0.1.0",
            "api_version": 1,
            "state": "degraded" if self.problem else "paused" if self.paused else "indexing",
            "paused": self.paused,
            "model": {
                "name": "sentence-transformers/all-MiniLM-L6-v2",
                "id": "sentence-transformers/all-MiniLM-L6-v2@c9745ed1",
                "dim": 384,
                "device": "cuda:0",
            },
            "generation": {"id": "g0003-minilm", "state": "active", "points": 48213},
            "queue": {
                "pending": 120,
                "scans": 1,
                "settling": 2,
                "planning": 4,
                "embedding": 256,
                "writing": 3,
            },
            "rates": {"files_per_s": 37.5, "chunks_per_s": 410.2, "embeds_per_s": 398.0},
            "eta_s": 95.0,
            "roots": [
                {
                    "path": ROOT,
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
            "problem": self.problem,
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
                "root": ROOT,
                "path": "projects/raft.md",
                "start_line": 12,
                "end_line": 30,
                "snippet": "## Leader election\nA follower becomes a candidate when its "
                "election timeout fires.\nIt votes for itself and asks the others.",
            },
            {
                "rank": 2,
                "score": 0.7011,
                "root": ROOT,
                "path": "papers/paxos-made-simple.txt",
                "start_line": 1,
                "end_line": 22,
                "snippet": "Paxos made simple: the proposer sends prepare(n) to a majority.",
            },
        ]
        data = {"hits": hits[:k], "took_ms": 7.4, "generation": "g0003-minilm"}
        return QueryResponse.model_validate(data).model_dump(mode="json")

    def files(self, state: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        self.calls.append(("files", state))
        self._check()
        items = [
            {
                "root": ROOT,
                "path": "media/talk.mp4",
                "state": "skipped",
                "reason": "binary",
                "detail": "looks binary (NUL bytes in the first 8 KiB)",
                "at": "2024-05-01T10:02:03Z",
            },
            {
                "root": ROOT,
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

    def actions(self) -> list[str]:
        """Names of the calls made, status polls left out."""
        return [name for name, _ in self.calls]


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an async test body: pytest-asyncio is not a dependency of this project."""
    asyncio.run(asyncio.wait_for(test(), timeout=60))


def make_app(fake: FakeClient) -> RepdApp:
    # Faster than the production second, to keep the recovery test short; not much faster,
    # as Pilot waits for the app to go idle after every key.
    return create_app(lambda: fake, poll_interval=0.25)


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


def test_status_panels_show_the_daemon_state() -> None:
    fake = FakeClient()

    async def body() -> None:
        app = make_app(fake)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.daemon_up is True, "the first status")
            status = app.query_one("#status", KeyValueGrid)
            assert status.value("state") == "indexing"
            assert status.value("paused").startswith("no")
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
            assert rows[0][3] == "## Leader election"
            assert rows[1][2] == "papers/paxos-made-simple.txt:1"
            # The first hit is previewed, and moving to the second shows its whole chunk.
            assert "A follower becomes a candidate" in text_of(app, "#snippet")
            await pilot.press("down", "enter")
            await pilot.pause()
            assert text_of(app, "#snippet").startswith("Paxos made simple")
            box_title = str(app.query_one("#snippet-box").border_title)
            assert box_title.startswith(f"{ROOT}/papers/paxos-made-simple.txt:1-22")

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
            assert status.value("paused").startswith("yes")
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
            assert rows[0][:3] == ["skipped", f"{ROOT}/media/talk.mp4", "binary"]
            assert rows[1][:4] == [
                "failed",
                f"{ROOT}/scans/contract.pdf",
                "extract_error",
                "pypdf: EOF marker not found",
            ]
            assert "1 skipped on purpose, 1 failed" in text_of(app, "#files-summary")
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
            await pilot.press("slash", *"raft", "enter")
            await until(
                pilot, lambda: app.query_one("#results", DataTable).row_count == 2, "the results"
            )
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
            "Pause/resume",
            "Files",
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
