"""repd's own exceptions, one tree with one exit code each (kept import-light for the CLI).

Every problem a person can act on is a :class:`RepdError`; the CLI prints its message as
one line and exits with its ``exit_code``. Foreign exceptions (OSError, sqlite3, Qdrant)
are translated into this tree at the edge that meets them.

Exit codes:
  0  success
  1  an error a person can act on (``EngineError`` and the rest of the tree)
  2  bad configuration or usage (``ConfigError``); systemd's RestartPreventExitStatus=2
  3  no daemon answers (``DaemonUnavailable``)
  4  the daemon answers but is degraded (``repd status``)
  75 a temporary failure worth retrying later (``TransientError``, EX_TEMPFAIL)
  130 interrupted
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_NO_DAEMON = 3
EXIT_DEGRADED = 4
EXIT_TEMPFAIL = 75
EXIT_INTERRUPTED = 130

#: OS errors that say nothing about the file itself: the machine is short of something
#: (descriptors, memory, disk) or the device hiccupped. They are retried with backoff and
#: never mark a file unreadable or delete its points.
TRANSIENT_ERRNOS = frozenset({
    errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EAGAIN, errno.ENOSPC,
    errno.EDQUOT, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT,
})


class RepdError(Exception):
    """A problem a person can act on; the message is one clear line."""

    exit_code = EXIT_ERROR


class EngineError(RepdError):
    """The index cannot be opened or used as asked (a lock, a model mismatch, ...)."""


class ConfigError(RepdError):
    """Bad configuration; ``problems`` holds one human-readable line per problem."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class DaemonUnavailable(RepdError):  # noqa: N818 (named for what the user sees)
    """No daemon answers on the socket."""

    exit_code = EXIT_NO_DAEMON


class TransientError(RepdError):
    """A failure that is not about one file and may pass (no descriptors, disk full, I/O)."""

    exit_code = EXIT_TEMPFAIL


class DiskFullError(TransientError):
    """Free space in the data folder is below the reserve: writing waits for space."""


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying later rather than recording against a file."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    # sqlite3 errors and the store's errors are checked by name so that this module stays
    # import-light; a locked or full database, or a store write that failed, passes.
    name = type(exc).__name__
    if name == "OperationalError":
        text = str(exc).lower()
        return any(s in text for s in ("locked", "full", "disk i/o", "unable to open", "busy"))
    return name == "StoreError"
