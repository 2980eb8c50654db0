"""A short run of the soak (bench/soak.py): random file operations on a real daemon, kill -9
at random moments and at write steps, restarts, then the store compared with a fresh index.
The full run (200 kills) is in the README; this one keeps CI to a few minutes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_short(tmp_path: Path) -> None:
    root = tmp_path / "soak"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--seed", "11", "--kills", "5",
         "--root", str(root), "--keep"],
        capture_output=True, text=True, timeout=840, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-12000:]
    summary = re.search(r"SOAK PASS: seed=11 kills=5 .* missing=0 extra=0 stale=0 rows=0 "
                        r"intents=0", out)
    assert summary, out[-12000:]
    assert "final: idle, probe searchable" in out
