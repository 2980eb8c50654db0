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


def test_invalid_path_glob_is_exit_2_with_the_reason_before_anything_loads(
        tmp_path: Path) -> None:
    for glob, reason in (("docs/[abc.md", "unbalanced '[' at position 6"),
                         ("src/**/*.{py,pyi", "unbalanced '{' at position 10"),
                         (str(tmp_path / "x}.md"), "unbalanced '}'")):
        proc = subprocess.run([sys.executable, "-m", "repd.cli", "query", "anything", "--path",
                               glob], env=cli_env(tmp_path), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"repd: invalid --path glob {glob!r}: {reason}" in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert heavy_modules(["query", "anything", "--path", "a[b"], tmp_path) == ""


def test_a_path_that_exists_is_taken_literally(tmp_path: Path) -> None:
    odd = tmp_path / "odd[1.md"  # an invalid glob, but a real file
    odd.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "query", "anything", "--path",
                           str(odd)], env=cli_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert "invalid --path glob" not in proc.stderr
    assert "nothing is indexed yet" in proc.stderr  # got as far as opening the index


def test_query_mode_choices(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "query", "x", "--mode", "fuzzy"],
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'fuzzy'" in proc.stderr
