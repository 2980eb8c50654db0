"""The fast paths of the reconcile scan give the answers of the careful ones.

* the joined-regex shortcut in front of pathspec (``core.ignore._Matcher``) never
  changes a verdict, for rule files git accepts and for ones whose regexes cannot be
  joined;
* the walk's per-folder rules (``IgnoreRules.for_dir``) keep exactly the files that
  asking the rules about every path, ancestors included, keeps;
* the one stat rule (``indexer.unchanged_since``) reads a full manifest row and the
  scan's view of it alike, and distrusts dirty rows, racy files and any changed field;
* a no-op scan of names that need escaping (a backslash, bytes that are not UTF-8)
  finds every file unchanged.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from pathspec import GitIgnoreSpec

from repd.adapters.manifest import Manifest
from repd.core.identity import RACY_WINDOW_NS, StatSig, stored_path
from repd.core.ignore import IgnoreRules, _Matcher
from repd.pipeline.generations import Generations
from repd.pipeline.indexer import Indexer, scan_row, unchanged_since
from repd.pipeline.scanner import walk, walk_folders

SPECS = [
    ["*.log", "generated/", "/scratch/", "!keep.log"],
    ["docs/**/*.md", "!docs/keep/**", "[a-c]x", "a?c"],
    ["build", "!build/keep.txt", "**/tmp/**", "*.py[cod]"],
    ["/only-root.md", "sub/", "!sub/", "\\#literal", "\\!bang", "space\\ name"],
    ["*", "!*/", "!*.md"],  # ignore everything but folders and Markdown
    ["weird(?P<x>/)name", "a+b", "{x}", "dot.", "$HOME", "^caret"],  # regex characters
]
NAMES = ["a.log", "keep.log", "x.md", "bx", "dx", "abc", "aXc", "build", "keep.txt",
         "tmp", "f.pyc", "f.py", "only-root.md", "sub", "#literal", "!bang", "space name",
         "weird(?P<x>", "a+b", "{x}", "dot.", "$HOME", "^caret", "generated", "scratch"]
DIRS = ["", "docs", "docs/keep", "docs/a/b", "tmp", "src/tmp/x", "sub", "sub/sub",
        "generated", "x/generated", "scratch", "y/scratch", "build", "weird(?P<x>"]


def _paths(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        d = rng.choice(DIRS)
        name = rng.choice(NAMES)
        path = f"{d}/{name}" if d else name
        out.append(path + "/" if rng.random() < 0.3 else path)
    return out


@pytest.mark.parametrize("lines", SPECS)
def test_the_joined_regex_never_changes_a_verdict(lines: list[str]) -> None:
    spec = GitIgnoreSpec.from_lines(lines)
    matcher = _Matcher(spec)
    assert matcher._any is not None, "these rule files can all be joined"
    for path in _paths(random.Random(len(lines)), 3000):
        assert matcher.check(path) == spec.check_file(path).include, path


def test_rule_files_that_cannot_be_joined_go_to_pathspec_alone() -> None:
    # A backreference to a named group: renaming groups would break it, so no shortcut.
    spec = GitIgnoreSpec.from_lines(["*.log"])
    pattern = spec.patterns[0]
    object.__setattr__(pattern, "regex", __import__("re").compile(r"^(?P<d>a)(?P=d)$"))
    matcher = _Matcher(spec)
    assert matcher._any is None
    assert matcher.check("aa") is True and matcher.check("ab") is None


def test_an_empty_rule_file_matches_nothing() -> None:
    matcher = _Matcher(GitIgnoreSpec.from_lines(["# only a comment", ""]))
    assert matcher.check("anything") is None


def _tree(root: Path) -> None:
    files = {
        ".gitignore": "*.log\ngenerated/\n/scratch/\n!keep.log\n",
        "a.md": "", "a.log": "", "keep.log": "", "data.png": "", "x.swp": "",
        "scratch/s.md": "", "other/scratch/s.md": "", "deep/generated/g.md": "",
        "deep/.gitignore": "!*.log\n*.md\n!keep.md\n",
        "deep/b.log": "", "deep/b.md": "", "deep/keep.md": "",
        "deep/er/.repdignore": "*.txt\n", "deep/er/c.txt": "", "deep/er/c.log": "",
        "deep/er/keep.md": "", "node_modules/m.js": "", "src/__pycache__/m.py": "",
        "src/m.py": "", "src/.env": "", "venvish/pyvenv.cfg": "", "venvish/lib.py": "",
        ".git/config": "", "notes/.hidden.md": "", "notes/#auto#": "", "notes/ok.txt": "",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _reference(root: Path, rules: IgnoreRules) -> set[str]:
    """Every regular file, asking the rules about each path and each of its folders."""
    kept = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = [d for d in dirnames
                       if not rules.is_ignored(f"{rel_dir}/{d}" if rel_dir else d, True)]
        for name in filenames:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if not rules.is_ignored(rel, False):
                kept.add(rel)
    return kept


@pytest.mark.parametrize("options", [
    {}, {"exclude": ["!*.log", "notes/"]}, {"include": ["*.md", "*.py"]},
    {"use_gitignore": False},
])
def test_the_walk_keeps_what_the_rules_keep_path_by_path(tmp_path: Path,
                                                          options: dict[str, object]) -> None:
    _tree(tmp_path)
    walked = IgnoreRules(tmp_path, private_dirs=[], **options)  # type: ignore[arg-type]
    found = {rel for folder in walk_folders(tmp_path, walked) for rel, _ in folder.files}
    # Fresh rules for the reference: nothing cached by the walk helps it.
    reference = _reference(tmp_path, IgnoreRules(tmp_path, private_dirs=[], **options))  # type: ignore[arg-type]
    assert found == reference
    assert found, "the tree keeps some files under every option set"
    # The flat walk yields the same files, each with its stat.
    flat = {e.relpath: e.st for e in walk(tmp_path, walked) if e.st is not None}
    assert set(flat) == found
    assert all(st.st_ino == (tmp_path / rel).stat().st_ino for rel, st in flat.items())


def test_the_walk_keeps_gitignore_semantics(tmp_path: Path) -> None:
    _tree(tmp_path)
    rules = IgnoreRules(tmp_path, private_dirs=[])
    found = {rel for folder in walk_folders(tmp_path, rules) for rel, _ in folder.files}
    assert "a.md" in found and "keep.log" in found and "a.log" not in found
    assert "scratch/s.md" not in found and "other/scratch/s.md" in found  # anchored
    assert "deep/generated/g.md" not in found
    # deep/.gitignore overrides the root's for its folder: logs back, Markdown out.
    assert "deep/b.log" in found and "deep/b.md" not in found and "deep/keep.md" in found
    # .repdignore below adds its own rules; the deeper .gitignore still applies.
    assert "deep/er/c.txt" not in found and "deep/er/c.log" in found
    assert "deep/er/keep.md" in found
    assert "src/m.py" in found and "venvish/lib.py" not in found
    assert not any(p.startswith((".git/", "node_modules/")) for p in found)


def _row(manifest: Manifest, root: str, path: str) -> tuple[object, ...]:
    return manifest.scan_view(root)[path]


def test_one_stat_rule_for_scan_rows_and_full_rows(tmp_path: Path) -> None:
    f = tmp_path / "a.md"
    f.write_text("hello")
    st = f.stat()
    sig = StatSig.of(st)
    m = Manifest(tmp_path / "m.sqlite")
    late = max(st.st_mtime_ns, st.st_ctime_ns) + RACY_WINDOW_NS + 1
    with m.transaction() as db:
        Manifest.upsert_file(db, "/r", "a.md", sig, "h", "indexed", None, None, late)
        Manifest.upsert_file(db, "/r", "racy.md", sig, "h", "indexed", None, None, late - 2)
        Manifest.upsert_file(db, "/r", "dirty.md", sig, "h", "dirty", None, None, late)
    for path, trusted in (("a.md", True), ("racy.md", False), ("dirty.md", False)):
        full = m.file("/r", path)
        assert full is not None
        assert scan_row(full) == _row(m, "/r", path)
        assert unchanged_since(_row(m, "/r", path), st) is trusted, path
    # Any one field of the stat changed: not trusted.
    row = list(_row(m, "/r", "a.md"))
    for i in range(4):
        changed = row.copy()
        changed[i] = int(changed[i]) + 1  # type: ignore[call-overload]
        assert not unchanged_since(tuple(changed), st), i
    m.close()


def test_a_no_op_scan_finds_names_that_need_escaping_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    names = [b"plain.md", b"back\\slash.md", b"caf\xc3\xa9.md", b"latin1-caf\xe9.md"]
    sub = root / "d\\ir"
    sub.mkdir()
    for folder in (root, sub):
        for name in names:
            with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
                fh.write(b"x")
    time.sleep(0.01)
    rules = IgnoreRules(root, private_dirs=[])
    m = Manifest(tmp_path / "m.sqlite")
    later = time.time_ns() + RACY_WINDOW_NS + 1  # as if indexed well after the writes
    with m.transaction() as db:
        for e in walk(root, rules):
            assert e.st is not None
            Manifest.upsert_file(db, str(root), stored_path(e.relpath), StatSig.of(e.st),
                                 "h", "indexed", None, None, later)
    indexer = Indexer(m, Generations(), max_file_bytes=1 << 20)
    stats = indexer.reconcile(root, rules)
    assert stats.seen == stats.unchanged == 2 * len(names)
    assert stats.deleted == stats.indexed == 0
    m.close()


def test_the_walk_holds_no_descriptor_between_folders(tmp_path: Path) -> None:
    _tree(tmp_path)
    rules = IgnoreRules(tmp_path, private_dirs=[])
    before = len(os.listdir("/proc/self/fd"))
    folders = walk_folders(tmp_path, rules)
    next(folders)
    next(folders)
    assert len(os.listdir("/proc/self/fd")) == before  # paused between two folders
    folders.close()  # abandoned half way: nothing left open either
    assert sum(1 for _ in walk_folders(tmp_path, rules)) > 5
    assert len(os.listdir("/proc/self/fd")) == before
