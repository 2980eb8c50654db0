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

As in git, nothing inside an ignored directory can be re-included.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from pathspec import GitIgnoreSpec

#: Files whose change alters the rules of their directory (the watcher invalidates on them).
RULE_FILES = frozenset({".gitignore", ".repdignore", "pyvenv.cfg", "CACHEDIR.TAG"})

# --- hard rules ---------------------------------------------------------------------
VCS_DIRS = frozenset({".git", ".hg", ".svn", ".jj", ".bzr", "_darcs"})
SECRET_DIRS = frozenset({".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".password-store"})
SECRET_NAMES = frozenset(
    {
        ".env",
        ".envrc",
        ".netrc",
        "_netrc",
        ".npmrc",
        ".pypirc",
        ".pgpass",
        ".git-credentials",
        ".htpasswd",
        ".boto",
        ".s3cfg",
        ".dockercfg",
        ".vault-token",
        ".histfile",
        ".lesshst",
    }
)
SECRET_PREFIXES = (".env.", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519")
SECRET_SUFFIXES = (
    ".pem",
    ".key",
    ".p12",
    ".pfx",
    ".jks",
    ".keystore",
    ".kdbx",
    ".tfstate",
    ".tfstate.backup",
)
SECRET_JSON_PREFIXES = ("credentials", "client_secret", "service-account")

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
    if len(name) > 1 and name[0] == "#" and name[-1] == "#":  # emacs autosave
        return True
    if name[0] == "." and (name[-4:-1] == ".sw" or ".tmp" in name):  # vim .x.swn, .x.tmp123
        return True
    dot = lower.rfind(".")
    return dot > 0 and lower[dot + 1 :] in BINARY_EXTENSIONS


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
        self._include = GitIgnoreSpec.from_lines(include) if include else None
        self._exclude = GitIgnoreSpec.from_lines(exclude) if exclude else None
        if private_dirs is None:
            from repd import paths  # local import: only the default needs the XDG lookup

            private_dirs = (paths.data_dir(), paths.cache_dir())
        self._private = frozenset(self._inside(p) for p in private_dirs) - {None, ""}
        self._lock = threading.RLock()
        self._specs: dict[str, GitIgnoreSpec | None] = {}  # dir -> its own rule files
        self._chains: dict[str, tuple[tuple[int, GitIgnoreSpec], ...]] = {}
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
        if parent and self._dir_ignored(parent):
            return True
        if self._own(relpath, parent, name, is_dir=False):
            return True
        return self._include is not None and not self._include.match_file(relpath)

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
            parent, _, name = rel.rpartition("/")
            result = (bool(parent) and self._dir_ignored(parent)) or self._own(
                rel, parent, name, is_dir=True
            )
            if len(self._dirs) >= _MAX_CACHED_DIRS:
                self._dirs.clear()
            self._dirs[rel] = result
            return result

    def _own(self, rel: str, parent: str, name: str, *, is_dir: bool) -> bool:
        """The path's own verdict, its ancestors aside."""
        lower = name.lower()
        if _hard(name, lower, is_dir) or (is_dir and rel in self._private):
            return True
        user = None
        if self._exclude is not None:
            user = self._exclude.check_file(rel + "/" if is_dir else rel).include
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
        verdict = False
        for cut, spec in self._chain(parent):
            sub = rel[cut:]
            hit = spec.check_file(sub + "/" if is_dir else sub).include
            if hit is not None:  # deeper files override shallower ones
                verdict = hit
        return verdict

    def _chain(self, dir_rel: str) -> tuple[tuple[int, GitIgnoreSpec], ...]:
        """Specs that apply inside ``dir_rel``, root first, with the prefix length to cut."""
        chain = self._chains.get(dir_rel)
        if chain is not None:
            return chain
        with self._lock:
            head = self._chain(dir_rel.rpartition("/")[0]) if dir_rel else ()
            spec = self._spec(dir_rel)
            chain = (*head, (len(dir_rel) + 1 if dir_rel else 0, spec)) if spec else head
            self._chains[dir_rel] = chain
            return chain

    def _spec(self, dir_rel: str) -> GitIgnoreSpec | None:
        if dir_rel in self._specs:
            return self._specs[dir_rel]
        base = self.root / dir_rel
        names = [".gitignore", ".repdignore"] if self.use_gitignore else [".repdignore"]
        if self.use_gitignore and not dir_rel:
            names.insert(0, ".git/info/exclude")
        lines: list[str] = []
        for name in names:
            try:
                lines += (base / name).read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:  # absent or unreadable: no rules from it
                continue
        spec = GitIgnoreSpec.from_lines(lines) if any(s.strip() for s in lines) else None
        self._specs[dir_rel] = spec
        return spec
