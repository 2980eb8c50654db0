"""Path globs used by ``repd query --path``."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from repd.core.globs import (
    GlobError,
    check_glob,
    escape,
    glob_exts,
    literal_prefix,
    match_path,
    split_literal_head,
)


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
    ("a\\[1\\].md", "a[1].md", True),  # escaped: the file's own name
    ("a[1].md", "a1.md", True),  # a class
    ("a[1].md", "a[1].md", False),
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
                 "**/*" * 200 + "q", "a" + "*a" * 200, "*[a-z]" * 300 + "q",
                 "{a,d}{i,b}{r,c}{x,0}{*,?}" + "*[!q]" * 150 + "q"]
        t0 = time.process_time()
        hits = sum(match_path(g, p) for g in globs for p in paths)
        print(hits, time.process_time() - t0)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    hits, seconds = done.stdout.split()
    assert hits == "0"
    # 16,000 matches of up to 1,000-character globs (one of 32 alternatives): a few
    # seconds here; minutes before.
    assert float(seconds) < 20, seconds


@pytest.mark.parametrize(("glob", "path", "expected"), [
    # Classes: one character other than "/".
    ("[abc].md", "b.md", True),
    ("[abc].md", "d.md", False),
    ("[a-c]x", "bx", True),
    ("[a-c]x", "dx", False),
    ("[!a-c]x", "dx", True),
    ("[^a-c]x", "ax", False),
    ("[]]x", "]x", True),  # a "]" first is a member
    ("[a-]x", "-x", True),  # so is a "-" last
    ("x[/]y", "x/y", False),
    ("**/v[0-9].txt", "a/b/v7.txt", True),
    # Braces: alternatives, nested, each with the usual rules.
    ("src/**/*.{py,pyi}", "src/x/a.pyi", True),
    ("src/**/*.{py,pyi}", "src/x/a.md", False),
    ("{docs,src}/*.md", "src/a.md", True),
    ("{docs,src}", "src/a/b.md", True),  # a plain folder name, either one
    ("*.{md,{rst,txt}}", "x/a.txt", True),
    ("a{,b}c", "ac", True),
    # Escapes: the next character is itself.
    ("\\*.md", "*.md", True),
    ("\\*.md", "a.md", False),
    ("notes\\{1\\}/*", "notes{1}/a", True),
    # Anchored at the root: never the file name alone.
    ("/README.md", "README.md", True),
    ("/README.md", "docs/README.md", False),
    ("README.md", "docs/README.md", True),
    ("/docs", "docs/a/b.md", True),
    ("/*.md", "a.md", True),
    ("/*.md", "d/a.md", False),
    # "./" is the root; a dot folder stays one.
    ("./.github/*.yml", ".github/ci.yml", True),
    ("./docs/*.md", "docs/a.md", True),
])
def test_match_path_classes_braces_escapes(glob: str, path: str, expected: bool) -> None:
    assert match_path(glob, path) is expected


@pytest.mark.parametrize(("glob", "reason"), [
    ("a[b", "unbalanced '[' at position 2"),
    ("docs/[!x", "unbalanced '[' at position 6"),
    ("a{b", "unbalanced '{' at position 2"),
    ("a{b,c", "unbalanced '{' at position 2"),
    ("a}b", "unbalanced '}' at position 2"),
    ("a\\", "lone '\\'"),
    ("[z-a]", "'z-a'"),
    ("{a,b}" * 6, "more than 32 alternatives"),
    ("{" * 20 + "}" * 20, "nested more than"),
])
def test_invalid_globs_say_why(glob: str, reason: str) -> None:
    with pytest.raises(GlobError, match=re.escape(reason)):
        check_glob(glob)
    with pytest.raises(GlobError):
        match_path(glob, "a")


@pytest.mark.parametrize(("glob", "prefix"), [
    ("docs/**/*.md", "docs/"),
    ("src/app*.py", "src/app"),
    ("**/*.py", ""),
    ("README.md", ""),  # may be any folder's README
    ("/README.md", "README.md"),
    ("docs/guide.md", "docs/guide.md"),
    ("{docs,dev}/*.md", "d"),
    ("{docs,src}/*.md", ""),
    ("a\\[1\\]/*.md", "a[1]/"),
])
def test_literal_prefix_is_a_string_prefix_of_every_match(glob: str, prefix: str) -> None:
    assert literal_prefix(glob) == prefix


@pytest.mark.parametrize(("glob", "exts"), [
    ("**/*.py", ("", ".py")),  # "" for a file named just ".py"
    ("*.md", ("", ".md")),
    ("src/**/*.{py,pyi}", ("", ".py", ".pyi")),
    ("**/test_*.py", (".py",)),
    ("src/a?.PY", (".py",)),  # the payload's ext is lower-cased
    ("x/*.tar.gz", (".gz",)),
    ("**/.gitignore", ("",)),
    ("docs", None),  # also a folder: anything below it
    ("docs/**", None),
    ("*.{md,txt*}", None),
    ("notes/a.", None),
])
def test_glob_exts(glob: str, exts: tuple[str, ...] | None) -> None:
    assert glob_exts(glob) == exts


def test_glob_exts_agree_with_the_payload() -> None:
    from repd.pipeline.writer import file_ext

    paths = ["a.py", "src/x/b.PY", ".py", "src/.py", "Makefile", "a.tar.gz", "d.x/y", "t_1.py"]
    for glob in ("**/*.py", "*.py", "src/**/*.py", "**/t_*.py", "*.gz", "**/*.{py,gz}"):
        exts = glob_exts(glob)
        assert exts is not None
        for path in paths:
            if match_path(glob, path):
                assert file_ext(path) in exts, (glob, path)


def test_escape_and_split_literal_head() -> None:
    name = "a[1]*{x}?.md"
    assert match_path(escape(name), name) and not match_path(escape(name), "a1x.md")
    assert split_literal_head("/home/me/notes/**/*.md") == ("/home/me/notes", "**/*.md")
    assert split_literal_head("/home/me/a\\[1\\].md") == ("/home/me/a[1].md", "")
    assert split_literal_head("/a/{b,c}/d") == ("/a", "{b,c}/d")
    assert split_literal_head("*.md") == ("", "*.md")
