"""A real daemon subprocess on real folders: live changes, editor saves, .gitignore,
signals, the API on its socket. (Storms and kill -9 are in test_daemon_storm.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repd.api.client import ApiRequestError
from tests.daemon_harness import DaemonProc, wait_for

FACTS = {
    "volcano": "Basaltic lava from shield volcanoes flows far because it is low in silica.",
    "bees": "Honeybees communicate the direction of flowers with a waggle dance.",
    "chess": "The Sicilian Defence is the most popular response to the king's pawn opening.",
    "tea": "Oolong tea is partially oxidised, between green and black tea.",
    "orbit": "Geostationary satellites orbit at about 35,786 kilometres above the equator.",
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "volcano.md").write_text("# Volcanoes\n\n" + FACTS["volcano"] + "\n")
    return r


@pytest.fixture
def daemon(tmp_path: Path, root: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path / "home", [root]).start()
    yield d
    d.stop()


def searchable(d: DaemonProc, text: str, path: str) -> bool:
    """``path`` is among the top hits for ``text``."""
    return path in d.paths_for(text, k=5)


def gone(d: DaemonProc, text: str, path: str) -> bool:
    """``path`` has no points at all (these test trees are far smaller than k=100)."""
    return path not in d.paths_for(text, k=100)


def snippets(d: DaemonProc, path: str) -> str:
    """Everything the index holds for ``path``, as text."""
    hits = d.client.query("anything", k=100)["hits"]
    return " ".join(h["snippet"] for h in hits if h["path"] == path)


def test_live_create_modify_delete_move(daemon: DaemonProc, root: Path) -> None:
    assert daemon.top_path("lava low in silica") == "volcano.md"
    (root / "bees.md").write_text(FACTS["bees"])
    wait_for(lambda: searchable(daemon, "waggle dance of honeybees", "bees.md"), 15, "create")
    (root / "bees.md").write_text(FACTS["chess"])
    wait_for(lambda: searchable(daemon, "Sicilian Defence opening", "bees.md"), 15, "modify")
    wait_for(lambda: "waggle" not in snippets(daemon, "bees.md"), 15, "the old text gone")
    (root / "bees.md").rename(root / "chess.md")
    wait_for(lambda: searchable(daemon, "Sicilian Defence opening", "chess.md"), 15, "rename")
    wait_for(lambda: gone(daemon, "Sicilian Defence opening", "bees.md"), 15, "old name gone")
    (root / "chess.md").unlink()
    wait_for(lambda: gone(daemon, "Sicilian Defence opening", "chess.md"), 15, "delete")


def test_directory_moves_in_out_and_inside(daemon: DaemonProc, root: Path,
                                           tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "tea.md").write_text(FACTS["tea"])
    os.rename(outside / "sub", root / "moved-in")
    wait_for(lambda: searchable(daemon, "partially oxidised oolong", "moved-in/tea.md"), 20,
             "a folder moved into the root")
    os.rename(root / "moved-in", root / "renamed")
    wait_for(lambda: searchable(daemon, "partially oxidised oolong", "renamed/tea.md"), 20,
             "a folder renamed inside the root")
    wait_for(lambda: gone(daemon, "partially oxidised oolong", "moved-in/tea.md"), 20,
             "the old folder path gone")
    os.rename(root / "renamed", outside / "back")
    wait_for(lambda: gone(daemon, "partially oxidised oolong", "renamed/tea.md"), 20,
             "a folder moved out of the root")
    st = daemon.wait_idle()
    assert st["totals"]["files"] == 1


def _indexed_paths(d: DaemonProc) -> set[str]:
    return {h["path"] for h in d.client.query("anything at all", k=100)["hits"]}


def test_editor_save_patterns_index_only_the_final_file(daemon: DaemonProc, root: Path) -> None:
    target = root / "orbit.md"
    target.write_text(FACTS["orbit"])
    wait_for(lambda: searchable(daemon, "geostationary satellites", "orbit.md"), 15, "first save")
    # vim: probe file 4913, swap file, backup by rename, write the new file, drop the backup.
    (root / "4913").write_text("")
    (root / "4913").unlink()
    (root / ".orbit.md.swp").write_bytes(b"b0VIM 9.0" + b"\x00" * 100)
    target.rename(root / "orbit.md~")
    target.write_text(FACTS["orbit"] + " Vim edit about the Clarke belt.")
    (root / "orbit.md~").unlink()
    (root / ".orbit.md.swp").unlink()
    # emacs: lock symlink, autosave file, backup file.
    (root / ".#orbit.md").symlink_to("user@host.1234:1700000000")
    (root / "#orbit.md#").write_text("autosave")
    (root / "orbit.md~").write_text(FACTS["orbit"])
    (root / ".#orbit.md").unlink()
    (root / "#orbit.md#").unlink()
    # atomic save: write a temp file, rename over the target.
    tmp = root / ".orbit.md.tmp1234"
    tmp.write_text(FACTS["orbit"] + " Atomic edit mentioning the Clarke belt and drift.")
    os.replace(tmp, target)
    wait_for(lambda: "Atomic edit" in json.dumps(daemon.client.query("Clarke belt drift", k=3)),
             15, "the final content")
    daemon.wait_idle()
    paths = _indexed_paths(daemon)
    assert "orbit.md" in paths
    assert not {p for p in paths if p not in ("orbit.md", "volcano.md")}, paths


def test_gitignore_is_honoured(daemon: DaemonProc, root: Path) -> None:
    (root / ".gitignore").write_text("private/\n*.log\n")
    (root / "private").mkdir()
    (root / "private" / "bees.md").write_text(FACTS["bees"])
    (root / "run.log").write_text(FACTS["tea"])
    (root / "public.md").write_text(FACTS["chess"])
    wait_for(lambda: searchable(daemon, "Sicilian Defence", "public.md"), 15, "public file")
    daemon.wait_idle()
    paths = _indexed_paths(daemon)
    assert "private/bees.md" not in paths and "run.log" not in paths


def test_api_endpoints_and_socket(daemon: DaemonProc, root: Path) -> None:
    c = daemon.client
    mode = stat.S_IMODE(daemon.socket.stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700
    st = c.status()
    assert st["model"]["dim"] == 384 and st["model"]["device"] == "cpu"
    assert st["roots"][0]["watch"] in ("inotify", "polling")
    assert st["totals"]["files"] == 1 and st["store"]["points"] >= 1
    (root / "bin.dat").write_bytes(b"\x00\x01" * 500)
    wait_for(lambda: c.files()["total"] == 1, 15, "the binary file to be recorded")
    item = c.files()["items"][0]
    assert (item["path"], item["reason"]) == ("bin.dat", "binary")
    assert "repd_files{" in c.metrics() and "repd_up 1" in c.metrics()
    assert c.pause()["ok"] and c.status()["paused"]
    (root / "tea.md").write_text(FACTS["tea"])
    time.sleep(1.5)
    assert "tea.md" not in daemon.paths_for("oolong tea", k=5)  # paused: queued, not indexed
    assert c.resume()["ok"]
    wait_for(lambda: searchable(daemon, "oolong tea", "tea.md"), 15, "resume")
    res = c.reindex(str(root / "tea.md"))
    assert res["ok"] and res["queued"] >= 1
    assert c.reindex()["ok"]
    with pytest.raises(ApiRequestError) as info:
        c.reindex("/definitely/not/a/root")
    assert info.value.status == 404
    with pytest.raises(ApiRequestError) as info:
        c.query("x", k=1000)
    assert info.value.status == 422
    # No TCP listener unless configured: nothing of this process listens on inet sockets.
    inodes = {os.readlink(f"/proc/{daemon.pid}/fd/{fd}")
              for fd in os.listdir(f"/proc/{daemon.pid}/fd")}
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A":  # LISTEN
                listening.add(f"socket:[{parts[9]}]")
    assert not (inodes & listening)


def test_query_cli_goes_through_daemon(daemon: DaemonProc) -> None:
    import subprocess
    import sys

    # Through a running daemon the command must not load the model, nor even pydantic
    # or structlog: it is one stdlib HTTP request over the socket (see paths.quick_api_socket).
    # The program ends in os._exit (repd.process.end_process): the probe looks just before.
    probe = ("import os, runpy, sys\n"
             "end = os._exit\n"
             "def look(code):\n"
             "    mods = ('torch', 'sentence_transformers', 'qdrant_edge', 'pydantic',\n"
             "            'structlog', 'logging')\n"
             "    print('LOADED=' + ','.join(m for m in mods if m in sys.modules),\n"
             "          file=sys.stderr, flush=True)\n"
             "    end(code)\n"
             "os._exit = look\n"
             "sys.argv = ['repd', 'query', 'lava silica', '--json']\n"
             "runpy.run_module('repd.cli', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", probe], env=daemon.env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["hits"][0]["path"] == "volcano.md"
    assert proc.stderr.strip().splitlines()[-1] == "LOADED="
    status = subprocess.run([sys.executable, "-m", "repd.cli", "status"], env=daemon.env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "state:" in status.stdout and "ROOT" in status.stdout


def test_status_without_daemon_exits_nonzero(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import cli_env

    proc = subprocess.run([sys.executable, "-m", "repd.cli", "status"],
                          env=cli_env(tmp_path / "h"), capture_output=True, text=True)
    assert proc.returncode == 3 and "no daemon answers" in proc.stderr


def _stop_cpu_seconds(d: DaemonProc, timeout: float = 30) -> float:
    """Send SIGTERM and return the CPU time the daemon spent until it exited.

    Read from /proc while the exited daemon is a zombie (``DaemonProc.stop`` reaps it
    afterwards). CPU time, not wall time: a busy machine stretches the wall time of the
    same work many times over, and it is the work that must stay small.
    """
    def state_and_cpu() -> tuple[str, float]:
        with open(f"/proc/{d.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # after the command name
        ticks = int(fields[11]) + int(fields[12])  # utime + stime, every thread's
        return fields[0], ticks / os.sysconf("SC_CLK_TCK")

    before = state_and_cpu()[1]
    d.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (now := state_and_cpu())[0] != "Z":
        assert time.monotonic() < deadline, f"daemon did not exit within {timeout}s of SIGTERM"
        time.sleep(0.05)
    return now[1] - before


def test_sigterm_stops_cleanly_and_restart_finds_nothing_to_redo(tmp_path: Path,
                                                                  root: Path) -> None:
    d = DaemonProc(tmp_path / "home", [root]).start()
    for i in range(20):
        (root / f"n{i}.md").write_text(f"{FACTS['bees']} note {i}")
    time.sleep(1.0)  # let it start on them
    t0 = time.monotonic()
    assert d.stop(timeout=30) == 0
    assert time.monotonic() - t0 < 30
    assert not d.socket.exists()
    d2 = DaemonProc(tmp_path / "home", [root]).start()
    try:
        st = d2.wait_idle()
        assert st["totals"]["files"] == 21
        log = d.log.read_text()
        assert "recovered_after_crash" not in log
        # An idle stop is cheap, so that it ends within systemd's TimeoutStopSec=30 even on
        # a loaded machine. The interpreter's finalization after "stopped" (about 1.7
        # CPU-seconds over torch's, transformers' and OpenVINO's objects) took 17 s next to
        # 16 busy processes on 2 cores, and once over the 30 s of DaemonProc.stop; the
        # daemon now ends with os._exit once all is closed (about 0.05 s for the stop).
        cpu = _stop_cpu_seconds(d2)
        assert cpu < 0.5, f"an idle daemon's stop took {cpu:.2f} CPU-seconds"
        assert d2.stop() == 0
        # The log is flushed before that exit: its last line is the stop's last word.
        assert json.loads(d2.log.read_text().splitlines()[-1])["event"] == "stopped"
    finally:
        d2.stop()


def test_sighup_adds_and_removes_roots(tmp_path: Path, root: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "tea.md").write_text(FACTS["tea"])
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"roots = [{json.dumps(str(root))}]\n")
    d = DaemonProc(tmp_path / "home", [], {"REPD_CONFIG": str(cfg)}, args=[]).start()
    try:
        assert d.top_path("lava silica") == "volcano.md"
        cfg.write_text(f"roots = [{json.dumps(str(root))}, {json.dumps(str(other))}]\n")
        d.signal(signal.SIGHUP)
        wait_for(lambda: searchable(d, "oolong tea", "tea.md"), 30, "the added root")
        cfg.write_text(f"roots = [{json.dumps(str(other))}]\n")
        d.signal(signal.SIGHUP)
        wait_for(lambda: gone(d, "lava silica", "volcano.md"), 30, "the removed root to go")
        assert [r["path"] for r in d.status()["roots"]] == [str(other)]
    finally:
        d.stop()


def test_tcp_only_when_configured_and_needs_token(tmp_path: Path, root: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = DaemonProc(tmp_path / "home", [root], {"REPD_API__TCP_PORT": str(port),
                                               "REPD_API__TOKEN": "t0ken"}).start()
    try:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/status")
        assert conn.getresponse().status == 401
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/status", headers={"Authorization": "Bearer t0ken"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["state"] in ("idle", "indexing")
    finally:
        d.stop()
