"""Turns one changed file into a plan: read, hash, extract, chunk, and the points it wants."""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from repd.adapters.extract import extract_bytes, read_file, refuse_secrets
from repd.core.chunking import chunk_document
from repd.core.identity import StatSig, content_hash, fs_path, point_id
from repd.core.secrets import SecretPolicy
from repd.core.types import Chunk, SkipFile
from repd.errors import TransientError, is_transient
from repd.pipeline.scanner import real_bases


@dataclass
class FilePlan:
    """What should become of one file: new chunks, a skip with a reason, or removal.

    ``relpath`` is the stored form of the name (always valid UTF-8, see
    :func:`repd.core.identity.stored_path`): it goes to the manifest, ids and payloads.
    """

    root: str
    relpath: str
    sig: StatSig
    started_ns: int
    action: str  # "index" | "skip" | "fail" | "delete" | "touch"
    content_hash: str | None = None
    chunks: list[Chunk] = field(default_factory=list)
    point_ids: list[str] = field(default_factory=list)
    reason: str | None = None
    detail: str | None = None


ZERO_SIG = StatSig(0, 0, 0, 0)


# A file replaced between its check and its read is checked again; past this many
# replacements in a row the read is retried later instead (TransientError).
_READ_ATTEMPTS = 3


class Planner:
    """Reads and chunks files; needs a token counter only when a file really changed.

    ``follow_symlinks`` and ``allowed_roots`` decide what may be read: without following,
    a symlink is recorded (``symlink``) and never opened; with it, a link may lead only
    into its own root or another configured root (``outside_roots`` otherwise).
    """

    def __init__(self, max_file_bytes: int,
                 tokenizer: Callable[[], tuple[Callable[[list[str]], list[int]], int]],
                 *, follow_symlinks: bool = False,
                 allowed_roots: Sequence[Path] = (),
                 allow_secrets: Sequence[str] = ()) -> None:
        self.max_file_bytes = max_file_bytes
        #: Secret rules and the globs that opt files back in (repd.core.secrets).
        self.secrets = SecretPolicy(tuple(allow_secrets))
        self._tokenizer = tokenizer
        self.follow_symlinks = follow_symlinks
        self.allowed_roots: tuple[Path, ...] = tuple(allowed_roots)

    def plan(self, root: Path, relpath: str, known_hash: str | None,
             known_state: str | None) -> FilePlan:
        """Plan one file that exists (or existed a moment ago) at ``root/relpath``.

        ``relpath`` is the stored form of the name (see :func:`stored_path`); the file is
        reached through :func:`fs_path`. Raises TransientError for failures that are not
        about the file (out of descriptors, I/O errors): nothing is recorded for it then.
        """
        root_s = str(root)
        started = time.time_ns()
        path = root / fs_path(relpath)
        within = real_bases(root, self.allowed_roots if self.follow_symlinks else ())
        for _ in range(_READ_ATTEMPTS):
            checked = self._check(path)
            if not isinstance(checked, os.stat_result):  # (a stat result is a tuple too)
                reason, detail = checked
                if reason == "delete":
                    return FilePlan(root_s, relpath, ZERO_SIG, started, "delete")
                if reason == "keep":  # rows and points stay; a zero stat makes the next
                    # scan look at the file again once its folder can be read
                    return FilePlan(root_s, relpath, ZERO_SIG, started, "touch",
                                    content_hash=known_hash)
                return FilePlan(root_s, relpath, ZERO_SIG, started, "skip", reason=reason,
                                detail=detail)
            sig = StatSig.of(checked)
            try:
                refuse_secrets(self.secrets, path, relpath)  # by name: before a byte is read
                data = read_file(path, self.max_file_bytes, expect=checked,
                                 follow_symlinks=self.follow_symlinks, within=within)
                refuse_secrets(self.secrets, path, relpath, data)
            except SkipFile as skip:
                if skip.reason == "replaced":
                    continue  # swapped between the check and the open: check it again
                if skip.reason == "vanished":
                    return FilePlan(root_s, relpath, ZERO_SIG, started, "delete")
                return FilePlan(root_s, relpath, sig, started, "skip", reason=skip.reason,
                                detail=skip.detail)
            break
        else:
            raise TransientError(f"{path}: replaced again and again while being read")
        digest = content_hash(data)
        if digest == known_hash and known_state in ("indexed", "skipped"):
            return FilePlan(root_s, relpath, sig, started, "touch", content_hash=digest)
        try:
            doc = extract_bytes(data, os.path.basename(relpath))
            count, max_tokens = self._tokenizer()
            chunks = chunk_document(doc, count, max_tokens)
        except SkipFile as skip:
            return FilePlan(root_s, relpath, sig, started, "skip", content_hash=digest,
                            reason=skip.reason, detail=skip.detail)
        except Exception as exc:  # one bad file must never stop the run
            return FilePlan(root_s, relpath, sig, started, "fail", content_hash=digest,
                            reason="extract_error", detail=f"{type(exc).__name__}: {exc}")
        if not chunks:
            return FilePlan(root_s, relpath, sig, started, "skip", content_hash=digest,
                            reason="empty", detail="no text to index")
        ids = [point_id(root_s, relpath, c.ordinal, c.hash) for c in chunks]
        return FilePlan(root_s, relpath, sig, started, "index", content_hash=digest,
                        chunks=chunks, point_ids=ids)

    def _check(self, path: Path) -> os.stat_result | tuple[str, str]:
        """The stat the read will be held to, or ``(reason, detail)`` when there is none.

        ``lstat`` first: a symlink is recorded, not read, unless links are followed. The
        reason ``delete`` means the path is really gone (ENOENT), the one case that
        removes a file from the index; ``keep`` means a folder above it cannot be
        searched (EACCES on lstat is never about the file itself): what the index holds
        for it stays, and the scan records the folder's problem.
        """
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return "delete", ""
        except PermissionError:
            return "keep", ""
        except OSError as exc:
            if is_transient(exc):
                raise TransientError(f"cannot stat {path}: {exc.strerror or exc}") from exc
            return "unreadable", exc.strerror or str(exc)
        if not stat_mod.S_ISLNK(st.st_mode):
            return st
        if not self.follow_symlinks:
            return "symlink", "symlinks are not followed"
        try:
            return path.stat()
        except FileNotFoundError:
            return "unreadable", "dangling symlink"  # recorded, as the scanner records it
        except OSError as exc:
            if is_transient(exc):
                raise TransientError(f"cannot stat {path}: {exc.strerror or exc}") from exc
            if exc.errno == errno.ELOOP:
                return "unreadable", "symlink loop"
            return "unreadable", exc.strerror or str(exc)
