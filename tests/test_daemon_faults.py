"""A real daemon under faults: supervised threads, loud states, disk full, SIGTERM, SIGHUP.

Each test runs ``repd run`` as a subprocess on real files with the real model and checks
what a person sees through ``repd status`` and ``repd query``: a failure is shown within
seconds (``degraded`` / ``disk_full``, exit code 4), and indexing resumes by itself once
the cause is gone.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from tests.daemon_harness import DaemonProc, wait_for
from tests.helpers import run_cli

WORDS = ("granite harbor lantern meadow orchard pepper quartz river saffron timber umbrella "
         "velvet walnut yonder zephyr anchor bramble cobalt dune ember fjord glacier").split()


def _text(i: int, paragraphs: int = 2) -> str:
    return "\n\n".join(
        " ".join(WORDS[(i * 5 + p * 7 + j) % len(WORDS)] for j in range(45)) + f" entry {i}.{p}"
        for p in range(paragraphs))


def _root(tmp_path: Path, n: int = 6, paragraphs: int = 2) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    for i in range(n):
        (root / f"doc{i:03}.md").write_text(_text(i, paragraphs))
    return root


def _status(d: DaemonProc) -> tuple[int, dict[str, Any]]:
    proc = run_cli(["status", "--json"], d.env, check=False, timeout=60)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def _config(d: DaemonProc, text: str) -> None:
    path = d.home / "config" / "repd" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _searchable(d: DaemonProc, phrase: str, name: str) -> bool:
    return name in d.paths_for(phrase, k=20)


def test_a_crashed_worker_thread_is_restarted_and_shown(tmp_path: Path) -> None:
    root = _root(tmp_path)
    d = DaemonProc(tmp_path / "home", [root], {"REPD_FAULT": "worker_loop:1"}).start()
    try:
        st = d.status()
        indexer = next(c for c in st["components"] if c["name"] == "indexer")
        assert indexer["restarts"] == 1 and indexer["state"] == "ok"
        assert "InjectedFault" in (indexer["last_error"] or "")
        assert st["totals"]["files"] == 6
        (root / "late.md").write_text("a lighthouse keeper logs the passing ships at dawn")
        wait_for(lambda: _searchable(d, "lighthouse keeper ships", "late.md"), 60,
                 "a new file to be indexed after the restart")
        assert "thread_crashed" in d.log.read_text()
    finally:
        d.stop()


def test_a_worker_that_keeps_dying_makes_the_daemon_degraded(tmp_path: Path) -> None:
    root = _root(tmp_path, n=2)
    d = DaemonProc(tmp_path / "home", [root], {"REPD_FAULT": "worker_loop:0"})
    d.start(wait_idle=False)
    try:
        t0 = time.monotonic()

        def degraded() -> dict[str, Any] | None:
            code, st = _status(d)
            return st if code == 4 and st.get("state") == "degraded" else None

        st = wait_for(degraded, 120, "repd status to report degraded")
        # Reported within seconds of the fifth crash, with the component and the reason.
        assert time.monotonic() - t0 < 90
        assert "indexer is dead" in st["problem"] and "InjectedFault" in st["problem"]
        human = run_cli(["status"], d.env, check=False)
        assert human.returncode == 4 and "PROBLEM" in human.stdout
    finally:
        d.stop()


def test_failing_units_are_loud_then_recover(tmp_path: Path) -> None:
    root = _root(tmp_path)
    d = DaemonProc(tmp_path / "home", [root], {"REPD_FAULT": "worker_unit:3"})
    d.start(wait_idle=False)
    try:
        seen: list[str] = []

        def loud() -> bool:
            code, st = _status(d)
            if st.get("state") == "degraded":
                seen.append(st["problem"])
                return code == 4
            return False

        wait_for(loud, 120, "the failing state to show", every=0.05)
        assert "retrying" in seen[0] and "InjectedFault" in seen[0]
        st = d.wait_idle(180)  # backoff 1 + 2 + 4 s, then the scan goes through
        assert st["totals"]["files"] == 6 and st["problem"] is None
    finally:
        d.stop()


def test_disk_full_at_start_waits_answering_status_then_resumes(tmp_path: Path) -> None:
    root = _root(tmp_path, n=3)
    d = DaemonProc(tmp_path / "home", [root])
    _config(d, "disk_reserve_mb = 100000000\n")
    d.start(wait_idle=False)
    try:
        def full() -> dict[str, Any] | None:
            code, st = _status(d)
            return st if st.get("state") == "disk_full" and code == 4 else None

        st = wait_for(full, 120, "disk_full to be reported at start")
        assert "disk_reserve_mb" in st["problem"]
        data = d.home / "data" / "repd"
        assert not (data / "shards").exists(), "the store must not be opened without space"
        _config(d, "disk_reserve_mb = 1\n")
        d.signal(signal.SIGHUP)
        st = d.wait_idle(180)
        assert st["totals"]["files"] == 3
    finally:
        d.stop()


def test_disk_full_while_running_pauses_writing_and_resumes(tmp_path: Path) -> None:
    root = _root(tmp_path, n=3)
    d = DaemonProc(tmp_path / "home", [root])
    _config(d, "disk_reserve_mb = 1\n")
    d.start()
    try:
        _config(d, "disk_reserve_mb = 100000000\n")
        d.signal(signal.SIGHUP)
        wait_for(lambda: _status(d)[1].get("state") == "disk_full", 60, "disk_full")
        (root / "kept.md").write_text("the cartographer inks a coastline of hidden coves")
        time.sleep(3)
        code, st = _status(d)
        assert code == 4 and st["state"] == "disk_full"
        assert not _searchable(d, "cartographer coastline coves", "kept.md")
        _config(d, "disk_reserve_mb = 1\n")
        d.signal(signal.SIGHUP)
        wait_for(lambda: _searchable(d, "cartographer coastline coves", "kept.md"), 90,
                 "the queued change to be written once space is back")
    finally:
        d.stop()


def test_sigterm_while_embedding_stops_cleanly_and_nothing_is_lost(tmp_path: Path) -> None:
    root = _root(tmp_path, n=120, paragraphs=4)
    d = DaemonProc(tmp_path / "home", [root])
    d.start(wait_idle=False)
    wait_for(lambda: d.status()["totals"]["embedded"] > 0 and d.status()["state"] != "idle",
             180, "the daemon to be embedding")
    t0 = time.monotonic()
    code = d.stop(timeout=60)
    took = time.monotonic() - t0
    log = d.log.read_text()
    assert code == 0, log[-3000:]
    assert took < 25, f"stop took {took:.1f}s"
    assert "worker_did_not_stop_in_time" not in log
    assert "terminate called" not in log
    # The next start finishes the job; nothing is half written.
    d2 = DaemonProc(tmp_path / "home", [root]).start(timeout=600)
    try:
        st = d2.status()
        assert st["totals"]["files"] == 120 and st["totals"]["failed"] == 0
    finally:
        d2.stop()


def test_sighup_applies_a_new_exclude_and_drops_those_files(tmp_path: Path) -> None:
    root = _root(tmp_path, n=2)
    (root / "secret-plans.md").write_text("the heist happens at midnight behind the museum")
    d = DaemonProc(tmp_path / "home", [root])
    _config(d, "")
    d.start()
    try:
        assert _searchable(d, "heist midnight museum", "secret-plans.md")
        _config(d, 'exclude = ["secret-*.md"]\nmax_file_bytes = 100000\n')
        d.signal(signal.SIGHUP)
        wait_for(lambda: not _searchable(d, "heist midnight museum", "secret-plans.md"), 60,
                 "the newly excluded file to leave the index")
        log = d.log.read_text()
        assert "reload_needs_restart" not in log  # both keys apply live
        # A new model applies live too: it starts a migration, which here cannot load
        # the model (offline) and says so, while the index keeps answering.
        _config(d, 'exclude = ["secret-*.md"]\nmodel = "some/other-model"\n')
        d.signal(signal.SIGHUP)

        def failed() -> dict[str, Any] | None:
            mig = d.client.model_status()["migration"]
            return mig if mig is not None and mig["state"] == "failed" else None
        mig = wait_for(failed, 60, "the migration to the unloadable model to fail")
        assert "some/other-model" in mig["message"]
        assert "reload_needs_restart" not in d.log.read_text()
        assert d.client.query("the", k=1)["generation"] == "1"
    finally:
        d.stop()


def test_status_json_exit_codes_match_the_human_ones(tmp_path: Path) -> None:
    root = _root(tmp_path, n=1)
    d = DaemonProc(tmp_path / "home", [root]).start()
    try:
        code, st = _status(d)
        assert code == 0 and st["state"] == "idle"
        assert {c["name"] for c in st["components"]} == {"api", "indexer", "watcher"}
        assert all(c["state"] == "ok" for c in st["components"])
    finally:
        d.stop()
    down = run_cli(["status", "--json"], d.env, check=False)
    assert down.returncode == 3
    assert json.loads(down.stdout)["state"] == "down"
