"""The data folder: a damaged manifest is rebuilt (issue 7 case 12), a folder that cannot
be written is one line (exit 2), queries create nothing, and the index is private
whatever the umask (issue 9 item 2).

Every case runs the real ``repd`` command in a subprocess on a real index.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from repd.engine import Engine
from repd.settings import Settings, StoreSettings
from tests.daemon_harness import DaemonProc
from tests.helpers import assert_same_index, cli_env, run_cli, snapshot

NOTES = {
    "volcano.md": "# Volcanoes\n\nBasalt lava flows from the volcano; silica makes it sticky.\n",
    "bees.md": "# Bees\n\nHoney bees dance to tell the hive where the flowers are.\n",
    "docs/tea.md": "# Tea\n\n## Oolong\n\nOolong tea is partly oxidised.\n\n## Green\n\n"
                   "Green tea is steamed or pan-fired to stop oxidation.\n",
}


def store_of(data: Path) -> dict[str, Any]:
    eng = Engine(Settings(store=StoreSettings(path=data), device="cpu"), writer=False)
    try:
        return snapshot(eng)
    finally:
        eng.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """(root, home of a finished `repd index`, snapshot of its store): copied per test."""
    base = tmp_path_factory.mktemp("pristine")
    root = base / "root"
    for name, text in NOTES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    home = base / "home"
    run_cli(["index", str(root)], cli_env(home))
    return root, home, store_of(home / "data" / "repd")


@pytest.fixture
def indexed(tmp_path: Path,
            pristine: tuple[Path, Path, dict[str, Any]]) -> tuple[Path, Path, dict[str, Any]]:
    root, home, snap = pristine
    shutil.copytree(home, tmp_path / "home", symlinks=True)
    return root, tmp_path / "home", snap


def data_of(home: Path) -> Path:
    return home / "data" / "repd"


def index_json(root: Path, home: Path, **env: str) -> tuple[dict[str, Any], str]:
    proc = run_cli(["index", str(root), "--json"], cli_env(home, **env))
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def events(stderr: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == name:
            out.append(rec)
    return out


def manifest_counts(data: Path) -> tuple[int, int]:
    db = sqlite3.connect(data / "manifest.sqlite")
    try:
        files = db.execute("SELECT COUNT(*) FROM files WHERE state='indexed'").fetchone()[0]
        chunks = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        return int(files), int(chunks)
    finally:
        db.close()


def _unprivileged(argv: list[str]) -> list[str]:
    # root ignores permission bits; in a new user namespace (unmapped, so without
    # capabilities over the host's files) the owner bits apply to root as to anyone.
    if os.geteuid() != 0:
        return argv
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-U", "true"]).returncode != 0:
        pytest.skip("running as root without user namespaces: permissions are not enforced")
    return [unshare, "-U", *argv]


# -- a damaged manifest ------------------------------------------------------------------


def test_a_manifest_that_is_not_a_database_is_rebuilt_from_the_store(
        indexed: tuple[Path, Path, dict[str, Any]]) -> None:
    root, home, snap = indexed
    data = data_of(home)
    (data / "manifest.sqlite").write_bytes(b"this is not a database\n" * 200)
    out, err = index_json(root, home)
    rebuilt = events(err, "manifest_rebuilt")
    assert rebuilt and rebuilt[0]["source"] == "store", err
    assert rebuilt[0]["files"] == len(NOTES)
    # The vectors came back from the store: confirming the files embedded nothing.
    assert out["chunks_embedded"] == 0 and out["points_written"] == 0, out
    aside = [p for p in data.glob("manifest.sqlite.damaged-*")
             if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert_same_index(store_of(data), snap)
    assert manifest_counts(data) == (len(NOTES), len(snap))
    again, _ = index_json(root, home)  # and the rebuilt manifest is a normal one
    assert again["unchanged"] == len(NOTES) and again["chunks_embedded"] == 0


def test_a_malformed_manifest_is_rebuilt_from_what_it_still_holds(
        indexed: tuple[Path, Path, dict[str, Any]]) -> None:
    root, home, snap = indexed
    data = data_of(home)
    # Without the generation records the model identity must come from the damaged
    # file itself, whose generations table is intact while its files table is not.
    shutil.rmtree(data / "generations")
    db = sqlite3.connect(data / "manifest.sqlite")
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    files_page = db.execute("SELECT rootpage FROM sqlite_master WHERE name='files'").fetchone()[0]
    db.close()
    with (data / "manifest.sqlite").open("r+b") as fh:
        fh.seek((files_page - 1) * page_size)
        fh.write(os.urandom(page_size))
    out, err = index_json(root, home)
    assert "malformed" in events(err, "manifest_damaged")[0]["problem"], err
    assert events(err, "manifest_rebuilt")[0]["source"] == "store"
    assert out["chunks_embedded"] == 0, out
    assert_same_index(store_of(data), snap)
    assert (data / "generations" / "1.json").exists()


def test_a_damaged_manifest_with_nothing_to_go_on_is_rebuilt_from_scratch(
        indexed: tuple[Path, Path, dict[str, Any]]) -> None:
    root, home, snap = indexed
    data = data_of(home)
    shutil.rmtree(data / "generations")
    (data / "manifest.sqlite").write_bytes(b"\0" * 5000)
    out, err = index_json(root, home)
    assert events(err, "manifest_rebuilt")[0]["source"] == "scratch", err
    assert out["indexed"] == len(NOTES) and out["chunks_embedded"] > 0
    assert len(list(data.glob("shards.unused-*"))) == 1  # kept, not deleted
    assert_same_index(store_of(data), snap)


def test_the_daemon_starts_on_a_damaged_manifest(
        indexed: tuple[Path, Path, dict[str, Any]]) -> None:
    root, home, _ = indexed
    data = data_of(home)
    (data / "manifest.sqlite").write_bytes(b"garbage" * 1000)
    d = DaemonProc(home, [root]).start()
    try:
        assert d.top_path("oolong oxidised") == "docs/tea.md"
        assert d.status()["totals"]["files"] == len(NOTES)
    finally:
        assert d.stop() == 0
    log = d.log.read_text()
    assert "manifest_rebuilt" in log and "Traceback" not in log


def test_query_and_files_on_a_damaged_manifest_say_so_and_change_nothing(
        indexed: tuple[Path, Path, dict[str, Any]]) -> None:
    _, home, _ = indexed
    data = data_of(home)
    junk = b"garbage" * 1000
    (data / "manifest.sqlite").write_bytes(junk)
    for args in (["query", "--local", "bees"], ["query", "bees"], ["files"]):
        proc = run_cli(args, cli_env(home), check=False)
        assert proc.returncode == 1, proc.stderr
        assert "is damaged" in proc.stderr and "rebuilds it" in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (data / "manifest.sqlite").read_bytes() == junk
    assert not list(data.glob("manifest.sqlite.damaged-*"))


# -- creating nothing --------------------------------------------------------------------


def test_query_and_files_without_an_index_create_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for args in (["query", "--local", "anything"], ["query", "anything"], ["files"]):
        proc = run_cli(args, cli_env(home), check=False)
        assert proc.returncode == 1
        assert "nothing is indexed yet" in proc.stderr and "Traceback" not in proc.stderr
    assert not (home / "data").exists()


def test_a_local_query_only_reads_the_manifest(
        indexed: tuple[Path, Path, dict[str, Any]]) -> None:
    _, home, _ = indexed
    manifest = data_of(home) / "manifest.sqlite"
    before = manifest.read_bytes()
    manifest.chmod(0o444)  # a manifest this user may read but not write
    proc = subprocess.run(_unprivileged([sys.executable, "-m", "repd.cli", "query", "--local",
                                         "lava", "--json"]),
                          env=cli_env(home), capture_output=True, text=True, timeout=300)
    manifest.chmod(0o600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["hits"][0]["path"] == "volcano.md"
    assert manifest.read_bytes() == before


# -- a data folder that cannot be written ------------------------------------------------


@pytest.mark.parametrize("command", ["index", "run"])
def test_a_read_only_data_folder_is_one_line_exit_2(tmp_path: Path, command: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.md").write_text("# A\n\nSome text.\n")
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    # Info level, so that a model load would show in stderr (one-shot commands are quiet).
    env = cli_env(tmp_path / "home", REPD_STORE__PATH=str(data), REPD_LOG_LEVEL="info")
    proc = subprocess.run(_unprivileged([sys.executable, "-m", "repd.cli", command, str(root)]),
                          env=env, capture_output=True, text=True, timeout=120)
    data.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("repd: config error: store.path:")], proc.stderr
    assert "cannot be written" in proc.stderr and "chmod u+rwx" in proc.stderr
    assert "Traceback" not in proc.stderr and "loading_model" not in proc.stderr
    assert list(data.iterdir()) == []


# -- privacy -----------------------------------------------------------------------------


def _loose(data: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(data):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            mode = p.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                out.append(f"{oct(mode & 0o777)} {p}")
    return out


def test_the_index_is_private_whatever_the_umask(tmp_path: Path,
                                                  pristine: tuple[Path, Path, Any]) -> None:
    root = pristine[0]
    home = tmp_path / "home"
    env = cli_env(home)

    def repd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "repd.cli", *args], env=env,
                              capture_output=True, text=True, timeout=300,
                              preexec_fn=lambda: os.umask(0o022))

    proc = repd("index", str(root))
    assert proc.returncode == 0, proc.stderr
    data = data_of(home)
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.sqlite" for p in files)
    assert any("shards" in p.parts for p in files)
    assert _loose(data) == []
    assert stat.S_IMODE(data.stat().st_mode) == 0o700

    # A folder loosened since (an older repd, a copy, a chmod): doctor warns, and the
    # next writer tightens it and says so once.
    for p in [data, *data.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    doctor = repd("doctor", "--quick")
    warn = [ln for ln in doctor.stdout.splitlines() if ln.startswith("[WARN] permissions")]
    assert warn and "chmod -R go-rwx" in warn[0], doctor.stdout
    proc = repd("index", str(root))
    assert proc.returncode == 0, proc.stderr
    assert len(events(proc.stderr, "data_folder_tightened")) == 1, proc.stderr
    assert _loose(data) == []
    doctor = repd("doctor", "--quick")
    assert any(ln.startswith("[ok  ] permissions") for ln in doctor.stdout.splitlines())
