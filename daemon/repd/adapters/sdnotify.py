"""sd_notify(3) for repd: the notify-socket client and the progress-gated watchdog."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from repd.log import get_logger

_log = get_logger("sdnotify")


def _monotonic_usec() -> int:
    # systemd compares MONOTONIC_USEC with its own CLOCK_MONOTONIC reading, so it must be
    # that clock exactly (time.monotonic() is CLOCK_MONOTONIC on Linux, but say so).
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _parse_address(raw: str) -> str | None:
    """NOTIFY_SOCKET as a socket address, or None when repd cannot speak to it."""
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        # Abstract namespace: a leading NUL instead of the '@'.
        return "\0" + raw[1:]
    # systemd >= 254 may hand out "vsock:CID:PORT" inside VMs; repd never runs as a VM's
    # payload, so saying so once beats half-implementing AF_VSOCK.
    _log.warning("notify socket address not supported; systemd notifications off",
                 notify_socket=raw)
    return None


class Notifier:
    """Sends sd_notify(3) messages to the service manager; a no-op without NOTIFY_SOCKET.

    Every method returns whether the datagram was handed to the socket. Failures are
    logged (the first of a run at warning level, repeats at debug) and never raised:
    losing a notification must not take the daemon down.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _parse_address(raw) if raw else None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._monotonic_usec = monotonic_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @property
    def enabled(self) -> bool:
        """True when a usable NOTIFY_SOCKET was given."""
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram (systemd applies them together)."""
        if self._address is None:
            return False
        payload = "\n".join(fields).encode("utf-8")
        try:
            with self._lock:
                if self._sock is None:
                    # Blocking on purpose, as libsystemd does: the manager's receive buffer
                    # is large, and dropping READY=1 under pressure would fail the start.
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(payload, self._address)
        except OSError as exc:
            self._report_failure(exc, fields)
            return False
        if self._failing:
            self._failing = False
            _log.info("notify socket reachable again")
        return True

    def _report_failure(self, exc: OSError, fields: tuple[str, ...]) -> None:
        # The watchdog pings every few seconds; one warning per outage is enough.
        level = _log.debug if self._failing else _log.warning
        self._failing = True
        level("sd_notify failed", error=str(exc), message=fields[0] if fields else "")

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) is complete; send only once really serving."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.send(*fields)

    def status(self, text: str) -> bool:
        """STATUS=: the one-line state shown by ``systemctl status``."""
        return self.send(_status_field(text))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun (the watchdog stops being enforced)."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.send(*fields)

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC; follow with ``ready()`` once reloaded.

        systemd >= 253 uses the timestamp to tell this reload apart from an earlier one.
        """
        return self.send("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_usec()}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: one keep-alive ping. Prefer WatchdogGate, which ties it to progress."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, usec: int) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for ``usec`` more from now during start, reload or stop.

        It only ever extends, and only until that moment: send it again before it runs out.
        """
        if usec <= 0:
            raise ValueError("usec must be positive")
        return self.send(f"EXTEND_TIMEOUT_USEC={int(usec)}")

    def set_watchdog_timeout(self, usec: int) -> bool:
        """WATCHDOG_USEC: change the watchdog timeout at run time (also resets the timer)."""
        if usec <= 0:
            raise ValueError("usec must be positive")
        return self.send(f"WATCHDOG_USEC={int(usec)}")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when systemd expects no pings from us.

        Follows sd_watchdog_enabled(3): WATCHDOG_USEC must be a positive integer and
        WATCHDOG_PID, when set, must name this process (a child inheriting the environment
        must not ping on the parent's behalf).
        """
        if self._address is None or not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            _log.warning("ignoring malformed WATCHDOG_USEC", value=self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                _log.warning("ignoring malformed WATCHDOG_PID", value=self._watchdog_pid)
                return None
            if pid != os.getpid():
                return None
        return usec / 1_000_000

    def close(self) -> None:
        """Close the socket; later sends reopen it."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status_field(text: str) -> str:
    # A newline would start a new KEY=VALUE field and could smuggle in READY=1 and the like.
    return "STATUS=" + " ".join(text.splitlines())


class WatchdogGate:
    """Sends WATCHDOG=1 only while every registered pipeline stage shows signs of life.

    Stages call :meth:`beat` whenever they make progress *and* whenever they wake up idle
    and healthy (a consumer returning from a timed ``queue.get``), at least every
    :attr:`idle_wait` seconds. :meth:`tick` pings systemd only if every registered stage
    beat within ``interval`` seconds; a stage stuck inside a call that never returns
    (a wedged GPU, a hung model) therefore stops the pings, and systemd kills and
    restarts the service after ``WatchdogSec``.

    With ``interval=None`` (no watchdog requested) the gate still records beats, so the
    pipeline calls it unconditionally and :meth:`ages` can feed status output; ``tick``
    then never pings and ``start`` does nothing.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval is not None and interval <= 0:
            raise ValueError("interval must be positive")
        self._notifier = notifier
        self._interval = interval
        self._clock = clock
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled: tuple[str, ...] = ()
        self._graces = 0
        self._warned_unknown: set[str] = set()
        self._dead: set[str] = set()

    @property
    def interval(self) -> float | None:
        """The longest a stage may stay silent, in seconds (systemd's WatchdogSec)."""
        return self._interval

    @property
    def idle_wait(self) -> float:
        """The longest a stage should block in an idle wait between two beats."""
        # A quarter leaves room for the tick period (interval / 2) plus scheduling jitter.
        return self._interval / 4 if self._interval is not None else 15.0

    def register(self, stage: str) -> None:
        """Watch ``stage`` from now on; it counts as having just beaten."""
        with self._lock:
            self._beats[stage] = self._clock()

    def unregister(self, stage: str) -> None:
        """Stop watching ``stage`` (it finished, or shutdown has begun)."""
        with self._lock:
            self._beats.pop(stage, None)

    def beat(self, stage: str) -> None:
        """Record that ``stage`` is alive; cheap enough to call every loop iteration."""
        now = self._clock()
        with self._lock:
            if stage in self._beats:
                self._beats[stage] = now
                return
            warn = stage not in self._warned_unknown
            self._warned_unknown.add(stage)
        if warn:
            # Ignored rather than auto-registered: after unregister() during shutdown a
            # late beat must not put the stage back under watch.
            _log.warning("watchdog beat from an unregistered stage ignored", stage=stage)

    def fail(self, component: str) -> None:
        """A component is dead and cannot be restarted: withhold every ping from now on,
        so that systemd restarts the service after ``WatchdogSec``."""
        with self._lock:
            self._dead.add(component)
        _log.error("watchdog withheld for good: component dead", component=component)

    def ages(self) -> dict[str, float]:
        """Seconds since each registered stage last beat."""
        now = self._clock()
        with self._lock:
            return {stage: now - last for stage, last in self._beats.items()}

    def stale(self) -> list[str]:
        """Registered stages silent for ``interval`` seconds or more, sorted."""
        if self._interval is None:
            return []
        limit = self._interval
        return sorted(stage for stage, age in self.ages().items() if age >= limit)

    def tick(self) -> bool:
        """Ping systemd if every stage is fresh; return whether WATCHDOG=1 was sent."""
        if self._interval is None:
            return False
        if self._dead:
            return False
        if self._graces:
            # Withheld without a word: the raised timeout is the deadline for now.
            return False
        stale = tuple(self.stale())
        if stale != self._stalled:
            if stale:
                # Logged on the transition only: this is the line to find in the journal
                # after systemd reports "Watchdog timeout".
                ages = self.ages()
                _log.error("watchdog withheld: pipeline stage stalled",
                           stages=list(stale),
                           silent_s={s: round(ages.get(s, 0.0), 1) for s in stale})
            else:
                _log.info("watchdog resumed: all stages healthy again")
            self._stalled = stale
        if stale:
            return False
        return self._notifier.watchdog()

    @contextlib.contextmanager
    def grace(self, seconds: float) -> Iterator[None]:
        """Allow one known-long call (e.g. an index build holding the GIL) ``seconds``.

        Raises systemd's watchdog timeout (WATCHDOG_USEC) for the duration and withholds
        pings meanwhile, so a call that outlives ``seconds`` still gets the service
        restarted. Afterwards restores the timeout and counts every stage as fresh, since
        a GIL-holding call freezes them all. Usage::

            with gate.grace(600):
                store.maybe_build_index()
        """
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        if self._interval is None:
            yield
            return
        with self._lock:
            self._graces += 1
        self._notifier.set_watchdog_timeout(int(seconds * 1_000_000))
        try:
            yield
        finally:
            now = self._clock()
            with self._lock:
                self._graces -= 1
                for stage in self._beats:
                    self._beats[stage] = now
            self._notifier.set_watchdog_timeout(int(self._interval * 1_000_000))

    def start(self) -> None:
        """Tick now and then every ``interval / 2`` seconds on a daemon thread."""
        if self._interval is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="repd-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the ticking thread and wait for it (at most ``timeout`` seconds)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        assert self._interval is not None
        period = self._interval / 2
        while True:
            try:
                self.tick()
            except Exception:
                # A bug here must not silently stop the pings and get a healthy daemon killed.
                _log.exception("watchdog tick failed")
            if self._stop.wait(period):
                return
