"""Walks a root (or a folder inside it) and lists the files that ignore rules let through.

The walk is iterative (a tree of any depth), never leaves the root (a symlinked folder is
followed only when ``follow_symlinks`` is set, and then only when it leads to a folder
inside the root or inside another configured root), and tells apart the ways a folder
can fail to list: gone (its files are deleted), not listable (EACCES: its files are kept
and the folder is reported), or short of a resource (EMFILE, EIO...: the whole scan is
retried later, see :class:`~repd.errors.TransientError`).
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from repd.core.ignore import IgnoreRules
from repd.errors import TransientError, is_transient


@dataclass(frozen=True, slots=True)
class Entry:
    """One candidate file: its path relative to the root and its stat (or why it has none).

    ``relpath`` is the name as ``os`` gives it (it may hold surrogate escapes, see
    :func:`repd.core.identity.stored_path`). ``folder`` marks an entry about a folder
    that could not be listed: the files the manifest knows below it must be kept.
    """

    relpath: str
    st: os.stat_result | None
    skip_reason: str | None = None
    skip_detail: str = ""
    folder: bool = False


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _within(path: str, bases: Sequence[str]) -> bool:
    return any(path == b or path.startswith(b.rstrip("/") + "/") for b in bases)


def real_bases(root: Path, allowed_roots: Sequence[Path] = ()) -> list[str]:
    """Resolved paths a file of ``root`` may really live under: the root, and the other
    configured roots (which a followed symlink may lead into)."""
    bases = [os.path.realpath(root)]
    bases += [os.path.realpath(r) for r in allowed_roots]
    return list(dict.fromkeys(bases))


def contained(root: Path, relpath: str, follow_symlinks: bool,
              allowed_roots: Sequence[Path] = ()) -> bool:
    """True when the folder holding ``root/relpath`` really lies inside the root.

    Only the folder part is resolved: the last component may itself be a symlink, which
    callers report (``symlink``) or check when reading. Without ``follow_symlinks`` the
    folder must resolve inside the root itself; with it, inside any allowed root.
    """
    parent = relpath.rpartition("/")[0]
    real = os.path.realpath(root / parent if parent else root)
    bases = real_bases(root, allowed_roots if follow_symlinks else ())
    return _within(real, bases)


def walk(root: Path, rules: IgnoreRules, subdir: str = "",
         follow_symlinks: bool = False, allowed_roots: Sequence[Path] = ()) -> Iterator[Entry]:
    """Yield every file below ``root/subdir`` that is not ignored.

    Symlinks are reported as skipped (reason ``symlink``) unless ``follow_symlinks``;
    when followed, a symlink loop or a dangling link is reported as ``unreadable``, and a
    link to a folder outside the root and every ``allowed_roots`` as ``outside_roots``.
    A folder that cannot be listed is one ``unreadable`` entry with ``folder`` set.
    Raises TransientError when listing or stat fails for a reason that may pass.
    """
    bases = real_bases(root, allowed_roots if follow_symlinks else ())
    seen_dirs: set[tuple[int, int]] = set()
    start = subdir.strip("/")
    if start and not _start_inside(root, start, follow_symlinks, bases):
        yield Entry(start, None, "outside_roots", "leads outside the indexed roots")
        return
    stack = [start]
    while stack:
        rel_dir = stack.pop()
        abs_dir = root / rel_dir if rel_dir else root
        try:
            dir_st = abs_dir.stat()
            key = (dir_st.st_dev, dir_st.st_ino)
            if key in seen_dirs:  # a followed symlink brought us back: a loop
                continue
            seen_dirs.add(key)
            with os.scandir(abs_dir) as it:
                # Listed at once so the descriptor is closed before the (possibly long)
                # walk below it: a deep tree must not hold one descriptor per level.
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            continue  # really gone (or no longer a folder): its files are deleted
        except OSError as exc:
            if is_transient(exc):
                raise TransientError(
                    f"cannot list folder {abs_dir}: {exc.strerror or exc}") from exc
            yield Entry(rel_dir or ".", None, "unreadable",
                        f"cannot list folder: {exc.strerror or exc}", folder=True)
            continue
        for de in entries:
            yield from _entry(root, rules, rel_dir, de, follow_symlinks, bases, stack)


def _start_inside(root: Path, start: str, follow: bool, bases: Sequence[str]) -> bool:
    # A scan of a folder below the root (a reindex, an event) must not follow a symlink
    # in its own path out of the root: `repd reindex ROOT/link` read files elsewhere.
    real = os.path.realpath(root / start)
    if _within(real, bases[:1]):
        return True
    return follow and _within(real, bases)


def _entry(root: Path, rules: IgnoreRules, rel_dir: str, de: os.DirEntry[str],
           follow_symlinks: bool, bases: Sequence[str], stack: list[str]) -> Iterator[Entry]:
    rel = _join(rel_dir, de.name)
    try:
        is_link = de.is_symlink()
        if is_link and not follow_symlinks:
            if not rules.is_ignored(rel, False):
                yield Entry(rel, None, "symlink", "symlinks are not followed")
            return
        is_dir = de.is_dir(follow_symlinks=True)
    except OSError as exc:
        if is_transient(exc):
            raise TransientError(f"cannot stat {root / rel}: {exc.strerror or exc}") from exc
        yield Entry(rel, None, "unreadable", exc.strerror or str(exc))
        return
    if rules.is_ignored(rel, is_dir):
        return
    if is_link:
        real = os.path.realpath(root / rel)
        if not _within(real, bases) and Path(real).exists():  # dangling: reported below
            # A followed link may lead only into the root or another configured root.
            yield Entry(rel, None, "outside_roots", "symlink leads outside the indexed roots")
            return
    if is_dir:
        stack.append(rel)
        return
    try:
        st = de.stat(follow_symlinks=True)
    except OSError as exc:
        if is_transient(exc):
            raise TransientError(f"cannot stat {root / rel}: {exc.strerror or exc}") from exc
        detail = "symlink loop" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        if isinstance(exc, FileNotFoundError) and is_link:
            detail = "dangling symlink"
        elif isinstance(exc, FileNotFoundError):
            return  # vanished between listing and stat: nothing to index
        yield Entry(rel, None, "unreadable", detail)
        return
    if not stat_mod.S_ISREG(st.st_mode):
        yield Entry(rel, None, "not_a_file", "not a regular file")
        return
    yield Entry(rel, st)
