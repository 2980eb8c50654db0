"""The first minutes with repd, through real CLI processes and a real daemon.

One-shot commands print their summary and nothing of the logs; a daemon's JSON log is
JSON lines only (no "Loading weights" bar); ``repd query`` waits for a daemon that is
still loading its model; result lines fit the terminal; ``repd status`` reads right at
80 columns; ``repd doctor`` sees the roots of the daemon that runs.
"""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from repd.cli_output import fit, hit_line, text_width
from repd.cli_status import render_status
from tests.daemon_harness import DaemonProc, wait_for
from tests.helpers import cli_env, run_cli

BACKUP = ("To rotate the backup encryption keys, generate a new key pair on the vault host, "
          "re-encrypt the latest snapshot with it, and retire the old key after a week of "
          "successful nightly restores into the staging cluster.")
TLS = ("The TLS certificates for the internal services are issued by the step-ca instance "
       "and renewed automatically every sixteen hours by the sidecar on each node.")
COOKING = ("Knead the dough for ten minutes, let it rise in a warm place until doubled, then "
           "shape the loaves and bake them at two hundred and twenty degrees.")


def _tree(base: Path) -> Path:
    tree = base / "notes"
    (tree / "docs").mkdir(parents=True)
    (tree / "docs" / "backup.md").write_text(f"# Backups\n\n{BACKUP}\n")
    (tree / "docs" / "tls.md").write_text(f"# Certificates\n\n{TLS}\n")
    (tree / "bread.md").write_text(f"# Bread\n\n{COOKING}\n")
    return tree


def _log_lines(stderr: str) -> list[str]:
    """Lines of ``stderr`` that are log records or library noise, not the command's own."""
    return [ln for ln in stderr.splitlines()
            if ln.lstrip().startswith("{") or "Loading weights" in ln or "[info" in ln
            or "[debug" in ln or "loading_model" in ln]


def _manifest_files(home: Path) -> set[tuple[str, str]]:
    db = home / "data" / "repd" / "manifest.sqlite"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {(r, p) for r, p, s in conn.execute("SELECT root, path, state FROM files")
                if s == "indexed"}
    finally:
        conn.close()


def _run_on_pty(args: list[str], env: dict[str, str], pty_for: str,
                timeout: float = 180, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run ``repd ARGS`` with stdout or stderr on a pseudo-terminal (the other a pipe)."""
    master, slave = pty.openpty()
    streams: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    streams[pty_for] = slave
    proc = subprocess.Popen([sys.executable, "-m", "repd.cli", *args], env=env, text=True,
                            cwd=cwd, **streams)
    os.close(slave)
    chunks: list[bytes] = []

    # The pty's buffer is small: drain it while the process runs.
    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, err = proc.communicate(timeout=timeout)
    other = out if pty_for == "stderr" else err
    reader.join(10)
    os.close(master)
    on_tty = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return proc.returncode, on_tty, other or ""


def _repd(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "repd.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_the_first_minutes(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "single.md").write_text("# Garden\n\nWater the tomatoes in the morning.\n")
    (loose / "other.md").write_text(f"# Other\n\n{COOKING}\n")
    home = tmp_path / "home"
    env = cli_env(home)

    # A single file outside every configured root: its folder is the root, and only
    # that file is read. Asked for info, the logs come (as JSON: stderr is a pipe).
    one = run_cli(["index", str(loose / "single.md"), "--log-level", "info", "--json"], env)
    assert json.loads(one.stdout)["indexed"] == 1
    records = [json.loads(ln) for ln in one.stderr.splitlines() if ln.startswith("{")]
    assert any(r.get("event") == "loading_model" for r in records), one.stderr
    assert "Loading weights" not in one.stderr
    assert _manifest_files(home) == {(str(loose), "single.md")}

    # A folder, at the default level: a summary on stdout, no log line on stderr.
    run = run_cli(["index", str(tree)], env)
    assert "files seen" in run.stdout and "indexed    3" in run.stdout, run.stdout
    assert _log_lines(run.stderr) == [], run.stderr

    # The daemon opens its socket first and says "starting" while the model loads; a
    # query sent then waits for it (and says so on a terminal) instead of failing.
    d = DaemonProc(home, [tree])
    d.start(wait_idle=False)
    try:
        first = wait_for(lambda: d.status()["state"], 180, "the daemon's API", every=0.05)
        assert first == "starting", first
        code, err, out = _run_on_pty(["query", "rotate the backup keys", "--json", "-k", "3"],
                                     d.env, pty_for="stderr")
        assert code == 0, err
        assert "the daemon is starting (loading model and index); waiting" in err
        hits = json.loads(out)["hits"]
        assert hits and hits[0]["path"] == "docs/backup.md", hits
        d.wait_idle()

        # doctor reads the roots the daemon watches (given on its command line, not in
        # any config) instead of warning that none are configured.
        doctor = run_cli(["doctor", "--quick"], d.env, check=False)
        roots_line = [ln for ln in doctor.stdout.splitlines() if " roots: " in ln]
        assert roots_line and roots_line[0].startswith("[ok  ]"), doctor.stdout
        assert str(tree) in roots_line[0] and "running daemon" in roots_line[0]

        # Result lines fit the terminal: snippet shortened, path:line whole (paths are
        # shown relative to the working folder, here the root).
        where = f"docs/backup.md:{hits[0]['start_line']}"
        short_env = {**d.env, "COLUMNS": "60"}
        q = ["query", "rotate the backup keys", "-k", "2"]
        code, tty_out, _ = _run_on_pty(q, short_env, pty_for="stdout", cwd=tree)
        assert code == 0
        lines = [ln for ln in tty_out.splitlines() if ln.strip()]
        assert lines and all(text_width(ln) <= 60 for ln in lines), tty_out
        assert where in lines[0] and lines[0].endswith("…"), lines
        flag = _repd([*q, "--width", "60"], d.env, tree).stdout.splitlines()
        assert flag == lines
        # A pipe gets whole lines unless asked.
        piped = _repd(q, short_env, tree).stdout.splitlines()
        assert where in piped[0] and BACKUP[:100] in piped[0] and text_width(piped[0]) > 60

        # The human status fits 80 columns, the roots table included.
        status = run_cli(["status"], {**d.env, "COLUMNS": "80"})
        assert "state: idle" in status.stdout and "ROOT" in status.stdout
        # The model line names the backend that runs it and its precision (auto picks both).
        model = d.status()["model"]
        assert model["backend"] in {"torch", "openvino"}
        assert model["precision"] in {"f32", "bf16"}
        torch_too = " (with torch)" if model.get("runtime") == "full" else ""
        line = f"dim 384  cpu, {model['backend']} {model['precision']}{torch_too}\n"
        assert line in status.stdout, status.stdout  # whole, on one line of the 80
        assert all(text_width(ln) <= 80 for ln in status.stdout.splitlines()), status.stdout
    finally:
        code = d.stop()
    assert code == 0
    # The daemon's log is JSON lines, every one of them, with no progress bar among them.
    text = d.log.read_text()
    assert "Loading weights" not in text
    events = []
    for ln in text.splitlines():
        try:
            events.append(json.loads(ln)["event"])
        except ValueError:
            raise AssertionError(f"not a JSON line in the daemon's log: {ln!r}") from None
    assert "model_loaded" in events and "ready" in events, events
    # The query path was set up before READY (the first query compiles nothing).
    assert events.index("query_path_warm") < events.index("ready"), events


def test_index_a_missing_path_says_so(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    proc = run_cli(["index", str(tmp_path / "nothere")], env, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"repd: {tmp_path / 'nothere'}: does not exist"


def test_index_a_file_inside_a_configured_root_uses_that_root(tmp_path: Path) -> None:
    from repd.cli import _index_targets

    root = tmp_path / "notes"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.md").write_text("x")
    (tmp_path / "g.md").write_text("y")
    nested = root / "a"
    got = _index_targets([str(root / "a" / "b" / "f.md"), str(tmp_path / "g.md"), str(root)],
                         [root, nested])
    assert got == [(nested, "b/f.md"), (tmp_path, "g.md"), (root, "")]


def test_status_with_a_broken_config_exits_2(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", REPD_BATCH_TOKENS="lots")
    proc = run_cli(["status"], env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "REPD_BATCH_TOKENS" in proc.stderr and "Traceback" not in proc.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text("batch_token = 1000\n")
    proc = run_cli(["status", "--json", "--config", str(cfg)], cli_env(tmp_path / "home"),
                   check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "batch_token: unknown setting (did you mean 'batch_tokens'?)" in proc.stderr


# -- rendering -----------------------------------------------------------------------------

def _status(**over: Any) -> dict[str, Any]:
    st: dict[str, Any] = {
        "version": "0.1.0", "api_version": 1, "state": "idle", "paused": False,
        "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "id": "x", "dim": 384,
                  "device": "cpu"},
        "generation": {"id": "3", "state": "active", "points": 1234},
        "queue": {"pending": 0, "scans": 0, "settling": 0, "planning": 0, "embedding": 0,
                  "writing": 0},
        "rates": {"files_per_s": 0.0, "chunks_per_s": 0.0, "embeds_per_s": 0.0},
        "eta_s": None,
        "roots": [{"path": "/home/someone/a/rather/long/path/to/the/notes/of/the/project",
                   "watch": "inotify", "files": 12345, "chunks": 678901, "skipped": 3,
                   "failed": 0}],
        "totals": {"files": 12345, "chunks": 678901, "skipped": 3, "failed": 0,
                   "embedded": 100, "reused": 5},
        "store": {"kind": "embedded", "points": 1234, "indexed_vectors": 0,
                  "index_built": False},
        "uptime_s": 3725.0, "last_scan_at": None, "last_error": None, "problem": None,
        "components": [],
    }
    st.update(over)
    return st


def test_status_paused_says_it_once_and_shows_no_eta() -> None:
    text = render_status(_status(state="paused", paused=True, eta_s=42.0,
                                 rates={"files_per_s": 0.0, "chunks_per_s": 0.0,
                                        "embeds_per_s": 0.0},
                                 queue={**_status()["queue"], "pending": 7}))
    assert "state: paused" in text and "(paused)" not in text
    assert "eta" not in text
    assert "7 pending" in text
    # A state that outranks paused still says it is paused.
    assert "state: degraded  (paused)" in render_status(_status(state="degraded", paused=True))


def test_status_eta_only_while_working_and_never_zero() -> None:
    working = {"files_per_s": 2.5, "chunks_per_s": 40.0, "embeds_per_s": 30.0}
    assert "eta 2m 05s" in render_status(_status(state="indexing", rates=working, eta_s=125))
    assert "eta" not in render_status(_status(state="indexing", rates=working, eta_s=0.4))
    assert "eta" not in render_status(_status(state="indexing", rates=working, eta_s=None))
    idle = render_status(_status())
    assert "0.0 files/s  0.0 chunks/s  0.0 embeds/s" in idle and "eta" not in idle


def test_status_problem_and_components_fit_80_columns() -> None:
    problem = ("indexer is dead (RuntimeError: CUDA error: an illegal memory access was "
               "encountered; compile with TORCH_USE_CUDA_DSA to enable device-side assertions)"
               "; 3 files keep failing in a row: see `repd files --state failed`")
    comps = [{"name": "indexer", "state": "dead", "restarts": 5,
              "last_error": "RuntimeError: CUDA error: an illegal memory access was encountered"},
             {"name": "watcher", "state": "ok", "restarts": 0, "last_error": None},
             {"name": "api", "state": "ok", "restarts": 1, "last_error": "OSError: EMFILE"}]
    roots = [_status()["roots"][0],
             {"path": "/srv/x", "watch": "error: inotify watch limit reached (raise "
              "fs.inotify.max_user_watches)", "files": 0, "chunks": 0, "skipped": 0,
              "failed": 0}]
    text = render_status(_status(state="degraded", problem=problem, components=comps,
                                 roots=roots, last_error="x" * 200), 80)
    lines = text.splitlines()
    assert all(len(ln) <= 80 for ln in lines), "\n".join(ln for ln in lines if len(ln) > 80)
    assert lines[1].startswith("PROBLEM    indexer is dead")
    joined = " ".join(ln.strip() for ln in lines)
    assert "compile with TORCH_USE_CUDA_DSA" in joined  # wrapped, not cut
    assert "component  indexer: dead, 5 restart(s); last error: RuntimeError" in text
    assert "api: ok, 1 restart(s)" in text and "watcher" not in text
    # A long root keeps its end, cut at a folder boundary.
    row = next(ln for ln in lines if ln.startswith("…/"))
    assert "/notes/of/the/project " in row and "inotify" in row and "12,345" in row
    assert "inotify watch limit reached" in joined
    assert "12,345" in text and "678,901" in text


def test_status_while_starting_reads_right() -> None:
    text = render_status(_status(state="starting", problem="loading model and index",
                                 model={"name": "m", "id": None, "dim": None, "device": None},
                                 generation=None, roots=[]))
    assert "state: starting" in text and "phase      loading model and index" in text
    assert "None" not in text and "(not loaded yet)" in text


def test_hit_line_cuts_the_snippet_never_the_location() -> None:
    where = "docs/some/file.md:120"
    line = hit_line(1, 0.5, where, "word " * 40, 60)
    assert text_width(line) == 60 and where in line and line.endswith("…"), line
    # No room for a useful snippet: the location alone, still whole.
    assert hit_line(1, 0.5, where, "word " * 40, 30) == f"  1  0.500  {where}"
    assert hit_line(1, 0.5, "a:1", "short", 60) == "  1  0.500  a:1  short"
    assert hit_line(1, 0.5, "a:1", "x" * 100, None).endswith("x" * 100)
    wide = fit("漢字" * 20, 11)  # two columns a character
    assert text_width(wide) <= 11 and wide.endswith("…")
