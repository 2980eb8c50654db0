"""`repd --help`, `repd --version` and `repd status` must not import torch (or the model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import cli_env

PROBE = """
import sys
from repd.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "sentence_transformers", "transformers", "qdrant_edge",
                           "fastapi", "uvicorn") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def heavy_modules(args: list[str], home: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=cli_env(home),
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY=")][-1]
    return line.removeprefix("HEAVY=")


def test_help_version_status_config_stay_light(tmp_path: Path) -> None:
    assert heavy_modules(["--help"], tmp_path) == ""
    assert heavy_modules(["--version"], tmp_path) == ""
    assert heavy_modules(["query", "--help"], tmp_path) == ""
    assert heavy_modules(["status"], tmp_path) == ""  # no daemon: exits 3, still light
    assert heavy_modules(["config", "show"], tmp_path) == ""


def test_query_without_index_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "query", "anything"],
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "nothing is indexed yet" in proc.stderr and "Traceback" not in proc.stderr
