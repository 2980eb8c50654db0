"""The data-folder lock: one writer, readers one at a time, and nobody opens a held store.

Qdrant Edge damages a shard that a second process loads (it truncates the payload
indexes' tracker journals before failing on its own lock), so these are not niceties:
see tests/test_second_opener.py for the same rules against a real daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from repd.adapters.datalock import (
    DataLock,
    IndexBusy,
    announce_daemon,
    busy_by_writer,
    read_daemon_record,
    retract_daemon,
)
from repd.errors import EXIT_TEMPFAIL, EngineError, TransientError
from tests.helpers import cli_env, run_cli


def test_one_writer_at_a_time_and_the_second_is_told_who(tmp_path: Path) -> None:
    first = DataLock.writer(tmp_path)
    try:
        with pytest.raises(EngineError, match=rf"being written by pid {os.getpid()} "):
            DataLock.writer(tmp_path, wait_s=0)
    finally:
        first.release()
    DataLock.writer(tmp_path, wait_s=0).release()  # free again once released


def test_a_reader_never_gets_past_a_writer_and_learns_the_daemons_socket(
        tmp_path: Path) -> None:
    writer = DataLock.writer(tmp_path)
    try:
        assert busy_by_writer(tmp_path) is not None
        with pytest.raises(IndexBusy) as err:
            DataLock.reader(tmp_path, wait_s=0)
        assert err.value.holder.pid == os.getpid() and err.value.daemon is None
        announce_daemon(tmp_path, tmp_path / "d.sock")
        with pytest.raises(IndexBusy) as err:
            DataLock.reader(tmp_path, wait_s=0)
        assert err.value.daemon is not None
        assert err.value.daemon.socket == str(tmp_path / "d.sock")
    finally:
        retract_daemon(tmp_path)
        writer.release()
    assert read_daemon_record(tmp_path) is None
    assert busy_by_writer(tmp_path) is None
    DataLock.reader(tmp_path, wait_s=0).release()


def test_a_dead_daemons_record_is_ignored(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(proc.stdout)
    (tmp_path / "daemon.json").write_text(f'{{"pid": {dead_pid}, "socket": "/x.sock"}}')
    assert read_daemon_record(tmp_path) is None


def test_readers_exclude_each_other_briefly(tmp_path: Path) -> None:
    # Edge has no read-only mode: two readers loading one shard damage it as well.
    DataLock.writer(tmp_path).release()
    first = DataLock.reader(tmp_path)
    try:
        with pytest.raises(TransientError, match="is open by"):
            DataLock.reader(tmp_path, wait_s=0.3)
        threading.Timer(0.5, first.release).start()
        t0 = time.monotonic()
        second = DataLock.reader(tmp_path, wait_s=60)  # waits for the first, then gets it
        assert time.monotonic() - t0 >= 0.3
        second.release()
    finally:
        first.release()


def test_a_writer_waits_for_readers_then_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    DataLock.writer(tmp_path).release()
    reader = DataLock.reader(tmp_path)
    try:
        with pytest.raises(TransientError, match="try again when it finishes"):
            DataLock.writer(tmp_path, wait_s=0.3)
        threading.Timer(0.5, reader.release).start()
        DataLock.writer(tmp_path, wait_s=60).release()
    finally:
        reader.release()


@pytest.fixture(scope="module")
def indexed_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("lock")
    root = base / "root"
    root.mkdir()
    (root / "a.md").write_text("# Alpha\n\nThe copper lantern hangs in the harbor.\n")
    env = cli_env(base / "home")
    run_cli(["index", str(root)], env)
    return base / "home" / "data" / "repd", env


@pytest.mark.parametrize("local", [True, False])
def test_query_while_repd_index_writes_is_refused_without_touching_the_store(
        indexed_home: tuple[Path, dict[str, str]], local: bool) -> None:
    data, env = indexed_home
    lock = DataLock.writer(data)  # stands in for a `repd index` in progress
    try:
        args = ["query", "copper lantern"] + (["--local"] if local else [])
        # Info level, so that a model load would show in stderr (one-shot commands are quiet).
        proc = run_cli(args, {**env, "REPD_LOG_LEVEL": "info"}, check=False)
    finally:
        lock.release()
    assert proc.returncode == EXIT_TEMPFAIL, proc.stderr
    assert "query again when it finishes" in proc.stderr
    assert f"being written by pid {os.getpid()} (`" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # Refused before the model loads: nothing was waited for, nothing opened.
    assert "loading_model" not in proc.stderr
    ok = run_cli(["query", "copper lantern", "--local", "--json"], env)
    assert '"a.md"' in ok.stdout


def test_index_refuses_while_another_writer_holds_the_folder(
        indexed_home: tuple[Path, dict[str, str]]) -> None:
    data, env = indexed_home
    lock = DataLock.writer(data)
    try:
        proc = run_cli(["index", str(data.parent.parent.parent / "root")], env, check=False)
    finally:
        lock.release()
    assert proc.returncode == 1
    assert "being written by" in proc.stderr and "Traceback" not in proc.stderr

