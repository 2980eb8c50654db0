"""Walks a root (or a folder inside it) and lists the files that ignore rules let through."""

from __future__ import annotations

import os
import stat as stat_mod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from repd.core.ignore import IgnoreRules


@dataclass(frozen=True, slots=True)
class Entry:
    """One candidate file: its path relative to the root and its stat (or why it has none)."""

    relpath: str
    st: os.stat_result | None
    skip_reason: str | None = None
    skip_detail: str = ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def walk(root: Path, rules: IgnoreRules, subdir: str = "",
         follow_symlinks: bool = False) -> Iterator[Entry]:
    """Yield every file below ``root/subdir`` that is not ignored.

    Symlinks are reported as skipped (reason ``symlink``) unless ``follow_symlinks``;
    when followed, a symlink loop or a dangling link is reported as ``unreadable``.
    Folders that cannot be listed are reported as one ``unreadable`` entry.
    """
    seen_dirs: set[tuple[int, int]] = set()
    stack = [subdir.strip("/")]
    while stack:
        rel_dir = stack.pop()
        abs_dir = root / rel_dir if rel_dir else root
        try:
            dir_st = abs_dir.stat()
            key = (dir_st.st_dev, dir_st.st_ino)
            if key in seen_dirs:  # a followed symlink brought us back: a loop
                continue
            seen_dirs.add(key)
            it = os.scandir(abs_dir)
        except FileNotFoundError:
            continue
        except OSError as exc:
            yield Entry(rel_dir or ".", None, "unreadable", f"cannot list folder: {exc.strerror}")
            continue
        with it:
            for de in it:
                rel = _join(rel_dir, de.name)
                try:
                    is_link = de.is_symlink()
                    if is_link and not follow_symlinks:
                        if not rules.is_ignored(rel, False):
                            yield Entry(rel, None, "symlink", "symlinks are not followed")
                        continue
                    is_dir = de.is_dir(follow_symlinks=True)
                except OSError as exc:
                    yield Entry(rel, None, "unreadable", exc.strerror or str(exc))
                    continue
                if rules.is_ignored(rel, is_dir):
                    continue
                if is_dir:
                    stack.append(rel)
                    continue
                try:
                    st = de.stat(follow_symlinks=True)
                except OSError as exc:
                    detail = "symlink loop" if exc.errno == 40 else (exc.strerror or str(exc))
                    if isinstance(exc, FileNotFoundError) and is_link:
                        detail = "dangling symlink"
                    elif isinstance(exc, FileNotFoundError):
                        continue  # vanished between listing and stat: nothing to index
                    yield Entry(rel, None, "unreadable", detail)
                    continue
                if not stat_mod.S_ISREG(st.st_mode):
                    yield Entry(rel, None, "not_a_file", "not a regular file")
                    continue
                yield Entry(rel, st)
