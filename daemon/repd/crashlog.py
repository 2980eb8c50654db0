"""A fatal crash of the daemon leaves its threads' stacks on disk; the next start reports it.

A segmentation fault or an abort in a native library (the model runtime, the store's
engine) ends the process with no Python exception: nothing is logged, systemd restarts
the service, and ``repd status`` would show a fresh uptime and nothing else. Here the
daemon points :mod:`faulthandler` at ``crash.log`` in its data folder while it runs (the
folder's lock makes the file its own), removes the file when it stops cleanly, and at
the next start a file with something in it is the record of a crash: it is kept as
``last-crash.log``, logged, and shown by ``repd status`` for as long as that run lives.

A run ended by ``kill -9``, the OOM killer or a power cut leaves an empty file: the
kernel gave the process no chance to write. That is logged (the store recovers such
runs exactly) but not shown as a crash.
"""

from __future__ import annotations

import contextlib
import faulthandler
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from repd.log import get_logger
from repd.process import fatal_errors_to_stderr

log = get_logger("crash")

#: The file the running daemon's fatal errors go to.
CRASH_FILE = "crash.log"
#: Where the record of the previous run's crash is kept.
LAST_CRASH_FILE = "last-crash.log"
#: Bytes of a crash record read back (the first lines say what it was).
_HEAD_BYTES = 4096


@dataclass(frozen=True)
class Crash:
    """The previous run's fatal error, as its record says."""

    at: datetime
    error: str
    log: Path
    #: The record's first bytes (what logs quote).
    head: str


class CrashLog:
    """Arms :mod:`faulthandler` on ``folder/crash.log`` for the life of one run."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / CRASH_FILE
        self.last_path = folder / LAST_CRASH_FILE
        self._file: IO[str] | None = None

    def arm(self) -> Crash | None:
        """Look for the previous run's record, then send this run's fatal errors to the file.

        Returns the previous run's crash, or None. Never raises: a data folder that cannot
        take the file leaves the errors on stderr (the journal), as before.
        """
        crash = self._previous()
        try:
            # faulthandler writes to the descriptor itself, from the signal handler: no
            # Python buffer stands between a dying process and the file.
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (held open)
            faulthandler.enable(file=self._file, all_threads=True)
        except OSError as exc:
            log.warning("crash_log_unavailable", path=str(self.path), error=str(exc))
            self._file = None
        return crash

    def disarm(self) -> None:
        """A clean stop: fatal errors go back to stderr and the empty file goes."""
        if self._file is None:
            return
        fatal_errors_to_stderr()
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._file = None

    def _previous(self) -> Crash | None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return None  # the last run stopped cleanly (or there was none)
        if size == 0:
            log.warning("previous_run_killed", detail="the last run ended without stopping "
                        "(killed, out of memory or a power cut); its writes are recovered")
            return None
        try:
            self.path.replace(self.last_path)
        except OSError as exc:
            log.warning("crash_log_unreadable", path=str(self.path), error=str(exc))
            return None
        crash = read_crash(self.last_path)
        if crash is None:
            log.warning("crash_log_unreadable", path=str(self.last_path))
            return None
        log.error("previous_run_crashed", error=crash.error, at=crash.at.isoformat(),
                  stacks=str(crash.log), record=crash.head)
        return crash


def read_crash(path: Path) -> Crash | None:
    """The crash the record at ``path`` tells of; None where there is none to read (no
    file, an empty one, an unreadable one)."""
    try:
        st = path.stat()
        if st.st_size == 0:
            return None
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(_HEAD_BYTES)
    except OSError:
        return None
    return Crash(at=datetime.fromtimestamp(st.st_mtime, UTC), error=fatal_error(head),
                 log=path, head=head)


def fatal_error(record: str) -> str:
    """``Segmentation fault`` from faulthandler's ``Fatal Python error: Segmentation fault``."""
    for line in record.splitlines():
        if line.startswith("Fatal Python error:"):
            return line.partition(":")[2].strip() or "fatal error"
    first = record.strip().splitlines()
    return first[0][:200] if first else "fatal error"
