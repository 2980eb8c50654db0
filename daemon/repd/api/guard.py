"""Keeps hostile or broken clients from exhausting the daemon: connection cap, request
deadline, file-descriptor limit and rate-limited error logs.

Measured before these guards: 60 connections held open under a 48-descriptor limit made
every ``accept()`` fail, wrote 22 MB of logs in 10 s and broke indexing (no descriptor
was left for files); uvicorn never closes a connection that sends nothing, and its
``limit_concurrency`` answers 503 to *new* requests once idle connections fill it, which
would lock ``repd status`` out instead of the idle clients.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from repd.log import get_logger

log = get_logger("api")

#: A client has this long to send a whole request (headers and body) after connecting or
#: after its previous response; then the connection is closed (slowloris, idle sockets).
REQUEST_DEADLINE_S = 10.0
#: At most this many connections at once, whatever the descriptor limit allows.
MAX_CONNECTIONS = 128
#: Descriptors kept for everything but the API (model files, SQLite, store, inotify).
_FD_RESERVE = 96
#: Seconds between two log lines of the same kind of connection trouble.
LOG_EVERY_S = 10.0


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns ``(before, after)``.

    systemd (and most logins) hand out a soft limit of 1024 with a far higher hard one,
    leaving it to programs that never use ``select()`` to raise it, as repd may: asyncio
    uses epoll, and nothing else here calls ``select()``. Call it once, early in start-up.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel still caps it at fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as fh:
                target = int(fh.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("nofile_limit_not_raised", soft=soft, hard=hard, error=str(exc))
            return soft, soft
        log.info("nofile_limit_raised", before=soft, after=target)
        return soft, target
    return soft, soft


def connection_cap() -> int:
    """How many API connections may be open at once under the current descriptor limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, (soft - _FD_RESERVE) // 2))


class RateLimitedLog:
    """Logs one line per kind of event every ``every`` seconds, with the count held back."""

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, event: str, **fields: Any) -> None:
        """Log ``event`` unless one was logged within the last ``every`` seconds."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(event)
            if last is not None and now - last < self.every:
                self._held[event] = self._held.get(event, 0) + 1
                return
            self._last[event] = now
            held = self._held.pop(event, 0)
        log.warning(event, **fields, **({"similar_held_back": held} if held else {}))


class _RateLimitFilter(logging.Filter):
    """For the stdlib loggers of uvicorn and asyncio: the same record text at most once per
    ``every`` seconds (a client sending garbage in a loop must not flood the journal)."""

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        super().__init__("repd-rate-limit")
        self.every = every
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                return False
            if len(self._last) > 1000:
                self._last.clear()
            self._last[key] = now
            return True


def install_log_limits() -> None:
    """Rate-limit the library loggers the API's clients can make talk (idempotent)."""
    for name in ("uvicorn.error", "uvicorn", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RateLimitFilter) for f in logger.filters):
            logger.addFilter(_RateLimitFilter())


class ConnectionGuard:
    """The connections of one API server, oldest first, and what to do past the cap."""

    def __init__(self, cap: int, deadline_s: float = REQUEST_DEADLINE_S) -> None:
        self.cap = cap
        self.deadline_s = deadline_s
        self.live: dict[GuardedH11, None] = {}  # insertion order = age
        self.trouble = RateLimitedLog()

    def admit(self, conn: GuardedH11) -> bool:
        """Take ``conn`` in; past the cap, close the oldest idle connection to make room,
        or refuse ``conn`` itself when every other one is busy with a request."""
        self.live[conn] = None
        if len(self.live) <= self.cap:
            return True
        victim = next((c for c in self.live if c.waiting and c is not conn), None)
        if victim is None:
            self.trouble.warning("api_connection_refused", reason="every connection is busy",
                                 limit=self.cap)
            self.live.pop(conn, None)
            return False
        self.trouble.warning("api_idle_connection_closed", reason="connection limit",
                             limit=self.cap)
        victim.close_idle()
        return True

    def forget(self, conn: GuardedH11) -> None:
        """``conn`` is gone."""
        self.live.pop(conn, None)

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's exception handler: ``accept()`` failing for want of descriptors
        repeats every second for as long as it lasts; say so once in a while."""
        exc = context.get("exception")
        self.trouble.warning("api_loop_error", message=str(context.get("message", "")),
                             error=repr(exc) if exc is not None else None)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a request deadline and a place under a ConnectionGuard."""

    guard: ConnectionGuard  # set on the subclass made by guarded_protocol()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._awaited: object = None  # the cycle that was current when the deadline armed

    @property
    def waiting(self) -> bool:
        """True while no request is being served: only the client can move it on."""
        return self._deadline is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()
        if not self.guard.admit(self):
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if (self._deadline is not None and cycle is not None and cycle is not self._awaited
                and not cycle.more_body):
            self._disarm()  # a whole request is in: the time it takes to answer is ours

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def close_idle(self) -> None:
        """Close this connection, which is waiting for its client."""
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._awaited = self.cycle
        self._deadline = self.loop.call_later(self.guard.deadline_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.guard.trouble.warning("api_slow_client_closed",
                                       deadline_s=self.guard.deadline_s)
            self.transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11]:
    """A protocol class for ``uvicorn.Config(http=...)`` whose connections ``guard`` keeps."""
    return type("GuardedH11ForServer", (GuardedH11,), {"guard": guard})
