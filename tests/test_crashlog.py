"""A native crash is never silent: the stacks are kept and the next run says so.

The real daemon is crashed with SIGSEGV (what a fault in the model runtime or the store's
engine raises), restarted, and asked for its status; a one-shot command's crash prints
its stacks on stderr.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from repd.cli_status import render_status
from repd.crashlog import CRASH_FILE, LAST_CRASH_FILE, CrashLog, fatal_error
from tests.daemon_harness import DaemonProc
from tests.helpers import cli_env, run_cli
from tests.test_cli_experience import _status

RECORD = """Fatal Python error: Segmentation fault

Thread 0x00007f1c2a7fc6c0 (most recent call first):
  File "/venv/lib/python3.11/site-packages/openvino/runtime.py", line 40 in infer
  File "/venv/lib/python3.11/site-packages/repd/adapters/openvino_runtime.py", line 88 in run

Current thread 0x00007f1c3b7fe740 (most recent call first):
  <no Python frame>
"""


def _arm(folder: Path) -> tuple[CrashLog, object]:
    log = CrashLog(folder)
    return log, log.arm()


def test_a_run_that_stops_cleanly_leaves_nothing_and_reports_nothing(tmp_path: Path) -> None:
    log, previous = _arm(tmp_path)
    try:
        assert previous is None
        assert (tmp_path / CRASH_FILE).exists()  # armed: this run's record goes there
    finally:
        log.disarm()
    assert not (tmp_path / CRASH_FILE).exists()
    log, previous = _arm(tmp_path)
    log.disarm()
    assert previous is None


def test_a_record_left_by_a_crash_is_reported_once_and_kept(tmp_path: Path) -> None:
    (tmp_path / CRASH_FILE).write_text(RECORD)
    log, crash = _arm(tmp_path)
    try:
        assert crash is not None
        assert crash.error == "Segmentation fault"  # type: ignore[attr-defined]
        assert crash.log == tmp_path / LAST_CRASH_FILE  # type: ignore[attr-defined]
        assert (tmp_path / LAST_CRASH_FILE).read_text() == RECORD
        assert (tmp_path / CRASH_FILE).read_text() == ""  # this run's file starts empty
    finally:
        log.disarm()
    log, again = _arm(tmp_path)  # the run after a clean stop has nothing to say
    log.disarm()
    assert again is None
    assert (tmp_path / LAST_CRASH_FILE).read_text() == RECORD


def test_an_empty_record_is_a_kill_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / CRASH_FILE).write_text("")  # kill -9: the process had no chance to write
    log, crash = _arm(tmp_path)
    log.disarm()
    assert crash is None
    assert not (tmp_path / LAST_CRASH_FILE).exists()


def test_the_fatal_error_is_read_from_the_record() -> None:
    assert fatal_error(RECORD) == "Segmentation fault"
    assert fatal_error("Fatal Python error: Aborted\n\nStack...") == "Aborted"
    assert fatal_error("something else entirely\nmore") == "something else entirely"
    assert fatal_error("") == "fatal error"


def test_status_text_shows_the_previous_crash() -> None:
    crash = {"at": "2026-12-03T11:52:00+00:00", "error": "Segmentation fault",
             "log": "/home/u/.local/share/repd/last-crash.log"}
    text = render_status(_status(previous_crash=crash))
    assert "CRASHED" in text and "Segmentation fault" in text
    assert "last-crash.log" in text
    assert "CRASHED" not in render_status(_status())


def test_a_crashed_daemon_is_reported_by_the_next_run(tmp_path: Path) -> None:
    """SIGSEGV to a real daemon; the restarted daemon's status and `repd status` say so."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "lava.md").write_text("Basalt lava flows from shield volcanoes.\n")
    home = tmp_path / "home"
    data_dir = home / "data" / "repd"
    d = DaemonProc(home, [root]).start()
    d.signal(signal.SIGSEGV)
    assert d.proc is not None
    assert d.proc.wait(60) == -signal.SIGSEGV
    record = (data_dir / CRASH_FILE).read_text()
    assert record.startswith("Fatal Python error: Segmentation fault"), record[:500]
    assert "(most recent call first)" in record  # every thread's stack
    assert "repd" in record  # the daemon's own frames (its threads wait in repd's code)
    doctor = run_cli(["doctor", "--quick"], d.env, check=False)
    assert "has not started since" in doctor.stdout and "Segmentation fault" in doctor.stdout

    d2 = DaemonProc(home, [root]).start()
    try:
        st = d2.status()
        crash = st["previous_crash"]
        assert crash is not None and crash["error"] == "Segmentation fault"
        assert Path(crash["log"]) == data_dir / LAST_CRASH_FILE
        assert (data_dir / LAST_CRASH_FILE).read_text() == record
        assert st["state"] == "idle"  # the index itself is fine: the crash is history
        shown = run_cli(["status"], d2.env).stdout
        assert "CRASHED" in shown and "Segmentation fault" in shown
        events = [json.loads(line).get("event") for line in d2.log.read_text().splitlines()
                  if line.startswith("{")]
        assert "previous_run_crashed" in events
        assert d2.top_path("basalt lava") == "lava.md"
        doctor = run_cli(["doctor", "--quick"], d2.env, check=False).stdout
        assert "then delete the file" in doctor and str(data_dir / LAST_CRASH_FILE) in doctor
    finally:
        assert d2.stop() == 0
    assert not (data_dir / CRASH_FILE).exists()  # a clean stop: the next run reports nothing


def test_a_command_that_crashes_prints_its_stacks(tmp_path: Path) -> None:
    """The `repd` program's entry point arms faulthandler before any command runs."""
    code = ("import ctypes, repd.cli as cli\n"
            "def main():\n"
            "    return ctypes.string_at(0)  # a read of address 0: SIGSEGV\n"
            "cli.main = main\n"
            "cli.run()\n")
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    assert 'line 3 in main' in proc.stderr


@pytest.mark.parametrize("code", [0, 3])
def test_the_program_exits_with_the_commands_code_and_its_output_flushed(
        tmp_path: Path, code: int) -> None:
    script = ("import sys, repd.cli as cli\n"
              f"cli.main = lambda: (sys.stdout.write('x' * 100000), {code})[1]\n"
              "cli.run()\n")
    proc = subprocess.run([sys.executable, "-c", script], env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code
    assert proc.stdout == "x" * 100000
