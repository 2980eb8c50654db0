"""A real daemon against hostile input: held connections under a tight descriptor limit, a
pathological glob, and file names and contents full of terminal escape sequences."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from repd.api.guard import REQUEST_DEADLINE_S
from tests.daemon_harness import DaemonProc, wait_for
from tests.helpers import run_cli

# The limit of the measured failure: 60 held connections under 48 descriptors wrote 22 MB
# of logs in 10 s and broke indexing. Hard and soft alike, so the daemon cannot raise it.
FD_LIMIT = 48
# A terminal title change, a line erase, colours, a bell, and C1 CSI (\x9b) without ESC.
HOSTILE_NAME = "report\x1b]0;pwned\x07\x1b[2K\x1b[31mRED\x9b2J.md"
HOSTILE_TEXT = ("Volcano eruption report \x1b]0;owned title\x07 with \x1b[31mred lava text"
                "\x1b[0m, a bell \x07 and a C1 clear \x9b2J at the end.\n")
EMPTY_NAME = "empty\x1b[2J\x1b[H.txt"
ROOT_NAME = "notes\x1b[41m"
LONG_NAMES = [f"a-long-file-name-about-glaciers-and-lava-flows-{i}.md" for i in range(6)]
CONTROL = [chr(c) for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))]


def no_controls(text: str) -> bool:
    return not any(ch in text for ch in CONTROL)


class LimitedDaemon(DaemonProc):
    """The harness's daemon, started under RLIMIT_NOFILE = FD_LIMIT."""

    def start(self, wait_idle: bool = True, timeout: float = 180) -> DaemonProc:
        real_popen = subprocess.Popen

        def popen(*args: Any, **kwargs: Any) -> Any:
            kwargs["preexec_fn"] = lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
            return real_popen(*args, **kwargs)

        subprocess.Popen = popen  # type: ignore[misc]
        try:
            return super().start(wait_idle, timeout)
        finally:
            subprocess.Popen = real_popen  # type: ignore[misc]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    base = tmp_path_factory.mktemp("hostile")
    root = base / ROOT_NAME
    root.mkdir()
    (root / HOSTILE_NAME).write_text(HOSTILE_TEXT)
    (root / EMPTY_NAME).write_text("")
    for i, name in enumerate(LONG_NAMES):
        (root / name).write_text(f"Field notes {i}: glaciers grind rock; lava flows cool.\n")
    proc = LimitedDaemon(base / "home", [root])
    proc.start()
    yield proc
    proc.stop()


def test_daemon_really_runs_under_the_tight_limit(daemon: DaemonProc) -> None:
    limits = Path(f"/proc/{daemon.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    assert line.split()[3:5] == [str(FD_LIMIT), str(FD_LIMIT)], line


def _hold(sock_path: Path, n: int) -> list[socket.socket]:
    held = []
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(str(sock_path))
            if i % 3 == 1:  # slowloris: headers begun, never finished
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
            elif i % 3 == 2:  # a body promised and never sent
                s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/json\r\nContent-Length: 500\r\n\r\n{\"te")
        except OSError:
            pass  # refused or reset under load is fine: the daemon decides, not us
        held.append(s)
    return held


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True  # reset, or never connected


def test_held_connections_neither_block_status_nor_indexing(daemon: DaemonProc) -> None:
    log_before = daemon.log.stat().st_size
    held = _hold(daemon.socket, 200)
    try:
        t0 = time.monotonic()
        proc = run_cli(["status", "--timeout", "20"], daemon.env, check=False, timeout=60)
        took = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        assert "state:" in proc.stdout
        assert took < 30, took
        # Indexing goes on: a file written now becomes searchable.
        (daemon.roots[0] / "penguins.md").write_text("Emperor penguins huddle in winter.\n")
        wait_for(lambda: "penguins.md" in daemon.paths_for("emperor penguins huddle", 3), 90,
                 "the new file to be indexed while connections are held")
        # Nobody holds a connection for free: every one is closed within the deadline.
        wait_for(lambda: all(_closed_by_peer(s) for s in held), REQUEST_DEADLINE_S + 30,
                 "the daemon to close every idle or unfinished connection")
    finally:
        for s in held:
            s.close()
    grown = daemon.log.stat().st_size - log_before
    assert grown < 50_000, f"{grown} bytes of log for 200 held connections"


def test_pathological_glob_answers_within_a_bound(daemon: DaemonProc) -> None:
    slowest_status = 0.0
    stop = threading.Event()

    def poll_status() -> None:
        nonlocal slowest_status
        while not stop.is_set():
            t = time.monotonic()
            daemon.status()
            slowest_status = max(slowest_status, time.monotonic() - t)
            time.sleep(0.05)

    poller = threading.Thread(target=poll_status)
    poller.start()
    try:
        for glob in ("*" * 18 + "x", "*a" * 30 + "*z", "**/" * 200 + "x", "*?" * 400 + "q"):
            t = time.monotonic()
            hits = daemon.client.query("glaciers and lava", k=10, path=glob)["hits"]
            assert time.monotonic() - t < 10, glob  # a backtracking regex took minutes
            assert hits == []
    finally:
        stop.set()
        poller.join()
    assert slowest_status < 10, slowest_status
    # The matcher still matches.
    hits = daemon.client.query("glaciers and lava", k=10, path="**/*flows-3.md")["hits"]
    assert [h["path"] for h in hits] == [LONG_NAMES[3]]


def test_cli_output_has_no_control_characters_and_json_stays_exact(daemon: DaemonProc) -> None:
    env = daemon.env
    text = run_cli(["query", "volcano eruption report red lava", "-k", "3"], env).stdout
    assert "Volcano eruption report" in text
    assert no_controls(text), repr(text)
    assert "\\x1b]0;owned title\\x07" in text and "\\x9b2J" in text  # shown, made visible
    raw = json.loads(run_cli(["query", "volcano eruption report red lava", "-k", "3",
                              "--json"], env).stdout)
    top = raw["hits"][0]
    assert top["path"] == HOSTILE_NAME
    assert "\x1b]0;owned title\x07" in top["snippet"] and "\x9b2J" in top["snippet"]

    files = run_cli(["files"], env).stdout
    assert "empty" in files and no_controls(files), repr(files)
    items = json.loads(run_cli(["files", "--json"], env).stdout)["items"]
    assert EMPTY_NAME in {it["path"] for it in items}

    status = run_cli(["status"], env).stdout
    assert "notes\\x1b[41m" in status and no_controls(status), repr(status)
    roots = json.loads(run_cli(["status", "--json"], env).stdout)["roots"]
    assert roots[0]["path"].endswith(ROOT_NAME)


def test_dashboard_shows_no_control_characters(daemon: DaemonProc) -> None:
    from textual.widgets import DataTable, Input, Static

    from repd.api.client import ApiClient
    from repd_tui.app import create_app

    async def body() -> None:
        app = create_app(lambda: ApiClient(daemon.socket, timeout=30), poll_interval=0.5)
        async with app.run_test(size=(140, 44)) as pilot:
            deadline = time.monotonic() + 30
            while app.daemon_up is not True:
                assert time.monotonic() < deadline, "no status"
                await pilot.pause(0.05)
            roots = app.query_one("#roots", DataTable)
            root_cell = str(roots.get_row_at(0)[0])
            assert root_cell.endswith("notes\\x1b[41m") and no_controls(root_cell)
            await pilot.press("slash")
            app.query_one("#query", Input).value = "volcano eruption report red lava"
            await pilot.press("enter")
            results = app.query_one("#results", DataTable)
            while results.row_count == 0:
                assert time.monotonic() < deadline + 30, "no results"
                await pilot.pause(0.05)
            cells = [str(c) for i in range(results.row_count) for c in results.get_row_at(i)]
            assert any("report\\x1b]0;pwned" in c for c in cells)
            assert all(no_controls(c) for c in cells), cells
            snippet = str(app.query_one("#snippet", Static).content)
            title = str(app.query_one("#snippet-box").border_title)
            assert "Volcano eruption report" in snippet
            assert no_controls(snippet) and no_controls(title), (snippet, title)

    asyncio.run(asyncio.wait_for(body(), timeout=120))


def test_raise_nofile_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))\n"
        "from repd.api.guard import connection_cap, raise_nofile_limit\n"
        "before_cap = connection_cap()\n"
        "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0],"
        " before_cap, connection_cap())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split("\n")[-2]
    assert out == "(64, 4096) 4096 4 128", out
