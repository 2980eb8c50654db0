"""Which paths under a root are never indexed: safe defaults, globs, .gitignore and .repdignore.

Precedence, highest first, for a path and each of its ancestor directories:

1. Hard rules nothing can undo: VCS metadata, secrets, repd's own data folders.
2. ``exclude`` globs (gitwildmatch); a negated glob such as ``!build/`` re-includes
   something a soft default would skip.
3. Soft defaults (dependencies, caches, build output, editor temporaries, binaries).
4. ``.gitignore`` (when enabled) and ``.repdignore`` files at every level, with git's
   semantics: anchoring relative to the file's directory, negation, and deeper files
   overriding shallower ones; ``.repdignore`` overrides ``.gitignore`` in the same
   directory. ``.git/info/exclude`` of the root counts as the root's lowest layer.
5. ``include`` globs: when any are given, a *file* must match one (never a directory).

As in git, nothing inside an ignored directory can be re-included. A line of a rule file
that cannot be compiled (``[z-a]``, a lone ``!``, a trailing backslash: git accepts such
files) is skipped with a warning naming ``file:line``, as git does; the file's other lines
still apply. Ancestors are walked iteratively, so a tree of any depth is fine.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from pathspec import GitIgnoreSpec

from repd.core.secrets import SECRET_DIRS as _SECRET_DIRS
from repd.errors import TransientError, is_transient
from repd.log import get_logger

log = get_logger("ignore")

#: Files whose change alters the rules of their directory (the watcher invalidates on them).
RULE_FILES = frozenset({".gitignore", ".repdignore", "pyvenv.cfg", "CACHEDIR.TAG"})

# --- hard rules ---------------------------------------------------------------------
VCS_DIRS = frozenset({".git", ".hg", ".svn", ".jj", ".bzr", "_darcs"})
# Secret folders are left out whole, never walked. Secret *files* are not ignored here:
# the planner skips them by name (before reading them) or by content with reason
# ``secret``, so ``repd files`` shows them and ``allow_secrets`` can bring one back.
# repd.core.secrets holds every rule; the empty lists below keep this module's names.
SECRET_DIRS = _SECRET_DIRS
SECRET_NAMES: frozenset[str] = frozenset()
SECRET_PREFIXES: tuple[str, ...] = ()
SECRET_SUFFIXES: tuple[str, ...] = ()
SECRET_JSON_PREFIXES: tuple[str, ...] = ()

# --- soft defaults ------------------------------------------------------------------
# Deliberately absent: "out", "bin", "lib", "vendor", "env", "target" and "tmp" are also
# ordinary folder names in notes and documents. Rust's target/ and most caches carry a
# CACHEDIR.TAG and virtualenvs a pyvenv.cfg, which catch them whatever their name.
SOFT_DIRS = frozenset(
    {
        "node_modules",
        "bower_components",
        "jspm_packages",
        ".pnpm-store",
        ".yarn",
        ".venv",
        "venv",
        ".virtualenv",
        ".direnv",
        ".conda",
        "site-packages",
        "__pypackages__",
        "__pycache__",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".cache",
        ".tox",
        ".nox",
        ".hypothesis",
        ".ipynb_checkpoints",
        ".eggs",
        ".pytype",
        ".pyre",
        ".dmypy",
        ".gradle",
        ".parcel-cache",
        ".turbo",
        ".sass-cache",
        ".terraform",
        ".serverless",
        "build",
        "dist",
        "_build",
        ".next",
        ".nuxt",
        ".svelte-kit",
        ".angular",
        ".docusaurus",
        ".idea",
        ".vs",
        ".Trash",
        ".Trash-1000",
        "$RECYCLE.BIN",
        "lost+found",
    }
)
SOFT_DIR_SUFFIXES = (".egg-info",)
DIR_MARKERS = ("pyvenv.cfg", "CACHEDIR.TAG")
# Housekeeping files: rules for tools, not content a person searches for (a .gitignore came
# back as a hit for "build output"). Soft: an ``exclude`` line such as ``!.gitattributes``
# brings one back.
HOUSEKEEPING_NAMES = frozenset(
    {
        *RULE_FILES,
        ".gitattributes",
        ".gitmodules",
        ".gitkeep",
        ".keep",
        ".hgignore",
        ".ignore",
        ".rgignore",
        ".fdignore",
        ".dockerignore",
        ".npmignore",
        ".prettierignore",
        ".eslintignore",
        ".stylelintignore",
        ".gcloudignore",
        ".vercelignore",
        ".slugignore",
        ".cfignore",
        ".helmignore",
        ".bzrignore",
        ".cvsignore",
    }
)
JUNK_NAMES = frozenset({"4913", ".DS_Store", "Thumbs.db", "desktop.ini", ".directory"})
TEMP_SUFFIXES = (
    "~",
    ".swp",
    ".swo",
    ".swx",
    ".tmp",
    ".temp",
    ".crdownload",
    ".part",
    ".partial",
    ".bak",
    ".kate-swp",
    "___jb_tmp___",
    "___jb_old___",
)
TEMP_PREFIXES = (".#", ".~lock.", "~$", ".goutputstream-", ".nfs")
BINARY_EXTENSIONS = frozenset(
    {
        "pyc",
        "pyo",
        "o",
        "a",
        "so",
        "dylib",
        "dll",
        "exe",
        "class",
        "jar",
        "war",
        "whl",
        "egg",
        "zip",
        "tar",
        "gz",
        "tgz",
        "bz2",
        "xz",
        "zst",
        "7z",
        "rar",
        "iso",
        "dmg",
        "img",
        "png",
        "jpg",
        "jpeg",
        "gif",
        "bmp",
        "ico",
        "webp",
        "tif",
        "tiff",
        "psd",
        "heic",
        "mp3",
        "mp4",
        "m4a",
        "mov",
        "avi",
        "mkv",
        "webm",
        "wav",
        "flac",
        "ogg",
        "ttf",
        "otf",
        "woff",
        "woff2",
        "eot",
        "sqlite",
        "sqlite3",
        "db",
        "db-wal",
        "db-shm",
        "parquet",
        "npy",
        "npz",
        "pt",
        "pth",
        "ckpt",
        "safetensors",
        "onnx",
        "h5",
        "pkl",
    }
)

_MAX_CACHED_DIRS = 200_000


def is_rule_file(name: str) -> bool:
    """True for a file name whose change alters its directory's ignore rules."""
    return name in RULE_FILES


def _hard(name: str, lower: str, is_dir: bool) -> bool:
    if is_dir and (name in VCS_DIRS or name in SECRET_DIRS):
        return True
    if lower in SECRET_NAMES or lower.startswith(SECRET_PREFIXES):
        return True
    if lower.endswith(SECRET_SUFFIXES):
        return True
    if lower[0] == "." and lower.endswith("_history"):  # shell histories hold typed secrets
        return True
    return lower.endswith(".json") and lower.startswith(SECRET_JSON_PREFIXES)


def _soft_file(name: str, lower: str) -> bool:
    if name in JUNK_NAMES or name.endswith(TEMP_SUFFIXES) or name.startswith(TEMP_PREFIXES):
        return True
    if name in HOUSEKEEPING_NAMES:
        return True
    if len(name) > 1 and name[0] == "#" and name[-1] == "#":  # emacs autosave
        return True
    if name[0] == "." and (name[-4:-1] == ".sw" or ".tmp" in name):  # vim .x.swn, .x.tmp123
        return True
    dot = lower.rfind(".")
    return dot > 0 and lower[dot + 1 :] in BINARY_EXTENSIONS


# A named group in a pattern's regex (pathspec marks directory matches with one); made
# anonymous when the regexes of a rule file are joined (group names must be unique).
_NAMED_GROUP = re.compile(r"(?<!\\)\(\?P<\w+>")
_LEADS = ("/", "./")
_ANY_DEPTH = "(?:.+/)?"


class _Matcher:
    """One rule file's (or glob list's) patterns, with a cheap test in front.

    Nearly every path matches no pattern at all, and pathspec finds that out by trying
    each pattern's regex in turn from Python (most of a scan's time went there). All the
    regexes are joined into one alternation, tried once, in C: when it does not match,
    no pattern does and the verdict is "no opinion"; when it does, pathspec decides, so
    git's semantics (last match wins, negation, directory patterns) stay pathspec's.
    A rule file whose regexes cannot be joined simply goes without the shortcut.
    """

    __slots__ = ("_any", "_spec")

    def __init__(self, spec: GitIgnoreSpec) -> None:
        self._spec = spec
        self._any = _joined(spec)

    def check(self, path: str) -> bool | None:
        """True (ignore/include), False (negated), None (no pattern matches ``path``)."""
        any_ = self._any
        # (A path pathspec would first strip of "/" or "./" is left to pathspec.)
        if any_ is not None and any_.search(path) is None and not path.startswith(_LEADS):
            return None
        return self._spec.check_file(path).include


def _joined(spec: GitIgnoreSpec) -> re.Pattern[str] | None:
    """One regex matching wherever one of ``spec``'s active patterns matches (it may match
    more, never less), or None when the patterns cannot be joined."""
    parts: list[str] = []
    flags: set[int] = set()
    for pat in spec.patterns:
        if pat.include is None:
            continue  # a comment or blank line: pathspec skips it too
        regex = getattr(pat, "regex", None)
        if not isinstance(regex, re.Pattern) or not isinstance(regex.pattern, str):
            return None
        parts.append(_NAMED_GROUP.sub("(?:", regex.pattern))
        flags.add(regex.flags)
    if not parts:
        return re.compile(r"(?!)")  # nothing can match
    if len(flags) != 1:
        return None
    flag = flags.pop()
    if flag & re.MULTILINE:
        return None
    if all(p.startswith("^") and _anchored(p) for p in parts):
        # Most patterns match at any depth, ``^(?:.+/)?X``, which the engine retries at
        # every character of the path. One shared ``^(?:[^/]*/)*`` tries each X only at
        # the folder boundaries. It matches every string ``(?:.+/)?`` matches (and the
        # empty prefix), so the join still matches wherever a pattern does.
        heads = [p[1:].removeprefix(_ANY_DEPTH) for p in parts]
        joined = "^(?:[^/]*/)*(?:" + "|".join(f"(?:{h})" for h in heads) + ")"
    else:
        joined = "|".join(f"(?:{p})" for p in parts)
    try:
        return re.compile(joined, flag)
    except (re.error, RecursionError, OverflowError):
        return None  # e.g. a backreference to a renamed group: pathspec alone decides


def _anchored(pattern: str) -> bool:
    """True when every match of ``pattern`` starts at ``^``: its first element is the
    anchor (a top-level alternation such as ``^a|b`` parses as one branch element
    instead, and moving its ``^`` out would anchor ``b`` too). Unknown counts as False."""
    try:
        from re import _parser  # type: ignore[attr-defined]

        items = list(_parser.parse(pattern))
        return bool(items) and items[0] == (_parser.AT, _parser.AT_BEGINNING)
    except Exception:
        return False


class DirRules:
    """The rules for the entries of one folder, worked out once for the whole folder.

    A scan asks about every file; :meth:`file_ignored` then costs the file name's own
    checks and one regex per rule file that applies, with no walk up the ancestors.
    Built by :meth:`IgnoreRules.for_dir`; valid until the rules are invalidated.
    """

    __slots__ = ("_chain", "_exclude", "_include", "_rules", "ignored", "prefix")

    def __init__(self, rules: IgnoreRules, dir_rel: str, ignored: bool,
                 chain: tuple[tuple[int, _Matcher], ...]) -> None:
        self._rules = rules
        #: The folder itself is ignored (or lies below an ignored one): so is all of it.
        self.ignored = ignored
        #: The folder's path with a trailing slash ("" for the root).
        self.prefix = dir_rel + "/" if dir_rel else ""
        prefix = self.prefix
        # Each rule file sees paths relative to its own folder; deepest first, so the
        # first opinion found is the one git keeps.
        self._chain = tuple((prefix[cut:], m) for cut, m in reversed(chain))
        self._exclude = rules._exclude
        self._include = rules._include

    def file_ignored(self, name: str) -> bool:
        """True when the file ``name`` of this folder must not be indexed."""
        if self.ignored:
            return True
        lower = name.lower()
        if _hard(name, lower, False):
            return True
        rel = self.prefix + name
        if self._exclude is not None:
            user = self._exclude.check(rel)
            if user is not None:
                return user
        if _soft_file(name, lower):
            return True
        for sub, matcher in self._chain:
            hit = matcher.check(sub + name)
            if hit is not None:  # the deepest rule file with an opinion decides
                if hit:
                    return True
                break
        return self._include is not None and not self._include.check(rel)

    def dir_ignored(self, name: str) -> bool:
        """True when the sub-folder ``name`` must not be walked."""
        return self.ignored or self._rules.is_ignored(self.prefix + name, True)


class IgnoreRules:
    """Decides whether a path under ``root`` is left out of the index.

    Thread-safe. Rule files are read lazily, once per directory, and cached until
    :meth:`invalidate`; decisions about directories are cached too, so checking every
    file of a large tree costs about one dictionary lookup plus the file's own rules.
    ``private_dirs`` are folders that must never be indexed (repd's store and cache);
    None means the XDG data and cache folders.
    """

    def __init__(
        self,
        root: Path,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        use_gitignore: bool = True,
        *,
        private_dirs: Iterable[Path] | None = None,
    ) -> None:
        # abspath, not resolve(): paths must look like the ones watchdog reports.
        self.root = Path(os.path.abspath(root))
        self.use_gitignore = use_gitignore
        self._include = _Matcher(GitIgnoreSpec.from_lines(include)) if include else None
        self._exclude = _Matcher(GitIgnoreSpec.from_lines(exclude)) if exclude else None
        if private_dirs is None:
            from repd import paths  # local import: only the default needs the XDG lookup

            private_dirs = (paths.data_dir(), paths.cache_dir())
        self._private = frozenset(self._inside(p) for p in private_dirs) - {None, ""}
        self._lock = threading.RLock()
        self._specs: dict[str, _Matcher | None] = {}  # dir -> its own rule files
        self._chains: dict[str, tuple[tuple[int, _Matcher], ...]] = {}
        self._dirs: dict[str, bool] = {}  # dir -> ignored (itself or an ancestor)

    def _inside(self, path: Path) -> str | None:
        try:
            rel = Path(os.path.abspath(path)).relative_to(self.root).as_posix()
        except ValueError:
            return None
        return "" if rel == "." else rel

    def is_ignored(self, relpath: str, is_dir: bool) -> bool:
        """True when ``relpath`` (POSIX, relative to the root) must not be indexed."""
        relpath = relpath.strip("/")
        if relpath.startswith("./"):
            relpath = relpath[2:]
        if not relpath or relpath == ".":
            return False
        if is_dir:
            return self._dir_ignored(relpath)
        parent, _, name = relpath.rpartition("/")
        return self.for_dir(parent).file_ignored(name)

    def for_dir(self, dir_rel: str) -> DirRules:
        """The rules for the entries of the folder ``dir_rel`` ("" for the root), to ask
        about many of its files at the cost of one."""
        dir_rel = dir_rel.strip("/")
        if dir_rel == ".":
            dir_rel = ""
        ignored = bool(dir_rel) and self._dir_ignored(dir_rel)
        return DirRules(self, dir_rel, ignored, () if ignored else self._chain(dir_rel))

    def invalidate(self, dir_relpath: str = "") -> None:
        """Forget cached rules of ``dir_relpath``: one of its RULE_FILES changed."""
        key = dir_relpath.strip("/")
        with self._lock:
            self._specs.pop("" if key == "." else key, None)
            self._chains.clear()
            self._dirs.clear()

    def _dir_ignored(self, rel: str) -> bool:
        cached = self._dirs.get(rel)
        if cached is not None:
            return cached
        with self._lock:
            # Iterative, not recursive: a tree 1,000 folders deep must not hit Python's
            # recursion limit. Climb to the nearest ancestor already decided, then decide
            # the rest top-down (an ignored ancestor ignores everything below it).
            todo: list[str] = []
            cur = rel
            verdict = False
            while cur:
                known = self._dirs.get(cur)
                if known is not None:
                    verdict = known
                    break
                todo.append(cur)
                cur = cur.rpartition("/")[0]
            if len(self._dirs) + len(todo) >= _MAX_CACHED_DIRS:
                self._dirs.clear()
            for path in reversed(todo):
                if not verdict:
                    parent, _, name = path.rpartition("/")
                    verdict = self._own(path, parent, name, is_dir=True)
                self._dirs[path] = verdict
            return verdict

    def _own(self, rel: str, parent: str, name: str, *, is_dir: bool) -> bool:
        """The path's own verdict, its ancestors aside."""
        lower = name.lower()
        if _hard(name, lower, is_dir) or (is_dir and rel in self._private):
            return True
        user = None
        if self._exclude is not None:
            user = self._exclude.check(rel + "/" if is_dir else rel)
        if user is not None:
            return user
        if is_dir:
            if name in SOFT_DIRS or name.endswith(SOFT_DIR_SUFFIXES) or self._has_marker(rel):
                return True
        elif _soft_file(name, lower):
            return True
        return self._rule_files_ignore(rel, parent, is_dir)

    def _has_marker(self, rel: str) -> bool:
        base = self.root / rel
        return any(os.path.lexists(base / marker) for marker in DIR_MARKERS)

    def _rule_files_ignore(self, rel: str, parent: str, is_dir: bool) -> bool:
        for cut, matcher in reversed(self._chain(parent)):
            sub = rel[cut:]
            hit = matcher.check(sub + "/" if is_dir else sub)
            if hit is not None:  # deeper files override shallower ones
                return hit
        return False

    def _chain(self, dir_rel: str) -> tuple[tuple[int, _Matcher], ...]:
        """Specs that apply inside ``dir_rel``, root first, with the prefix length to cut."""
        chain = self._chains.get(dir_rel)
        if chain is not None:
            return chain
        with self._lock:
            # Iterative for the same reason as _dir_ignored: climb to a cached ancestor
            # (the root's chain at worst), then extend the chain folder by folder.
            todo: list[str] = []
            cur: str | None = dir_rel
            head: tuple[tuple[int, _Matcher], ...] = ()
            while cur is not None:
                known = self._chains.get(cur)
                if known is not None:
                    head = known
                    break
                todo.append(cur)
                cur = cur.rpartition("/")[0] if cur else None
            for path in reversed(todo):
                spec = self._spec(path)
                if spec is not None:
                    head = (*head, (len(path) + 1 if path else 0, spec))
                self._chains[path] = head
            return head

    def _spec(self, dir_rel: str) -> _Matcher | None:
        if dir_rel in self._specs:
            return self._specs[dir_rel]
        base = self.root / dir_rel
        names = [".gitignore", ".repdignore"] if self.use_gitignore else [".repdignore"]
        if self.use_gitignore and not dir_rel:
            names.insert(0, ".git/info/exclude")
        lines: list[str] = []
        for name in names:
            path = base / name
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                if is_transient(exc):
                    # Out of descriptors or an I/O error: reading on as if the file had
                    # no rules would index what it ignores. Retry later instead.
                    raise TransientError(f"cannot read {path}: {exc.strerror or exc}") from exc
                continue  # absent or unreadable (EACCES): no rules from it, as git does
            lines += _valid_lines(path, text.splitlines())
        spec = _Matcher(GitIgnoreSpec.from_lines(lines)) if lines else None
        self._specs[dir_rel] = spec
        return spec


def _valid_lines(path: Path, lines: list[str]) -> list[str]:
    """The lines of a rule file that compile; each bad one is logged as ``file:line``.

    pathspec raises on a whole file for one bad pattern; git skips just that line. The
    order of the kept lines is unchanged, so negation still works as written.
    """
    kept: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            GitIgnoreSpec.from_lines([line])
        except Exception as exc:  # pathspec raises its own errors and re.error alike
            log.warning("invalid_ignore_line", file=f"{path}:{number}", line=line[:200],
                        error=f"{type(exc).__name__}: {exc}")
            continue
        kept.append(line)
    return kept
