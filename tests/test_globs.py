"""Path globs used by ``repd query --path``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from repd.core.globs import literal_prefix, match_path


@pytest.mark.parametrize(("glob", "path", "expected"), [
    ("*.py", "src/a.py", True),
    ("*.py", "src/a.pyc", False),
    ("src/*.py", "src/a.py", True),
    ("src/*.py", "src/sub/a.py", False),
    ("src/**/*.py", "src/a.py", True),
    ("src/**/*.py", "src/x/y/a.py", True),
    ("**/test_*.py", "tests/test_api.py", True),
    ("docs", "docs/guide/intro.md", True),
    ("docs", "docsite/a.md", False),
    ("notes/2024-??.md", "notes/2024-05.md", True),
    ("a[1].md", "a[1].md", True),
])
def test_match_path(glob: str, path: str, expected: bool) -> None:
    assert match_path(glob, path) is expected


def test_literal_prefix() -> None:
    assert literal_prefix("docs/**/*.md") == "docs/"
    assert literal_prefix("src/app/*.py") == "src/app/"
    assert literal_prefix("*.py") == ""


@pytest.mark.parametrize(("glob", "path", "expected"), [
    ("**/", "a/b/", True),
    ("**/", "a/b", False),
    ("**/x", "x", True),
    ("**/x", "a/x", True),
    ("**/x", "ax", False),
    ("a/**/b", "a/b", True),
    ("a/**/b", "a/x/y/b", True),
    ("a/**/b", "a/xb", False),
    ("a/**", "a/x/y", True),
    ("***", "a/b", True),
    ("***/x", "a/b/x", True),
    ("**/**/x", "x", True),
    ("*/**/*", "a/b", True),
    ("*", "a/b", True),  # no "/" in the glob: the file name alone may match
    ("a*", "b/ab", True),
    ("a/*", "a/b/c", False),
    ("??", "ab", True),
    ("??", "a/", False),
    ("*" * 18 + "x", "dir/fix", True),
])
def test_match_path_edge_cases(glob: str, path: str, expected: bool) -> None:
    assert match_path(glob, path) is expected


def test_pathological_globs_answer_within_a_bound() -> None:
    # A backtracking regex took 15.6 s on the first glob against one short path, holding
    # the GIL and freezing the daemon; the matcher is linear in the path's length. Run in a
    # child so the old behaviour fails by timeout instead of hanging the suite.
    code = textwrap.dedent("""
        import time
        from repd.core.globs import match_path
        paths = [f"dir{i}/sub/" + "a-long-file-name-about-volcanoes" * (1 + i % 4)
                 for i in range(2000)]
        globs = ["*" * 18 + "x", "*a" * 40 + "*z", "**/" * 300 + "x", "*?" * 500 + "q",
                 "**/*" * 200 + "q", "a" + "*a" * 200]
        t0 = time.process_time()
        hits = sum(match_path(g, p) for g in globs for p in paths)
        print(hits, time.process_time() - t0)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    hits, seconds = done.stdout.split()
    assert hits == "0"
    # 12,000 matches of up to 1,000-character globs: about 1 s here; minutes before.
    assert float(seconds) < 20, seconds
