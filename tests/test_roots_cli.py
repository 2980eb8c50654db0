"""``repd roots add|remove|list``: roots saved in the config file, and a running daemon told.

The daemon tests run a real ``repd run`` (no folders on its command line, so it watches
the config's roots) and check what a person would: an added root's files come back from
queries, a removed root's files stop coming back.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from repd.cli_roots import RunningDaemon, index_tip
from tests.daemon_harness import DaemonProc, wait_for
from tests.helpers import cli_env, run_cli

CONFIG_TEXT = """\
# My repd settings. Keep this comment.
model = "sentence-transformers/all-MiniLM-L6-v2"  # the default, said out loud

[watch]
# Quicker than the default on this laptop.
debounce_ms = 100
"""


def config_of(home: Path) -> Path:
    return home / "config" / "repd" / "config.toml"


def roots_json(env: dict[str, str], *extra: str) -> dict[str, object]:
    out: dict[str, object] = json.loads(run_cli(["roots", "list", "--json", *extra], env).stdout)
    return out


def test_add_remove_list_keep_the_file_as_it_was(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = cli_env(home)
    cfg = config_of(home)
    cfg.parent.mkdir(parents=True)
    cfg.write_text(CONFIG_TEXT)
    cfg.chmod(0o640)
    notes = tmp_path / "notes"
    notes.mkdir()
    docs = tmp_path / "docs"
    docs.mkdir()

    # Relative to the current folder, and twice in one call: added once, made absolute.
    done = subprocess.run([sys.executable, "-m", "repd.cli", "roots", "add", "notes",
                           str(docs), "./notes"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"added: {notes}" in done.stdout and f"added: {docs}" in done.stdout
    text = cfg.read_text()
    for line in CONFIG_TEXT.splitlines():
        assert line in text  # every comment and setting survives, as written
    assert f'roots = ["{notes}", "{docs}"]' in text
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o640  # an existing file keeps its mode
    assert "no daemon is running" in done.stdout

    # Idempotent: nothing to do, file untouched.
    before = cfg.read_bytes()
    again = run_cli(["roots", "add", str(notes)], env)
    assert f"already a root: {notes}" in again.stdout and "saved" not in again.stdout
    assert cfg.read_bytes() == before

    listed = roots_json(env)
    assert listed["roots"] == [{"path": str(notes), "exists": True, "watched": None},
                               {"path": str(docs), "exists": True, "watched": None}]
    assert listed["daemon_answers"] is False

    # A folder that went away can still be removed, and is reported missing meanwhile.
    docs.rmdir()
    plain = run_cli(["roots", "list"], env).stdout
    assert f"{docs}  MISSING" in plain and f"{notes}  exists" in plain
    gone = run_cli(["roots", "remove", str(docs), str(tmp_path / "never")], env)
    assert f"removed: {docs}" in gone.stdout
    assert f"not a root: {tmp_path / 'never'}" in gone.stdout
    text = cfg.read_text()
    assert str(docs) not in text and f'roots = ["{notes}"]' in text
    for line in CONFIG_TEXT.splitlines():
        assert line in text
    # Every command still reads the file.
    shown = json.loads(run_cli(["config", "show", "--json"], env).stdout)
    assert shown["roots"]["value"] == f"[{notes}]"
    assert shown["watch.debounce_ms"]["value"] == "100"


def test_add_refuses_what_is_not_a_folder_and_changes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = cli_env(home)
    cfg = config_of(home)
    cfg.parent.mkdir(parents=True)
    cfg.write_text(CONFIG_TEXT)
    a_file = tmp_path / "file.md"
    a_file.write_text("not a folder\n")
    real = tmp_path / "real"
    real.mkdir()
    for bad, why in ((a_file, "is not a folder"), (tmp_path / "missing", "does not exist")):
        done = run_cli(["roots", "add", str(real), str(bad)], env, check=False)
        assert done.returncode == 2
        assert f"{bad} {why}" in done.stderr
        assert cfg.read_text() == CONFIG_TEXT  # all or nothing


def test_a_new_config_file_is_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = cli_env(home)
    notes = tmp_path / "notes"
    notes.mkdir()
    run_cli(["roots", "add", str(notes)], env)
    cfg = config_of(home)
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert stat.S_IMODE(cfg.parent.stat().st_mode) == 0o700
    assert f'roots = ["{notes}"]' in cfg.read_text()
    # --config and REPD_CONFIG name the file, as for every other command.
    other = tmp_path / "other.toml"
    run_cli(["roots", "add", "--config", str(other), str(notes)], env)
    via_env = tmp_path / "via-env.toml"
    run_cli(["roots", "add", str(notes)], {**env, "REPD_CONFIG": str(via_env)})
    for path in (other, via_env):
        assert f'roots = ["{notes}"]' in path.read_text()


def test_a_symlinked_config_is_edited_where_it_points(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = cli_env(home)
    dotfiles = tmp_path / "dotfiles" / "repd.toml"
    dotfiles.parent.mkdir()
    dotfiles.write_text(CONFIG_TEXT)
    cfg = config_of(home)
    cfg.parent.mkdir(parents=True)
    cfg.symlink_to(dotfiles)
    notes = tmp_path / "notes"
    notes.mkdir()
    run_cli(["roots", "add", str(notes)], env)
    assert cfg.is_symlink()
    assert f'roots = ["{notes}"]' in dotfiles.read_text()


def test_a_stale_daemon_record_is_not_signalled(tmp_path: Path) -> None:
    """daemon.json naming a pid that is now another program: it must not get SIGHUP."""
    home = tmp_path / "home"
    env = cli_env(home)
    data = home / "data" / "repd"
    data.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (data / "daemon.json").write_text(json.dumps({"pid": sleeper.pid, "socket": "/x"}))
        notes = tmp_path / "notes"
        notes.mkdir()
        done = run_cli(["roots", "add", str(notes)], env)
        assert "no daemon is running" in done.stdout
        assert sleeper.poll() is None  # SIGHUP would have ended it
    finally:
        sleeper.send_signal(signal.SIGTERM)
        sleeper.wait()


def test_index_tip_names_only_folders_no_root_covers() -> None:
    notes, sub, other = Path("/h/notes"), Path("/h/notes/sub"), Path("/h/my other")
    assert index_tip([notes, sub], [notes]) is None
    assert index_tip([other], [notes]) == (
        "tip: `repd roots add '/h/my other'` keeps it watched by `repd run` and the service")
    assert index_tip([other, Path("/x")], []) is not None
    assert "keeps them" in (index_tip([other, Path("/x")], []) or "")


def test_cli_folders_of_a_daemon_command_line() -> None:
    d = RunningDaemon(1, "/s", ["/usr/bin/python3", "/v/bin/repd", "run", "--config", "/c",
                                "/a", "--device", "cpu", "/b", "--log-format=json"])
    assert d.cli_folders() == ["/a", "/b"]
    assert RunningDaemon(1, "/s", ["/v/bin/repd", "run"]).cli_folders() == []


def test_index_says_once_how_to_keep_a_folder_watched(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = cli_env(home)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("Moraines are heaps of rock left by glaciers.\n")
    tip = f"tip: `repd roots add {notes}` keeps it watched by `repd run` and the service"
    plain = run_cli(["index", str(notes)], env)
    assert plain.stderr.count("tip:") == 1 and tip in plain.stderr
    as_json = run_cli(["index", str(notes), "--json"], env)
    assert "tip:" not in as_json.stderr
    json.loads(as_json.stdout)
    run_cli(["roots", "add", str(notes)], env)
    assert "tip:" not in run_cli(["index", str(notes)], env).stderr


def test_a_running_daemon_follows_roots_add_and_remove(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = tmp_path / "first"
    first.mkdir()
    (first / "glaciers.md").write_text("Glaciers grind bedrock into fine rock flour.\n")
    second = tmp_path / "second"
    second.mkdir()
    (second / "penguins.md").write_text("Emperor penguins huddle through the Antarctic "
                                        "winter to keep warm.\n")
    (second / "volcano.md").write_text("Lava cools into hexagonal basalt columns.\n")
    cfg = config_of(home)
    cfg.parent.mkdir(parents=True)
    cfg.write_text(CONFIG_TEXT)
    env = cli_env(home)
    run_cli(["roots", "add", str(first)], env)

    # No folders on the command line: the daemon watches the config's roots, as the
    # service does.
    daemon = DaemonProc(home, [], args=[]).start(timeout=240)
    try:
        assert [r["path"] for r in daemon.status()["roots"]] == [str(first)]
        listed = roots_json(daemon.env)
        assert listed["roots"] == [{"path": str(first), "exists": True, "watched": True}]

        added = run_cli(["roots", "add", str(second)], daemon.env)
        assert f"told the running daemon (pid {daemon.pid}) to reload" in added.stdout
        wait_for(lambda: "penguins.md" in daemon.paths_for("penguins huddling in winter"),
                 120, "the added root's files to be searchable")
        assert daemon.top_path("hexagonal basalt from lava") == "volcano.md"
        listed = roots_json(daemon.env)
        assert [r["watched"] for r in listed["roots"]] == [True, True]
        # The file still holds what a person wrote.
        for line in CONFIG_TEXT.splitlines():
            assert line in cfg.read_text()

        removed = run_cli(["roots", "remove", str(second)], daemon.env)
        assert "told the running daemon" in removed.stdout

        def second_gone() -> bool:
            hits = daemon.client.query("penguins huddling in winter", k=50)["hits"]
            return not any(h["root"] == str(second) for h in hits)

        wait_for(second_gone, 120, "the removed root's files to leave the results")
        assert [r["path"] for r in daemon.status()["roots"]] == [str(first)]
        assert daemon.top_path("how does rock flour form") == "glaciers.md"
        listed = roots_json(daemon.env)
        assert listed["roots"] == [{"path": str(first), "exists": True, "watched": True}]

        # `repd service status` shows systemd's view and then the daemon's own status.
        fake = tmp_path / "fakebin"
        fake.mkdir()
        (fake / "systemctl").write_text(
            '#!/bin/sh\ncase "$*" in *is-active*) echo active;; *) echo "repd.service";; esac\n')
        (fake / "systemctl").chmod(0o755)
        env_path = {**daemon.env, "PATH": f"{fake}{os.pathsep}{daemon.env['PATH']}"}
        st = run_cli(["service", "status"], env_path)
        assert "systemd:   active" in st.stdout
        assert "idle" in st.stdout or "indexing" in st.stdout, st.stdout
    finally:
        assert daemon.stop(timeout=120) == 0
