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


@dataclass(slots=True)
class Folder:
    """What the walk found in one folder.

    ``files``: the regular files the rules let through, as (path relative to the root,
    stat) pairs: plain tuples, since a scan handles one per file and a no-op scan of a
    large tree is mostly this. ``others``: everything else worth recording (symlinks,
    unreadable entries, a folder that cannot be listed, files that are not regular).
    """

    files: list[tuple[str, os.stat_result]]
    others: list[Entry]


def walk(root: Path, rules: IgnoreRules, subdir: str = "",
         follow_symlinks: bool = False, allowed_roots: Sequence[Path] = ()) -> Iterator[Entry]:
    """Yield every file below ``root/subdir`` that is not ignored (see :func:`walk_folders`).

    Within a folder, the entries of ``Folder.others`` come before its files.
    """
    for folder in walk_folders(root, rules, subdir, follow_symlinks, allowed_roots):
        yield from folder.others
        for rel, st in folder.files:
            yield Entry(rel, st)


def walk_folders(root: Path, rules: IgnoreRules, subdir: str = "",
                 follow_symlinks: bool = False,
                 allowed_roots: Sequence[Path] = ()) -> Iterator[Folder]:
    """Walk ``root/subdir`` folder by folder, yielding what each holds that is not ignored.

    Symlinks are reported as skipped (reason ``symlink``) unless ``follow_symlinks``;
    when followed, a symlink loop or a dangling link is reported as ``unreadable``, and a
    link to a folder outside the root and every ``allowed_roots`` as ``outside_roots``.
    A folder that cannot be listed is one ``unreadable`` entry with ``folder`` set.
    Raises TransientError when listing or stat fails for a reason that may pass.

    The ignore rules are worked out once per folder (:meth:`IgnoreRules.for_dir`); a
    file costs its name's checks, the ``DirEntry`` type bits (no system call) and one
    ``stat``: the file's own, which the caller compares with the manifest.
    """
    bases = real_bases(root, allowed_roots if follow_symlinks else ())
    seen_dirs: set[tuple[int, int]] = set()
    start = subdir.strip("/")
    if start and not _start_inside(root, start, follow_symlinks, bases):
        yield Folder([], [Entry(start, None, "outside_roots",
                                "leads outside the indexed roots")])
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
            yield Folder([], [Entry(rel_dir or ".", None, "unreadable",
                                    f"cannot list folder: {exc.strerror or exc}",
                                    folder=True)])
            continue
        yield _folder(root, rules, rel_dir, entries, follow_symlinks, bases, stack)


def _folder(root: Path, rules: IgnoreRules, rel_dir: str, entries: list[os.DirEntry[str]],
            follow_symlinks: bool, bases: Sequence[str], stack: list[str]) -> Folder:
    """Sort one folder's entries into files, other entries and sub-folders to walk."""
    here = rules.for_dir(rel_dir)
    prefix = here.prefix
    file_ignored = here.file_ignored
    files: list[tuple[str, os.stat_result]] = []
    others: list[Entry] = []
    is_reg = stat_mod.S_ISREG
    for de in entries:
        # The fast path: a plain file or folder, told apart by the listing's type bits.
        # Links and anything odd take the careful path below.
        try:
            if de.is_symlink():
                found = _entry(root, rules, rel_dir, de, follow_symlinks, bases, stack)
                if found is not None:
                    if found.st is not None:
                        files.append((found.relpath, found.st))
                    else:
                        others.append(found)
                continue
            is_dir = de.is_dir()
        except OSError as exc:
            if is_transient(exc):
                raise TransientError(
                    f"cannot stat {root / (prefix + de.name)}: {exc.strerror or exc}") from exc
            others.append(Entry(prefix + de.name, None, "unreadable", exc.strerror or str(exc)))
            continue
        name = de.name
        if is_dir:
            if not here.dir_ignored(name):
                stack.append(prefix + name)
            continue
        if file_ignored(name):
            continue
        try:
            st = de.stat()
        except OSError as exc:
            if is_transient(exc):
                raise TransientError(
                    f"cannot stat {root / (prefix + name)}: {exc.strerror or exc}") from exc
            if isinstance(exc, FileNotFoundError):
                continue  # vanished between listing and stat: nothing to index
            others.append(Entry(prefix + name, None, "unreadable", exc.strerror or str(exc)))
            continue
        if is_reg(st.st_mode):
            files.append((prefix + name, st))
        else:
            others.append(Entry(prefix + name, None, "not_a_file", "not a regular file"))
    return Folder(files, others)


def _start_inside(root: Path, start: str, follow: bool, bases: Sequence[str]) -> bool:
    # A scan of a folder below the root (a reindex, an event) must not follow a symlink
    # in its own path out of the root: `repd reindex ROOT/link` read files elsewhere.
    real = os.path.realpath(root / start)
    if _within(real, bases[:1]):
        return True
    return follow and _within(real, bases)


def _entry(root: Path, rules: IgnoreRules, rel_dir: str, de: os.DirEntry[str],
           follow_symlinks: bool, bases: Sequence[str], stack: list[str]) -> Entry | None:
    """The careful path, for a symlink: what to record of it (None: nothing, or a folder
    pushed on ``stack``)."""
    rel = _join(rel_dir, de.name)
    try:
        is_link = de.is_symlink()
        if is_link and not follow_symlinks:
            if not rules.is_ignored(rel, False):
                return Entry(rel, None, "symlink", "symlinks are not followed")
            return None
        is_dir = de.is_dir(follow_symlinks=True)
    except OSError as exc:
        if is_transient(exc):
            raise TransientError(f"cannot stat {root / rel}: {exc.strerror or exc}") from exc
        return Entry(rel, None, "unreadable", exc.strerror or str(exc))
    if rules.is_ignored(rel, is_dir):
        return None
    if is_link:
        real = os.path.realpath(root / rel)
        if not _within(real, bases) and Path(real).exists():  # dangling: reported below
            # A followed link may lead only into the root or another configured root.
            return Entry(rel, None, "outside_roots", "symlink leads outside the indexed roots")
    if is_dir:
        stack.append(rel)
        return None
    try:
        st = de.stat(follow_symlinks=True)
    except OSError as exc:
        if is_transient(exc):
            raise TransientError(f"cannot stat {root / rel}: {exc.strerror or exc}") from exc
        detail = "symlink loop" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        if isinstance(exc, FileNotFoundError) and is_link:
            detail = "dangling symlink"
        elif isinstance(exc, FileNotFoundError):
            return None  # vanished between listing and stat: nothing to index
        return Entry(rel, None, "unreadable", detail)
    if not stat_mod.S_ISREG(st.st_mode):
        return Entry(rel, None, "not_a_file", "not a regular file")
    return Entry(rel, st)
