"""Crash safety: ``kill -9`` a real ``repd index`` at many points, re-run, and compare the
store with a fresh index of the same files (same ids, same vectors, nothing extra)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from repd.engine import Engine
from repd.settings import Settings
from tests.helpers import assert_same_index, cli_env, run_cli, snapshot

WORDS = ("river stone light paper engine garden signal winter market forest copper violin "
         "harbor planet lantern meadow circuit glacier orchard canyon").split()


def make_corpus(root: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(n):
        paras = ["\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(rng.randint(1, 3)))
                 for _ in range(rng.randint(1, 4))]
        path = root / f"d{i % 7}" / f"note {i}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Note {i}\n\n" + "\n\n".join(paras) + "\n")


def mutate(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    files = sorted(root.rglob("*.md"))
    rng.shuffle(files)
    for p in files[:10]:
        extra = f"\n\nAn added line {rng.random()} about {rng.choice(WORDS)}.\n"
        p.write_text(p.read_text() + extra)
    for p in files[10:15]:
        p.unlink()
    for p in files[15:20]:
        p.rename(p.with_name("moved " + p.name))


def store_of(home: Path) -> dict[str, Any]:
    settings = Settings(store={"path": home / "data" / "repd"}, device="cpu")
    eng = Engine(settings, writer=False)
    try:
        return snapshot(eng)
    finally:
        eng.close()


def fresh(root: Path, tmp: Path) -> dict[str, Any]:
    home = tmp / f"fresh-{time.monotonic_ns()}"
    run_cli(["index", str(root)], cli_env(home))
    return store_of(home)


# The crashed run writes two groups: first the removals its scan found (deleted and
# renamed-away files), then the changed and new files. ":1" kills it inside the first
# group, ":2" inside the second.
@pytest.mark.parametrize("point", ["intent:1", "delete:1", "commit:1", "intent:2", "upsert:2",
                                   "delete:2", "commit:2"])
def test_kill_at_each_write_step(tmp_path: Path, point: str) -> None:
    kill_at_write_step(tmp_path, point, {})


# The suite runs on the default layout (two copies, store.replicas); the write steps in
# the other, one copy in the process that writes, are checked here.
@pytest.mark.parametrize("point", ["delete:1", "upsert:2", "commit:2"])
def test_kill_at_a_write_step_in_one_copy(tmp_path: Path, point: str) -> None:
    kill_at_write_step(tmp_path, point, {"REPD_STORE__REPLICAS": "false"})
    shards = tmp_path / "home" / "data" / "repd" / "shards"
    assert list(shards.glob("*/segments")) and not list(shards.glob("*/replicas.json"))


def kill_at_write_step(tmp_path: Path, point: str, layout: dict[str, str]) -> None:
    """Index, change the files, kill the next run at ``point``, recover, compare."""
    root = tmp_path / "root"
    make_corpus(root, 30, seed=1)
    home = tmp_path / "home"
    env = cli_env(home, **layout)
    run_cli(["index", str(root)], env)
    mutate(root, seed=2)  # so the crashed run has upserts AND deletions to make
    proc = run_cli(["index", str(root)], {**env, "REPD_CRASH_AT": point}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    out = json.loads(run_cli(["index", str(root), "--json"], env).stdout)
    if point.endswith(":2"):
        # The new vectors were cached slice by slice before the intent was written, so
        # the recovery run re-embeds nothing, whichever step of the write the crash hit.
        assert out["chunks_embedded"] == 0
    assert_same_index(store_of(home), fresh(root, tmp_path))
    # And a further run finds nothing to do.
    again = json.loads(run_cli(["index", str(root), "--json"], env).stdout)
    assert again["indexed"] == 0 and again["chunks_embedded"] == 0


def test_kill_first_run_then_recover_reuses_vectors(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_corpus(root, 30, seed=3)
    home = tmp_path / "home"
    env = cli_env(home)
    proc = run_cli(["index", str(root)], {**env, "REPD_CRASH_AT": "upsert:1"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    out = json.loads(run_cli(["index", str(root), "--json"], env).stdout)
    # Vectors were cached with the intent, before the store was touched: none is redone.
    assert out["chunks_embedded"] == 0 and out["chunks_reused"] > 0
    assert_same_index(store_of(home), fresh(root, tmp_path))


def _committed_files(home: Path) -> int:
    import sqlite3

    db = home / "data" / "repd" / "manifest.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(str(db)) as con:
        return int(con.execute("SELECT COUNT(*) FROM files").fetchone()[0])


def _wait_exit(proc: subprocess.Popen[str], seconds: float) -> bool:
    """Wait up to ``seconds`` for ``proc`` to end; True if it did."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def _wait_commit(proc: subprocess.Popen[str], home: Path, before: int, limit: float) -> bool:
    """Wait until a write group of ``proc`` has committed (the manifest's file count moved)
    or ``proc`` ended; True if it ended."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return True
        if _committed_files(home) != before:
            return False
        time.sleep(0.02)
    raise AssertionError(f"no write group committed within {limit} s")


def test_kill_at_random_moments(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_corpus(root, 1400, seed=4)  # three write groups of 512 files
    home = tmp_path / "home"
    env = cli_env(home, REPD_LOG_LEVEL="info")  # the kill is timed from the model_loaded line
    rng = random.Random(5)
    partial_kills = more = 0
    for attempt in range(16):
        if attempt == 4:
            mutate(root, seed=6)
        before = _committed_files(home)
        proc = subprocess.Popen([sys.executable, "-m", "repd.cli", "index", str(root)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        for line in proc.stderr:  # time the kill from the end of the model load
            if "model_loaded" in line:
                break
        if attempt % 2 == 0:
            # Anywhere: scanning, embedding, inside a write group or between two.
            finished = _wait_exit(proc, rng.uniform(0.5, 14.0))
        else:
            # Just after a group committed, whatever this machine's speed: the next group
            # is then being embedded or written.
            finished = _wait_commit(proc, home, before, 600)
            if not finished:
                finished = _wait_exit(proc, rng.uniform(0.0, 2.0))
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        after = _committed_files(home)
        if not finished and after != before:
            partial_kills += 1  # killed after some groups were committed, before the end
        if finished and partial_kills >= 3:
            break
        if finished and partial_kills < 2:
            # The index caught up before enough kills landed mid-run: give it more to do.
            make_corpus(root / f"more{more}", 1100, seed=20 + more)
            more += 1
    assert partial_kills >= 2, "no kill landed between write groups"
    run_cli(["index", str(root)], env)
    assert_same_index(store_of(home), fresh(root, tmp_path))
    shutil.rmtree(home)
