"""Ctrl-C during a long ``repd index`` keeps the work done so far.

Embedded vectors are cached slice by slice, so an interrupted run loses at most the slice
in flight: the next run reuses everything else and the result equals a fresh index.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import cli_env, index_json

WORDS = ("basalt cinder delta estuary fern gully heron inlet juniper kelp loam marsh nettle "
         "oxbow peat quarry reed silt tundra upland vale willow").split()


def _cached_vectors(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_ctrl_c_keeps_embedded_slices_for_the_next_run(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for i in range(90):
        paras = [" ".join(WORDS[(i * 3 + p * 5 + j) % len(WORDS)] for j in range(60))
                 + f" record {i}-{p}" for p in range(5)]
        (root / f"survey{i:03}.md").write_text("\n\n".join(paras))
    env = cli_env(tmp_path / "home")
    db = tmp_path / "home" / "data" / "repd" / "manifest.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "repd.cli", "index", str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while _cached_vectors(db) == 0:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no slice was cached within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    kept = _cached_vectors(db)
    assert kept > 0
    again = index_json(root, env)
    assert again["indexed"] == 90
    assert again["chunks_reused"] >= kept  # nothing embedded before Ctrl-C is embedded twice
