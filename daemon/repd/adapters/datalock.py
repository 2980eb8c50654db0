"""repd's own lock on a data folder, taken before anything opens the index's store.

Why repd needs its own: Qdrant Edge locks a shard's WAL, but only *after* it has started
loading it, and loading truncates the payload indexes' ``tracker_journal.dat`` files.
A second process that opens a shard in use (``repd query --local``, ``repd doctor``, a
query from a shell whose ``XDG_RUNTIME_DIR`` hides the daemon's socket) fails on the WAL
lock, but the owner's next flush then fails for good ("Tracker journal ... is shorter
than expected"). Edge has no read-only mode, so no two processes may ever load a shard at
once, readers included.

Two ``flock`` files in the data folder:

* ``writer.lock``: held *exclusively* by the one writer (``repd run`` or ``repd index``)
  for its whole life, and *shared* by every reader while it has the store open. Its text
  names the writer (``{"pid": ..., "command": ...}``) so a blocked reader can say who.
* ``store.lock``: held exclusively by a reader while it has the store open, because two
  readers may not load the shard at once either; a reader waits briefly for another.

A reader that finds the writer never touches the store: it gets :class:`IndexBusy`,
which carries the writer and, for a daemon, the socket the daemon recorded in
``daemon.json`` (see :func:`announce_daemon`), so the CLI can ask the daemon instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from repd.errors import EXIT_ERROR, EXIT_TEMPFAIL, ConfigError, EngineError, TransientError
from repd.process import process_exists

WRITER_LOCK = "writer.lock"
STORE_LOCK = "store.lock"
DAEMON_FILE = "daemon.json"

#: How long a writer waits for readers to close the store (a query holds it for well
#: under a second; ``repd doctor`` a little longer), and a reader for another reader.
WRITER_WAIT_S = 30.0
READER_WAIT_S = 30.0
_POLL_S = 0.1

#: Data-folder permissions: the index holds the text of a person's files.
PRIVATE_UMASK = 0o077


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its holder wrote it (pid None when it could not be read)."""

    pid: int | None
    command: str

    def describe(self) -> str:
        """``pid 123 (`repd index`)``, or just the command when the pid is unknown."""
        return f"pid {self.pid} (`{self.command}`)" if self.pid else f"`{self.command}`"

    def daemon_name(self) -> str:
        """``the repd daemon (pid 123)``."""
        return "the repd daemon" + (f" (pid {self.pid})" if self.pid else "")

    @property
    def is_daemon(self) -> bool:
        """True when the holder is a ``repd run`` daemon."""
        return self.command.endswith(" run")


@dataclass(frozen=True)
class DaemonRecord:
    """What a running daemon recorded in its data folder: its pid and API socket."""

    pid: int
    socket: str


class IndexBusy(EngineError):  # noqa: N818 - a state, like DaemonNotRunning
    """A reader found the data folder held by a writer; the store was not touched.

    ``daemon`` is set when the writer is a daemon that recorded its socket, so the
    caller can ask it instead. The exit code is 75 (try again) while a one-shot
    ``repd index`` writes, and 1 when a daemon does (it will not go away by itself).
    """

    def __init__(self, data_dir: Path, holder: Holder, daemon: DaemonRecord | None) -> None:
        self.data_dir = data_dir
        self.holder = holder
        self.daemon = daemon
        #: A daemon holds it (by its command, or by the record it left in the folder).
        self.by_daemon = holder.is_daemon or daemon is not None
        if self.by_daemon:
            where = f" on {daemon.socket}" if daemon else ""
            msg = (f"the index in {data_dir} is being written by {holder.daemon_name()}; "
                   f"ask it through its API{where} (without --local): the index cannot be "
                   "opened twice")
            self.exit_code = EXIT_ERROR
        else:
            msg = (f"the index in {data_dir} is being written by {holder.describe()}; "
                   "query again when it finishes")
            self.exit_code = EXIT_TEMPFAIL
        super().__init__(msg)


def own_command() -> str:
    """How this process is known to a person: ``repd run``, ``repd index``, or its program."""
    argv = sys.argv
    prog = Path(argv[0]).name if argv and argv[0] else "python"
    if prog in ("repd", "cli.py", "__main__.py", "-m") and len(argv) > 1:
        return f"repd {argv[1]}"
    return prog


def _open_lock_file(path: Path, write: bool) -> IO[str]:
    """Open (creating if allowed) a lock file; a folder we cannot write is a config problem."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        return os.fdopen(fd, "r+")
    except OSError as exc:
        if write or exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise _folder_error(path.parent, exc) from None
    # A reader in a folder it cannot write can still lock a lock file that exists
    # (flock needs no write access); it just cannot record its name there.
    try:
        return os.fdopen(os.open(path, os.O_RDONLY), "r")
    except OSError as exc:
        raise _folder_error(path.parent, exc) from None


def _folder_error(folder: Path, exc: OSError) -> ConfigError:
    why = exc.strerror or str(exc)
    return ConfigError([
        f"store.path: cannot write to the data folder {folder} ({why}): make it writable "
        f"(chmod u+rwx {folder}) or point store.path at a folder you own"])


def _try(fh: IO[str], flags: int) -> bool:
    try:
        fcntl.flock(fh, flags | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(fh: IO[str], fallback: str) -> Holder:
    try:
        fh.seek(0)
        data = json.loads(fh.read() or "{}")
        return Holder(int(data["pid"]), str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return Holder(None, fallback)


def _write_holder(fh: IO[str]) -> None:
    if not fh.writable():
        return
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "command": own_command()}))
    fh.flush()


def _clear_holder(fh: IO[str]) -> None:
    # Cleared before unlocking, so a later reader never names a process that has left.
    if fh.writable():
        with contextlib.suppress(OSError):
            fh.seek(0)
            fh.truncate()


class DataLock:
    """A held lock on a data folder: :meth:`writer` or :meth:`reader`; :meth:`release` it."""

    def __init__(self, data_dir: Path, role: str, files: list[IO[str]]) -> None:
        self.data_dir = data_dir
        self.role = role
        self._files = files

    @classmethod
    def writer(cls, data_dir: Path, wait_s: float = WRITER_WAIT_S) -> DataLock:
        """Own the folder exclusively (waiting up to ``wait_s`` for readers to leave).

        Raises EngineError when another writer holds it, TransientError when readers
        keep it past ``wait_s``, ConfigError when the folder cannot be written.
        """
        fh = _open_lock_file(data_dir / WRITER_LOCK, write=True)
        # The store lock is created here so that readers in a read-only folder find it.
        _open_lock_file(data_dir / STORE_LOCK, write=True).close()
        deadline = time.monotonic() + wait_s
        while not _try(fh, fcntl.LOCK_EX):
            if _try(fh, fcntl.LOCK_SH):
                # Only readers hold it (a writer's exclusive lock would refuse this one):
                # they leave within a second or so.
                fcntl.flock(fh, fcntl.LOCK_UN)
                if time.monotonic() < deadline:
                    time.sleep(_POLL_S)
                    continue
                reader = _reader_holder(data_dir)
                fh.close()
                raise TransientError(
                    f"the index in {data_dir} is open by {reader.describe()}; "
                    "try again when it finishes")
            holder = _read_holder(fh, "another repd process")
            fh.close()
            raise EngineError(
                f"the index in {data_dir} is being written by {holder.describe()}; "
                "stop it first, or use the running daemon (repd status)")
        _write_holder(fh)
        return cls(data_dir, "writer", [fh])

    @classmethod
    def reader(cls, data_dir: Path, wait_s: float = READER_WAIT_S) -> DataLock:
        """Share the folder with other readers, and own the store among them.

        Raises IndexBusy (without waiting) when a writer holds the folder, and
        TransientError when another reader keeps the store past ``wait_s``.
        """
        wfh = _open_lock_file(data_dir / WRITER_LOCK, write=False)
        if not _try(wfh, fcntl.LOCK_SH):
            holder = _read_holder(wfh, "another repd process")
            wfh.close()
            raise IndexBusy(data_dir, holder, read_daemon_record(data_dir, holder.pid))
        sfh = _open_lock_file(data_dir / STORE_LOCK, write=False)
        deadline = time.monotonic() + wait_s
        while not _try(sfh, fcntl.LOCK_EX):
            if time.monotonic() >= deadline:
                other = _read_holder(sfh, "another repd process")
                sfh.close()
                wfh.close()
                raise TransientError(
                    f"the index in {data_dir} is open by {other.describe()}; "
                    "try again when it finishes")
            time.sleep(_POLL_S)
        _write_holder(sfh)
        return cls(data_dir, "reader", [sfh, wfh])

    def release(self) -> None:
        """Let go (idempotent); closing the files drops the flocks."""
        files, self._files = self._files, []
        for fh in files:
            _clear_holder(fh)
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


def busy_by_writer(data_dir: Path) -> IndexBusy | None:
    """IndexBusy (to raise) if a writer holds ``data_dir`` right now, else None.

    A probe only: it holds nothing afterwards, so the answer may change at once; the
    reader lock taken before the store is opened is what counts.
    """
    try:
        fh = open(data_dir / WRITER_LOCK)  # noqa: SIM115 - closed below
    except OSError:
        return None  # no writer ever ran here (or we cannot tell): the reader lock decides
    try:
        if _try(fh, fcntl.LOCK_SH):
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None
        holder = _read_holder(fh, "another repd process")
        return IndexBusy(data_dir, holder, read_daemon_record(data_dir, holder.pid))
    finally:
        fh.close()


def _reader_holder(data_dir: Path) -> Holder:
    try:
        with (data_dir / STORE_LOCK).open() as fh:
            return _read_holder(fh, "a reader (`repd query` or `repd doctor`)")
    except OSError:
        return Holder(None, "a reader (`repd query` or `repd doctor`)")


# -- the daemon's record -----------------------------------------------------------------


def read_daemon_record(data_dir: Path, pid: int | None = None) -> DaemonRecord | None:
    """The daemon recorded in ``data_dir`` if it is still alive (and is ``pid``, if given)."""
    try:
        data = json.loads((data_dir / DAEMON_FILE).read_text(encoding="utf-8"))
        record = DaemonRecord(int(data["pid"]), str(data["socket"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid is not None and record.pid != pid:
        return None
    return record if process_exists(record.pid) else None


def announce_daemon(data_dir: Path, socket: Path | str) -> None:
    """Record this daemon's pid and API socket in its data folder (atomically).

    Any process that opens the data folder and finds it held (a query from a shell with
    another ``XDG_RUNTIME_DIR``, ``--socket`` pointing elsewhere) reaches the daemon
    through this instead of touching the store.
    """
    tmp = data_dir / f".{DAEMON_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"pid": os.getpid(), "socket": os.fspath(socket)}, fh)
    tmp.replace(data_dir / DAEMON_FILE)


def retract_daemon(data_dir: Path) -> None:
    """Remove this daemon's record (only if it is ours: a newer daemon may have replaced it)."""
    record = read_daemon_record(data_dir)
    if record is None or record.pid == os.getpid():
        with contextlib.suppress(OSError):
            (data_dir / DAEMON_FILE).unlink()


# -- permissions -------------------------------------------------------------------------

_umask_lock = threading.Lock()
_umask_users = 0
_umask_saved = 0


def enter_private_umask() -> None:
    """Make everything this process creates private (0700 folders, 0600 files).

    Qdrant Edge creates its files itself, at open and later (WAL segments, HNSW
    segments), so the process umask is the one place that covers them all. Counted, so
    nested engines in one process (tests) restore the caller's umask only at the end.
    """
    global _umask_users, _umask_saved
    with _umask_lock:
        old = os.umask(PRIVATE_UMASK)
        if _umask_users == 0:
            _umask_saved = old
        _umask_users += 1


def leave_private_umask() -> None:
    """Undo one :func:`enter_private_umask`; the last one restores the old umask."""
    global _umask_users
    with _umask_lock:
        if _umask_users == 0:
            return
        _umask_users -= 1
        if _umask_users == 0:
            os.umask(_umask_saved)


def loose_entries(data_dir: Path, limit: int = 1_000_000) -> list[Path]:
    """Entries under (and including) ``data_dir`` that group or others may use."""
    out: list[Path] = []
    for path in _walk(data_dir, limit):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not _is_link(st.st_mode) and st.st_mode & 0o077:
            out.append(path)
    return out


def tighten(data_dir: Path) -> int:
    """Remove group and other permissions from everything we own in ``data_dir``.

    Returns how many entries changed. Symlinks and other users' files are left alone.
    """
    changed = 0
    uid = os.getuid()
    for path in loose_entries(data_dir):
        try:
            st = os.lstat(path)
            if st.st_uid != uid:
                continue
            path.chmod(st.st_mode & 0o7700)
            changed += 1
        except OSError:
            continue
    return changed


def _is_link(mode: int) -> bool:
    return stat.S_ISLNK(mode)


def _walk(top: Path, limit: int) -> list[Path]:
    # Iterative, no symlink following: the data folder is ours and shallow, but a deep or
    # looping tree someone put there must not crash start-up.
    out = [top]
    stack = [top]
    while stack and len(out) < limit:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                for de in it:
                    p = Path(de.path)
                    out.append(p)
                    if de.is_dir(follow_symlinks=False):
                        stack.append(p)
        except OSError:
            continue
    return out
