"""Issue 7 case 1 and case 13 against a real daemon: a second process never opens the
daemon's store, and the CLI's errors are one line with their exit code.

Before the data-folder lock, ``repd query --local``, a query with the wrong ``--socket``
(or from a shell with another ``XDG_RUNTIME_DIR``) and ``repd doctor`` loaded the
daemon's Qdrant Edge shard; Edge truncated the payload indexes' ``tracker_journal.dat``
before failing on its own lock, and every later flush of the daemon failed, so new
files were never searchable again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProc, wait_for
from tests.helpers import run_cli

NOTES = {
    "volcano.md": "# Volcanoes\n\nBasalt lava flows from the volcano; silica makes it sticky.\n",
    "bees.md": "# Bees\n\nHoney bees dance to tell the hive where the flowers are.\n",
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    base = tmp_path_factory.mktemp("opener")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    for name, text in NOTES.items():
        (root / name).write_text(text)
    d = DaemonProc(base / "home", [root]).start()
    try:
        yield d
    finally:
        d.stop()


def _journals(data: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in data.rglob("tracker_journal.dat")}


def _one_clean_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def _searchable(d: DaemonProc, text: str, path: str) -> bool:
    return d.top_path(text) == path


def test_second_openers_leave_the_daemons_store_alone(daemon: DaemonProc,
                                                      tmp_path: Path) -> None:
    d = daemon
    root = d.roots[0]
    data = d.home / "data" / "repd"
    before = _journals(data)
    assert before and all(before.values()), before
    wrong = str(tmp_path / "wrong.sock")

    # --local: refused in one line, without loading the model or touching the store.
    proc = run_cli(["query", "--local", "lava silica"], d.env, check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"being written by the repd daemon (pid {d.pid})" in proc.stderr
    _one_clean_line(proc.stderr)

    # A socket that is not the daemon's: the data folder names the right one.
    proc = run_cli(["query", "lava silica", "--socket", wrong, "--json"], d.env)
    assert json.loads(proc.stdout)["hits"][0]["path"] == "volcano.md"
    other_shell = {**d.env, "XDG_RUNTIME_DIR": str(tmp_path / "elsewhere")}
    proc = run_cli(["query", "honey bees dance", "--json"], other_shell)
    assert json.loads(proc.stdout)["hits"][0]["path"] == "bees.md"

    # doctor with the wrong socket reports the daemon it finds through the data folder.
    proc = run_cli(["doctor", "--quick", "--socket", wrong], d.env, check=False)
    assert f"answers on {d.socket}" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr

    # `repd files` reads the manifest (read-only SQLite is safe beside the writer).
    proc = run_cli(["files", "--json"], d.env)
    assert json.loads(proc.stdout)["total"] == 0

    assert _journals(data) == before  # nothing truncated, nothing removed

    # The proof that matters: the daemon still writes, and what it writes is found.
    (root / "fresh.md").write_text("# Glaciers\n\nA glacier carves a fjord out of granite.\n")
    (root / "bees.md").write_text("# Bees\n\nBumblebees buzz-pollinate tomato flowers.\n")
    wait_for(lambda: _searchable(d, "glacier carves a fjord", "fresh.md"), 120,
             "the new file to become searchable")
    wait_for(lambda: _searchable(d, "bumblebees pollinate tomatoes", "bees.md"), 120,
             "the edited file to become searchable")
    st = d.wait_idle()
    assert st["state"] == "idle" and not st.get("last_error"), st
    after = _journals(data)
    assert after and all(after.values()), after
    assert "shorter than expected" not in d.log.read_text()


def test_api_errors_are_one_line_with_their_exit_code(daemon: DaemonProc) -> None:
    elsewhere = daemon.roots[0].parent / "not-a-root"  # outside every root
    elsewhere.mkdir(exist_ok=True)
    proc = run_cli(["query", "lava", "--root", str(elsewhere)], daemon.env, check=False)
    assert proc.returncode == 2, proc.stderr  # the daemon refused the request (HTTP 404)
    assert "is not an indexed root" in proc.stderr
    _one_clean_line(proc.stderr)
    proc = run_cli(["reindex", "/nowhere/at/all"], daemon.env, check=False)
    assert proc.returncode == 2, proc.stderr
    _one_clean_line(proc.stderr)


def test_a_second_daemon_is_refused_before_loading_the_model(daemon: DaemonProc,
                                                             tmp_path: Path) -> None:
    env = {**daemon.env, "XDG_RUNTIME_DIR": str(tmp_path / "run2")}
    proc = run_cli(["run", str(daemon.roots[0])], env, check=False, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"being written by pid {daemon.pid} (`repd run`)" in proc.stderr
    assert "Traceback" not in proc.stderr and "loading_model" not in proc.stderr


def test_doctor_suggests_replicas_for_a_large_index_in_one_copy(
        daemon: DaemonProc, monkeypatch: pytest.MonkeyPatch) -> None:
    """The advice reads the daemon's real status: an embedded index in one copy at or
    past ``REPLICAS_ADVICE_POINTS`` gets it, a smaller one or a replicated one (the
    default, as this daemon's) does not."""
    from repd import doctor

    st = daemon.status()
    points = st["store"]["points"]
    assert points > 0 and st["store"]["kind"] == "embedded"
    # The real status is one of the two (REPD_TEST_REPLICAS=0 runs the suite on one
    # copy); the other is made from it.
    if st["store"]["replicas"]:
        assert st["store"]["replicas"]["serving"] in ("r0", "r1")
        replicated, one_copy = st, {**st, "store": {**st["store"], "replicas": None}}
    else:
        one_copy = st
        replicated = {**st, "store": {**st["store"],
                                      "replicas": {"serving": "r0", "building": None}}}
    monkeypatch.setattr(doctor, "REPLICAS_ADVICE_POINTS", points)
    assert "replicas" not in doctor._store_from_status(replicated).message
    check = doctor._store_from_status(one_copy)
    assert check.level == "ok" and "`[store] replicas = true`" in check.message, check.message
    monkeypatch.setattr(doctor, "REPLICAS_ADVICE_POINTS", points + 1)
    assert "replicas" not in doctor._store_from_status(one_copy).message
