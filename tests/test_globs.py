"""Path globs used by ``repd query --path``."""

from __future__ import annotations

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
